"""Leave-one-out fold weights, loaded so that a case is only ever scored by a fold that never saw it.

``scripts/train_demo_segmentation.py --work WORK`` leaves each fold's fine-tuned network in
``WORK/loo-<case>/last.pt``. Held-out figures (Dice in ``benchmarks/seg_accuracy.py``, the
real-CT rows of the quality calibration) are only honest if the loader refuses a checkpoint
that was trained on the case it is asked to score, or one that has not finished training,
so those checks live here, once, for every script that reads folds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from radnode.models.raseg import RASeg, RASegConfig


class FoldError(ValueError):
    """A fold checkpoint cannot score the case as held out (trained on it, or unfinished)."""


def fold_checkpoint(work: Path, case_id: str) -> Path:
    """Where the training script writes the fold that holds ``case_id`` out."""
    return Path(work) / f"loo-{case_id}" / "last.pt"


def load_fold_model(work: Path, case_id: str) -> RASeg | None:
    """The network of the fold that held ``case_id`` out, in eval mode; ``None`` when there is no fold.

    Raises :class:`FoldError` when the checkpoint's training cases include ``case_id`` or
    its step count is short of its configured steps (a fold still being trained).
    """
    checkpoint = fold_checkpoint(work, case_id)
    if not checkpoint.is_file():
        return None
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if case_id in payload.get("train_ids", []):
        raise FoldError(f"{checkpoint}: this fold was trained on {case_id}; it cannot score it as held out")
    steps = int(payload.get("config", {}).get("steps", 0))
    if int(payload.get("step", 0)) < steps:
        raise FoldError(f"{checkpoint}: the fold is still training (step {payload.get('step')} of {steps})")
    model = RASeg(RASegConfig.from_dict(payload["architecture"]))
    model.load_state_dict(payload["model"])
    return model.eval()
