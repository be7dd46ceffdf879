"""The pipeline as one service inside ``radnode serve``: queue, workers, outbox, scheduler.

::

    listener --SeriesCompleted--> PipelineService.on_series_complete
                                    │ routing: process / forward / ignore
                                    │ (+ a clinician's RTSTRUCT for a processed CT: clinician_contour job)
                                    ▼
                                 JobQueue ──claim (process)──> WorkerPool ──child process──> chain
                                    │                             │ phase done
                                    └──claim (forward)──> Forwarder (received files, unchanged)
                                                                  ▼
                                                               Outbox ──DispatchLoop──> C-STORE to destinations
    PipelineScheduler: completion checks, dispatch retries, lease recovery, retention, nightly sweep

Wiring into ``radnode serve`` (the listener owns the :class:`SeriesCompletion`)::

    service = PipelineService(settings, completion=completion)
    service.start()          # after the listener's index is open; replays complete series
    ...
    service.stop()           # on SIGTERM, before the listener's index is closed

``completion`` is optional: without it, jobs come from :meth:`PipelineService.enqueue` and
the sweep only. With it, the service subscribes to completions and, unless
``schedule_completion_checks=False``, runs :meth:`SeriesCompletion.check_due` on its
scheduler (the listener then needs no timer of its own).

``roles`` (:mod:`radnode.service.roles`) picks the parts this process runs: ``completion``
(the subscription above), ``scheduler``, ``dispatch`` (outbox and forward jobs) and
``workers``; the others may run in other processes on the same data folder. Each role runs
in one process per data folder: :meth:`start` takes the role's lock, which is what makes
re-queueing every ``running`` job at start safe when this process runs every role that
claims jobs (otherwise only jobs whose lease expired are re-queued).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from radnode.config import Destination, Settings
from radnode.pipeline.dispatch import Dispatcher, DispatchLoop
from radnode.pipeline.forward import Forwarder
from radnode.pipeline.jobs import (
    Backoff,
    Job,
    JobKind,
    JobSource,
    JobSpec,
    JobState,
    Phase,
    Priority,
    current_pipeline_version,
)
from radnode.pipeline.outbox import DEFAULT_BACKOFF, Outbox
from radnode.pipeline.notify import Notifier
from radnode.pipeline.queue import JobQueue, SQLiteJobQueue, open_queue
from radnode.pipeline.remote_link import RemoteLink, pg_queue_options
from radnode.pipeline.review import contour_counts, stage_phase
from radnode.pipeline.scheduler import (
    TASK_COMPLETION_CHECK,
    TASK_DISPATCH_RETRY,
    TASK_LEASE_RECOVERY,
    TASK_RETENTION,
    TASK_SWEEP,
    PipelineScheduler,
    ScheduledTask,
    crontab_trigger,
    in_window,
    interval,
    window_seconds,
)
from radnode.node.index import NodeIndex, open_existing_index
from radnode.node.storage import INCOMING_DIR, series_dir
from radnode.service.roles import PIPELINE_ROLES, Role, RoleLocks, format_roles
from radnode.node.routing import RoutingDecision, decide
from radnode.pipeline.archive import ArchiveQuery, rules_need_instance_level
from radnode.pipeline.sweep import SweepReport, Sweeper
from radnode.pipeline.child import HEARTBEAT_SECONDS, ChildOutcome
from radnode.pipeline.worker import LEASE_SECONDS, WorkerPool

log = logging.getLogger(__name__)

RESULTS_DIR = "results"
#: Interval of the dispatch safety-net round (the loop also wakes on new items and due times).
DISPATCH_RETRY_SECONDS = 15.0
#: Longest idle wait of the dispatch loop when the workers run in another process, whose
#: staged results cannot wake it.
CROSS_PROCESS_POLL_SECONDS = 2.0
#: Interval of lease recovery (jobs of a worker that vanished without the node restarting).
LEASE_RECOVERY_SECONDS = 60.0
#: Seconds a graceful stop waits for running jobs before it kills them (they are re-queued).
DRAIN_SECONDS = 10.0
#: Folder where C-GET retrievals went before they took the ingest path (still cleaned up).
LEGACY_SWEEP_DIR = "sweep"
#: Daily time of the retention cleanup (local time).
RETENTION_CRON = "30 3 * * *"


class CompletionSource(Protocol):
    """What the service needs from the listener's :class:`radnode.node.completion.SeriesCompletion`."""

    def subscribe(self, subscriber: Callable[[Any], None]) -> None: ...

    def unsubscribe(self, subscriber: Callable[[Any], None]) -> None: ...

    def pending(self) -> list[Any]: ...

    def replay(self, subscriber: Callable[[Any], None]) -> int: ...

    def mark_processed(self, series_instance_uid: str, now: float | None = None) -> bool: ...

    def check_due(self, now: float | None = None) -> list[Any]: ...


