"""The sweep: find CT series in the archive that were never processed, fetch and queue them.

Steps:

1. query the archive (:class:`~radnode.pipeline.archive.ArchiveQuery`: C-FIND at STUDY,
   then SERIES level) for CT series in a StudyDate range;
2. skip series already handled -- a job for (SeriesInstanceUID, pipeline version) that is
   done, still active, or failed (an operator retries those with ``radnode jobs retry``)
   -- and series the routing rules would not process;
3. retrieve the rest, at most ``sweep.max_concurrent_retrievals`` at a time and at most
   ``sweep.max_series_per_run`` per run, by C-MOVE to radnode's own listener or by C-GET
   (``pacs.retrieve``); either way each instance goes through the node's ingest into
   ``<data_dir>/incoming/<study>/<series>/``;
4. queue each retrieved series at sweep priority.

Progress is kept in :class:`~radnode.pipeline.sweep_store.SweepStore`, so an interrupted
run resumes. This module is the orchestration only: the DICOM client is
:mod:`radnode.pipeline.archive`, the progress store :mod:`radnode.pipeline.sweep_store`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from radnode.config import Settings
from radnode.node.routing import RouteCheck
from radnode.node.series_attributes import SeriesAttributes
from radnode.pipeline.archive import (
    ArchiveQuery,
    GetRetriever,
    MoveRetriever,
    Retriever,
    RetrieveResult,
    SweepError,
    rules_need_instance_level,
)
from radnode.pipeline.jobs import JobSource, JobSpec, JobState, Priority
from radnode.pipeline.queue import JobQueue
from radnode.pipeline.sweep_store import SWEEP_DB, ItemState, RunState, SweepStore, sweep_lock

__all__ = [
    "SWEEP_DB",
    "ArchiveQuery",
    "Decision",
    "ItemState",
    "RunState",
    "SweepError",
    "SweepReport",
    "SweepStore",
    "Sweeper",
    "rules_need_instance_level",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What the sweep does with one candidate: take it, or skip it and why."""

    candidate: SeriesAttributes
    take: bool
    reason: str
    profile: str = "default"
    destinations: tuple[str, ...] = ()


@dataclass
class SweepReport:
    """What a sweep did (or, with ``dry_run``, would do)."""

    run_id: int | None
    date_from: date
    date_to: date
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)
    queued: list[tuple[str, int]] = field(default_factory=list)  # (series UID, job id)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (series UID, error)
    remaining: int = 0  # planned items left for the next run (limit, window, stop)

    @property
    def taken(self) -> list[Decision]:
        return [d for d in self.decisions if d.take]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.take]


