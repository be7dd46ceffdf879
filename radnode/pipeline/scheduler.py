"""Periodic work of the node on APScheduler 3.x with a persistent job store.

Schedules live in ``<data_dir>/scheduler.sqlite`` (SQLAlchemy job store), so they survive
restarts: a nightly sweep that should have run while the node was down runs once at start
if it is still inside its misfire grace (the off-peak window), and never several times in a
row (``coalesce=True``, ``max_instances=1``).

A persistent job store pickles *references* to functions, not closures over live
objects. Every scheduled job therefore calls :func:`run_task` with a task *name*; the
running :class:`PipelineScheduler` keeps the name -> callable table in memory. A job
whose trigger did not change since the last run keeps its stored next run time (that is
what makes the schedule persistent); a changed trigger (say, a new sweep cron) replaces it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, time as dtime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger(__name__)

SCHEDULER_DB = "scheduler.sqlite"
#: The one function every persisted schedule points at (a stable import reference).
TASK_FUNC_REF = "radnode.pipeline.scheduler:run_task"
#: Seconds a periodic maintenance task may start late and still run.
DEFAULT_MISFIRE_GRACE_SECONDS = 60

# Names of the node's tasks (also the job ids in the store and the rows of ``status``).
TASK_COMPLETION_CHECK = "series-completion-check"
TASK_DISPATCH_RETRY = "dispatch-retry"
TASK_LEASE_RECOVERY = "lease-recovery"
TASK_RETENTION = "retention-cleanup"
TASK_SWEEP = "nightly-sweep"

_registry: dict[str, Callable[[], Any]] = {}
_registry_lock = threading.Lock()

#: Crontab weekday numbers (0 and 7 = Sunday) as APScheduler names; APScheduler 3 numbers
#: weekdays from Monday = 0, so numeric crontab weekdays must be translated.
_CRON_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def run_task(name: str) -> None:
    """Entry point of every persisted schedule: run the registered task ``name``."""
    with _registry_lock:
        func = _registry.get(name)
    if func is None:
        log.warning("scheduled task %r has no handler in this process; skipped", name)
        return
    try:
        func()
    except Exception:
        log.exception("scheduled task %r failed", name)


def _weekday_field(field: str) -> str:
    """Translate a crontab day-of-week field to APScheduler 3 names (``1-5`` -> ``mon,...,fri``)."""
    if field == "*" or not re.search(r"\d", field):
        return field
    if "/" in field:
        raise ValueError(f"day-of-week {field!r}: steps are not supported; list the days (e.g. 1,3,5)")
    days: list[str] = []
    for part in field.split(","):
        if "-" in part:
            start, end = (int(v) for v in part.split("-", 1))
            numbers = range(start, end + 1)
        else:
            numbers = range(int(part), int(part) + 1)
        for number in numbers:
            if not 0 <= number <= 7:
                raise ValueError(f"day-of-week {field!r}: {number} is outside 0-7 (0 and 7 = Sunday)")
            name = _CRON_WEEKDAYS[number]
            if name not in days:
                days.append(name)
    return ",".join(days)


def crontab_trigger(expression: str, timezone: Any = None) -> CronTrigger:
    """A :class:`CronTrigger` for a standard 5-field crontab line (Sunday = 0 or 7)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not a 5-field crontab expression (minute hour day month weekday)")
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute, hour=hour, day=day, month=month, day_of_week=_weekday_field(weekday), timezone=timezone
    )


def in_window(moment: dtime, start: dtime, end: dtime) -> bool:
    """Whether a time of day falls in ``[start, end)``; windows may wrap midnight (22:00-06:00)."""
    if start <= end:
        return start <= moment < end
    return moment >= start or moment < end


def window_seconds(start: dtime, end: dtime) -> int:
    """Length of an off-peak window in seconds (wrapping midnight when end <= start)."""
    anchor = datetime(2000, 1, 1)
    begin = datetime.combine(anchor, start)
    finish = datetime.combine(anchor, end)
    if finish <= begin:
        finish += timedelta(days=1)
    return int((finish - begin).total_seconds())


