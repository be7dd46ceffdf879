"""Run queued jobs, each in its own child process, so the node survives any job.

The processing chain loads models and large volumes; a segmentation fault, an
out-of-memory kill or an endless loop in it must never take the DICOM listener down. Every
attempt therefore runs in a fresh ``spawn``-ed process (no state inherited from the
listener), in its own process group, and dies with its parent (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the node leaves no orphan writing into a result folder the next attempt
reuses. The parent thread that owns the child

* forwards the chain's progress, and stages a delivery phase the moment the chain reports
  it (issue 10, "contours first"): through ``run_chain``'s ``on_phase(name, files)`` hook,
  or, for chains without that parameter, a progress event ``("phase:<name>", "done")``;
* renews the job's lease (:meth:`JobQueue.heartbeat`) and kills the child when the job is
  cancelled;
* kills the whole process group when ``pipeline.job_timeout_seconds`` elapses;
* turns the child's end (result, exception, signal, exit code) into one queue transition.

Test hook
---------
The function the child runs is named by an import reference ``"package.module:function"``
or ``"/path/to/file.py:function"`` with the signature of
:func:`radnode.pipeline.chain.run_chain`. It defaults to :data:`DEFAULT_CHAIN`; pass
``chain=`` to :class:`WorkerPool` / :class:`~radnode.pipeline.service.PipelineService`, or
set the environment variable :data:`CHAIN_ENV_VAR` (used by end-to-end tests that start
``radnode serve`` as a separate process).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import traceback as tb_module
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from radnode.config import Settings
from radnode.pipeline.jobs import (
    STAGE_DONE,
    FailureReason,
    Job,
    Phase,
    PhaseState,
    parse_phase_marker,
)
from radnode.pipeline.queue import JobQueue, LeaseLost

log = logging.getLogger(__name__)

#: The production chain.
DEFAULT_CHAIN = "radnode.pipeline.chain:run_chain"
#: Environment variable that overrides the chain reference (tests of a whole ``radnode serve``).
CHAIN_ENV_VAR = "RADNODE_PIPELINE_CHAIN"
#: Seconds a job's lease lasts without a heartbeat; a node that died longer ago than this
#: has its running jobs recovered by :meth:`JobQueue.recover`.
LEASE_SECONDS = 60.0
#: Seconds between heartbeats (well inside the lease).
HEARTBEAT_SECONDS = 10.0
#: Seconds between SIGTERM and SIGKILL when a child must stop.
KILL_GRACE_SECONDS = 5.0
#: Exit code of a child whose chain function raised (the traceback travels over the pipe).
EXIT_CHAIN_RAISED = 70

#: ``prctl`` option that delivers a signal to the child when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1

#: Messages from child to parent: ("progress", stage, state), ("result", dict), ("error", dict).
Message = tuple[Any, ...]
ChainFunction = Callable[..., Any]


class OutcomeKind(StrEnum):
    """How a child process ended."""

    RESULT = "result"  # the chain returned (its status says done / rejected / failed)
    RAISED = "raised"  # the chain function raised; traceback captured
    CRASHED = "crashed"  # the process died without a result (signal, os._exit, OOM killer)
    TIMEOUT = "timeout"  # killed after pipeline.job_timeout_seconds
    CANCELLED = "cancelled"  # killed because the job lost its lease (cancelled by an operator)
    STOPPED = "stopped"  # killed because the node is shutting down


@dataclass
class ChildOutcome:
    """The end of one attempt as the parent saw it."""

    kind: OutcomeKind
    seconds: float
    exitcode: int | None = None
    status: str | None = None  # chain status for RESULT: "done" | "rejected" | "failed"
    error: str | None = None
    traceback: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def chain_reference(explicit: str | None = None) -> str:
    """The chain to run: ``explicit``, else ``$RADNODE_PIPELINE_CHAIN``, else the real chain."""
    return explicit or os.environ.get(CHAIN_ENV_VAR) or DEFAULT_CHAIN


def resolve_chain(reference: str) -> ChainFunction:
    """Import ``"module:function"`` or ``"/file.py:function"`` and return the function.

    Raises
    ------
    ValueError
        When the reference has no ``:`` or names nothing callable.
    """
    module_name, sep, attr = reference.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"chain reference {reference!r} must look like 'package.module:function' or '/path/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        spec = importlib.util.spec_from_file_location(f"_radnode_chain_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"chain reference {reference!r}: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"chain reference {reference!r}: {attr!r} is not a callable in {module_name}")
    return func


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when the parent goes (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the orphan finishes its attempt
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


#: Added to the job process's OOM score (Linux ``/proc/self/oom_score_adj``, -1000..1000): under
#: memory pressure the kernel kills the job, not the listener. Raising it needs no privilege.
OOM_SCORE_ADJ = 500


def _prefer_oom_kill() -> None:
    """Make this process the out-of-memory killer's first choice (Linux only)."""
    try:
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
    except OSError:
        pass