class Sweeper:
    """Runs sweeps against ``settings.pacs`` and queues what it fetches.

    Parameters
    ----------
    settings
        PACS, sweep limits, our AE title, data folder.
    queue
        Where retrieved series are queued (at :attr:`Priority.SWEEP`).
    pipeline_version
        Chain version of the "already processed" check.
    route
        Routing check on the C-FIND attributes; ``None`` accepts every CT series.
    query, retriever
        Replaceable for other archives; default to C-FIND and C-MOVE/C-GET per ``pacs.retrieve``.
    """

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        pipeline_version: str,
        route: RouteCheck | None = None,
        query: ArchiveQuery | None = None,
        retriever: Retriever | None = None,
        store: SweepStore | None = None,
    ) -> None:
        if settings.pacs is None:
            raise SweepError("the sweep needs a 'pacs' section (ae_title, host, port) to query")
        self.settings = settings
        self.queue = queue
        self.pipeline_version = pipeline_version
        self.route = route
        if settings.pacs.protocol == "dicomweb" and (query is None or retriever is None):
            from radnode.pipeline.dicomweb_archive import archive_clients

            default_query, default_retriever = archive_clients(settings)
            query, retriever = query or default_query, retriever or default_retriever  # type: ignore[assignment]
        self.query = query or ArchiveQuery(settings)
        if retriever is None:
            retriever = GetRetriever(settings) if settings.pacs.retrieve == "get" else MoveRetriever(settings)
        self.retriever = retriever
        self.data_dir = Path(settings.storage.data_dir)
        self.store = store or SweepStore(self.data_dir)

    def decide(self, candidate: SeriesAttributes) -> Decision:
        """Take a candidate, or say why it is skipped."""
        latest = self.queue.latest_for_series(candidate.series_instance_uid, self.pipeline_version)
        if latest is not None:
            if latest.state is JobState.DONE:
                return Decision(candidate, False, f"already processed (job {latest.id}, pipeline {self.pipeline_version})")
            if latest.active:
                return Decision(candidate, False, f"already queued (job {latest.id}, {latest.state.value})")
            if latest.state is JobState.FAILED:
                return Decision(
                    candidate, False, f"failed before (job {latest.id}: {latest.reason}); use `radnode jobs retry {latest.id}`"
                )
        if self.route is not None:
            verdict = self.route(candidate)
            if verdict.action != "process":
                return Decision(candidate, False, f"routing: {verdict.action}: {verdict.reason}")
            return Decision(candidate, True, f"never processed; {verdict.reason}", verdict.profile or "default", verdict.destinations)
        return Decision(candidate, True, "never processed")

    def run(
        self,
        date_from: date,
        date_to: date,
        dry_run: bool = False,
        limit: int | None = None,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> SweepReport:
        """Sweep ``[date_from, date_to]``.

        Parameters
        ----------
        dry_run
            Query and decide only: nothing is retrieved, queued or persisted.
        limit
            Series to retrieve in this run (default ``sweep.max_series_per_run``).
        deadline
            Unix time after which no new retrieval starts (end of the off-peak window).
        stop
            Set to interrupt between retrievals (node shutdown).
        """
        if date_to < date_from:
            raise SweepError(f"sweep range is empty: --from {date_from} is after --to {date_to}")
        limit = self.settings.sweep.max_series_per_run if limit is None else limit
        candidates = self.query.series(date_from, date_to)
        report = SweepReport(None, date_from, date_to, dry_run, decisions=[self.decide(c) for c in candidates])
        if dry_run:
            return report
        with sweep_lock(self.data_dir):
            run_id, resumed = self.store.open_run(date_from, date_to)
            report.run_id = run_id
            if resumed:
                log.info("resuming sweep run %d over %s..%s", run_id, date_from, date_to)
            for decision in report.taken:
                self.store.plan(run_id, decision.candidate)
            by_uid = {d.candidate.series_instance_uid: d for d in report.taken}
            wanted = set(by_uid)
            todo: list[Decision] = []
            for item in self.store.open_items(run_id):
                if item["series_uid"] not in wanted:
                    # Planned earlier but now handled elsewhere (or gone from the archive).
                    reason = next((d.reason for d in report.skipped if d.candidate.series_instance_uid == item["series_uid"]), "no longer found")
                    self.store.set_item(run_id, item["series_uid"], ItemState.FAILED, error=f"skipped on resume: {reason}")
                    continue
                todo.append(by_uid[item["series_uid"]])
            batch = todo[:limit]
            report.remaining = len(todo) - len(batch)
            self._retrieve_all(run_id, batch, report, deadline, stop)
            state = RunState.DONE if report.remaining == 0 else RunState.PARTIAL
            self.store.finish_run(run_id, state, found=len(candidates), skipped=len(report.skipped))
        log.info(
            "sweep %s..%s: %d CT series, %d skipped, %d queued, %d failed, %d left for the next run",
            date_from, date_to, len(candidates), len(report.skipped), len(report.queued), len(report.failed), report.remaining,
        )
        return report

    def _fetch_clinical_contours(self, candidate: SeriesAttributes) -> None:
        """Retrieve the study's RTSTRUCT series (a clinician's GTV for the chain) through the
        same retriever, before the CT's job is queued; a failure is logged, never fatal."""
        if not self.settings.clinical_contours.enabled:
            return
        try:
            for rtstruct in self.query.study_series(candidate.study_instance_uid, "RTSTRUCT"):
                result = self.retriever.retrieve(rtstruct)
                if not result.ok:
                    log.warning("sweep: RTSTRUCT series %s not retrieved: %s", rtstruct.series_uid, result.error)
        except Exception as exc:
            log.warning("sweep: RTSTRUCTs of study %s not looked up: %s", candidate.study_instance_uid, exc)

    def _retrieve_all(
        self,
        run_id: int,
        batch: Sequence[Decision],
        report: SweepReport,
        deadline: float | None,
        stop: threading.Event | None,
    ) -> None:
        lock = threading.Lock()

        def one(decision: Decision) -> None:
            candidate = decision.candidate
            if (stop is not None and stop.is_set()) or (deadline is not None and time.time() >= deadline):
                with lock:
                    report.remaining += 1
                return
            self.store.set_item(run_id, candidate.series_instance_uid, ItemState.RETRIEVING)
            try:
                result = self.retriever.retrieve(candidate)
            except Exception as exc:  # one bad series must not end the sweep
                log.exception("sweep: retrieving series %s failed", candidate.series_instance_uid)
                result = RetrieveResult(False, self.data_dir, error=f"{type(exc).__name__}: {exc}")
            if not result.ok:
                self.store.set_item(run_id, candidate.series_instance_uid, ItemState.FAILED, error=result.error)
                with lock:
                    report.failed.append((candidate.series_instance_uid, result.error or "retrieval failed"))
                log.warning("sweep: series %s not retrieved: %s", candidate.series_instance_uid, result.error)
                return
            self._fetch_clinical_contours(candidate)
            job = self.queue.enqueue(
                JobSpec(
                    series_uid=candidate.series_instance_uid,
                    study_uid=candidate.study_instance_uid,
                    input_path=result.folder,
                    pipeline_version=self.pipeline_version,
                    priority=Priority.SWEEP,
                    source=JobSource.SWEEP,
                    profile=decision.profile,
                    destinations=decision.destinations,
                    instance_count=result.completed or candidate.instance_count,
                    max_attempts=self.settings.pipeline.max_attempts,
                )
            )
            self.store.set_item(run_id, candidate.series_instance_uid, ItemState.QUEUED, job_id=job.id)
            with lock:
                report.queued.append((candidate.series_instance_uid, job.id))

        workers = max(1, min(self.settings.sweep.max_concurrent_retrievals, len(batch) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="radnode-sweep") as pool:
            list(pool.map(one, batch))