def build_sweeper(settings: Settings, queue: JobQueue, pipeline_version: str | None = None) -> Sweeper:
    """A :class:`Sweeper` on ``queue`` that applies the node's routing rules to candidates."""
    return Sweeper(
        settings,
        queue,
        pipeline_version or current_pipeline_version(),
        route=lambda candidate: decide(settings, candidate),
        query=_archive_query(settings),
    )


def _archive_query(settings: Settings) -> Any:
    """The archive's query client: C-FIND, or QIDO-RS with ``pacs.protocol: dicomweb``."""
    if settings.pacs is not None and settings.pacs.protocol == "dicomweb":
        from radnode.pipeline.dicomweb_archive import QidoArchiveQuery

        return QidoArchiveQuery(settings, instance_level=rules_need_instance_level(settings))
    return ArchiveQuery(settings, instance_level=rules_need_instance_level(settings))


#: Job duration buckets (seconds): a CPU job takes tens of seconds to tens of minutes.
JOB_SECONDS_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)


class PipelineCollector:
    """Prometheus collector read at scrape time from the queue and the outbox.

    Exposes ``radnode_pipeline_jobs{state}``, ``radnode_pipeline_queue_age_seconds``,
    ``radnode_outbox_items{destination,state}`` and
    ``radnode_dispatch_attempts_total{destination,outcome}`` (failures are the outcomes
    ``refused``, ``unreachable`` and ``local_error``) and ``radnode_tumour_contours{quality}``
    (``uncertain``: flagged "tumour contour uncertain — review required"; deliveries waiting
    for a reviewer are ``radnode_outbox_items{state="awaiting_review"}``).
    """

    def __init__(self, queue: JobQueue, outbox: Outbox) -> None:
        self.queue = queue
        self.outbox = outbox

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        jobs = GaugeMetricFamily("radnode_pipeline_jobs", "Jobs by state.", labels=["state"])
        for state, count in self.queue.counts().items():
            jobs.add_metric([state.value], count)
        yield jobs
        oldest = self.queue.oldest_waiting_since()
        yield GaugeMetricFamily(
            "radnode_pipeline_queue_age_seconds",
            "Seconds the oldest queued or retrying job has waited (0 when none waits).",
            value=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
        )
        items = GaugeMetricFamily("radnode_outbox_items", "Outbox items by destination and state.", labels=["destination", "state"])
        for destination, per_state in self.outbox.counts().items():
            for state, count in per_state.items():
                items.add_metric([destination, state.value], count)
        yield items
        attempts = CounterMetricFamily(
            "radnode_dispatch_attempts", "C-STORE attempts by destination and outcome.", labels=["destination", "outcome"]
        )
        for (destination, outcome), count in self.outbox.attempt_counts().items():
            attempts.add_metric([destination, outcome.value], count)
        yield attempts
        contours = GaugeMetricFamily(
            "radnode_tumour_contours",
            "Quality verdict on the tumour contours of the latest done jobs (uncertain = review required).",
            labels=["quality"],
        )
        for quality, count in contour_counts(self.queue).items():
            contours.add_metric([quality], count)
        yield contours