def _result_payload(result: Any) -> dict[str, Any]:
    """What the parent needs from a ``ChainResult`` (or a dict of the same shape)."""
    if isinstance(result, dict):
        data = result
    else:
        data = {k: getattr(result, k, None) for k in ("status", "error", "outputs", "qc", "review")}
    return {
        "status": str(data.get("status") or "failed"),
        "error": data.get("error"),
        "outputs": dict(data.get("outputs") or {}),
        "qc": data.get("qc") or {},
        "review": data.get("review") or {},
    }


def _accepts_on_phase(chain: ChainFunction) -> bool:
    """Whether the chain takes the ``on_phase`` hook of :func:`radnode.pipeline.chain.run_chain`."""
    try:
        return "on_phase" in inspect.signature(chain).parameters
    except (TypeError, ValueError):
        return False


def _child_main(
    chain_ref: str,
    input_path: str,
    out_dir: str,
    settings: Settings,
    conn: Connection,
    parent_pid: int,
    log_context: dict[str, Any],
) -> None:
    """Entry point of the job process (runs in the spawned child)."""
    _die_with_parent(parent_pid)
    _prefer_oom_kill()
    os.setpgid(0, 0)  # own process group: a timeout kill reaches the chain's helpers too
    logging.basicConfig(
        level=settings.logging.level,
        stream=sys.stderr,
        format=(
            "%(asctime)s %(levelname)s [job {job_id} series {series_uid}] %(name)s: %(message)s".format(**log_context)
        ),
    )

    def progress(stage: str, state: str) -> None:
        conn.send(("progress", stage, state))

    def on_phase(phase: str, files: dict[str, Any]) -> None:
        conn.send(("phase", str(phase), [str(Path(f)) for f in dict(files or {}).values()]))

    try:
        chain = resolve_chain(chain_ref)
        if _accepts_on_phase(chain):
            result = chain(Path(input_path), Path(out_dir), settings, progress, on_phase=on_phase)
        else:
            result = chain(Path(input_path), Path(out_dir), settings, progress)
        conn.send(("result", _result_payload(result)))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        try:
            conn.send(
                (
                    "error",
                    {"error": f"{type(exc).__name__}: {exc}", "traceback": tb_module.format_exc()},
                )
            )
        finally:
            conn.close()
            os._exit(EXIT_CHAIN_RAISED)
    conn.close()


#: Called when the chain hands over a phase: (phase, its files or ``None`` = look in the folder).
PhaseReport = Callable[[Phase, list[Path] | None], None]


def _relay_phase(message: Message, on_phase: PhaseReport) -> None:
    """Pass the chain's ``on_phase(name, files)`` on to the parent's handler."""
    name = str(message[1])
    try:
        phase = Phase(name)
    except ValueError:
        log.warning("chain reported unknown delivery phase %r; known: %s", name, ", ".join(p.value for p in Phase))
        return
    files = [Path(f) for f in message[2]] if len(message) > 2 and message[2] else None
    on_phase(phase, files)


