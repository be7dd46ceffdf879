"""Move an embedded SQLite node's job queue and outbox into PostgreSQL (``radnode db migrate``).

Every job keeps its id, state, attempt history, phases and results, so ``radnode jobs``
and the outbox (which refers to jobs by id) read the same after the move. Jobs that were
``running`` keep their old lease; on PostgreSQL the node's lease recovery puts them back
in the queue once it has run out, like any job of a lost worker.

The outbox's rows (objects, items with their ids and states, attempts, review decisions,
destination health) move too; the object files they point to stay in the node's data
folder, where the node -- the only sender -- reads them (see :mod:`radnode.pipeline.outbox`).
The series index and the audit trail move as well (:func:`migrate_index`).

The node must be stopped (its pipeline lock is checked), and the target must hold no jobs
and no outbox rows yet: a migration never merges two queues or two outboxes. Both are
checked before anything is copied. Jobs and outbox rows are copied in two transactions (the
stores open their own connections); should the second fail, the target is recreated empty
and the migration run again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radnode.pipeline.outbox import OUTBOX_DB, Outbox
from radnode.pipeline.pg_queue import DEFAULT_QUEUE, PostgresJobQueue
from radnode.pipeline.queue import QUEUE_FILE

log = logging.getLogger(__name__)

#: Columns copied from the SQLite ``jobs`` table, in order.
JOB_COLUMNS = (
    "id", "series_uid", "study_uid", "input_path", "pipeline_version", "source", "profile", "destinations",
    "instance_count", "calling_ae", "priority", "state", "attempts", "max_attempts", "budget", "created_at",
    "updated_at", "started_at", "finished_at", "not_before", "lease_until", "worker_id", "reason", "error",
    "traceback", "phases", "result", "kind",
)
ATTEMPT_COLUMNS = ("job_id", "attempt", "worker_id", "started_at", "finished_at", "outcome", "reason", "error")


class MigrationError(RuntimeError):
    """The migration cannot run (node running, no queue, target not empty)."""


@dataclass(frozen=True)
class MigrationReport:
    jobs: int
    attempts: int
    outbox_items: int = 0


def _check_node_stopped(data_dir: Path, roles: Iterable[str] | None = None) -> None:
    """Refuse while any radnode process holds one of ``roles`` on ``data_dir`` (its role locks).

    The queue needs the pipeline roles stopped (default); the index also the listener.
    """
    from radnode.service.roles import PIPELINE_ROLES, RoleBusy, RoleLocks

    locks = RoleLocks(data_dir)
    try:
        locks.acquire(PIPELINE_ROLES if roles is None else roles)
    except RoleBusy as exc:
        raise MigrationError(f"the node is running on {data_dir}; stop it first ({exc})") from exc
    finally:
        locks.release()


def migrate_queue(data_dir: Path, url: str, profile_queues: dict[str, str] | None = None, default_queue: str = DEFAULT_QUEUE) -> MigrationReport:
    """Copy ``<data_dir>/jobs.sqlite`` into the PostgreSQL database at ``url``."""
    data_dir = Path(data_dir).resolve()
    source = data_dir / QUEUE_FILE
    if not source.is_file():
        raise MigrationError(f"no job queue at {source}: nothing to migrate")
    _check_node_stopped(data_dir)
    target = PostgresJobQueue(url)  # creates the schema
    target_outbox = Outbox(data_dir, database_url=url)
    lanes = dict(profile_queues or {})
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    src.row_factory = sqlite3.Row
    try:
        columns = {row["name"] for row in src.execute("PRAGMA table_info(jobs)")}
        jobs = src.execute(f"SELECT {', '.join(c if c in columns else repr('process') + ' AS kind' for c in JOB_COLUMNS)} FROM jobs ORDER BY id").fetchall()
        attempts = src.execute(f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM job_attempts ORDER BY job_id, attempt").fetchall()
    finally:
        src.close()
    with target.store.write() as conn:
        if conn.execute("SELECT COUNT(*) AS n FROM jobs").fetchone()["n"]:
            raise MigrationError("the target database already holds jobs; migrate into an empty database")
        if not target_outbox.is_empty():  # checked before any job is copied
            raise MigrationError("the target database already holds outbox rows; migrate into an empty database")
        conn.executemany(
            f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}, queue) OVERRIDING SYSTEM VALUE "
            f"VALUES ({', '.join('?' * (len(JOB_COLUMNS) + 1))})",
            [(*tuple(row), "node" if row["kind"] == "forward" else lanes.get(row["profile"], default_queue)) for row in jobs],
        )
        conn.executemany(
            f"INSERT INTO job_attempts ({', '.join(ATTEMPT_COLUMNS)}) VALUES ({', '.join('?' * len(ATTEMPT_COLUMNS))})",
            [tuple(row) for row in attempts],
        )
        # new jobs continue after the highest migrated id
        conn.execute("SELECT setval(pg_get_serial_sequence('jobs', 'id'), GREATEST((SELECT MAX(id) FROM jobs), 1))")
    outbox_items = 0
    if (data_dir / OUTBOX_DB).is_file():
        try:
            copied = target_outbox.copy_from(Outbox(data_dir))
        except ValueError as exc:
            raise MigrationError(str(exc)) from exc
        outbox_items = copied["items"]
    log.info("migrated %d job(s), %d attempt(s) and %d outbox item(s) from %s", len(jobs), len(attempts), outbox_items, data_dir)
    return MigrationReport(len(jobs), len(attempts), outbox_items)


# --- series index and audit trail ------------------------------------------------------------

#: Index tables copied, in an order that satisfies no constraint but reads naturally.
INDEX_COPY_TABLES = ("meta", "series", "instances", "completion_failures")


@dataclass(frozen=True)
class IndexMigrationReport:
    instances: int
    series: int
    completion_failures: int
    audit_records: int


def check_index_target(url: str) -> None:
    """Refuse a target whose series index already holds rows (checked before anything is copied)."""
    from radnode.node.index import postgres_index_store

    with postgres_index_store(url).connect() as conn:
        _refuse_a_held_index(conn)


def _refuse_a_held_index(conn: Any) -> None:
    """Raise :class:`MigrationError` when the target's index tables hold any row."""
    from radnode.node.index import POSTGRES_TABLES

    for name in ("instances", "series"):
        if conn.execute(f"SELECT 1 FROM {POSTGRES_TABLES[name]} LIMIT 1").fetchone() is not None:
            raise MigrationError("the target database already holds a series index; migrate into an empty database")