class PipelineService:
    """Runs the pipeline of one node.

    Parameters
    ----------
    settings
        The node's settings.
    completion
        The listener's completion checker (see the module docstring); ``None`` for a
        pipeline without a listener (tests, ``radnode sweep`` alone).
    chain
        Import reference of the chain function (test hook, see :mod:`radnode.pipeline.child`).
    schedule_completion_checks
        Run ``completion.check_due`` from the scheduler.
    lease_seconds, heartbeat_seconds
        Job lease and heartbeat (see :class:`~radnode.pipeline.worker.WorkerPool`).
    job_backoff, dispatch_backoff, dispatch_max_attempts
        Retry schedules of jobs and of outbox items.
    poll_seconds
        Idle wait of the workers between claims.
    roles
        The pipeline roles this process runs (default: all).
    take_locks
        Take the roles' locks in :meth:`start`; ``False`` when the caller holds them
        (``radnode serve`` takes every role's lock before anything starts).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        completion: CompletionSource | None = None,
        chain: str | None = None,
        schedule_completion_checks: bool = True,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        job_backoff: Backoff | None = None,
        dispatch_backoff: Backoff = DEFAULT_BACKOFF,
        dispatch_max_attempts: int | None = None,
        poll_seconds: float = 2.0,
        roles: Collection[Role] = PIPELINE_ROLES,
        take_locks: bool = True,
    ) -> None:
        self.settings = settings
        self.roles = frozenset(roles) & PIPELINE_ROLES
        self.take_locks = take_locks
        self.data_dir = Path(settings.storage.data_dir).resolve()
        self.completion = completion
        self.schedule_completion_checks = schedule_completion_checks
        self.pipeline_version = current_pipeline_version()
        remote = settings.database.url  # PostgreSQL: jobs shared with `radnode worker` machines
        pool_name = f"node@{os.uname().nodename}" if remote else None  # stable: start recovers only its own jobs
        self.queue: JobQueue = (
            open_queue(self.data_dir, remote, backoff=job_backoff or Backoff(), **pg_queue_options(settings, pool_name))
            if remote
            else SQLiteJobQueue.in_data_dir(self.data_dir, backoff=job_backoff or Backoff())  # embedded default
        )
        outbox_kwargs: dict[str, Any] = {"backoff": dispatch_backoff, "database_url": remote}
        if dispatch_max_attempts is not None:
            outbox_kwargs["max_attempts"] = dispatch_max_attempts
        self.outbox = Outbox(self.data_dir, **outbox_kwargs)
        self.dispatcher = Dispatcher(self.outbox, settings)
        # Staged results wake the dispatcher in-process; from another process they are polled.
        in_process = Role.WORKERS in self.roles
        self.dispatch_loop = DispatchLoop(self.dispatcher, **({} if in_process else {"idle_seconds": CROSS_PROCESS_POLL_SECONDS}))
        self.notifier = Notifier(settings.review)  # results awaiting review: webhook / e-mail
        self.pool = WorkerPool(
            self.queue,
            settings,
            self.data_dir / RESULTS_DIR,
            chain=chain,
            on_phase=self._stage_phase,
            on_finished=self._job_finished,
            lease_seconds=lease_seconds,
            heartbeat_seconds=heartbeat_seconds,
            poll_seconds=poll_seconds,
            name=pool_name,
            kinds=(JobKind.PROCESS, JobKind.CLINICIAN_CONTOUR),  # the latter reads this node's index
        )
        self.remote_link = (
            RemoteLink.for_service(settings, self.queue, self.data_dir / RESULTS_DIR, self._stage_phase, self._remote_report_staged)
            if remote
            else None
        )
        self.forwarder = Forwarder(
            self.queue,
            self.outbox,
            self.job_destinations,
            on_staged=self.dispatch_loop.wake,
            on_finished=self._forward_finished,
            timeout_seconds=settings.pipeline.job_timeout_seconds,
            lease_seconds=lease_seconds,
            poll_seconds=poll_seconds,
        )
        self.scheduler = PipelineScheduler(self.data_dir)
        self._locks = RoleLocks(self.data_dir)
        self._index: NodeIndex | None = None
        self._stop = threading.Event()
        self._started = False
        self._finished_listeners: list[Callable[[Job, ChildOutcome], None]] = []

    # -- life cycle ---------------------------------------------------------------------

    def _has(self, role: Role) -> bool:
        return role in self.roles

    def start(self) -> None:
        """Recover, then start this process's roles (workers, dispatch, scheduler); replay
        completed series."""
        if self._started:
            return
        if self.take_locks:
            self._locks.acquire(self.roles)
        self._stop.clear()
        if self._has(Role.WORKERS) or self._has(Role.DISPATCH):
            # Every job left running was this process's only when it runs every claimant.
            everything = self._has(Role.WORKERS) and self._has(Role.DISPATCH)
            recovered = self.queue.recover(expired_only=not everything)
            if recovered:
                log.warning("re-queued %d job(s) that were running when the node stopped", len(recovered))
        if self._has(Role.DISPATCH):
            # Destinations may have come back while the node was down: try waiting items once now.
            waiting = self.outbox.retry_now()
            if waiting:
                log.info("%d delivery(ies) waiting in the outbox; trying them now", waiting)
            self.forwarder.start()
            self.dispatch_loop.start()
            if self.remote_link is not None:  # remote workers' results are staged where dispatch runs
                self.remote_link.announce()
                self.remote_link.start()
        if self._has(Role.WORKERS):
            self.pool.start()
        if self._has(Role.SCHEDULER):
            self.scheduler.start(self._tasks())
        if self.completion is not None and self._has(Role.COMPLETION):
            self.completion.subscribe(self.on_series_complete)
            self.completion.replay(self.on_series_complete)  # a failure is retried, never lost
        self._started = True
        log.info(
            "pipeline started on %s (roles %s): %d worker(s), %d destination(s), pipeline version %s",
            self.data_dir, format_roles(self.roles), self.pool.size if self._has(Role.WORKERS) else 0,
            len(self.settings.destinations), self.pipeline_version,
        )

    def stop(self, timeout: float = 30.0, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Graceful stop (SIGTERM): take no new job, let running jobs finish for up to
        ``drain_seconds``, give the rest back to the queue, finish the dispatch round."""
        if not self._started:
            return
        self._stop.set()
        if self.completion is not None:
            self.completion.unsubscribe(self.on_series_complete)
        self.scheduler.stop()
        self.pool.stop(timeout, drain_seconds=drain_seconds)
        if self.remote_link is not None:
            self.remote_link.stop(timeout)
        self.forwarder.stop(timeout)
        self.dispatch_loop.stop(timeout)
        if self._index is not None:
            self._index.close()
            self._index = None
        self._locks.release()
        self._started = False
        log.info("pipeline stopped")

    def __enter__(self) -> PipelineService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def register_metrics(self, registry: Any) -> None:
        """Add the pipeline's metrics to a ``prometheus_client.CollectorRegistry``
        (the listener's, so one ``/metrics`` endpoint serves both)."""
        from prometheus_client import Histogram

        registry.register(PipelineCollector(self.queue, self.outbox))
        from radnode.pipeline.agreement import AgreementCollector

        registry.register(AgreementCollector(self.data_dir))
        histogram = Histogram(
            "radnode_job_duration_seconds",
            "Wall time of job attempts, by how they ended.",
            ["outcome"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=registry,
        )
        self.add_finished_listener(lambda job, outcome: histogram.labels(outcome.kind.value).observe(outcome.seconds))

    def add_finished_listener(self, listener: Callable[[Job, ChildOutcome], None]) -> None:
        """Be told about every finished attempt (metrics, tests)."""
        self._finished_listeners.append(listener)

    # -- scheduled tasks ----------------------------------------------------------------

    def _tasks(self) -> list[ScheduledTask]:
        tasks = [
            ScheduledTask(TASK_LEASE_RECOVERY, interval(LEASE_RECOVERY_SECONDS), self._recover_leases),
            ScheduledTask(TASK_RETENTION, crontab_trigger(RETENTION_CRON), self.retention_cleanup, misfire_grace_seconds=6 * 3600),
        ]
        if self._has(Role.DISPATCH):  # a wake-up only reaches a dispatcher in this process
            tasks.insert(0, ScheduledTask(TASK_DISPATCH_RETRY, interval(DISPATCH_RETRY_SECONDS), self.dispatch_loop.wake))
        if self.completion is not None and self.schedule_completion_checks:
            quiet = self.settings.series.quiet_seconds
            tasks.append(
                ScheduledTask(
                    TASK_COMPLETION_CHECK,
                    interval(min(5.0, max(0.5, quiet / 4))),
                    self.completion.check_due,
                    misfire_grace_seconds=30,
                )
            )
        sweep = self.settings.sweep
        if sweep.enabled and self.settings.pacs is not None:
            tasks.append(
                ScheduledTask(
                    TASK_SWEEP,
                    crontab_trigger(sweep.cron),
                    self.scheduled_sweep,
                    misfire_grace_seconds=max(60, window_seconds(sweep.window_start, sweep.window_end)),
                )
            )
        return tasks

    def _recover_leases(self) -> None:
        recovered = self.queue.recover(expired_only=True)
        if recovered:
            self.pool.wake()

    # -- intake -------------------------------------------------------------------------

    def enqueue(self, spec: JobSpec) -> Job:
        """Queue a job and wake a worker."""
        job = self.queue.enqueue(spec)
        self.pool.wake()
        return job

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        """Where the listener keeps a received series."""
        return series_dir(self.data_dir, study_uid, series_uid)

    def on_series_complete(self, event: Any) -> Job | None:
        """Subscriber for :class:`radnode.node.completion.SeriesCompleted`: route and enqueue
        a processing or a forward job (never more work than that on the completion thread).

        Idempotent: an announcement of a series that already has an active job, or a
        finished job for the same instance count (a replay after restart, a sweep
        retrieval), adds nothing. A later round (``event.is_update``) is processed again.
        """
        series_uid = event.series_instance_uid
        study_uid = event.study_instance_uid
        attributes = replace(event.attributes, instance_count=event.instance_count, calling_ae=event.calling_ae)
        if attributes.modality is None:
            attributes = replace(attributes, modality=event.modality)
        late = self._late_clinician_contour(event, attributes)  # besides whatever the rules say
        verdict = decide(self.settings, attributes)
        if verdict.action == "ignore":
            log.info("series %s not processed: %s", series_uid, verdict.reason)
            self._mark_processed(series_uid)
            return late
        if verdict.action == "forward":
            return self._forward(event, verdict)
        latest = self.queue.latest_for_series(series_uid, self.pipeline_version)
        is_update = bool(getattr(event, "is_update", False))
        if latest is not None:
            same_round = latest.instance_count == event.instance_count and not is_update
            # A job that has not started yet will read the folder as it is now; a running
            # one read it before this round's instances arrived, so an update gets a new job.
            if latest.active and (latest.state is not JobState.RUNNING or same_round):
                log.info("series %s already has job %d (%s)", series_uid, latest.id, latest.state.value)
                return latest
            if latest.state is JobState.DONE and same_round:
                self._mark_processed(series_uid)
                return latest
            if latest.state in (JobState.FAILED, JobState.CANCELLED) and same_round:
                log.info(
                    "series %s: job %d ended %s; not re-queued automatically (radnode jobs retry %d)",
                    series_uid, latest.id, latest.state.value, latest.id,
                )
                return latest
        return self.enqueue(
            JobSpec(
                series_uid=series_uid,
                study_uid=study_uid,
                input_path=self.series_folder(study_uid, series_uid),
                pipeline_version=self.pipeline_version,
                priority=Priority.LIVE,
                source=JobSource.LIVE,
                profile=verdict.profile or "default",
                destinations=verdict.destinations,
                instance_count=event.instance_count,
                calling_ae=event.calling_ae,
                max_attempts=self.settings.pipeline.max_attempts,
            )
        )

    def _late_clinician_contour(self, event: Any, attributes: Any) -> Job | None:
        """Queue a clinician-contour job for an RT Structure Set whose CT was already processed
        (see :mod:`radnode.pipeline.late_contours`); ``None`` for any other series."""
        from radnode.pipeline.late_contours import is_structure_set, late_contour_job

        if not is_structure_set(attributes):
            return None
        spec = late_contour_job(
            event, attributes, self.settings, self.queue,
            getattr(self.completion, "index", None) or self._node_index(),  # the listener's, when in this process
            self.data_dir / RESULTS_DIR, self.pipeline_version,
        )
        return self.enqueue(spec) if spec is not None else None

    def _mark_processed(self, series_uid: str) -> None:
        try:
            if self.completion is not None:
                self.completion.mark_processed(series_uid)
            elif (index := self._node_index()) is not None:
                # The listener and completion run in another process: the index is shared.
                index.mark_processed(series_uid, time.time())
        except Exception:
            log.exception("could not mark series %s processed in the node index", series_uid)

    def _node_index(self) -> NodeIndex | None:
        """The node's index when another process on this data folder keeps it, else None."""
        if self._index is None:
            self._index = open_existing_index(self.data_dir, self.settings.database.url)
        return self._index

    def _forward(self, event: Any, verdict: RoutingDecision) -> Job:
        """Queue a forward job (action ``forward``): the forwarder stages the received files
        unchanged for the rule's destinations, off the completion thread."""
        series_uid = event.series_instance_uid
        latest = self.queue.latest_for_series(series_uid, kind=JobKind.FORWARD)
        if latest is not None and latest.instance_count == event.instance_count and not getattr(event, "is_update", False):
            if latest.active:
                return latest
            if latest.state is JobState.DONE:
                self._mark_processed(series_uid)
                return latest
            log.info(
                "series %s: forward job %d ended %s; not re-queued automatically (radnode jobs retry %d)",
                series_uid, latest.id, latest.state.value, latest.id,
            )
            return latest
        job = self.queue.enqueue(
            JobSpec(
                series_uid=series_uid,
                study_uid=event.study_instance_uid,
                input_path=self.series_folder(event.study_instance_uid, series_uid),
                pipeline_version=self.pipeline_version,
                priority=Priority.LIVE,
                source=JobSource.LIVE,
                destinations=verdict.destinations,
                instance_count=event.instance_count,
                calling_ae=event.calling_ae,
                max_attempts=self.settings.pipeline.max_attempts,
                kind=JobKind.FORWARD,
            )
        )
        self.forwarder.wake()
        return job

    def _forward_finished(self, job: Job) -> None:
        if job.state is JobState.DONE:
            self._mark_processed(job.series_uid)

    # -- worker callbacks ---------------------------------------------------------------

    def job_destinations(self, job: Job) -> list[Destination]:
        """The destinations of a job: its rule's, or every configured one."""
        if job.destinations:
            known = {d.name: d for d in self.settings.destinations}
            missing = [n for n in job.destinations if n not in known]
            if missing:
                log.warning("job %d names destinations no longer configured: %s", job.id, ", ".join(missing))
            return [known[n] for n in job.destinations if n in known]
        return list(self.settings.destinations)

    def _stage_phase(self, job: Job, phase: Phase, out_dir: Path, files: list[Path]) -> int:
        """Stage exactly the files the chain handed over for ``phase`` (the one staging path).

        Each destination's ``uncertain_contour`` policy applies when the contour is flagged.
        """
        items = stage_phase(
            self.outbox, files, self.job_destinations(job), out_dir, phase, job_id=job.id, source_series_uid=job.series_uid,
            on_awaiting=self.notifier.awaiting_review,
        )
        self.dispatch_loop.wake()
        return len({item.sop_instance_uid for item in items})

    def _remote_report_staged(self, job: Job) -> None:
        """A remote worker's last phase is staged: what ``_job_finished`` does for a local job."""
        if job.source is not JobSource.MANUAL:
            self._mark_processed(job.series_uid)
        self._record_features(job)

    def _job_finished(self, job: Job, outcome: ChildOutcome) -> None:
        if job.state is JobState.DONE and job.source is not JobSource.MANUAL:
            self._mark_processed(job.series_uid)
        if job.state is JobState.DONE:
            self._record_features(job)
            self._record_agreement(job)
        for listener in self._finished_listeners:
            try:
                listener(job, outcome)
            except Exception:
                log.exception("finished-listener failed for job %d", job.id)

    def _record_features(self, job: Job) -> None:
        """Add the job's radiomic features to the research feature database (never fails the job)."""
        from radnode.models.research.featuredb import database_url, record_result

        result_json = self.pool.out_dir(job) / "result.json"
        try:
            if result_json.is_file():
                url = database_url(self.data_dir, self.settings.storage.feature_db_url)
                rows = record_result(url, result_json, job.input_path, job.id)
                log.info("job %d series %s: %d region row(s) added to the feature database", job.id, job.series_uid, rows)
        except Exception:
            log.exception("job %d series %s: features not added to the feature database", job.id, job.series_uid)

    def _record_agreement(self, job: Job) -> None:
        """Add the job's agreement with a clinician's GTV, if it had one, to the per-model summary."""
        from radnode.pipeline.agreement import AgreementStore

        result_json = self.pool.out_dir(job) / "result.json"
        try:
            if result_json.is_file() and AgreementStore(self.data_dir).record_result(result_json, job.id):
                log.info("job %d series %s: tumour agreement with the clinician's GTV recorded", job.id, job.series_uid)
        except Exception:
            log.exception("job %d series %s: agreement with the clinician's GTV not recorded", job.id, job.series_uid)

    # -- sweep --------------------------------------------------------------------------

    def sweeper(self) -> Sweeper:
        """A sweeper on this node's queue, with the node's routing rules."""
        return build_sweeper(self.settings, self.queue, self.pipeline_version)

    def scheduled_sweep(self) -> SweepReport | None:
        """The nightly sweep: last ``sweep.lookback_days`` days, only inside the off-peak window."""
        sweep = self.settings.sweep
        now = datetime.now()
        if not in_window(now.time(), sweep.window_start, sweep.window_end):
            log.info("nightly sweep skipped: %s is outside the off-peak window %s-%s", now.time(), sweep.window_start, sweep.window_end)
            return None
        end = datetime.combine(now.date(), sweep.window_end)
        if end <= now:
            end += timedelta(days=1)
        today = date.today()
        report = self.sweeper().run(
            today - timedelta(days=sweep.lookback_days), today, deadline=end.timestamp(), stop=self._stop
        )
        self.pool.wake()
        return report

    # -- retention ----------------------------------------------------------------------

    def retention_cleanup(self) -> dict[str, int]:
        """Delete processed input older than ``storage.retention_days`` and delivered outbox files.

        Only folders under ``<data_dir>/incoming`` (and ``<data_dir>/sweep``, where C-GET
        retrievals of earlier versions went) are removed, and
        only for series whose newest job (processing or forward) is done (never one still
        queued or failed, which an operator may want to retry).
        """
        days = self.settings.storage.retention_days
        if days <= 0:
            return {"inputs": 0, "outbox_files": 0}
        cutoff = time.time() - days * 86400
        allowed = [(self.data_dir / INCOMING_DIR).resolve(), (self.data_dir / LEGACY_SWEEP_DIR).resolve()]
        removed = 0
        for job in self.queue.list(states=[JobState.DONE], limit=100_000):
            if job.finished_at is None or job.finished_at >= cutoff:
                continue
            # The series' newest job of any kind (processed or forwarded) must be this one.
            latest = [j for k in JobKind if (j := self.queue.latest_for_series(job.series_uid, kind=k))]
            if max(j.id for j in latest) != job.id or any(j.state is not JobState.DONE for j in latest):
                continue
            folder = job.input_path.resolve()
            if not folder.exists() or not any(base in folder.parents for base in allowed):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
            log.info("retention: removed input of series %s (job %d done %d+ days ago)", job.series_uid, job.id, days)
        outbox_files = self.outbox.purge_delivered(days * 86400)
        return {"inputs": removed, "outbox_files": outbox_files}

    # -- health -------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)`` for ``/healthz``: workers, dispatch and scheduler alive, queue state."""
        counts = self.queue.counts()
        oldest = self.queue.oldest_waiting_since()
        details = {
            "pipeline_started": self._started,
            "roles": format_roles(self.roles),
            "scheduler_running": self.scheduler.running,
            "jobs": {state.value: n for state, n in counts.items()},
            "queue_age_seconds": round(time.time() - oldest, 1) if oldest is not None else 0.0,
            "busy_workers": len(self.pool.busy()),
        }
        return self._started and (self.scheduler.running or not self._has(Role.SCHEDULER)), details
