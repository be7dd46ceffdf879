"""What the node and its remote workers share in PostgreSQL besides the jobs.

Three small tables, next to the job queue of :mod:`radnode.pipeline.pg_queue`:

``radnode_nodes``
    Where the node is: AE title, host and port of its DICOM listener, its pipeline
    version and model checksum. A ``radnode worker`` needs nothing but ``database.url``;
    it reads this row to know whom to C-GET a series from.
``radnode_workers``
    One row per worker process, refreshed with every heartbeat: host, queues, device,
    current job, version. ``radnode status`` lists them.
``radnode_results``
    The hand-back of results. A remote worker never talks to a PACS or TPS: it stores the
    finished phase of a job -- its output folder as a tar archive and the names of the
    objects it handed over -- keyed by (job, phase). The node unpacks the row into its
    result folder and stages it into *its* outbox (which then delivers, once per object
    and destination); the row is marked staged in the same step. A worker that re-runs a
    job after a crash writes the same key again with objects of the same UIDs; a row the
    node already staged is never replaced, and re-staging an identical object adds nothing
    to the outbox.

Why a hand-over table and not workers writing into the outbox: the outbox's rows are shared
too (its ``outbox_*`` tables in the same database, see :mod:`radnode.pipeline.outbox`), but
its object files live on the node, the only sender. A worker cannot put a file there, and
staging decides destinations and review holds from the node's configuration; so a worker
hands the finished phase over here and the node stages it into the shared outbox.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radnode.pipeline.database import PostgresDB

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS radnode_nodes (
    name             TEXT PRIMARY KEY,
    ae_title         TEXT NOT NULL,
    host             TEXT NOT NULL,
    port             INTEGER NOT NULL,
    pipeline_version TEXT NOT NULL,
    bundle_sha256    TEXT,
    tls              BOOLEAN NOT NULL DEFAULT false,
    updated_at       DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS radnode_workers (
    worker_id        TEXT PRIMARY KEY,
    host             TEXT NOT NULL,
    queues           TEXT NOT NULL,
    device           TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    bundle_sha256    TEXT,
    current_job      BIGINT,
    started_at       DOUBLE PRECISION NOT NULL,
    last_heartbeat   DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS radnode_results (
    job_id      BIGINT NOT NULL,
    phase       TEXT   NOT NULL,
    worker_id   TEXT   NOT NULL,
    files       TEXT   NOT NULL,
    archive     BYTEA  NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    staged_at   DOUBLE PRECISION,
    PRIMARY KEY (job_id, phase)
);
CREATE INDEX IF NOT EXISTS radnode_results_pending ON radnode_results (created_at) WHERE staged_at IS NULL;
"""

_NOW = "extract(epoch FROM clock_timestamp())"


@dataclass(frozen=True)
class NodeAddress:
    """The node's DICOM listener as registered in the database."""

    name: str
    ae_title: str
    host: str
    port: int
    pipeline_version: str
    bundle_sha256: str | None
    updated_at: float
    tls: bool = False


@dataclass(frozen=True)
class HandedBack:
    """One finished phase of a job waiting for (or already given to) the node's outbox."""

    job_id: int
    phase: str
    worker_id: str
    files: list[str]
    archive: bytes


def pack_folder(folder: Path) -> bytes:
    """``folder`` as an uncompressed tar (DICOM pixel data rarely compresses well)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def unpack_into(archive: bytes, folder: Path) -> None:
    """Extract a :func:`pack_folder` archive; names leaving ``folder`` are refused (tar ``data`` filter)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        tar.extractall(folder, filter="data")


