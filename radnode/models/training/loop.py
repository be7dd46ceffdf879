"""The RA-Seg training loop: Dice + cross-entropy, Adam, checkpoints, resume, validation.

Determinism without saved random states
---------------------------------------
Every random choice of step ``s`` (which cases, the patch, the augmentation draws, the
box jitter, dropout) is seeded from ``(seed, s)`` alone. A run resumed from the checkpoint
of step ``s`` therefore draws exactly what an uninterrupted run draws from step ``s`` on;
together with the model and Adam states in the checkpoint it continues bit for bit (on
the same device and thread count; CUDA convolutions may still differ in the last bits).

Checkpoints
-----------
``<checkpoint_dir>/last.pt`` holds the model, the optimiser, the step, the loss history,
the validation history and what was trained (architecture, configuration, case ids). It
is written every ``checkpoint_every`` steps and at the end, atomically (temporary file +
rename), so an interrupted run always leaves a usable one. Resuming checks that the
architecture and the case ids match and refuses otherwise.

Validation
----------
Dice per validation case on its whole grid, with the network run as at inference
(:func:`radnode.models.inference.predict_probabilities`, sliding window over the tumour's
box grown by ``val_context_mm``) but with the box from the reference label, so the figure
measures the network, not the candidate detector.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss

from radnode import durable
from radnode.models.bundle import save_bundle
from radnode.models.candidates import DetectorParams, box_from_mask, mm_to_voxels
from radnode.models.inference import (
    InferenceSettings,
    configure_cpu_threads,
    predict_probabilities,
    resolve_device,
)
from radnode.models.metrics import dice
from radnode.models.preprocess import PreprocessParams
from radnode.models.raseg import FAITHFUL_CHANNELS, RASeg, RASegConfig
from radnode.models.training.data import Fold, TrainingCase, kfold_split
from radnode.models.training.transforms import (
    BBOX,
    IMAGE,
    LABEL,
    negative_sample,
    sample_dict,
    training_transforms,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
#: Case ids of synthetic phantoms start with this (see ``TrainConfig.real_case_weight``).
PHANTOM_PREFIX = "phantom"
#: Case ids of nodule crops start with this (see ``TrainConfig.crop_case_weight``).
CROP_PREFIX = "crop-"
#: Channels of the ``small`` width: a quarter of the published ones (16x fewer weights).
SMALL_CHANNELS = (16, 32, 64, 128)
WIDTHS: dict[str, tuple[int, ...]] = {"faithful": FAITHFUL_CHANNELS, "small": SMALL_CHANNELS}


class TrainingError(RuntimeError):
    """Training cannot start or resume as asked."""


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (stored in checkpoints and the bundle).

    Attributes
    ----------
    steps
        Optimiser steps (one batch each).
    batch_size
        Patches per step.
    learning_rate, weight_decay
        Adam's.
    patch_size
        Training patch (z, y, x) on the 1 × 1 × 1.5 mm grid.
    pos_fraction
        Share of patches centred on a tumour voxel.
    negative_fraction
        Share of patches drawn around a hard-negative detector box
        (:attr:`~radnode.models.training.data.TrainingCase.negatives`) with that box as the
        a2t input; 0 keeps the plain positive/background sampling.
    real_case_weight
        Sampling weight of cases whose id does not start with ``phantom`` relative to
        phantom cases (1: uniform). A handful of real CTs among many phantoms would
        otherwise hardly ever be drawn.
    crop_case_weight
        Sampling weight of nodule crops (case ids starting with ``crop-``, see
        :mod:`radnode.models.training.lidc_crops`) relative to phantom cases; hundreds of
        small crops would otherwise crowd out the few whole CTs.
    augment, augment_prob
        The method's augmentations and the probability of each.
    box_margin_mm, box_jitter_mm
        The a2t box: margin around the tumour and random per-face jitter.
    checkpoint_every
        Steps between checkpoints.
    validate_every
        Steps between validations (0: only at the end).
    seed
        Seed of everything random (see the module docstring).
    device
        ``auto``, ``cpu`` or ``cuda``.
    num_threads
        torch CPU threads (``None``: automatic).
    val_roi_size, val_context_mm
        Sliding window and context of validation (and the bundle's inference defaults).
    """

    steps: int = 2000
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    patch_size: tuple[int, int, int] = (32, 96, 96)
    pos_fraction: float = 0.67
    negative_fraction: float = 0.0
    real_case_weight: float = 1.0
    crop_case_weight: float = 1.0
    augment: bool = True
    augment_prob: float = 0.5
    box_margin_mm: float = 5.0
    box_jitter_mm: float = 3.0
    checkpoint_every: int = 100
    validate_every: int = 0
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    val_roi_size: tuple[int, int, int] = (64, 96, 96)
    val_context_mm: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))
        object.__setattr__(self, "val_roi_size", tuple(int(v) for v in self.val_roi_size))
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.validate_every < 0:
            raise TrainingError(f"validate_every: must be >= 0, got {self.validate_every}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise TrainingError(f"patch_size: three positive voxel counts (z, y, x), got {self.patch_size}")
        if self.learning_rate <= 0:
            raise TrainingError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.negative_fraction < 1.0:
            raise TrainingError(f"negative_fraction: must be in [0, 1), got {self.negative_fraction}")
        if self.real_case_weight <= 0 or self.crop_case_weight <= 0:
            raise TrainingError(f"real_case_weight, crop_case_weight: must be > 0, got "
                                f"{self.real_case_weight}, {self.crop_case_weight}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        data["val_roi_size"] = list(self.val_roi_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are ignored: newer checkpoints)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def architecture_for(width: str = "faithful", **overrides: Any) -> RASegConfig:
    """RA-Seg architecture of a named width (``faithful``: 64-128-256-512, ``small``: 16-32-64-128)."""
    if width not in WIDTHS:
        raise TrainingError(f"width: one of {sorted(WIDTHS)}, got {width!r}")
    return RASegConfig(channels=WIDTHS[width], **overrides)


@dataclass
class FoldResult:
    """Outcome of one training run.

    Attributes
    ----------
    name
        ``fold-<k>`` or ``all``.
    model
        The trained network (eval mode, on CPU).
    step
        Steps done in total (including those before a resume).
    validation
        Dice per validation case at the end (empty without validation cases).
    losses
        Loss per step, from step 1.
    val_history
        ``(step, mean Dice)`` of each validation.
    resumed_from
        The step the run resumed from (0 for a fresh start).
    """

    name: str
    model: RASeg
    step: int
    validation: dict[str, float]
    losses: list[float]
    val_history: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def validation_dice(self) -> float | None:
        """Mean validation Dice, ``None`` without validation cases."""
        return float(np.mean(list(self.validation.values()))) if self.validation else None


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def case_weight(case_id: str, config: TrainConfig) -> float:
    """Sampling weight of a case: phantoms 1, nodule crops ``crop_case_weight``, other real cases ``real_case_weight``."""
    if case_id.startswith(PHANTOM_PREFIX):
        return 1.0
    if case_id.startswith(CROP_PREFIX):
        return config.crop_case_weight
    return config.real_case_weight


def make_batch(
    cases: Sequence[TrainingCase], transforms: Any, config: TrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of ``step``: (image, bbox, label) tensors (B, 1, D, H, W), drawn from ``(seed, step)``."""
    rng = _step_rng(config.seed, step)
    weights = np.array([case_weight(c.case_id, config) for c in cases])
    images, boxes, labels = [], [], []
    for _ in range(config.batch_size):
        case = cases[int(rng.choice(len(cases), p=weights / weights.sum()))]
        if case.negatives and rng.random() < config.negative_fraction:
            box = case.negatives[int(rng.integers(len(case.negatives)))]
            sample = negative_sample(case.image, case.label, box, config.patch_size, rng)
        else:
            transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
            sample = transforms(sample_dict(case.image, case.label))[0]
        images.append(torch.as_tensor(sample[IMAGE]).as_subclass(torch.Tensor).float())
        boxes.append(torch.as_tensor(sample[BBOX]).as_subclass(torch.Tensor).float())
        labels.append(torch.as_tensor(sample[LABEL]).as_subclass(torch.Tensor).round().long())
    return torch.stack(images), torch.stack(boxes), torch.stack(labels)


def validate(
    model: RASeg, cases: Sequence[TrainingCase], config: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Dice per case (see the module docstring); leaves the model in eval mode."""
    settings = InferenceSettings(
        roi_size=config.val_roi_size, device=device.type, num_threads=config.num_threads,  # type: ignore[arg-type]
        deep_features=False,
    )
    scores: dict[str, float] = {}
    for case in cases:
        spacing = case.spacing_zyx
        box = box_from_mask(case.label, spacing, config.box_margin_mm)
        if box is None:
            continue
        region = box.grow(mm_to_voxels(config.val_context_mm, spacing), case.label.shape)
        box_mask = box.mask(case.label.shape)
        probs = predict_probabilities(model, case.image[region.slices], box_mask[region.slices], settings)
        pred = np.zeros(case.label.shape, dtype=bool)
        pred[region.slices] = probs >= 0.5
        scores[case.case_id] = dice(pred, case.label != 0)
    return scores


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with durable.replacing(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, arch: RASegConfig, train_ids: Sequence[str]) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable file: say which
        raise TrainingError(f"{path}: cannot read the checkpoint ({exc})") from exc
    if payload.get("architecture") != arch.to_dict():
        raise TrainingError(
            f"{path}: checkpoint architecture {payload.get('architecture')} differs from the requested "
            f"{arch.to_dict()}; use the same --width or another output"
        )
    if list(payload.get("train_ids", [])) != list(train_ids):
        raise TrainingError(f"{path}: checkpoint was trained on other cases (or another fold/seed)")
    return payload


def train_model(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase],
    arch: RASegConfig,
    config: TrainConfig,
    checkpoint_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = False,
    name: str = "all",
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> FoldResult:
    """Train one network on ``train_cases`` and validate it on ``val_cases``.

    Parameters
    ----------
    train_cases, val_cases
        Prepared cases (:func:`radnode.models.training.data.prepare_case`).
    arch, config
        Architecture and hyper-parameters.
    checkpoint_dir
        Where ``last.pt`` goes (``None``: no checkpoints).
    resume
        Continue from ``checkpoint_dir/last.pt`` when it exists.
    progress
        Show a rich progress bar.
    name
        Label for logs and the progress bar.
    initial_state
        Weights to start from (fine-tuning a pre-trained network) instead of the seeded
        random initialisation; a resumed checkpoint takes precedence.
    """
    if not train_cases:
        raise TrainingError(f"{name}: no training cases")
    device = resolve_device(config.device)
    if device.type == "cpu":
        configure_cpu_threads(config.num_threads)
    train_ids = [c.case_id for c in train_cases]
    spacing = train_cases[0].spacing_zyx
    transforms = training_transforms(
        config.patch_size, spacing, pos_fraction=config.pos_fraction, augment=config.augment,
        augment_prob=config.augment_prob, margin_mm=config.box_margin_mm, jitter_mm=config.box_jitter_mm,
    )
    torch.manual_seed(config.seed)
    model = RASeg(arch)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    step, losses, val_history = 0, [], []
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        payload = _load_checkpoint(checkpoint, arch, train_ids)
        model.load_state_dict(payload["model"])
        optimiser.load_state_dict(payload["optimizer"])
        step, losses = int(payload["step"]), list(payload["losses"])
        val_history = [tuple(v) for v in payload.get("val_history", [])]
        log.info("%s: resumed from step %d (%s)", name, step, checkpoint)
    resumed_from = step

    def save() -> None:
        if checkpoint is None:
            return
        _save_checkpoint(checkpoint, {
            "model": model.state_dict(), "optimizer": optimiser.state_dict(), "step": step,
            "losses": losses, "val_history": [list(v) for v in val_history],
            "architecture": arch.to_dict(), "config": config.to_dict(), "train_ids": train_ids,
            "val_ids": [c.case_id for c in val_cases], "name": name,
        })

    bar = _progress(progress)
    task = bar.add_task(name, total=config.steps, completed=step, loss=float("nan")) if bar else None
    try:
        model.train()
        while step < config.steps:
            image, box, label = (t.to(device) for t in make_batch(train_cases, transforms, config, step))
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout of this step
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(image, box), label)
            loss.backward()
            optimiser.step()
            step += 1
            losses.append(float(loss.detach()))
            if bar is not None and task is not None:
                bar.update(task, completed=step, loss=losses[-1])
            if config.validate_every and step % config.validate_every == 0 and step < config.steps and val_cases:
                val_history.append((step, float(np.mean(list(validate(model, val_cases, config, device).values())))))
                model.train()
            if step % config.checkpoint_every == 0:
                save()
    finally:
        if bar is not None:
            bar.stop()
    scores = validate(model, val_cases, config, device) if val_cases else {}
    finished_before = resumed_from == step  # a resumed run that had nothing left to do
    if scores and not finished_before:
        val_history.append((step, float(np.mean(list(scores.values())))))
    model.eval()
    if not finished_before:  # leave a finished checkpoint alone (other processes may read it)
        save()
    log.info("%s: %d steps, last loss %.4f, validation Dice %s", name, step,
             losses[-1] if losses else float("nan"),
             f"{np.mean(list(scores.values())):.3f}" if scores else "-")
    return FoldResult(name, model.cpu(), step, scores, losses, val_history, resumed_from)


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
    )
    bar.start()
    return bar


@dataclass
class TrainingReport:
    """What :func:`train_and_bundle` did."""

    bundle: Path
    folds: list[FoldResult]
    final: FoldResult
    metrics: dict[str, Any]


def train_and_bundle(
    cases: Sequence[TrainingCase],
    out: str | Path,
    arch: RASegConfig,
    config: TrainConfig,
    *,
    folds: int = 5,
    fold: int | None = None,
    workdir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    data_description: str = "",
    name: str = "raseg-trained",
    version: str = "0.1.0",
    preprocessing: PreprocessParams | None = None,
    overwrite: bool = False,
    initial_state: Mapping[str, torch.Tensor] | None = None,
) -> TrainingReport:
    """Cross-validate, train the model to ship and write it as a bundle.

    * ``folds == 1``: one model on every case, no validation;
    * ``fold = k``: the model of fold ``k`` (validated on its held-out cases) is the bundle;
    * ``fold = None`` (all): every fold is trained and validated (the cross-validation
      Dice goes into the bundle's metrics), then one model on every case, same steps, is
      the bundle; its expected performance is the cross-validation figure.

    Checkpoints go to ``workdir/<fold-k|all>/`` (default ``<out>.work``); ``resume``
    continues each from its last checkpoint. ``initial_state`` fine-tunes every model from
    those weights (e.g. the bundled demo model's) instead of a random start.
    """
    out = Path(out)
    workdir = Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    by_id = {c.case_id: c for c in cases}
    splits = kfold_split(list(by_id), folds, config.seed)
    if fold is not None and not 0 <= fold < len(splits):
        raise TrainingError(f"fold: must be in 0..{len(splits) - 1} (or all), got {fold}")
    chosen: list[Fold] = [] if folds == 1 else (splits if fold is None else [splits[fold]])
    results = []
    for split in chosen:
        run_name = f"fold-{split.index}"
        results.append(train_model(
            [by_id[i] for i in split.train], [by_id[i] for i in split.validation], arch, config,
            workdir / run_name, resume=resume, progress=progress, name=run_name, initial_state=initial_state,
        ))
    if fold is not None and results:
        final = results[0]
    else:
        final = train_model(list(by_id.values()), [], arch, config, workdir / "all",
                            resume=resume, progress=progress, name="all", initial_state=initial_state)
    per_case = {k: v for r in results for k, v in r.validation.items()}
    metrics: dict[str, Any] = {
        "folds": folds,
        "trained_folds": [r.name for r in results],
        "validation_dice_per_fold": {r.name: r.validation_dice for r in results},
        "validation_dice_per_case": per_case,
        "validation_dice_mean": float(np.mean(list(per_case.values()))) if per_case else None,
        "steps": final.step,
        "final_loss": final.losses[-1] if final.losses else None,
        "bundle_model": final.name,
    }
    inference = InferenceSettings(
        roi_size=config.val_roi_size, context_mm=config.val_context_mm,
        detector=DetectorParams(box_margin_mm=config.box_margin_mm),
    )
    description = (
        f"{len(cases)} cases{': ' + data_description if data_description else ''}; "
        f"{'no cross-validation' if folds == 1 else f'{folds}-fold cross-validation (seed {config.seed})'}; "
        f"bundle model: {final.name} ({final.step} steps)"
    )
    bundle = save_bundle(
        final.model, out, name=name, version=version, training_data=description, metrics=metrics,
        intended_use="research only; not for diagnosis or treatment planning", demo=False,
        preprocessing=preprocessing, inference=inference, overwrite=overwrite,
        extra={"training": {"config": config.to_dict(), "case_ids": sorted(by_id),
                            "folds": [{"index": s.index, "validation": list(s.validation)} for s in splits]
                            if folds > 1 else []}},
    )
    return TrainingReport(bundle, results, final, metrics)


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """``config`` with the non-``None`` overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
