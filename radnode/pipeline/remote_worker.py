"""``radnode worker``: processing only, on another machine, against the shared PostgreSQL.

A worker needs ``database.url`` and a scratch folder, nothing of the node's data folder:

1. it claims a job from its queues (``--queues cpu,gpu``) in the PostgreSQL job queue,
   woken by the queue's ``NOTIFY`` when one is queued (no busy polling while idle);
2. it checks that the job asks for *its* pipeline version and model checksum, and
   refuses it with a clear message otherwise (the job goes back with backoff for a
   matching worker; the message shows in ``radnode jobs show``);
3. it reads where the node is from the database and fetches the series with C-GET from
   the node's listener (:mod:`radnode.node.retrieve`; the node's AE allow-list applies
   to the worker's AE title) into ``<scratch>/input/<job>``;
4. it runs the chain in a child process exactly like the node's own pool
   (:class:`~radnode.pipeline.worker.WorkerPool`: lease, heartbeats, timeout, kill), with
   the output folder in ``<scratch>/results/<job>``;
5. each finished phase is handed back through the database (:mod:`radnode.pipeline.pg_shared`);
   the node stages it into its outbox and delivers. Workers never talk to a PACS or TPS.

The worker heartbeats its row in ``radnode_workers`` (host, queues, device, current job)
so ``radnode status`` on the node lists it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import ssl
import threading
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

from radnode.config import Settings
from radnode.config.model import TLSSettings
from radnode.node.storage import validate_uid
from radnode.pipeline.identity import bundle_checksum
from radnode.pipeline.jobs import Job, Phase, current_pipeline_version
from radnode.pipeline.pg_queue import PostgresJobQueue
from radnode.pipeline.pg_shared import NodeAddress, SharedState
from radnode.pipeline.queue import LeaseLost
from radnode.pipeline.worker import HEARTBEAT_SECONDS, WorkerPool

log = logging.getLogger(__name__)

#: Failure reasons a remote worker adds (stored as strings, like FailureReason).
VERSION_MISMATCH = "version_mismatch"
FETCH_FAILED = "fetch_failed"


#: Seconds a worker thread waits after the node could not be reached (its job went back unchanged).
NODE_DOWN_WAIT_SECONDS = 5.0
#: Seconds between claims of an idle worker. New jobs wake it at once (PostgreSQL
#: ``LISTEN``); the poll only finds retries whose backoff ran out and covers a listener
#: that is reconnecting, so it can be long without delaying work or loading the database.
IDLE_POLL_SECONDS = 10.0


class FetchError(RuntimeError):
    """The series could not be fetched from the node.

    ``node_down``: the node did not answer or the association broke (restart, network):
    the job goes back to the queue without counting an attempt. Otherwise the node
    answered with a failure (series not stored): an attempt is spent, as for any failure.
    """

    def __init__(self, message: str, node_down: bool = False) -> None:
        super().__init__(message)
        self.node_down = node_down


def client_tls(node: NodeAddress, tls: TLSSettings | None) -> tuple[ssl.SSLContext, str] | None:
    """TLS arguments for the association when the node's listener uses TLS (PS3.15 B.1):
    the worker's ``node.tls.ca_file`` verifies the node, its ``cert_file``/``key_file`` (if
    set) are the client certificate a node with ``require_client_cert`` asks for."""
    if not node.tls:
        return None
    ca_file = tls.ca_file if tls is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    if tls is not None and tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context, node.host


def fetch_series(
    node: NodeAddress, study_uid: str | None, series_uid: str, folder: Path, ae_title: str, timeout: float = 60.0,
    tls: TLSSettings | None = None,
) -> int:
    """C-GET one series from the node into ``folder`` (emptied first); returns the instance count."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    received: list[str] = []

    def on_store(event: Any) -> int:
        try:
            sop_uid = validate_uid(event.request.AffectedSOPInstanceUID, "SOPInstanceUID")
        except ValueError:
            return 0xC000
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(folder / f"{sop_uid}.dcm", enforce_file_format=True)
        received.append(sop_uid)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        node.host, node.port, ae_title=node.ae_title, tls_args=client_tls(node, tls),
        ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise FetchError(
            f"node {node.ae_title} at {node.host}:{node.port} refused or did not answer the association",
            node_down=not assoc.is_rejected,
        )
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    if study_uid:
        identifier.StudyInstanceUID = study_uid
    identifier.SeriesInstanceUID = series_uid
    final: int | None = None
    comment = ""
    try:
        for response, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
            if "Status" not in response:
                raise FetchError("the C-GET ended without a response (association lost)", node_down=True)
            final = int(response.Status)
            comment = str(response.get("ErrorComment", "") or "")
    finally:
        if assoc.is_established:
            assoc.release()
    if final != 0x0000 or not received:
        raise FetchError(
            f"C-GET of series {series_uid} from {node.ae_title}: status 0x{(final or 0):04X} {comment}".strip()
            + f", {len(received)} instance(s) received"
        )
    return len(received)


def detect_device(settings: Settings) -> str:
    """``cuda`` or ``cpu``, as the chain would choose (``models.device``); no torch import if fixed."""
    if settings.models.device != "auto":
        return settings.models.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # a broken torch install still lets the status say something
        return "cpu"


