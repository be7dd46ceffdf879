"""The node's side of remote workers (``database.url`` set): announce, recover, take results back.

One background loop on the node, every :data:`ROUND_SECONDS`:

* re-announces where the node's DICOM listener is (``radnode_nodes``), so a worker that
  knows only ``database.url`` can fetch its series with C-GET;
* returns jobs whose lease ran out to the queue (:meth:`JobQueue.recover`, one bounded
  ``UPDATE``): a killed worker's job runs again within ``lease + ROUND_SECONDS``;
* stages phases that workers handed back (:mod:`radnode.pipeline.pg_shared`) into the
  node's outbox through the very function local jobs use, so review holds and
  destination rules apply unchanged, and wakes the dispatcher.

A PostgreSQL outage makes a round fail; the loop logs it and tries again next round
(no crash loop, nothing lost: unstaged results stay in the table).
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radnode.config import Settings
from radnode.pipeline.background import BackgroundLoop
from radnode.pipeline.identity import bundle_checksum
from radnode.pipeline.jobs import Job, Phase, current_pipeline_version
from radnode.pipeline.pg_shared import SharedState, unpack_into
from radnode.pipeline.queue import JobNotFound, JobQueue

log = logging.getLogger(__name__)

#: Seconds between rounds (recovery bound = lease + this).
ROUND_SECONDS = 2.0
#: Seconds between re-announcements of the node's address.
ANNOUNCE_SECONDS = 60.0

StagePhase = Callable[[Job, Phase, Path, list[Path]], int]


def advertised_host(settings: Settings) -> str:
    """Address workers use to reach the listener: ``database.node_host``, else ``node.host``
    unless it is a wildcard, else this machine's name."""
    configured = settings.database.node_host
    if configured:
        return configured
    if settings.node.host not in ("0.0.0.0", "::", ""):
        return settings.node.host
    return socket.getfqdn()


def pg_queue_options(settings: Settings, local_prefix: str | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`~radnode.pipeline.pg_queue.PostgresJobQueue` for the node."""
    return {
        "profile_queues": dict(settings.database.profile_queues),
        "default_queue": settings.database.default_queue,
        "local_prefix": f"{local_prefix}/" if local_prefix else None,
        "bundle_sha256": bundle_checksum(settings),
    }


def node_queue(settings: Settings) -> JobQueue:
    """The node's job queue as the CLI opens it: PostgreSQL (with lanes and checksum) or SQLite."""
    from radnode.pipeline.queue import open_queue

    data_dir = Path(settings.storage.data_dir).resolve()
    if settings.database.url:
        return open_queue(data_dir, settings.database.url, **pg_queue_options(settings))
    return open_queue(data_dir)


class RemoteLink(BackgroundLoop):
    """Announce the node, recover expired leases, stage handed-back results."""

    thread_name = "radnode-remote-link"

    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        shared: SharedState,
        results_dir: Path,
        stage_phase: StagePhase,
        on_report_staged: Callable[[Job], None],
        pipeline_version: str,
        bundle_sha256: str,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.queue = queue
        self.shared = shared
        self.results_dir = Path(results_dir)
        self.stage_phase = stage_phase
        self.on_report_staged = on_report_staged
        self.pipeline_version = pipeline_version
        self.bundle_sha256 = bundle_sha256
        self._announced_at = 0.0

    @classmethod
    def for_service(
        cls, settings: Settings, queue: JobQueue, results_dir: Path, stage_phase: StagePhase, on_report_staged: Callable[[Job], None]
    ) -> RemoteLink:
        """The link of a node whose ``database.url`` is set."""
        assert settings.database.url
        return cls(
            settings, queue, SharedState(settings.database.url), results_dir, stage_phase, on_report_staged,
            current_pipeline_version(), bundle_checksum(settings),
        )

    def announce(self) -> None:
        node = self.settings.node
        self.shared.register_node(
            node.ae_title, node.ae_title, advertised_host(self.settings), node.port, self.pipeline_version, self.bundle_sha256,
            tls=node.tls.enabled,
        )
        self._announced_at = time.monotonic()

    def round(self) -> float:
        if time.monotonic() - self._announced_at > ANNOUNCE_SECONDS:
            self.announce()
        self.queue.recover(expired_only=True)
        staged = self.stage_pending()
        return 0.0 if staged else ROUND_SECONDS

    def stage_pending(self) -> int:
        """Stage every handed-back phase not staged yet; returns how many phases."""
        done = 0
        for handed in self.shared.pending_results():
            try:
                job = self.queue.get(handed.job_id)
            except JobNotFound:
                log.error("results handed back for unknown job %d; ignored", handed.job_id)
                self.shared.mark_staged(handed.job_id, handed.phase)
                continue
            out_dir = self.results_dir / str(job.id)
            if out_dir.exists() and handed.phase == Phase.CONTOURS.value:
                shutil.rmtree(out_dir)  # leftovers of an earlier attempt are no results
            unpack_into(handed.archive, out_dir)
            files = [out_dir / name for name in handed.files]
            phase = Phase(handed.phase)
            objects = self.stage_phase(job, phase, out_dir, files)
            self.shared.mark_staged(job.id, handed.phase)
            log.info("job %d phase %s from worker %s staged: %d object(s)", job.id, phase.value, handed.worker_id, objects)
            if phase is Phase.REPORT:
                self.on_report_staged(job)
            done += 1
        return done
