"""The audit trail: one JSON object per line, with UIDs and AE titles but never patient data.

Every association decision and every stored or rejected instance is recorded, so that
"who sent what, when, and what did we do with it" can be answered from the file alone
(in the spirit of the audit messages of PS3.15 Annex A.5, kept local and simple). Fields
are checked against an allow-list, so a patient name or ID cannot slip in through a
careless call.

With ``database.url`` every record also goes to the append-only ``audit_events`` table of
the shared PostgreSQL database, so the trail of all nodes and the dashboard can be
queried in one place. The local file stays the primary copy, written first and
synchronously, for two reasons: an audit record must never cost a C-STORE (the database
may be restarting or unreachable, and the listener must keep accepting), and the file
is what survives when the database does not. Records reach the table from a background
thread in batches; while the database is away they wait in memory (up to
:data:`MAX_PENDING`, beyond which the oldest are left to the file alone, with a warning)
and are written when it is back. Each record carries a random id, so a batch written
twice after a lost acknowledgement is stored once; a sequence number keeps the order written.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import uuid
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)

#: The only fields an audit record may carry. UIDs, AE titles, addresses, sizes, statuses,
#: reasons; deliberately nothing that identifies a patient.
AUDIT_FIELDS = frozenset(
    {
        "calling_ae",
        "called_ae",
        "peer_address",
        "peer_port",
        "tls",
        "result",
        "source",
        "reason",
        "status",
        "error_comment",
        "sop_class_uid",
        "sop_instance_uid",
        "series_instance_uid",
        "study_instance_uid",
        "transfer_syntax_uid",
        "version",
        "size",
        "path",
        "quarantine_file",
        "round",
        "instance_count",
        "expected_count",
        "state",
        "outcome",
        "detail",
    }
)


#: Table of the audit trail in PostgreSQL (the node's role may only SELECT and INSERT).
AUDIT_TABLE = "audit_events"
_AUDIT_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    id     TEXT NOT NULL UNIQUE,
    time   TEXT NOT NULL,
    event  TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS {AUDIT_TABLE}_by_time ON {AUDIT_TABLE} (time);
"""
#: Records waiting for the database at most; older ones are then kept in the file only.
MAX_PENDING = 100_000
#: Records per INSERT batch.
_BATCH = 500


class AuditLog:
    """Append-only JSON-lines audit file (``<data_dir>/audit/audit.jsonl``), and with a
    database URL the ``audit_events`` table too (see the module docstring).

    Parameters
    ----------
    path
        The file; its folder is created. Lines are appended with ``O_APPEND`` and
        flushed per record, so concurrent associations never interleave within a line.
    database_url
        ``database.url``: a ``postgresql://`` URL also sends every record there.
    retry_seconds
        How long the background writer waits between tries while the database is away.
    """

    def __init__(self, path: Path, database_url: str | None = None, retry_seconds: float = 5.0) -> None:
        from radnode.pipeline.database import is_postgres_url

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        self._db: _DatabaseWriter | None = None
        if is_postgres_url(database_url):
            self._db = _DatabaseWriter(str(database_url), retry_seconds)

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; ``fields`` must be in :data:`AUDIT_FIELDS`.

        Raises
        ------
        ValueError
            For a field outside the allow-list (a programming error, caught in tests).
        """
        unknown = sorted(set(fields) - AUDIT_FIELDS)
        if unknown:
            raise ValueError(f"audit field(s) {unknown} not allowed; allowed: {sorted(AUDIT_FIELDS)}")
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, sort_keys=False, default=str)
        with self._lock:
            if self._file.closed:
                LOGGER.warning("audit log closed; dropped %s record", event)
                return
            self._file.write(line + "\n")
        if self._db is not None:
            self._db.put(entry)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record reached the database; False if some still wait (or no database)."""
        return self._db.flush(timeout) if self._db is not None else False

    def close(self, timeout: float = 5.0) -> None:
        """Flush and close the file; give the database writer ``timeout`` seconds to finish."""
        with self._lock:
            if not self._file.closed:
                self._file.close()
        if self._db is not None:
            self._db.close(timeout)


class _DatabaseWriter:
    """Sends audit records to PostgreSQL from one background thread, never blocking the caller."""

    def __init__(self, url: str, retry_seconds: float) -> None:
        self.url = url
        self.retry_seconds = retry_seconds
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self._dropped = 0
        self._store: Any = None
        self._conn: Any = None
        self._conn_stack: ExitStack | None = None
        self._thread = threading.Thread(target=self._run, name="audit-db", daemon=True)
        self._thread.start()

    def put(self, entry: dict[str, Any]) -> None:
        with self._cv:
            if len(self._pending) >= MAX_PENDING:
                self._pending.popleft()
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 10_000 == 0:
                    LOGGER.warning(
                        "audit database unreachable: %d record(s) kept only in the audit file", self._dropped
                    )
            self._pending.append({"id": uuid.uuid4().hex, **entry})
            self._cv.notify_all()

    def flush(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float) -> None:
        with self._cv:
            self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)
            self._stopping = True
            left = len(self._pending)
            self._cv.notify_all()
        if left:
            LOGGER.warning("%d audit record(s) not written to the database (they are in the audit file)", left)
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        failing = False
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stopping)
                if self._stopping:
                    self._disconnect()
                    return
                batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                self._busy = True
            try:
                self._write(batch)
            except Exception as exc:  # the database is away: keep the batch, try again later
                with self._cv:
                    self._pending.extendleft(reversed(batch))
                    self._busy = False
                    self._cv.notify_all()
                if not failing:
                    LOGGER.warning(
                        "audit database unreachable (%s); records wait and stay in the audit file",
                        type(exc).__name__,
                    )
                failing = True
                with self._cv:
                    self._cv.wait_for(lambda: self._stopping, self.retry_seconds)
                continue
            if failing:
                LOGGER.info("audit database reachable again")
                failing = False
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        # One connection kept for the thread's life: records come one at a time at ingest
        # rates, and a connection per batch would start a server process per record.
        if self._conn is None:
            if self._store is None:
                self._store = audit_store(self.url)
            stack = ExitStack()
            self._conn = stack.enter_context(self._store.connect())
            self._conn_stack = stack
        try:
            self._conn.executemany(
                f"INSERT INTO {AUDIT_TABLE} (id, time, event, fields) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [_row(entry) for entry in batch],
            )
        except Exception:
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        if self._conn_stack is not None:
            try:
                self._conn_stack.close()
            except Exception:  # already broken
                pass
        self._conn, self._conn_stack = None, None


def _row(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    fields = {k: v for k, v in entry.items() if k not in ("id", "time", "event")}
    return entry["id"], entry["time"], entry["event"], json.dumps(fields, default=str)


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Read every record of an audit file (for tests and tools)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def audit_store(url: str) -> Any:
    """The ``audit_events`` table at ``url`` (created when missing), a :class:`radnode.sqlstore.PostgresStore`."""
    from radnode.sqlstore import PostgresStore

    return PostgresStore(url, _AUDIT_SCHEMA, AUDIT_TABLE, "audit")


def read_audit_db(url: str) -> list[dict[str, Any]]:
    """Read every record of the ``audit_events`` table in the order written, shaped like a line of the file."""
    with audit_store(url).connect() as conn:
        rows = conn.execute(f"SELECT time, event, fields FROM {AUDIT_TABLE} ORDER BY seq").fetchall()
    return [{"time": row[0], "event": row[1], **json.loads(row[2])} for row in rows]
