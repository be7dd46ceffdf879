"""The series index's two backends as one fixture: tests written once run on the SQLite
file and on PostgreSQL (a fresh database of the session's throw-away cluster)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pg_support import PgCluster
from radnode.node.index import NodeIndex


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest) -> str | None:
    """``database.url`` of the backend under test: ``None`` (SQLite file) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database("i")


@pytest.fixture
def open_index(index_url: str | None, tmp_path: Path) -> Callable[..., NodeIndex]:
    """Opens a :class:`NodeIndex` on the backend under test; every call is another object on the same store."""

    def make(**kwargs: object) -> NodeIndex:
        return NodeIndex(tmp_path / "index.sqlite", database_url=index_url, **kwargs)  # type: ignore[arg-type]

    return make
