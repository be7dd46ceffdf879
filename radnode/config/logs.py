"""Process-wide logging set-up from the ``logging`` settings.

Humans at a terminal get rich, coloured lines on stderr; services under journald or a log
shipper get one JSON object per line (``logging.json_format: true``). Message text is the
caller's responsibility: radnode logs UIDs, never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from radnode.config.model import LoggingSettings

#: Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """Format a record as one JSON object, keeping ``extra=`` fields such as ``job_id``."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(settings: LoggingSettings) -> None:
    """Install one stderr handler on the root logger (replacing earlier ones)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if settings.json_format:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLineFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.level)
    # pynetdicom logs every PDU at DEBUG and every association at INFO; keep it quieter.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
