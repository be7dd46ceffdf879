"""The sandbox one job attempt runs in: a spawned child process the node survives.

The processing chain loads models and large volumes; a segmentation fault, an
out-of-memory kill or an endless loop in it must never take the DICOM listener down. Every
attempt therefore runs in a fresh ``spawn``-ed process (no state inherited from the
listener), in its own process group, and dies with its parent (``PR_SET_PDEATHSIG``), so a
``kill -9`` of the node leaves no orphan writing into a result folder the next attempt
reuses. :class:`ChildRunner`, on the parent thread that owns the child,

* receives the child's typed messages (:mod:`radnode.pipeline.messages`): forwards its
  progress, and hands a delivery phase over the moment the chain reports it ("contours
  first") through ``run_chain``'s ``on_phase(name, files)`` hook;
* calls ``keep_going`` (the job's lease heartbeat) and kills the child when it says no;
* kills the whole process group when the job's timeout elapses;
* turns the child's end (result, exception, signal, exit code) into one
  :class:`ChildOutcome`.

Which jobs run, and what their outcome does to the queue, is the pool's business
(:mod:`radnode.pipeline.worker`).

Test hook
---------
The function the child runs is named by an import reference ``"package.module:function"``
or ``"/path/to/file.py:function"`` with the signature of
:func:`radnode.pipeline.chain.run_chain`. It defaults to :data:`DEFAULT_CHAIN`; pass
``chain=`` to :class:`~radnode.pipeline.worker.WorkerPool` /
:class:`~radnode.pipeline.service.PipelineService` (end-to-end tests start
:func:`radnode.cli.serve_cmd.run_node` with it). Nothing in the environment can choose the
chain: a process's environment must not decide which code the workers execute.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import multiprocessing
import os
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
from radnode.pipeline.jobs import Job, Phase
from radnode.pipeline.messages import (
    ChainStatus,
    ChildMessage,
    Finished,
    PhaseReady,
    Progress,
    Raised,
    finished_message,
    phase_message,
    progress_message,
)

log = logging.getLogger(__name__)

#: The production chain.
DEFAULT_CHAIN = "radnode.pipeline.chain:run_chain"
#: Seconds between heartbeats (well inside the job's lease).
HEARTBEAT_SECONDS = 10.0
#: Seconds between SIGTERM and SIGKILL when a child must stop.
KILL_GRACE_SECONDS = 5.0
#: Exit code of a child whose chain function raised (the traceback travels over the pipe).
EXIT_CHAIN_RAISED = 70

#: ``prctl`` option that delivers a signal to the child when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1

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
    status: ChainStatus | None = None  # how the chain ended, for RESULT
    error: str | None = None
    traceback: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def chain_reference(explicit: str | None = None) -> str:
    """The chain to run: ``explicit`` (a caller's Python argument), else the real chain."""
    return explicit or DEFAULT_CHAIN


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

    def send(message: ChildMessage) -> None:
        conn.send(message)

    def progress(stage: str, state: str) -> None:
        send(progress_message(stage, state))

    def on_phase(phase: str, files: dict[str, Any]) -> None:
        send(phase_message(phase, files))

    try:
        chain = resolve_chain(chain_ref)
        result = chain(Path(input_path), Path(out_dir), settings, progress, on_phase=on_phase)
        send(finished_message(result))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        try:
            send(Raised(f"{type(exc).__name__}: {exc}", tb_module.format_exc()))
        finally:
            conn.close()
            os._exit(EXIT_CHAIN_RAISED)
    conn.close()


#: Called when the chain hands over a phase: (phase, the phase's files).
PhaseReport = Callable[[Phase, list[Path]], None]


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
        ended: list[Finished | Raised] = []

        def handle(message: ChildMessage) -> None:
            match message:
                case Progress(stage=stage, state=state):
                    on_progress(stage, state.value)
                case PhaseReady(phase=phase, files=files):
                    on_phase(phase, list(files))
                case Finished() | Raised():
                    ended.append(message)
                case _:
                    log.error("job %d: unexpected message from the job process: %r", job.id, message)

        pipe_open = True
        try:
            while True:
                if pipe_open and parent_conn.poll(0.2):
                    try:
                        handle(parent_conn.recv())
                    except (EOFError, OSError):
                        pipe_open = False
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
                    handle(parent_conn.recv())
                except (EOFError, OSError):
                    break
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
        end = ended[-1] if ended else None
        if isinstance(end, Finished) and process.exitcode == 0:
            return ChildOutcome(OutcomeKind.RESULT, seconds, 0, status=end.status, error=end.error, result=end.as_result())
        if isinstance(end, Raised):
            return ChildOutcome(OutcomeKind.RAISED, seconds, process.exitcode, error=end.error, traceback=end.traceback)
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
