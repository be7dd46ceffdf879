"""Fixtures shared by the whole suite.

Real data lives beside the checkout in ``../shared/data`` (see its README). Tests that
need it use :func:`shared_data`; a missing folder fails the test rather than skipping
it, so a CI run without the data can never pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    override = os.environ.get("RADNODE_SHARED_DATA")
    if override:
        return Path(override)
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real test data folder (``../shared/data``)."""
    path = _shared_data_dir()
    if not (path / "README.md").is_file():
        pytest.fail(f"real test data not found at {path}; set RADNODE_SHARED_DATA")
    return path
