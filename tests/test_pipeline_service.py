"""The service's intake: routing decisions turned into jobs, forwards and nothing, idempotent
against repeated announcements, with a new job for an updated series."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from radnode.config import Settings
from radnode.node.series_attributes import SeriesAttributes
from radnode.pipeline.jobs import JobKind, JobSource, JobState, Priority
from radnode.pipeline.outbox import ItemState
from radnode.pipeline.service import PipelineService
from radnode.service.roles import RoleBusy


@dataclass(frozen=True)
class Completed:
    """Shaped like :class:`radnode.node.completion.SeriesCompleted`."""

    series_instance_uid: str
    study_instance_uid: str
    instance_count: int
    calling_ae: str = "SCANNER1"
    modality: str | None = "CT"
    round: int = 1
    attributes: SeriesAttributes = field(default_factory=lambda: SeriesAttributes(None))

    @property
    def is_update(self) -> bool:
        return self.round > 1


class FakeCompletion:
    def __init__(self) -> None:
        self.processed: list[str] = []
        self.subscribers: list[Any] = []

    def subscribe(self, subscriber: Any) -> None:
        self.subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Any) -> None:
        self.subscribers.remove(subscriber)

    def pending(self) -> list[Any]:
        return [Completed("1.2.826.0.2.9", "1.2.826.0.2", 40)]

    def replay(self, subscriber: Any) -> int:
        for event in self.pending():
            subscriber(event)
        return len(self.pending())

    def mark_processed(self, series_instance_uid: str, now: float | None = None) -> bool:
        self.processed.append(series_instance_uid)
        return True

    def check_due(self, now: float | None = None) -> list[Any]:
        return []


def ct(uid: str, count: int = 60, **kwargs: Any) -> Completed:
    attributes = SeriesAttributes(uid, modality=kwargs.pop("modality", "CT"), manufacturer="SCANNER")
    return Completed(uid, "1.2.826.0.1", count, modality=attributes.modality, attributes=attributes, **kwargs)


@pytest.fixture
def service(tmp_path: Path) -> PipelineService:
    settings = Settings(
        storage={"data_dir": str(tmp_path / "data")},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}],
        routing=[
            {"name": "forward-mr", "match": {"modality": ["MR"]}, "action": "forward", "destinations": ["tps"]},
            {"name": "chest-ct", "match": {"modality": ["CT"], "min_instances": 20}, "action": "process", "profile": "lung"},
        ],
    )
    return PipelineService(settings, completion=FakeCompletion())


def test_a_complete_ct_series_becomes_one_live_job(service: PipelineService) -> None:
    job = service.on_series_complete(ct("1.2.826.0.1.1"))
    assert job is not None and job.state is JobState.QUEUED
    assert job.priority == Priority.LIVE and job.source is JobSource.LIVE and job.profile == "lung"
    assert job.input_path == service.data_dir / "incoming" / "1.2.826.0.1" / "1.2.826.0.1.1"
    assert job.instance_count == 60 and job.calling_ae == "SCANNER1"
    again = service.on_series_complete(ct("1.2.826.0.1.1"))  # announced twice (replay after restart)
    assert again is not None and again.id == job.id
    assert len(service.queue.list()) == 1


def test_non_matching_series_are_not_processed(service: PipelineService) -> None:
    completion = service.completion
    assert service.on_series_complete(ct("1.2.826.0.1.2", count=10)) is None  # below min_instances
    assert service.on_series_complete(ct("1.2.826.0.1.3", modality="SEG")) is None
    assert service.queue.list() == []
    assert completion.processed == ["1.2.826.0.1.2", "1.2.826.0.1.3"]  # type: ignore[union-attr]


def test_updates_and_replays(service: PipelineService) -> None:
    first = service.on_series_complete(ct("1.2.826.0.1.4"))
    assert first is not None
    claimed = service.queue.claim("w", 60)
    assert claimed is not None and claimed.id == first.id
    # More instances arrived while the job runs: the running job read the old set.
    update = service.on_series_complete(ct("1.2.826.0.1.4", count=64, round=2))
    assert update is not None and update.id != first.id and update.instance_count == 64
    service.queue.complete(first.id, "w", {})
    # A replay of the finished round adds nothing and marks the series processed.
    finished = ct("1.2.826.0.1.5")
    done = service.on_series_complete(finished)
    assert done is not None
    service.queue.claim("w", 60)  # the update job
    service.queue.claim("w", 60)
    service.queue.complete(done.id, "w", {})
    assert service.on_series_complete(finished).id == done.id  # type: ignore[union-attr]
    assert "1.2.826.0.1.5" in service.completion.processed  # type: ignore[union-attr]


def test_forward_rule_stages_the_series_unchanged(service: PipelineService, shared_data: Path) -> None:
    source = sorted((shared_data / "ibsi_ct_phantom" / "dicom" / "image").glob("*.dcm"))[:3]
    folder = service.series_folder("1.2.826.0.1", "1.2.826.0.1.6")
    folder.mkdir(parents=True)
    for path in source:
        shutil.copy(path, folder / path.name)
    event = ct("1.2.826.0.1.6", count=3, modality="MR")
    job = service.on_series_complete(event)
    # The completion thread only queues a forward job; nothing is staged yet.
    assert job is not None and job.kind is JobKind.FORWARD and job.state is JobState.QUEUED
    assert service.outbox.items() == [] and service.on_series_complete(event).id == job.id  # type: ignore[union-attr]
    assert service.queue.claim("w", 60) is None  # processing workers never take it
    assert service.forwarder.run_once()
    items = service.outbox.items()
    assert len(items) == 3 and {i.destination for i in items} == {"tps"}
    assert {i.state for i in items} == {ItemState.PENDING} and {i.object_type for i in items} == {"CT"}
    # Staged as received: the outbox files hold the exact bytes of the series' files.
    assert sorted(i.path.read_bytes() for i in items) == sorted(p.read_bytes() for p in source)
    assert service.queue.get(job.id).state is JobState.DONE
    assert "1.2.826.0.1.6" in service.completion.processed  # type: ignore[union-attr]
    assert service.queue.latest_for_series("1.2.826.0.1.6") is None  # no processing job


def test_a_forward_whose_series_is_gone_is_retried_then_failed(service: PipelineService) -> None:
    job = service.on_series_complete(ct("1.2.826.0.1.7", count=3, modality="MR"))
    assert job is not None and job.kind is JobKind.FORWARD
    assert service.forwarder.run_once()
    retrying = service.queue.get(job.id)
    assert retrying.state is JobState.RETRYING and retrying.reason == "input_missing"
    assert "1.2.826.0.1.7" not in service.completion.processed  # type: ignore[union-attr]


def test_start_replays_pending_completions_and_locks_the_data_folder(service: PipelineService) -> None:
    service.start()
    try:
        (job,) = service.queue.list()
        assert job.series_uid == "1.2.826.0.2.9"
        assert service.completion.subscribers == [service.on_series_complete]  # type: ignore[union-attr]
        second = PipelineService(service.settings)
        with pytest.raises(RoleBusy, match="another radnode process"):
            second.start()
        healthy, details = service.health()
        assert healthy and details["jobs"]["queued"] + details["jobs"]["running"] + details["jobs"]["failed"] == 1
    finally:
        service.stop(drain_seconds=0)
    assert service.completion.subscribers == []  # type: ignore[union-attr]


def test_retention_removes_only_old_processed_input_under_the_data_folder(tmp_path: Path) -> None:
    import time

    from radnode.pipeline.jobs import JobSpec
    from radnode.pipeline.queue import SQLiteJobQueue

    settings = Settings(storage={"data_dir": str(tmp_path / "data"), "retention_days": 30})
    service = PipelineService(settings)
    now = time.time()
    clock = {"t": now - 40 * 86400}
    service.queue = SQLiteJobQueue(service.data_dir / "jobs.sqlite", clock=lambda: clock["t"])
    folders = {}
    for name in ("old", "recent", "failed"):
        folders[name] = service.series_folder("1.2.3", f"1.2.3.{len(folders)}")
        folders[name].mkdir(parents=True)
        (folders[name] / "x.dcm").write_bytes(b"")
    outside = tmp_path / "elsewhere" / "1.2.3.9"
    outside.mkdir(parents=True)
    jobs = {}
    for name, folder in [*folders.items(), ("outside", outside)]:
        jobs[name] = service.queue.enqueue(JobSpec(series_uid=folder.name, input_path=folder, pipeline_version="1"))
    for name in ("old", "recent", "failed", "outside"):  # claimed in the order they were queued
        clock["t"] = now - (86400 if name == "recent" else 40 * 86400)
        claimed = service.queue.claim("w", 60)
        assert claimed is not None and claimed.id == jobs[name].id
        if name == "failed":
            service.queue.fail(claimed.id, "w", "exception", "bug", retryable=False)
        else:
            service.queue.complete(claimed.id, "w", {})
    removed = service.retention_cleanup()
    assert removed["inputs"] == 1
    assert not folders["old"].exists()
    assert folders["recent"].exists() and folders["failed"].exists() and outside.exists()


def test_the_nightly_sweep_is_scheduled_and_keeps_to_its_window(tmp_path: Path) -> None:
    from datetime import datetime, timedelta

    now = datetime.now()
    start, end = (now + timedelta(hours=2)).time(), (now + timedelta(hours=3)).time()
    settings = Settings(
        storage={"data_dir": str(tmp_path / "data")},
        pacs={"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        sweep={"enabled": True, "cron": "15 2 * * *", "window_start": start.replace(microsecond=0), "window_end": end.replace(microsecond=0)},
    )
    service = PipelineService(settings)
    assert service.scheduled_sweep() is None  # outside the off-peak window: nothing queried
    service.start()
    try:
        runs = {r.name: r for r in service.scheduler.next_runs()}
    finally:
        service.stop(drain_seconds=0)
    assert runs["nightly-sweep"].next_run is not None
    assert (runs["nightly-sweep"].next_run.hour, runs["nightly-sweep"].next_run.minute) == (2, 15)
    assert {"dispatch-retry", "lease-recovery", "retention-cleanup"} <= set(runs)