def migrate_index(data_dir: Path, url: str) -> IndexMigrationReport:
    """Copy the series index (``radnode.sqlite``) and the audit file into PostgreSQL, in one transaction.

    Rows keep every column, so series states, rounds and timers carry on where they were;
    audit records keep their time and order (they are appended after any the target has).
    """
    from radnode.node.audit import AUDIT_TABLE, audit_store, read_audit
    from radnode.node.index import POSTGRES_TABLES, postgres_index_store
    from radnode.node.storage import AUDIT_FILE, INDEX_FILE
    from radnode.service.roles import ALL_ROLES

    data_dir = Path(data_dir).resolve()
    _check_node_stopped(data_dir, ALL_ROLES)  # the listener writes the index
    source = data_dir / INDEX_FILE
    copied: dict[str, tuple[list[str], list[tuple[object, ...]]]] = {}
    if source.is_file():
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            for table in INDEX_COPY_TABLES:
                cursor = src.execute(f"SELECT * FROM {table}")
                copied[table] = ([c[0] for c in cursor.description], [tuple(r) for r in cursor.fetchall()])
        finally:
            src.close()
    audit_file = data_dir / AUDIT_FILE
    records = read_audit(audit_file) if audit_file.is_file() else []
    audit_store(url)  # creates the audit table
    store = postgres_index_store(url)
    with store.write() as conn:
        _refuse_a_held_index(conn)  # again inside the transaction: nobody filled it meanwhile
        for table, (columns, rows) in copied.items():
            if rows:
                conn.executemany(
                    f"INSERT INTO {POSTGRES_TABLES[table]} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                    "ON CONFLICT DO NOTHING",
                    rows,
                )
        if records:
            conn.executemany(
                f"INSERT INTO {AUDIT_TABLE} (id, time, event, fields) VALUES (?, ?, ?, ?)",
                [
                    (uuid.uuid4().hex, r.get("time", ""), r.get("event", ""),
                     json.dumps({k: v for k, v in r.items() if k not in ("time", "event")}))
                    for r in records
                ],
            )
    report = IndexMigrationReport(
        instances=len(copied.get("instances", ((), []))[1]),
        series=len(copied.get("series", ((), []))[1]),
        completion_failures=len(copied.get("completion_failures", ((), []))[1]),
        audit_records=len(records),
    )
    log.info(
        "migrated %d series, %d instance row(s) and %d audit record(s) from %s",
        report.series, report.instances, report.audit_records, data_dir,
    )
    return report
