"""Quarantine is bounded: size and count caps drop the oldest items (audited), and each
sender (calling AE + host) has a rate beyond which its rejected data is not kept."""

from __future__ import annotations

import json
from pathlib import Path

from radnode.config.model import StorageSettings
from radnode.node import status
from radnode.node.audit import AuditLog, read_audit
from radnode.node.index import NodeIndex
from radnode.node.ingest import Ingestor, StoreRequest
from radnode.node.quarantine import Quarantine
from radnode.node.storage import InstanceStore

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ingestor(tmp_path: Path, **limits: int) -> tuple[Ingestor, Quarantine, FakeClock, Path]:
    data = tmp_path / "data"
    store = InstanceStore(data, min_free_gb=0)
    clock = FakeClock()
    settings = {"max_bytes": 10**9, "max_items": 1000, "per_minute": 1000} | limits
    quarantine = Quarantine(store, clock=clock, **settings)
    audit_path = data / "audit.jsonl"
    ingestor = Ingestor(store, NodeIndex(data / "index.sqlite"), AuditLog(audit_path), quarantine=quarantine)
    return ingestor, quarantine, clock, audit_path


def _garbage(n: int, calling_ae: str = "SENDER", peer: str = "10.0.0.1", size: int = 1000) -> StoreRequest:
    """A C-STORE whose data set holds none of the required UIDs (rejected 0xC002, quarantined)."""
    body = bytes([0xFF, 0xFF]) + bytes((n + i) % 251 for i in range(size - 2))
    return StoreRequest(CT_IMAGE_STORAGE, f"1.2.3.{n}", EXPLICIT_LE, calling_ae, peer, (body,))


def _kept_uids(data: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["command_sop_instance_uid"] for p in (data / "quarantine").glob("*.json"))


def test_count_cap_drops_the_oldest_and_audits_it(tmp_path: Path) -> None:
    ingestor, quarantine, _clock, audit_path = _ingestor(tmp_path, max_items=3)
    outcomes = [ingestor.ingest(_garbage(n)) for n in range(1, 6)]
    assert all(o.status == status.MISSING_ATTRIBUTE and o.outcome == "rejected" for o in outcomes)
    data = tmp_path / "data"
    assert _kept_uids(data) == ["1.2.3.3", "1.2.3.4", "1.2.3.5"]
    assert len(list((data / "quarantine").glob("*.dcm"))) == 3
    dropped = [r for r in read_audit(audit_path) if r["event"] == "quarantine-dropped"]
    assert [r["quarantine_file"] for r in dropped] == [outcomes[0].quarantine_file.stem, outcomes[1].quarantine_file.stem]
    assert all(r["reason"] == "quarantine-cap" for r in dropped)
    assert quarantine.size[0] == 3


def test_size_cap_drops_the_oldest_until_it_fits(tmp_path: Path) -> None:
    # One item is the Part 10 file (~1.2 kB) plus its JSON reason (~0.7 kB): two fit, three do not.
    ingestor, quarantine, _clock, _audit = _ingestor(tmp_path, max_bytes=5_000)
    for n in range(1, 5):
        ingestor.ingest(_garbage(n))
    data = tmp_path / "data"
    on_disk = sum(p.stat().st_size for p in (data / "quarantine").iterdir())
    assert on_disk <= 5_000 and quarantine.size == (len(_kept_uids(data)), on_disk)
    assert _kept_uids(data)[-1] == "1.2.3.4" and "1.2.3.1" not in _kept_uids(data)
    # A restart counts what is there (the caps hold across restarts).
    again = Quarantine(InstanceStore(data, min_free_gb=0), max_bytes=5_000, max_items=10, per_minute=10)
    assert again.size == quarantine.size


def test_rejections_are_rate_limited_per_sender(tmp_path: Path) -> None:
    ingestor, _quarantine, clock, audit_path = _ingestor(tmp_path, per_minute=2)
    flood = [ingestor.ingest(_garbage(n, "FLOOD", "10.0.0.9")) for n in range(1, 6)]
    # Every request is still answered with its failure status ...
    assert [o.status for o in flood] == [status.MISSING_ATTRIBUTE] * 5
    # ... but only the first two are kept; the rest are audited as rate-limited.
    assert [o.quarantine_file is not None for o in flood] == [True, True, False, False, False]
    rejected = [r for r in read_audit(audit_path) if r["event"] == "instance-rejected"]
    assert len(rejected) == 5 and [r.get("detail") for r in rejected].count("rate-limited") == 3
    # Another sender (other AE, or the same AE from another host) is not held back by the flood.
    assert ingestor.ingest(_garbage(10, "OTHER", "10.0.0.9")).quarantine_file is not None
    assert ingestor.ingest(_garbage(11, "FLOOD", "10.0.0.10")).quarantine_file is not None
    # After the window, the flooding sender's rejections are kept again.
    clock.now += 61
    assert ingestor.ingest(_garbage(12, "FLOOD", "10.0.0.9")).quarantine_file is not None
    assert _kept_uids(tmp_path / "data") == ["1.2.3.1", "1.2.3.10", "1.2.3.11", "1.2.3.12", "1.2.3.2"]


def test_limits_come_from_the_storage_settings(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "data", min_free_gb=0)
    storage = StorageSettings(quarantine_max_gb=0.5, quarantine_max_items=7, quarantine_per_minute=4)
    quarantine = Quarantine.from_settings(store, storage)
    assert (quarantine.max_bytes, quarantine.max_items, quarantine.per_minute) == (500_000_000, 7, 4)
    # per_minute 0: nothing rejected is kept, and it is still answered.
    ingestor = Ingestor(
        store, NodeIndex(tmp_path / "index.sqlite"), AuditLog(tmp_path / "audit.jsonl"),
        quarantine=Quarantine.from_settings(store, StorageSettings(quarantine_per_minute=0)),
    )
    outcome = ingestor.ingest(_garbage(1))
    assert outcome.status == status.MISSING_ATTRIBUTE and outcome.quarantine_file is None
    assert list((tmp_path / "data" / "quarantine").iterdir()) == []
