"""A failed completion announcement is retried with backoff and shown as stuck, never lost."""

from __future__ import annotations

import io
from pathlib import Path

from index_support import index_url  # noqa: F401  (fixture: each test runs on SQLite and on PostgreSQL)
from pg_support import pg_cluster  # noqa: F401  (session fixture)
from rich.console import Console

from radnode.cli.status_cmd import collect_status, render
from radnode.config import Settings
from radnode.config.model import SeriesSettings
from radnode.node.completion import SeriesCompleted, SeriesCompletion
from radnode.node.index import InstanceRecord, NodeIndex, SeriesState
from radnode.node.storage import INDEX_FILE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _record(series: str, sop: str, at: float) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, version=1, series_instance_uid=series, study_instance_uid="1.9",
        sop_class_uid=CT_IMAGE_STORAGE, transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT",
        calling_ae="CT1", peer_address="127.0.0.1", path=f"incoming/1.9/{series}/{sop}.dcm", size=10, received_at=at,
    )


class Flaky:
    """Raises for the first ``failures`` calls, then records the events it gets."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.got: list[SeriesCompleted] = []

    def __call__(self, event: SeriesCompleted) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"job queue unavailable (call {self.calls})")
        self.got.append(event)


def _completion(data: Path, subscriber: Flaky, url: str | None) -> tuple[NodeIndex, SeriesCompletion]:
    index = NodeIndex(data / INDEX_FILE, database_url=url)
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=1, force_seconds=10), retry_base_seconds=5)
    completion.subscribe(subscriber)
    index.add_instance(_record("1.9.1", "1.9.1.1", 100.0), {}, None)
    return index, completion


def test_a_subscriber_that_fails_twice_then_succeeds_gets_the_series(tmp_path: Path, index_url: str | None) -> None:
    flaky = Flaky(failures=2)
    others: list[SeriesCompleted] = []
    index, completion = _completion(tmp_path, flaky, index_url)
    completion.subscribe(others.append)
    assert len(completion.check_due(102.0)) == 1  # complete; the first announcement fails
    assert len(others) == 1  # the other subscriber is not held up
    (stuck,) = completion.stuck()
    assert (stuck.series_instance_uid, stuck.attempts, stuck.next_attempt_at) == ("1.9.1", 1, 107.0)
    assert "call 1" in (stuck.last_error or "")
    completion.check_due(104.0)  # not due yet: not called again
    assert flaky.calls == 1
    completion.check_due(107.0)  # second try fails, the delay doubles
    (stuck,) = completion.stuck()
    assert (stuck.attempts, stuck.next_attempt_at, flaky.calls) == (2, 117.0, 2)
    completion.check_due(117.0)  # third try succeeds
    assert [e.series_instance_uid for e in flaky.got] == ["1.9.1"] and completion.stuck() == []
    assert len(others) == 1  # a retry goes to the failed subscriber only
    completion.check_due(200.0)
    assert flaky.calls == 3


def test_a_subscriber_that_always_fails_shows_the_series_as_stuck(tmp_path: Path, index_url: str | None) -> None:
    data = tmp_path / "data"
    data.mkdir()
    broken = Flaky(failures=10**6)
    index, completion = _completion(data, broken, index_url)
    now = 102.0
    for _ in range(6):
        completion.check_due(now)
        now += 1000.0
    assert broken.calls == 6
    (stuck,) = completion.stuck()
    assert stuck.attempts == 6 and stuck.next_attempt_at - stuck.first_failed_at > 0

    # A restarted node still knows (the failure is in the index), and radnode status shows it.
    index.close()
    status = collect_status(Settings(storage={"data_dir": str(data)}, database={"url": index_url}))
    (row,) = status["series"]["stuck"]
    assert row["series_uid"] == "1.9.1" and row["attempts"] == 6 and "unavailable" in row["last_error"]
    assert row["subscriber"].endswith("Flaky")
    out = io.StringIO()
    render(status, Console(file=out, width=250))
    assert "Stuck series" in out.getvalue() and "1.9.1" in out.getvalue()

    # Once the series is processed by other means, the retry is dropped, not repeated.
    index = NodeIndex(data / INDEX_FILE, database_url=index_url)
    completion = SeriesCompletion(index, SeriesSettings(quiet_seconds=1, force_seconds=10))
    completion.subscribe(broken)
    assert index.mark_processed("1.9.1", now)
    completion.check_due(now + 10_000)
    assert completion.stuck() == [] and broken.calls == 6
    assert index.series("1.9.1").state is SeriesState.PROCESSED


def test_replay_after_a_restart_goes_through_the_same_retries(tmp_path: Path, index_url: str | None) -> None:
    flaky = Flaky(failures=1)
    index, completion = _completion(tmp_path, Flaky(failures=0), index_url)
    completion.check_due(102.0)
    late = SeriesCompletion(index, SeriesSettings(quiet_seconds=1, force_seconds=10), retry_base_seconds=5)
    late.subscribe(flaky)
    assert late.replay(flaky, now=200.0) == 0  # fails: recorded, not raised
    assert [f.attempts for f in late.stuck()] == [1]
    late.check_due(205.0)
    assert [e.series_instance_uid for e in flaky.got] == ["1.9.1"] and late.stuck() == []
