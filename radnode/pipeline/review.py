"""The review gate: which deliveries wait for a person, and what a reviewer's decision sends.

Two settings put a destination's items in the outbox as ``awaiting_review`` -- one state,
one decision, whichever asked for it:

* ``requires_approval: true`` (e.g. the planning system): always; only an approved copy
  of the RTSTRUCT ever goes there (:func:`approve`);
* ``uncertain_contour: hold``: only when the chain flagged the tumour contour uncertain.

The chain writes the tumour contour's quality verdict to ``<results>/contour_quality.json``
before it hands over the contours phase (:mod:`radnode.pipeline.chain`); when the node
stages a phase it reads that file and applies each destination's ``uncertain_contour``
policy (:class:`~radnode.config.model.UncertainContourPolicy`):

* ``send`` (default): the objects as they are; the flag travels inside them (ROI name
  suffix and observation in the RTSTRUCT, segment label in the SEG, finding in the SR);
* ``hold``: the items wait for review (above);
* ``skip_tumour``: the destination gets the lungs-only SEG and RTSTRUCT the chain wrote to
  ``<results>/lungs_only/`` instead of the full ones, and no SR (its measurements and
  predictions rest on the uncertain tumour).

A certain contour, a case without a verdict file (a chain that predates it) or an
unreadable one is treated as certain only when the file is absent; an unreadable file
counts as uncertain, since sending a doubtful GTV is the worse mistake.

A reviewer decides once per job, for every destination that waits (dashboard job page,
``/api/jobs/<id>/approve`` and ``/reject``):

* **approve** (optionally leaving out structures): each waiting RTSTRUCT is replaced by a
  new, approved instance (:mod:`radnode.dicom_io.approval`) written to
  ``<results>/approved/``; the SEG and SR follow the decision: they go when every structure
  was approved, and are withheld (``rejected``) when one was left out, since both carry it;
* **reject**: nothing goes to the waiting destinations; the reason is recorded.

``radnode jobs release ID`` lets ``hold`` items go as they are, without a review record;
it never releases a ``requires_approval`` destination's items.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pydicom

from radnode import durable
from radnode.config import Destination
from radnode.config.model import UncertainContourPolicy
from radnode.dicom_io.approval import ApprovalError, approved_rtstruct, roi_names
from radnode.pipeline.jobs import Phase
from radnode.pipeline.outbox import ItemState, Outbox, OutboxItem, ReviewDecision, ReviewError

log = logging.getLogger(__name__)

#: The chain's verdict on the tumour contour (result.json's ``review`` block).
QUALITY_FILE = "contour_quality.json"
#: Sub-folder of the lungs-only SEG/RTSTRUCT for ``skip_tumour`` destinations.
LUNGS_ONLY_DIR = "lungs_only"
#: Sub-folder of the approved RTSTRUCT copies.
APPROVED_DIR = "approved"
#: Longest comment or reason kept (it goes into the RTSTRUCT's Structure Set Description).
MAX_COMMENT = 500
#: Called with (job id, series UID, destination names) when a job's deliveries start waiting.
AwaitingHook = Callable[[int, str, list[str]], object]


def contour_uncertain(out_dir: Path) -> bool:
    """Whether the job in ``out_dir`` flagged its tumour contour for review."""
    path = Path(out_dir) / QUALITY_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("required"))
    except (OSError, ValueError, AttributeError) as exc:
        log.error("cannot read %s (%s): treating the tumour contour as uncertain", path, exc)
        return True


def stage_phase(
    outbox: Outbox,
    files: Sequence[Path],
    destinations: Sequence[Destination],
    out_dir: Path,
    phase: Phase,
    *,
    job_id: int | None = None,
    source_series_uid: str | None = None,
    on_awaiting: AwaitingHook | None = None,
) -> list[OutboxItem]:
    """Stage one phase of a job for its destinations, each according to its settings.

    ``on_awaiting`` is called (never raising into the caller) when this phase is the
    first of the job whose deliveries wait for review.
    """
    common = {"job_id": job_id, "source_series_uid": source_series_uid, "only_phase": phase}
    uncertain = contour_uncertain(out_dir)
    groups: dict[tuple[bool, bool], list[Destination]] = {}
    for dest in destinations:
        policy = dest.uncertain_contour if uncertain else UncertainContourPolicy.SEND
        lungs_only = policy is UncertainContourPolicy.SKIP_TUMOUR
        hold = dest.requires_approval or policy is UncertainContourPolicy.HOLD
        groups.setdefault((lungs_only, hold), []).append(dest)
    items: list[OutboxItem] = []
    for (lungs_only, hold), group in groups.items():
        chosen: Sequence[Path] = files
        if lungs_only:
            if phase is not Phase.CONTOURS:
                continue  # no SR: it rests on the uncertain tumour
            chosen = sorted((Path(out_dir) / LUNGS_ONLY_DIR).glob("*.dcm"))
            if not chosen:
                log.error("job %s: no lungs-only objects in %s for %s; nothing staged for them",
                          job_id, out_dir, ", ".join(d.name for d in group))
        items += outbox.stage(chosen, group, hold=hold, **common)
    items = list({i.id: i for i in items}.values())  # each call returns the object's items so far
    if uncertain:
        log.warning(
            "job %s: tumour contour uncertain — review required; phase %s: %s", job_id, phase.value,
            "; ".join(f"{'lungs only' if lo else 'flagged'}{', awaiting review' if h else ''} to "
                      f"{', '.join(d.name for d in g)}" for (lo, h), g in groups.items()),
        )
    waiting = sorted({i.destination for i in items if i.state is ItemState.AWAITING_REVIEW})
    if waiting and job_id is not None and on_awaiting is not None and _first_waiting_phase(outbox, job_id, phase):
        try:
            on_awaiting(job_id, source_series_uid or "", waiting)
        except Exception:
            log.exception("job %s: the awaiting-review notice failed (the deliveries still wait)", job_id)
    return items


def _first_waiting_phase(outbox: Outbox, job_id: int, phase: Phase) -> bool:
    reviewed = (ItemState.AWAITING_REVIEW, ItemState.REJECTED, ItemState.REPLACED)
    return not any(i.phase != phase.value for i in outbox.items(job_id=job_id, states=reviewed))


# --- decisions --------------------------------------------------------------------------------


def _waiting_rtstructs(outbox: Outbox, job_id: int) -> dict[str, OutboxItem]:
    return {
        i.sop_instance_uid: i for i in outbox.items(job_id=job_id, states=[ItemState.AWAITING_REVIEW])
        if i.object_type == "RTSTRUCT"
    }


def awaiting(outbox: Outbox, job_id: int) -> dict[str, Any]:
    """What waits for review in a job: destinations, items and the structures one may reject."""
    items = outbox.items(job_id=job_id, states=[ItemState.AWAITING_REVIEW])
    structures: list[str] = []
    for item in _waiting_rtstructs(outbox, job_id).values():
        try:
            structures += roi_names(pydicom.dcmread(item.path))
        except (OSError, ValueError, AttributeError) as exc:
            log.error("job %d: cannot read the RTSTRUCT awaiting review at %s: %s", job_id, item.path, exc)
    return {
        "destinations": sorted({i.destination for i in items}),
        "objects": sorted({i.object_type for i in items}),
        "items": len(items),
        "structures": list(dict.fromkeys(structures)),
    }


def _text(value: str) -> str:
    return " ".join(str(value).split())[:MAX_COMMENT]


def approve(
    outbox: Outbox,
    job_id: int,
    reviewer: str,
    results_dir: Path,
    *,
    rejected: Iterable[str] = (),
    comment: str = "",
    uid_root: str = "2.25",
    clock: Callable[[], float] = time.time,
) -> ReviewDecision:
    """Approve a job's waiting deliveries, leaving out the ``rejected`` structures.

    Raises :class:`ReviewError` (nothing waits, decided already, a structure the
    RTSTRUCT lacks, or every structure rejected).
    """
    left_out = list(dict.fromkeys(str(n) for n in rejected))
    rtstructs = _waiting_rtstructs(outbox, job_id)
    datasets = {uid: pydicom.dcmread(item.path) for uid, item in rtstructs.items()}
    names = list(dict.fromkeys(n for ds in datasets.values() for n in roi_names(ds)))
    unknown = [n for n in left_out if n not in names]
    if unknown:
        raise ReviewError(f"job {job_id}: no structure called {', '.join(map(repr, unknown))}; it has {names}")
    if names and not set(names) - set(left_out):
        raise ReviewError(f"job {job_id}: every structure rejected; reject the contours instead")
    now = clock()
    when = datetime.datetime.fromtimestamp(now)
    copies: dict[str, Path] = {}
    for uid, ds in sorted(datasets.items()):
        here = [n for n in left_out if n in roi_names(ds)]
        try:
            approved = approved_rtstruct(ds, reviewer, when, here, _text(comment), uid_root)
        except ApprovalError as exc:  # every structure of this one left out: it is not sent
            log.info("job %d: RTSTRUCT %s not approved: %s", job_id, uid, exc)
            continue
        path = Path(results_dir) / APPROVED_DIR / f"RTSTRUCT-{approved.SOPInstanceUID}.dcm"  # never one of another
        path.parent.mkdir(parents=True, exist_ok=True)
        with durable.replacing(path) as tmp:
            approved.save_as(tmp, enforce_file_format=True)
        copies[uid] = path
    decision = ReviewDecision(
        job_id=job_id, decision="approved", reviewer=reviewer, decided_at=now, comment=_text(comment),
        approved_structures=tuple(n for n in names if n not in left_out), rejected_structures=tuple(left_out),
    )
    try:
        outbox.decide(decision, copies)
    except ReviewError:  # another reviewer was faster: keep only the copies their decision sent
        earlier = outbox.review(job_id)
        sent = set(earlier.approved_objects) if earlier else set()
        for path in copies.values():
            if path.stem.removeprefix("RTSTRUCT-") not in sent:
                path.unlink(missing_ok=True)
        raise
    recorded = outbox.review(job_id)
    assert recorded is not None
    return recorded


def reject(
    outbox: Outbox, job_id: int, reviewer: str, reason: str, clock: Callable[[], float] = time.time
) -> ReviewDecision:
    """Reject a job's waiting deliveries: none of them is ever sent; the reason is recorded."""
    if not _text(reason):
        raise ReviewError("a rejection needs a reason")
    names = list(dict.fromkeys(
        n for item in _waiting_rtstructs(outbox, job_id).values() for n in roi_names(pydicom.dcmread(item.path))
    ))
    outbox.decide(ReviewDecision(job_id=job_id, decision="rejected", reviewer=reviewer, decided_at=clock(),
                                 comment=_text(reason), rejected_structures=tuple(names)))
    recorded = outbox.review(job_id)
    assert recorded is not None
    return recorded


#: Most recent finished jobs whose verdicts ``status`` and the metrics count.
REVIEW_WINDOW = 10000


def job_review(job: object) -> dict[str, object]:
    """A job's ``review`` block (from its stored result; empty when the chain had none)."""
    result = getattr(job, "result", None) or {}
    review = result.get("review") if isinstance(result, dict) else None
    return review if isinstance(review, dict) else {}


def contour_counts(queue: object, window: int = REVIEW_WINDOW) -> dict[str, int]:
    """``uncertain`` / ``acceptable`` tumour contours among the latest ``window`` done jobs."""
    from radnode.pipeline.jobs import JobState

    counts = {"uncertain": 0, "acceptable": 0}
    for job in queue.list(states=[JobState.DONE], limit=window):  # type: ignore[attr-defined]
        review = job_review(job)
        if review.get("tumour_quality_score") is None:
            continue
        counts["uncertain" if review.get("required") else "acceptable"] += 1
    return counts