def describe_exit(exitcode: int | None) -> str:
    """Human wording of a child's exit status (negative = killed by that signal)."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out-of-memory killer or operator)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {exitcode}"


class ChildRunner:
    """Runs one attempt of one job in a spawned child process and watches it.

    Parameters
    ----------
    chain
        Import reference of the chain function (see the module docstring).
    settings
        Passed to the chain (pickled into the child).
    timeout_seconds
        Wall-clock limit of the attempt.
    heartbeat_seconds
        How often ``keep_going`` is asked whether the job is still ours.
    """

    def __init__(self, chain: str, settings: Settings, timeout_seconds: float, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.chain = chain
        self.settings = settings
        self.timeout_seconds = timeout_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._ctx = multiprocessing.get_context("spawn")

    def run(
        self,
        job: Job,
        out_dir: Path,
        on_progress: Callable[[str, str], None],
        on_phase: PhaseReport,
        keep_going: Callable[[], bool],
        stopping: threading.Event,
    ) -> ChildOutcome:
        """Start the child, relay its messages, enforce timeout/cancel/stop, return how it ended."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_child_main,
            args=(
                self.chain,
                str(job.input_path),
                str(out_dir),
                self.settings,
                child_conn,
                os.getpid(),
                {"job_id": job.id, "series_uid": job.series_uid},
            ),
            name=f"radnode-job-{job.id}",
            daemon=False,  # the chain may start helper processes of its own
        )
        start = time.monotonic()
        process.start()
        child_conn.close()  # so recv() sees EOF when the child is gone
        deadline = start + self.timeout_seconds
        next_beat = start + self.heartbeat_seconds
        outcome: ChildOutcome | None = None
        payload: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        pipe_open = True
        try:
            while True:
                if pipe_open and parent_conn.poll(0.2):
                    try:
                        message = parent_conn.recv()
                    except (EOFError, OSError):
                        pipe_open = False
                        continue
                    kind = message[0]
                    if kind == "progress":
                        on_progress(str(message[1]), str(message[2]))
                    elif kind == "phase":
                        _relay_phase(message, on_phase)
                    elif kind == "result":
                        payload = message[1]
                    elif kind == "error":
                        error = message[1]
                    continue
                if not pipe_open:
                    process.join(0.2)
                if not process.is_alive():
                    break
                now = time.monotonic()
                if now >= deadline:
                    self._kill(process)
                    outcome = ChildOutcome(
                        OutcomeKind.TIMEOUT,
                        now - start,
                        process.exitcode,
                        error=f"timed out after {self.timeout_seconds:g} s (pipeline.job_timeout_seconds); "
                        "the job process was killed",
                    )
                    break
                if stopping.is_set():
                    self._kill(process)
                    outcome = ChildOutcome(OutcomeKind.STOPPED, now - start, process.exitcode, error="node shutting down")
                    break
                if now >= next_beat:
                    next_beat = now + self.heartbeat_seconds
                    if not keep_going():
                        self._kill(process)
                        outcome = ChildOutcome(
                            OutcomeKind.CANCELLED, now - start, process.exitcode, error="job no longer held (cancelled)"
                        )
                        break
            # Drain what the child sent just before it exited.
            while pipe_open and parent_conn.poll(0):
                try:
                    message = parent_conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "result":
                    payload = message[1]
                elif message[0] == "error":
                    error = message[1]
                elif message[0] == "progress":
                    on_progress(str(message[1]), str(message[2]))
                elif message[0] == "phase":
                    _relay_phase(message, on_phase)
        finally:
            if process.is_alive():
                self._kill(process)
            process.join(KILL_GRACE_SECONDS)
            parent_conn.close()
        seconds = time.monotonic() - start
        if outcome is not None:
            outcome.exitcode = process.exitcode
            outcome.seconds = seconds
            return outcome
        if payload is not None and process.exitcode == 0:
            return ChildOutcome(
                OutcomeKind.RESULT, seconds, 0, status=payload["status"], error=payload.get("error"), result=payload
            )
        if error is not None:
            return ChildOutcome(
                OutcomeKind.RAISED, seconds, process.exitcode, error=error.get("error"), traceback=error.get("traceback")
            )
        return ChildOutcome(
            OutcomeKind.CRASHED,
            seconds,
            process.exitcode,
            error=f"job process {describe_exit(process.exitcode)} before reporting a result",
        )

    @staticmethod
    def _kill(process: multiprocessing.process.BaseProcess) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left after a grace period."""
        pid = process.pid
        if pid is None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, KILL_GRACE_SECONDS)):
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:  # the child may not have reached setpgid yet
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
            process.join(wait)
            if not process.is_alive():
                # Helpers in the group may outlive the leader; they go too.
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                return


#: Called when a phase's objects are on disk: (job, phase, out_dir, the phase's files or
#: ``None`` when the chain did not list them) -> number of objects staged.
PhaseCallback = Callable[[Job, Phase, Path, "list[Path] | None"], int]
#: Called after the queue recorded the end of an attempt: (job as stored, outcome).
FinishedCallback = Callable[[Job, ChildOutcome], None]


class WorkerPool:
    """``pipeline.workers`` threads, each claiming jobs and running them in a child process.

    Parameters
    ----------
    queue
        Where jobs come from and where their outcome goes.
    settings
        Concurrency (``pipeline.workers``) and the per-job timeout come from here.
    results_dir
        ``<results_dir>/<job id>/`` is the chain's output folder (emptied before each attempt).
    chain
        Import reference of the chain function (test hook; see the module docstring).
    on_phase
        Stages a finished phase for dispatch; its return value is the number of objects.
    on_finished
        Told about every attempt's end (metrics, logging).
    lease_seconds, heartbeat_seconds, poll_seconds
        Lease length, heartbeat interval, and idle wait between claims.
    name
        Prefix of the worker ids stored with claimed jobs.
    """

    def __init__(
        self,
        queue: JobQueue,
        settings: Settings,
        results_dir: Path,
        *,
        chain: str | None = None,
        on_phase: PhaseCallback | None = None,
        on_finished: FinishedCallback | None = None,
        lease_seconds: float = LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        poll_seconds: float = 2.0,
        name: str | None = None,
    ) -> None:
        if heartbeat_seconds >= lease_seconds:
            raise ValueError(f"heartbeat_seconds ({heartbeat_seconds}) must be shorter than lease_seconds ({lease_seconds})")
        self.queue = queue
        self.settings = settings
        self.results_dir = Path(results_dir)
        self.chain = chain_reference(chain)
        self.on_phase = on_phase
        self.on_finished = on_finished
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.name = name or f"{os.uname().nodename}:{os.getpid()}"
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()  # kill running children
        self._no_claims = threading.Event()  # take no new job
        self._wake = threading.Event()
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Number of concurrent jobs (``pipeline.workers``)."""
        return self.settings.pipeline.workers

    def start(self) -> None:
        """Start the worker threads."""
        if self._threads:
            return
        self._stopping.clear()
        self._no_claims.clear()
        for index in range(self.size):
            worker_id = f"{self.name}/w{index}"
            thread = threading.Thread(target=self._loop, args=(worker_id,), name=f"radnode-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("worker pool started: %d worker(s), chain %s", self.size, self.chain)

    def stop(self, timeout: float = 30.0, drain_seconds: float = 0.0) -> None:
        """Stop claiming; let running jobs finish for up to ``drain_seconds``, then kill the
        children that are left and give their jobs back to the queue (attempt not counted)."""
        self._no_claims.set()
        self._wake.set()
        drain_until = time.monotonic() + drain_seconds
        while self.busy() and time.monotonic() < drain_until:
            time.sleep(0.05)
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        self._threads = []
        log.info("worker pool stopped")

    def wake(self) -> None:
        """Claim now instead of after the idle wait (a job was just enqueued)."""
        self._wake.set()

    def busy(self) -> dict[str, int]:
        """Worker id -> job id currently running."""
        with self._lock:
            return dict(self._busy)

    # -- the worker loop ----------------------------------------------------------------

    def _loop(self, worker_id: str) -> None:
        while not self._no_claims.is_set():
            try:
                job = self.queue.claim(worker_id, self.lease_seconds)
            except Exception:  # a locked or broken database must not end the worker thread
                log.exception("worker %s could not claim a job", worker_id)
                job = None
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            with self._lock:
                self._busy[worker_id] = job.id
            try:
                self.run_job(job, worker_id)
            except Exception:
                log.exception("worker %s: unexpected error around job %d", worker_id, job.id)
            finally:
                with self._lock:
                    self._busy.pop(worker_id, None)

    def out_dir(self, job: Job) -> Path:
        """The chain's output folder for ``job``."""
        return self.results_dir / str(job.id)

    def run_job(self, job: Job, worker_id: str) -> Job | None:
        """Run one claimed job to the end of this attempt and record the outcome."""
        out_dir = self.out_dir(job)
        if out_dir.exists():  # leftovers of an earlier attempt must not be mistaken for results
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        if not job.input_path.exists():
            return self._record(
                job,
                worker_id,
                ChildOutcome(OutcomeKind.RAISED, 0.0, error=f"input folder {job.input_path} does not exist"),
                reason=FailureReason.INPUT_MISSING,
                retryable=False,
            )
        staged: set[Phase] = set()
        staging_errors: list[str] = []

        def deliver(phase: Phase, files: list[Path] | None = None) -> None:
            if phase in staged:
                return
            staged.add(phase)
            try:
                self._deliver_phase(job, phase, out_dir, files)
            except Exception as exc:  # recorded as the attempt's failure below
                staging_errors.append(str(exc))

        def on_progress(stage: str, state: str) -> None:
            phase = parse_phase_marker(stage)
            if phase is not None and state == STAGE_DONE:
                deliver(phase)

        def keep_going() -> bool:
            return self.queue.heartbeat(job.id, worker_id, self.lease_seconds)

        runner = ChildRunner(self.chain, self.settings, self.settings.pipeline.job_timeout_seconds, self.heartbeat_seconds)
        outcome = runner.run(job, out_dir, on_progress, deliver, keep_going, self._stopping)
        log.info(
            "job %d series %s: attempt ended (%s%s) after %.1f s",
            job.id, job.series_uid, outcome.kind.value, f", {outcome.status}" if outcome.status else "", outcome.seconds,
        )
        if outcome.kind is OutcomeKind.STOPPED:
            try:
                self.queue.release(job.id, worker_id)
            except LeaseLost:
                pass
            return None
        if outcome.kind is OutcomeKind.CANCELLED:
            return None
        if outcome.kind is OutcomeKind.RESULT and outcome.status == "done":
            for phase in Phase:
                deliver(phase)
            if staging_errors:
                outcome.error = "; ".join(staging_errors)
                return self._record(job, worker_id, outcome, reason=FailureReason.STAGING_FAILED, retryable=True)
            return self._record(job, worker_id, outcome)
        if outcome.kind is OutcomeKind.RESULT and outcome.status == "rejected":
            return self._record(job, worker_id, outcome, reason=FailureReason.QC_REJECTED, retryable=False)
        reason = {
            OutcomeKind.RESULT: FailureReason.CHAIN_ERROR,
            OutcomeKind.RAISED: FailureReason.EXCEPTION,
            OutcomeKind.CRASHED: FailureReason.CRASHED,
            OutcomeKind.TIMEOUT: FailureReason.TIMEOUT,
        }[outcome.kind]
        return self._record(job, worker_id, outcome, reason=reason, retryable=True)

    def _deliver_phase(self, job: Job, phase: Phase, out_dir: Path, files: list[Path] | None = None) -> None:
        """Stage one phase's objects for dispatch and mark the phase done."""
        objects = 0
        if self.on_phase is not None:
            try:
                objects = self.on_phase(job, phase, out_dir, files)
            except Exception as exc:
                log.exception("job %d: staging phase %s failed", job.id, phase.value)
                self.queue.set_phase(job.id, phase, PhaseState.FAILED, 0)
                raise RuntimeError(f"staging phase {phase.value} of job {job.id} failed: {exc}") from exc
        self.queue.set_phase(job.id, phase, PhaseState.DONE, objects)
        log.info("job %d series %s: phase %s delivered to the outbox (%d object(s))", job.id, job.series_uid, phase.value, objects)

    def _record(
        self,
        job: Job,
        worker_id: str,
        outcome: ChildOutcome,
        reason: FailureReason | None = None,
        retryable: bool = True,
    ) -> Job | None:
        result = dict(outcome.result)
        result.update({"seconds": round(outcome.seconds, 3), "exitcode": outcome.exitcode, "outcome": outcome.kind.value})
        try:
            if reason is None:
                stored = self.queue.complete(job.id, worker_id, result)
            else:
                stored = self.queue.fail(
                    job.id,
                    worker_id,
                    reason,
                    outcome.error or reason.value,
                    traceback=outcome.traceback,
                    retryable=retryable,
                    result=result,
                )
                if stored.state.value == "failed":
                    for phase in Phase:
                        if stored.phase_state(phase) is PhaseState.PENDING:
                            stored = self.queue.set_phase(job.id, phase, PhaseState.FAILED, 0)
        except LeaseLost as lost:
            log.warning("job %d: outcome not recorded: %s", job.id, lost)
            return None
        if self.on_finished is not None:
            try:
                self.on_finished(stored, outcome)
            except Exception:
                log.exception("job %d: on_finished callback failed", job.id)
        return stored
