"""Quarantine with bounds: rejected data is kept for inspection, but never fills the disk.

Any peer allowed to connect can send data the node rejects. Keeping every rejected item
would let one faulty or hostile sender fill the disk down to ``storage.min_free_gb``, at
which point the node refuses good data too. So quarantine is capped twice:

* **size and count** (``storage.quarantine_max_gb``, ``storage.quarantine_max_items``):
  after each new item the oldest items are dropped until both caps hold again; each drop
  is returned to the caller, which audits it;
* **rate per sender** (``storage.quarantine_per_minute``, per calling AE title and peer
  host): beyond it a rejection is still answered and audited, but its bytes are not kept,
  so a flood from one sender cannot push out what others' rejections left.

An item is a pair ``<stem>.dcm`` (the bytes, as a Part 10 file) and ``<stem>.json`` (the
reason); stems start with a UTC time stamp, so they sort oldest first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radnode.config.model import StorageSettings
from radnode.node.storage import InstanceStore

LOGGER = logging.getLogger(__name__)

_BYTES_PER_GB = 1_000_000_000
#: Window of the per-sender rate limit.
RATE_WINDOW_SECONDS = 60.0
#: Most senders tracked by the rate limit (the least recently seen are forgotten first).
_MAX_SENDERS = 10_000


@dataclass(frozen=True)
class Kept:
    """What :meth:`Quarantine.keep` did with one rejected item."""

    path: Path | None  # the data file, or None when not kept
    dropped: tuple[str, ...] = ()  # stems of older items removed to respect the caps
    rate_limited: bool = False  # not kept: the sender exceeded its rate


@dataclass
class _Sender:
    times: deque[float] = field(default_factory=deque)


class Quarantine:
    """Keeps rejected items in ``<data_dir>/quarantine`` within size, count and rate limits.

    Parameters
    ----------
    store
        Writes the files (durably, not below ``storage.min_free_gb``).
    max_bytes, max_items
        Caps over all items; the oldest are removed first.
    per_minute
        Items kept per sender per minute; 0 keeps none.
    clock
        Source of "now" for the rate limit (tests pass a fake one).
    """

    def __init__(
        self,
        store: InstanceStore,
        max_bytes: int,
        max_items: int,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.folder = store.quarantine_dir
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._senders: OrderedDict[tuple[str, str], _Sender] = OrderedDict()
        self._items: OrderedDict[str, int] = self._inventory()
        self._bytes = sum(self._items.values())

    @classmethod
    def from_settings(cls, store: InstanceStore, storage: StorageSettings | None = None) -> Quarantine:
        """Limits from the ``storage`` section (its defaults when ``None``)."""
        storage = storage or StorageSettings()
        return cls(
            store,
            max_bytes=int(storage.quarantine_max_gb * _BYTES_PER_GB),
            max_items=storage.quarantine_max_items,
            per_minute=storage.quarantine_per_minute,
        )

    @property
    def size(self) -> tuple[int, int]:
        """``(items, bytes)`` held now."""
        with self._lock:
            return len(self._items), self._bytes

    def _inventory(self) -> OrderedDict[str, int]:
        sizes: dict[str, int] = {}
        for path in self.folder.iterdir():
            if path.suffix in (".dcm", ".json") and not path.name.startswith("."):
                try:
                    sizes[path.stem] = sizes.get(path.stem, 0) + path.stat().st_size
                except FileNotFoundError:
                    continue
        return OrderedDict(sorted(sizes.items()))

    def _allowed(self, sender: tuple[str, str]) -> bool:
        now = self._clock()
        record = self._senders.pop(sender, None) or _Sender()
        self._senders[sender] = record  # most recently seen last
        while record.times and record.times[0] <= now - RATE_WINDOW_SECONDS:
            record.times.popleft()
        while len(self._senders) > _MAX_SENDERS:
            self._senders.popitem(last=False)
        if len(record.times) >= self.per_minute:
            return False
        record.times.append(now)
        return True

    def keep(self, parts: Sequence[bytes | memoryview], reason: dict[str, Any], calling_ae: str, host: str) -> Kept:
        """Keep one rejected item unless its sender is over the rate; enforce the caps."""
        with self._lock:
            if not self._allowed((calling_ae, host)):
                return Kept(None, rate_limited=True)
        path = self.store.quarantine(parts, reason)
        if path is None:
            return Kept(None)
        size = sum(p.stat().st_size for p in (path, path.with_suffix(".json")) if p.exists())
        dropped: list[str] = []
        with self._lock:
            self._items[path.stem] = size
            self._bytes += size
            while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
                stem, old_size = self._items.popitem(last=False)
                self._bytes -= old_size
                for suffix in (".dcm", ".json"):
                    (self.folder / f"{stem}{suffix}").unlink(missing_ok=True)
                dropped.append(stem)
        if path.stem in dropped:  # a cap of 0, or one item larger than the size cap
            return Kept(None, tuple(dropped))
        return Kept(path, tuple(dropped))