@dataclass(frozen=True)
class ScheduledTask:
    """One periodic task: its name, when it fires and what it runs."""

    name: str
    trigger: BaseTrigger
    func: Callable[[], Any]
    misfire_grace_seconds: int = DEFAULT_MISFIRE_GRACE_SECONDS


@dataclass(frozen=True)
class NextRun:
    """A row of ``radnode status``: task name, trigger, next run (``None`` = paused)."""

    name: str
    trigger: str
    next_run: datetime | None


class PipelineScheduler:
    """The node's BackgroundScheduler over ``<data_dir>/scheduler.sqlite``.

    Parameters
    ----------
    data_dir
        Folder of the job store.
    timezone
        Zone of cron expressions; the local zone by default (the off-peak window is local).
    """

    def __init__(self, data_dir: Path, timezone: Any = None) -> None:
        self.db_path = Path(data_dir) / SCHEDULER_DB
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "jobstores": {"default": SQLAlchemyJobStore(url=f"sqlite:///{self.db_path}")},
            "job_defaults": {
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": DEFAULT_MISFIRE_GRACE_SECONDS,
            },
        }
        if timezone is not None:
            options["timezone"] = timezone
        self._scheduler = BackgroundScheduler(**options)
        self._names: list[str] = []
        # APScheduler logs every run at INFO (a line every few seconds); keep its warnings.
        chatty = logging.getLogger("apscheduler")
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.WARNING)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self, tasks: Iterable[ScheduledTask]) -> None:
        """Register ``tasks``, reconcile the stored schedules with them, and start running."""
        tasks = list(tasks)
        with _registry_lock:
            for task in tasks:
                _registry[task.name] = task.func
        self._names = [t.name for t in tasks]
        self._scheduler.start(paused=True)  # job store live, nothing fires while we reconcile
        wanted = {t.name for t in tasks}
        for job in self._scheduler.get_jobs():
            if job.id not in wanted:
                log.info("removing schedule %s (no longer configured)", job.id)
                job.remove()
        for task in tasks:
            existing = self._scheduler.get_job(task.name)
            if (
                existing is not None
                and str(existing.trigger) == str(task.trigger)
                and existing.misfire_grace_time == task.misfire_grace_seconds
                and existing.func_ref == TASK_FUNC_REF
            ):
                continue  # unchanged: keep the stored next run time
            self._scheduler.add_job(
                TASK_FUNC_REF,
                trigger=task.trigger,
                args=[task.name],
                id=task.name,
                name=task.name,
                replace_existing=True,
                misfire_grace_time=task.misfire_grace_seconds,
            )
        self._scheduler.resume()
        log.info("scheduler started with %d task(s): %s", len(tasks), ", ".join(self._names))

    def stop(self) -> None:
        """Stop firing (a running task finishes); schedules stay in the store."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        with _registry_lock:
            for name in self._names:
                _registry.pop(name, None)

    def run_now(self, name: str) -> None:
        """Fire a task at once (``radnode sweep`` while serving, tests)."""
        job = self._scheduler.get_job(name)
        if job is None:
            raise KeyError(f"no scheduled task {name!r}; known: {', '.join(self._names) or 'none'}")
        job.modify(next_run_time=datetime.now(self._scheduler.timezone))

    def next_runs(self) -> list[NextRun]:
        """Next run of every task."""
        return [NextRun(j.id, str(j.trigger), j.next_run_time) for j in self._scheduler.get_jobs()]


def read_next_runs(data_dir: Path) -> list[NextRun]:
    """Read the stored schedules of a node from another process (``radnode status``)."""
    path = Path(data_dir) / SCHEDULER_DB
    if not path.exists():
        return []
    store = SQLAlchemyJobStore(url=f"sqlite:///{path}")
    try:
        store.start(None, "default")  # type: ignore[arg-type]  # read-only use, no scheduler
        jobs = store.get_all_jobs()
        return [NextRun(j.id, str(j.trigger), j.next_run_time) for j in jobs]
    finally:
        store.shutdown()


def interval(seconds: float) -> IntervalTrigger:
    """An interval trigger (kept here so callers need no APScheduler import)."""
    return IntervalTrigger(seconds=seconds)