class RemoteWorkerPool(WorkerPool):
    """A :class:`WorkerPool` that fetches its input from the node and hands results back."""

    def __init__(
        self,
        settings: Settings,
        scratch: Path,
        queues: list[str],
        *,
        ae_title: str = "RADWORKER",
        jobs: int = 1,
        chain: str | None = None,
        lease_seconds: float | None = None,
        heartbeat_seconds: float | None = None,
        poll_seconds: float = IDLE_POLL_SECONDS,
    ) -> None:
        url = settings.database.url
        if not url:
            raise ValueError("radnode worker needs database.url (RADNODE_DATABASE__URL=postgresql://…)")
        lease = lease_seconds or settings.database.lease_seconds
        beat = heartbeat_seconds or min(HEARTBEAT_SECONDS, lease / 4)  # well inside the lease
        self.scratch = Path(scratch).resolve()
        self.queues = list(queues)
        self.jobs = jobs
        self.ae_title = ae_title
        self.bundle_sha256 = bundle_checksum(settings)
        self.pipeline_version = current_pipeline_version()
        self.device = detect_device(settings)
        self.pg_queue = PostgresJobQueue(url, queues=self.queues)
        self.shared = SharedState(url)
        super().__init__(
            self.pg_queue, settings, self.scratch / "results", chain=chain, on_phase=self._hand_back,
            lease_seconds=lease, heartbeat_seconds=beat, poll_seconds=poll_seconds,
        )
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._listen_thread: threading.Thread | None = None

    @property
    def size(self) -> int:
        """Concurrent jobs of this worker (``--jobs``; ``pipeline.workers`` is the node's)."""
        return self.jobs

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._beat()
        super().start()
        self._beat_stop.clear()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="radnode-worker-registry", daemon=True)
        self._beat_thread.start()
        self._listen_thread = threading.Thread(
            target=self.pg_queue.listen, args=(self._on_work, self._beat_stop), name="radnode-worker-listen", daemon=True
        )
        self._listen_thread.start()
        log.info("worker %s: queues %s, device %s, pipeline %s, scratch %s", self.name, ",".join(self.queues), self.device,
                 self.pipeline_version, self.scratch)

    def stop(self, timeout: float = 30.0, drain_seconds: float = 0.0) -> None:
        self._beat_stop.set()
        super().stop(timeout, drain_seconds=drain_seconds)
        if self._listen_thread is not None:
            self._listen_thread.join(timeout)  # leaves within a second of the stop
        try:
            self._beat()
        except Exception:
            log.warning("worker %s: last registry heartbeat failed", self.name)

    def _on_work(self, lane: str | None) -> None:
        """A job became claimable in ``lane`` (``None``: perhaps in any): claim now if it is ours."""
        if lane is None or lane in self.queues:
            self.wake()

    def _beat(self) -> None:
        busy = self.busy()
        for index in range(max(1, self.size)):
            worker_id = f"{self.name}/w{index}"
            self.shared.worker_beat(
                worker_id, os.uname().nodename, self.queues, self.device, self.pipeline_version, self.bundle_sha256,
                busy.get(worker_id),
            )

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.heartbeat_seconds):
            try:
                self._beat()
            except Exception as exc:  # PostgreSQL restarting: the next beat reconnects
                log.warning("worker %s: registry heartbeat failed: %s", self.name, exc)

    # -- one job --------------------------------------------------------------------------

    def refusal(self, job: Job) -> str | None:
        """Why this worker must not run ``job`` (another chain version or models), else ``None``."""
        _, wanted_bundle = self.pg_queue.lane(job.id)
        if job.pipeline_version != self.pipeline_version:
            return (f"worker {self.name} runs pipeline version {self.pipeline_version}; job {job.id} asks for "
                    f"{job.pipeline_version}: upgrade the worker or the node so both match")
        if wanted_bundle and wanted_bundle != self.bundle_sha256:
            return (f"worker {self.name} has model checksum {self.bundle_sha256[:12]}…; job {job.id} asks for "
                    f"{wanted_bundle[:12]}…: install the node's model bundle and models settings on the worker")
        return None

    def run_job(self, job: Job, worker_id: str) -> Job | None:
        why = self.refusal(job)
        if why is not None:
            log.error("refusing job %d: %s", job.id, why)
            return self._give_up(job, worker_id, VERSION_MISMATCH, why)
        node = self.shared.node()
        if node is None:
            return self._give_up(job, worker_id, FETCH_FAILED, "no node has registered in the database yet")
        folder = self.scratch / "input" / str(job.id)
        try:
            count = fetch_series(node, job.study_uid, job.series_uid, folder, self.ae_title, tls=self.settings.node.tls)
        except FetchError as exc:
            if exc.node_down:  # a restarting node delays the job, never fails it
                log.warning("job %d: %s; job handed back, retrying in %.0f s", job.id, exc, NODE_DOWN_WAIT_SECONDS)
                try:
                    self.queue.release(job.id, worker_id)
                except LeaseLost:
                    pass
                self._stopping.wait(NODE_DOWN_WAIT_SECONDS)
                return None
            log.error("job %d: %s", job.id, exc)
            return self._give_up(job, worker_id, FETCH_FAILED, str(exc))
        except OSError as exc:  # scratch full or unwritable
            log.error("job %d: %s", job.id, exc)
            return self._give_up(job, worker_id, FETCH_FAILED, str(exc))
        log.info("job %d: fetched %d instance(s) of series %s from %s", job.id, count, job.series_uid, node.ae_title)
        try:
            return super().run_job(dataclasses.replace(job, input_path=folder), worker_id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(self.out_dir(job), ignore_errors=True)

    def _give_up(self, job: Job, worker_id: str, reason: str, error: str) -> Job | None:
        try:
            return self.queue.fail(job.id, worker_id, reason, error, retryable=True)
        except LeaseLost:
            return None

    def _hand_back(self, job: Job, phase: Phase, out_dir: Path, files: list[Path]) -> int:
        self.shared.hand_back(job.id, Phase(phase).value, self.name, out_dir, files)
        return len(files)
