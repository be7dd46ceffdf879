"""The persistent scheduler: schedules survive restarts, missed runs coalesce into one,
crontab weekdays mean what crontab means, and the off-peak window wraps midnight."""

from __future__ import annotations

import threading
import time
from datetime import datetime, time as dtime
from pathlib import Path

from radnode.pipeline.scheduler import (
    PipelineScheduler,
    ScheduledTask,
    crontab_trigger,
    in_window,
    interval,
    read_next_runs,
    window_seconds,
)

from pipeline_support import wait_for


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.calls += 1


def test_crontab_weekdays_follow_crontab_not_apscheduler() -> None:
    # crontab: 1-5 = Monday..Friday (APScheduler 3 alone would read 0 as Monday).
    trigger = crontab_trigger("30 1 * * 1-5", timezone="UTC")
    saturday = datetime.fromisoformat("2024-01-06T12:00:00+00:00")
    fire = trigger.get_next_fire_time(None, saturday)
    assert fire is not None and fire.isoformat() == "2024-01-08T01:30:00+00:00"  # Monday
    sunday_only = crontab_trigger("0 2 * * 0", timezone="UTC")
    fire = sunday_only.get_next_fire_time(None, saturday)
    assert fire is not None and fire.weekday() == 6 and fire.hour == 2
    assert crontab_trigger("0 2 * * 7", timezone="UTC").get_next_fire_time(None, saturday) == fire


def test_off_peak_window_wraps_midnight() -> None:
    assert in_window(dtime(23, 30), dtime(22, 0), dtime(6, 0))
    assert in_window(dtime(5, 59), dtime(22, 0), dtime(6, 0))
    assert not in_window(dtime(6, 0), dtime(22, 0), dtime(6, 0))
    assert in_window(dtime(1, 0), dtime(1, 0), dtime(6, 0)) and not in_window(dtime(0, 59), dtime(1, 0), dtime(6, 0))
    assert window_seconds(dtime(22, 0), dtime(6, 0)) == 8 * 3600
    assert window_seconds(dtime(1, 0), dtime(6, 0)) == 5 * 3600


def test_schedules_persist_across_restarts_and_changes_replace_them(tmp_path: Path) -> None:
    counter = Counter()
    first = PipelineScheduler(tmp_path, timezone="UTC")
    first.start([ScheduledTask("hourly", interval(3600), counter), ScheduledTask("old", interval(60), counter)])
    stored = {r.name: r.next_run for r in first.next_runs()}
    first.stop()
    time.sleep(1.1)  # a restart a second later must not push the hourly run back by a second

    second = PipelineScheduler(tmp_path, timezone="UTC")
    second.start([ScheduledTask("hourly", interval(3600), counter), ScheduledTask("daily", crontab_trigger("0 3 * * *", "UTC"), counter)])
    runs = {r.name: r for r in second.next_runs()}
    second.stop()
    assert set(runs) == {"hourly", "daily"}  # "old" is no longer configured: removed
    assert runs["hourly"].next_run == stored["hourly"]
    assert runs["daily"].next_run is not None and runs["daily"].next_run.hour == 3

    third = PipelineScheduler(tmp_path, timezone="UTC")
    third.start([ScheduledTask("hourly", interval(1800), counter)])  # a changed trigger replaces the schedule
    (run,) = third.next_runs()
    third.stop()
    assert run.trigger == "interval[0:30:00]" and run.next_run != stored["hourly"]
    assert [r.name for r in read_next_runs(tmp_path)] == ["hourly"]  # another process can read them
    assert counter.calls == 0


def test_runs_missed_while_down_coalesce_into_one(tmp_path: Path) -> None:
    counter = Counter()
    scheduler = PipelineScheduler(tmp_path, timezone="UTC")
    t0 = time.monotonic()  # the interval's runs fall on t0 + 1, t0 + 2, ...
    scheduler.start([ScheduledTask("tick", interval(1), counter, misfire_grace_seconds=3600)])
    scheduler.stop()  # down before the first run
    time.sleep(max(0.0, t0 + 3.4 - time.monotonic()))  # three runs missed; restart between two runs
    assert counter.calls == 0
    restarted = PipelineScheduler(tmp_path, timezone="UTC")
    restarted.start([ScheduledTask("tick", interval(1), counter, misfire_grace_seconds=3600)])
    try:
        wait_for(lambda: counter.calls >= 1, 5, 0.01, "the missed run")
        time.sleep(0.15)
        # Still before the next regular run (t0 + 4): one catch-up run, not three.
        assert time.monotonic() < t0 + 3.95, "the machine is too slow for this timing check"
        assert counter.calls == 1
    finally:
        restarted.stop()
