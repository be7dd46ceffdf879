"""The audit trail: one JSON object per line, with UIDs and AE titles but never patient data.

Every association decision and every stored or rejected instance is recorded, so that
"who sent what, when, and what did we do with it" can be answered from the file alone
(in the spirit of the audit messages of PS3.15 Annex A.5, kept local and simple). Fields
are checked against an allow-list, so a patient name or ID cannot slip in through a
careless call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
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


class AuditLog:
    """Append-only JSON-lines audit file (``<data_dir>/audit/audit.jsonl``).

    Parameters
    ----------
    path
        The file; its folder is created. Lines are appended with ``O_APPEND`` and
        flushed per record, so concurrent associations never interleave within a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

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

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            if not self._file.closed:
                self._file.close()


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Read every record of an audit file (for tests and tools)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
