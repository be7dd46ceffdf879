"""One contract for the outbox on both backends: the embedded SQLite file and PostgreSQL.

Each test runs once per backend (``store`` is parametrised) against a real database: the
``outbox.sqlite`` of a data folder, or the ``outbox_*`` tables of a fresh database in the
throw-away cluster of :mod:`pg_support` (missing PostgreSQL fails, never skips). The object
files lie in the data folder on both. Time is a fake clock, so backoff expires without
sleeping; the concurrency tests use threads, each with its own :class:`Outbox` object (as
separate processes would open the store).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from pg_support import BACKENDS, backend_store, pg_cluster  # noqa: F401  (session fixture)
from pipeline_support import first_header, write_result_objects
from radnode.config import Destination, Settings
from radnode.pipeline.jobs import Backoff, Phase
from radnode.pipeline.outbox import (
    AttemptOutcome,
    DestinationState,
    ItemState,
    Outbox,
    ReviewDecision,
    ReviewError,
    outbox_exists,
)

BACKOFF = Backoff(base_seconds=10.0, factor=2.0, max_seconds=600.0)


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, str | None]:
    """(backend, data dir, database URL) of one empty outbox."""
    return backend_store(request, tmp_path / "data", "o")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_outbox(store: tuple[str, Path, str | None], clock: FakeClock) -> Callable[..., Outbox]:
    """Another outbox object on the same store (like another process of the node would open)."""
    _, data_dir, url = store
    return lambda **kwargs: Outbox(data_dir, backoff=BACKOFF, clock=clock, database_url=url, **kwargs)


@pytest.fixture(scope="module")
def header(shared_data: Path) -> pydicom.Dataset:
    return first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image")


@pytest.fixture
def objects(tmp_path: Path, header: pydicom.Dataset) -> Callable[[str, list[str]], dict[str, Path]]:
    """Result objects of one job version: kind -> file (deterministic UIDs per version)."""

    def write(version: str, kinds: list[str]) -> dict[str, Path]:
        out = tmp_path / "results" / version
        out.mkdir(parents=True, exist_ok=True)
        return {p.stem: p for p in write_result_objects(header, out, kinds, version=version)}

    return write


def destinations(*names: str, objects: tuple[str, ...] = ("SEG", "RTSTRUCT", "SR")) -> list[Destination]:
    return Settings(
        destinations=[
            {"name": n, "ae_title": n.upper()[:16], "host": "127.0.0.1", "port": 104, "objects": list(objects)} for n in names
        ]
    ).destinations


def test_staging_twice_adds_nothing_and_rows_live_in_the_chosen_database(
    store: tuple[str, Path, str | None], make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]]
) -> None:
    backend, data_dir, url = store
    outbox = make_outbox()
    assert data_dir.exists() is (backend == "sqlite")  # opening the shared tables writes nothing on disk
    files = objects("1", ["SEG", "RTSTRUCT"])
    first = outbox.stage(files.values(), destinations("pacs") + destinations("tps", objects=("RTSTRUCT",)), job_id=1)
    again = make_outbox().stage(files.values(), destinations("pacs", "tps"), job_id=1)
    assert sorted((i.object_type, i.destination) for i in first) == [("RTSTRUCT", "pacs"), ("RTSTRUCT", "tps"), ("SEG", "pacs")]
    # the second staging adds the SEG for tps (now wanted) and nothing else
    assert {i.id for i in first} < {i.id for i in again} and len(again) == 4
    assert all(i.path.parent == data_dir / "outbox" and i.path.is_file() for i in again)
    assert (data_dir / "outbox.sqlite").exists() is (backend == "sqlite")
    assert outbox_exists(data_dir, url)
    if url is not None:  # prefixed tables: a shared database has other stores' items and objects
        import psycopg

        with psycopg.connect(url) as conn:
            found = conn.execute("SELECT to_regclass('outbox_items') IS NOT NULL, to_regclass('items') IS NULL").fetchone()
        assert found == (True, True)


def test_refusals_back_off_then_fail_and_rearm_gives_a_new_budget(
    make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]], clock: FakeClock
) -> None:
    outbox = make_outbox(max_attempts=2)
    (item,) = outbox.stage([objects("1", ["SEG"])["SEG"]], destinations("pacs"), job_id=1)
    assert [i.id for i in outbox.due()["pacs"]] == [item.id]
    refused = outbox.record(item, AttemptOutcome.REFUSED, status=0xA700, error="out of resources")
    assert (refused.state, refused.refusals, refused.next_attempt_at) == (ItemState.PENDING, 1, clock.now + 10)
    assert outbox.due() == {} and outbox.next_due_at() == clock.now + 10
    clock.advance(10)
    failed = make_outbox(max_attempts=2).record(outbox.due()["pacs"][0], AttemptOutcome.REFUSED, status=0xA900)
    assert failed.state is ItemState.FAILED and failed.attempts == 2
    assert [(a["outcome"], a["status"]) for a in outbox.attempts(item.id)] == [("refused", 0xA700), ("refused", 0xA900)]
    assert outbox.rearm(job_id=1) == 1 and outbox.rearm(job_id=1) == 0
    sent = outbox.record(outbox.due()["pacs"][0], AttemptOutcome.SUCCESS, status=0)
    assert (sent.state, sent.refusals, sent.sent_at) == (ItemState.SENT, 0, clock.now)
    outbox.stage([item.path], destinations("pacs"), job_id=1)  # staged again: never sent again
    assert outbox.due() == {} and outbox.items(job_id=1)[0].state is ItemState.SENT


def test_a_down_destination_delays_every_item_and_its_health_is_shared(
    make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]], clock: FakeClock
) -> None:
    outbox = make_outbox(max_attempts=1)
    items = outbox.stage(objects("1", ["SEG", "SR"]).values(), destinations("pacs"), job_id=1)
    for _ in range(2):
        outbox.record_destination("pacs", reachable=False, error="connection refused")
    assert outbox.defer_destination("pacs") == 20.0
    unreachable = outbox.record(items[0], AttemptOutcome.UNREACHABLE, error="connection refused")
    assert unreachable.state is ItemState.PENDING and unreachable.refusals == 0  # never counts towards failing
    assert {i.next_attempt_at for i in outbox.items()} == {clock.now + 20}
    (health,) = make_outbox().health(["pacs"])
    assert (health.state, health.consecutive_failures, health.pending) == (DestinationState.DOWN, 2, 2)
    outbox.record_destination("pacs", reachable=True)
    assert outbox.retry_now("pacs") == 2 and len(outbox.due()["pacs"]) == 2
    (health,) = outbox.health()
    assert (health.state, health.consecutive_failures, health.last_success_at) == (DestinationState.UP, 0, clock.now)


def test_review_holds_items_until_one_decision_replaces_or_rejects_them(
    make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]], clock: FakeClock
) -> None:
    outbox = make_outbox()
    files = objects("1", ["SEG", "RTSTRUCT"])
    copy = objects("1-approved", ["RTSTRUCT"])["RTSTRUCT"]
    held = outbox.stage(files.values(), destinations("tps"), job_id=1, hold=True)
    assert {i.state for i in held} == {ItemState.AWAITING_REVIEW} and outbox.due() == {}
    rtstruct = next(i for i in held if i.object_type == "RTSTRUCT")
    decision = ReviewDecision(job_id=1, decision="approved", reviewer="dr.ada", decided_at=clock.now)
    decided = make_outbox().decide(decision, {rtstruct.sop_instance_uid: copy})
    by_uid = {i.sop_instance_uid: i.state for i in decided}
    approved_uid = pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID
    assert by_uid[rtstruct.sop_instance_uid] is ItemState.REPLACED and by_uid[approved_uid] is ItemState.PENDING
    assert {i.object_type for i in outbox.due()["tps"]} == {"SEG", "RTSTRUCT"}
    assert outbox.review(1) is not None and outbox.review(1).approved_objects == (approved_uid,)  # type: ignore[union-attr]
    with pytest.raises(ReviewError):
        outbox.decide(decision)

    outbox.stage(objects("2", ["SEG"]).values(), destinations("tps", "pacs"), job_id=2, hold=True)
    assert outbox.release(2, except_destinations=["tps"]) == 1
    outbox.decide(ReviewDecision(job_id=2, decision="rejected", reviewer="dr.bob", decided_at=clock.now, comment="wrong"))
    assert {(i.destination, i.state) for i in outbox.items(job_id=2)} == {("pacs", ItemState.PENDING), ("tps", ItemState.REJECTED)}
    assert [r.job_id for r in outbox.reviews()] == [2, 1] and outbox.review(3) is None


def test_counts_per_job_phase_and_purge_of_delivered_files(
    make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]], clock: FakeClock
) -> None:
    outbox = make_outbox()
    items = outbox.stage(objects("1", ["SEG", "SR"]).values(), destinations("pacs", "tps"), job_id=1)
    for item in items:
        if item.destination == "pacs" or item.object_type == "SEG":
            outbox.record(item, AttemptOutcome.SUCCESS, status=0)
    assert outbox.counts()["pacs"][ItemState.SENT] == 2 and outbox.counts()["tps"][ItemState.PENDING] == 1
    delivery = make_outbox().job_delivery(1)
    assert delivery[Phase.CONTOURS.value][ItemState.SENT] == 2 and delivery[Phase.REPORT.value][ItemState.PENDING] == 1
    assert sum(make_outbox().attempt_counts().values()) == 3
    assert outbox.purge_delivered(60) == 0  # too recent
    clock.advance(61)
    assert outbox.purge_delivered(60) == 1  # the SEG only: the SR still waits for tps
    seg = next(i for i in items if i.object_type == "SEG")
    assert not seg.path.exists() and next(i for i in items if i.object_type == "SR").path.exists()
    assert len(outbox.items(job_id=1)) == 4  # the rows stay as the proof of delivery


def test_concurrent_records_and_decisions_from_separate_outbox_objects_lose_nothing(
    make_outbox: Callable[..., Outbox], objects: Callable[..., dict[str, Path]], clock: FakeClock
) -> None:
    (item,) = make_outbox().stage([objects("1", ["SEG"])["SEG"]], destinations("pacs"), job_id=1)
    make_outbox().stage(objects("2", ["SEG"]).values(), destinations("tps"), job_id=2, hold=True)
    threads, rounds = 4, 10
    decided: list[str] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        outbox = make_outbox(max_attempts=1000)
        try:
            for _ in range(rounds):
                outbox.record(item, AttemptOutcome.REFUSED, status=0xA700)
                outbox.record_destination("pacs", reachable=False)
            outbox.decide(ReviewDecision(job_id=2, decision="approved", reviewer=f"r{n}", decided_at=clock.now))
            decided.append(f"r{n}")
        except ReviewError:
            pass
        except BaseException as exc:  # surfaced below with its traceback
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors, errors
    current = make_outbox().items(job_id=1)[0]
    assert (current.attempts, current.refusals) == (threads * rounds, threads * rounds)
    assert len(make_outbox().attempts(item.id)) == threads * rounds
    assert make_outbox().health(["pacs"])[0].consecutive_failures == threads * rounds
    assert len(decided) == 1 and make_outbox().review(2).reviewer == decided[0]  # type: ignore[union-attr]