class SharedState:
    """Node registry, worker registry and result hand-back in one PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self._db = PostgresDB(url, _SCHEMA, "radnode_results")

    # -- node -----------------------------------------------------------------------------

    def register_node(
        self, name: str, ae_title: str, host: str, port: int, pipeline_version: str, bundle_sha256: str | None, tls: bool = False
    ) -> None:
        with self._db.connect() as conn:
            conn.execute(
                "INSERT INTO radnode_nodes (name, ae_title, host, port, pipeline_version, bundle_sha256, tls, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (name) DO UPDATE SET ae_title = EXCLUDED.ae_title, "
                "host = EXCLUDED.host, port = EXCLUDED.port, pipeline_version = EXCLUDED.pipeline_version, "
                "bundle_sha256 = EXCLUDED.bundle_sha256, tls = EXCLUDED.tls, updated_at = EXCLUDED.updated_at",
                (name, ae_title, host, port, pipeline_version, bundle_sha256, tls),
            )

    def node(self) -> NodeAddress | None:
        """The most recently registered node (one node per database)."""
        with self._db.connect() as conn:
            row = conn.execute("SELECT * FROM radnode_nodes ORDER BY updated_at DESC LIMIT 1").fetchone()
        return NodeAddress(**row) if row is not None else None

    # -- workers --------------------------------------------------------------------------

    def worker_beat(
        self, worker_id: str, host: str, queues: list[str], device: str, pipeline_version: str,
        bundle_sha256: str | None, current_job: int | None,
    ) -> None:
        with self._db.connect() as conn:
            conn.execute(
                "INSERT INTO radnode_workers (worker_id, host, queues, device, pipeline_version, bundle_sha256, "
                f"current_job, started_at, last_heartbeat) VALUES (%s, %s, %s, %s, %s, %s, %s, {_NOW}, {_NOW}) "
                "ON CONFLICT (worker_id) DO UPDATE SET current_job = EXCLUDED.current_job, "
                "last_heartbeat = EXCLUDED.last_heartbeat, queues = EXCLUDED.queues, device = EXCLUDED.device",
                (worker_id, host, ",".join(queues), device, pipeline_version, bundle_sha256, current_job),
            )

    def workers(self) -> list[dict[str, Any]]:
        """Every worker seen, newest heartbeat first, with ``age_seconds`` since that heartbeat."""
        with self._db.connect() as conn:
            rows = conn.execute(
                f"SELECT *, {_NOW} - last_heartbeat AS age_seconds FROM radnode_workers ORDER BY last_heartbeat DESC"
            ).fetchall()
        return [dict(r) for r in rows]

    # -- results --------------------------------------------------------------------------

    def hand_back(self, job_id: int, phase: str, worker_id: str, folder: Path, files: list[Path]) -> None:
        """Store one finished phase (idempotent; a staged row is never replaced)."""
        names = [str(Path(f).resolve().relative_to(Path(folder).resolve())) for f in files]
        archive = pack_folder(folder)
        with self._db.connect() as conn:
            conn.execute(
                "INSERT INTO radnode_results (job_id, phase, worker_id, files, archive, created_at) "
                f"VALUES (%s, %s, %s, %s, %s, {_NOW}) ON CONFLICT (job_id, phase) DO UPDATE SET "
                "worker_id = EXCLUDED.worker_id, files = EXCLUDED.files, archive = EXCLUDED.archive, "
                "created_at = EXCLUDED.created_at WHERE radnode_results.staged_at IS NULL",
                (job_id, phase, worker_id, json.dumps(names), archive),
            )
        log.info("job %d phase %s: %d object(s) handed back to the node (%d bytes)", job_id, phase, len(names), len(archive))

    def pending_results(self, limit: int = 20) -> list[HandedBack]:
        """Handed-back phases the node has not staged yet, oldest first."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT job_id, phase, worker_id, files, archive FROM radnode_results WHERE staged_at IS NULL "
                "ORDER BY created_at LIMIT %s",
                (limit,),
            ).fetchall()
        return [HandedBack(r["job_id"], r["phase"], r["worker_id"], json.loads(r["files"]), bytes(r["archive"])) for r in rows]

    def mark_staged(self, job_id: int, phase: str) -> None:
        with self._db.connect() as conn:
            conn.execute(
                f"UPDATE radnode_results SET staged_at = {_NOW}, archive = ''::bytea WHERE job_id = %s AND phase = %s",
                (job_id, phase),
            )

    def pending_count(self) -> int:
        with self._db.connect() as conn:
            return int(conn.execute("SELECT COUNT(*) AS n FROM radnode_results WHERE staged_at IS NULL").fetchone()["n"])
