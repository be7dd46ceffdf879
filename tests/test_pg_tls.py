"""TLS to PostgreSQL: ``database.url`` with ``sslmode=verify-full`` against a real TLS-only server.

A separate throw-away cluster with ``ssl = on``, a certificate from a test CA and a
``pg_hba.conf`` that accepts radnode's role only over TLS with a SCRAM password -- the
layout docs/operations.md recommends. The stores connect through the URL alone; a
plain-text connection and a server whose certificate the configured CA did not sign are
refused with libpq's own message.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pg_support import PgCluster, give_to_server, start_cluster
from radnode.config.model import Settings
from radnode.pipeline.database import PostgresDB, redact
from radnode.pipeline.jobs import JobSpec
from radnode.pipeline.queue import open_queue
from test_node_ingest import _make_pki

PASSWORD = "s3cret-for-tls-test"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, dict[str, Path]]]:
    pki = _make_pki(tmp_path_factory.mktemp("pgtls") / "pki")

    def configure(cluster: PgCluster) -> None:
        for name in ("srv.crt", "srv.key"):
            target = cluster.root / name
            shutil.copy(pki[name], target)
            give_to_server(target)
        (cluster.data / "pg_hba.conf").write_text(
            "hostssl all postgres 127.0.0.1/32 trust\n"
            "hostssl all all      127.0.0.1/32 scram-sha-256\n"
        )

    try:
        cluster, root = start_cluster(
            "-c ssl=on -c ssl_cert_file=../srv.crt -c ssl_key_file=../srv.key", configure=configure
        )
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(f"PostgreSQL is needed for this test and could not be started: {exc}")
    try:
        with psycopg.connect(cluster.url() + "?sslmode=require", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE radnode_node LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE radnode OWNER radnode_node")
        yield cluster, pki
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _url(cluster: PgCluster, query: str) -> str:
    return f"postgresql://radnode_node:{PASSWORD}@127.0.0.1:{cluster.port}/radnode?{query}"


def test_the_queue_runs_over_verified_tls_from_the_url_alone(tls_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, pki = tls_cluster
    url = _url(cluster, f"sslmode=verify-full&sslrootcert={pki['ca.crt']}")
    settings = Settings(database={"url": url}, storage={"data_dir": tmp_path / "data"})
    queue = open_queue(tmp_path / "data", settings.database.url)
    job = queue.enqueue(JobSpec(series_uid="1.2.3", input_path=tmp_path / "in", pipeline_version="1"))
    assert queue.get(job.id).series_uid == "1.2.3"
    with psycopg.connect(url) as conn:
        ssl, version = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert ssl is True and version.startswith("TLS")


def test_plain_text_is_refused_by_the_server(tls_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster, _ = tls_cluster
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        PostgresDB(_url(cluster, "sslmode=disable"), "", "jobs", retry_seconds=0)


def test_a_server_certificate_from_another_ca_is_refused(tls_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cluster, _ = tls_cluster
    other = _make_pki(tmp_path / "other")
    url = _url(cluster, f"sslmode=verify-full&sslrootcert={other['ca.crt']}")
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        PostgresDB(url, "", "jobs", retry_seconds=0)
    assert PASSWORD not in redact(url)
