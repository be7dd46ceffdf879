"""What each destination gets when a job's tumour contour is flagged uncertain.

The chain writes the tumour contour's quality verdict to ``<results>/contour_quality.json``
before it hands over the contours phase (:mod:`radnode.pipeline.chain`); when the node
stages a phase it reads that file and applies each destination's ``uncertain_contour``
policy (:class:`~radnode.config.model.UncertainContourPolicy`):

* ``send`` (default): the objects as they are; the flag travels inside them (ROI name
  suffix and observation in the RTSTRUCT, segment label in the SEG, finding in the SR);
* ``hold``: the items are staged ``held``; nothing goes out until a person runs
  ``radnode jobs release ID`` (the review page of the dashboard will do the same);
* ``skip_tumour``: the destination gets the lungs-only SEG and RTSTRUCT the chain wrote to
  ``<results>/lungs_only/`` instead of the full ones, and no SR (its measurements and
  predictions rest on the uncertain tumour).

A certain contour, a case without a verdict file (a chain that predates it) or an
unreadable one is treated as certain only when the file is absent; an unreadable file
counts as uncertain, since sending a doubtful GTV is the worse mistake.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from radnode.config import Destination
from radnode.config.model import UncertainContourPolicy
from radnode.pipeline.jobs import Phase
from radnode.pipeline.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)

#: The chain's verdict on the tumour contour (result.json's ``review`` block).
QUALITY_FILE = "contour_quality.json"
#: Sub-folder of the lungs-only SEG/RTSTRUCT for ``skip_tumour`` destinations.
LUNGS_ONLY_DIR = "lungs_only"


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
) -> list[OutboxItem]:
    """Stage one phase of a job for its destinations, each according to its policy."""
    common = {"job_id": job_id, "source_series_uid": source_series_uid, "only_phase": phase}
    if not contour_uncertain(out_dir):
        return outbox.stage(files, destinations, **common)
    by_policy: dict[UncertainContourPolicy, list[Destination]] = {p: [] for p in UncertainContourPolicy}
    for dest in destinations:
        by_policy[dest.uncertain_contour].append(dest)
    items = outbox.stage(files, by_policy[UncertainContourPolicy.SEND], **common)
    if by_policy[UncertainContourPolicy.HOLD]:
        items += outbox.stage(files, by_policy[UncertainContourPolicy.HOLD], hold=True, **common)
    skip = by_policy[UncertainContourPolicy.SKIP_TUMOUR]
    if skip and phase is Phase.CONTOURS:
        lungs_only = sorted((Path(out_dir) / LUNGS_ONLY_DIR).glob("*.dcm"))
        if not lungs_only:
            log.error("job %s: no lungs-only objects in %s for %s; nothing staged for them",
                      job_id, out_dir, ", ".join(d.name for d in skip))
        items += outbox.stage(lungs_only, skip, **common)
    log.warning(
        "job %s: tumour contour uncertain — review required; phase %s: sent flagged to %s, held for %s, "
        "lungs only to %s", job_id, phase.value,
        ", ".join(d.name for d in by_policy[UncertainContourPolicy.SEND]) or "none",
        ", ".join(d.name for d in by_policy[UncertainContourPolicy.HOLD]) or "none",
        ", ".join(d.name for d in skip) or "none",
    )
    return items


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
