"""What a job process tells the worker thread that owns it: one typed message per event.

The chain runs in a spawned child (:mod:`radnode.pipeline.child`); everything it reports
crosses the process boundary as one of the frozen dataclasses below, pickled over a pipe.
Phase, stage state and chain status are enums, so a misspelt name fails in the child (where
the chain reports it) instead of being silently ignored by the parent.

There is exactly one way results reach the outbox: the chain hands over a delivery phase
with its files (:class:`PhaseReady`, from ``run_chain``'s ``on_phase`` hook), and the
worker stages those files. Nothing is staged by scanning the result folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from radnode.pipeline.jobs import Phase


class StageState(StrEnum):
    """Where a chain stage is (the second argument of ``chain.ProgressHook``)."""

    START = "start"
    DONE = "done"
    FAILED = "failed"


class ChainStatus(StrEnum):
    """How the chain function ended (``ChainResult.status``)."""

    DONE = "done"
    REJECTED = "rejected"  # QC refused the series; retrying cannot help
    FAILED = "failed"  # the chain caught an error and wrote it to result.json


@dataclass(frozen=True)
class Progress:
    """A chain stage started or ended."""

    stage: str
    state: StageState


@dataclass(frozen=True)
class PhaseReady:
    """A delivery phase's objects are complete on disk: stage exactly these files."""

    phase: Phase
    files: tuple[Path, ...]


@dataclass(frozen=True)
class Finished:
    """The chain function returned."""

    status: ChainStatus
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    #: The tumour contour's quality verdict (result.json's ``review`` block), for status and metrics.
    review: dict[str, Any] = field(default_factory=dict)

    def as_result(self) -> dict[str, Any]:
        """The mapping stored with the job (``Job.result``)."""
        return {
            "status": self.status.value,
            "error": self.error,
            "outputs": dict(self.outputs),
            "qc": dict(self.qc),
            "review": dict(self.review),
        }


@dataclass(frozen=True)
class Raised:
    """An exception escaped the chain function (the child then exits)."""

    error: str
    traceback: str


#: Everything the child sends to its parent.
ChildMessage = Progress | PhaseReady | Finished | Raised


def progress_message(stage: str, state: str) -> Progress:
    """The message for ``progress(stage, state)``; an unknown state raises ``ValueError``."""
    return Progress(str(stage), StageState(state))


def phase_message(phase: str | Phase, files: dict[str, Any] | None) -> PhaseReady:
    """The message for the chain's ``on_phase(name, {kind: path})``.

    Raises ``ValueError`` for a phase name that is not a :class:`Phase` (the chain then
    fails with that error, instead of its results being left unstaged).
    """
    try:
        known = Phase(phase)
    except ValueError:
        raise ValueError(f"unknown delivery phase {phase!r}; known: {', '.join(p.value for p in Phase)}") from None
    return PhaseReady(known, tuple(Path(f) for f in dict(files or {}).values()))


def finished_message(result: Any) -> Finished:
    """The message for the chain's return value (a ``ChainResult`` or a mapping of its shape).

    A status that is not a :class:`ChainStatus` is reported as ``failed`` naming it.
    """
    data = result if isinstance(result, dict) else {
        k: getattr(result, k, None) for k in ("status", "error", "outputs", "qc", "review")
    }
    error = data.get("error")
    try:
        status = ChainStatus(str(data.get("status")))
    except ValueError:
        status = ChainStatus.FAILED
        error = f"chain returned unknown status {data.get('status')!r}" + (f": {error}" if error else "")
    return Finished(
        status=status,
        error=None if error is None else str(error),
        outputs={str(k): str(v) for k, v in dict(data.get("outputs") or {}).items()},
        qc=dict(data.get("qc") or {}),
        review=dict(data.get("review") or {}),
    )
