"""Reference-free quality score of a tumour contour: does radnode trust what it is about to send?

A planning system that receives a wrong GTV is worse off than one that receives none, and
the demo network is wrong often. No reference exists at inference time, so the
score combines signals that go with a wrong contour on the cases we could measure:

* **test-time augmentation agreement** (weight 0.40): the network is run again on the
  tumour's neighbourhood, mirrored left-right (optionally also moved by a few voxels, see
  :class:`TTAParams`), each time
  through the *same* :func:`~radnode.models.inference.predict_probabilities` and
  :func:`~radnode.models.inference.postprocess_mask` as the main prediction; the Dice of
  each such contour with the one sent is the agreement. A network that has learned the
  tumour gives the same answer; one that guesses at a vessel or the hilum does not;
* **confidence** (0.25): the mean tumour probability inside the contour, rescaled so that
  the decision threshold is 0 and certainty is 1; its spread is reported too;
* **one object** (0.10): the share of the contour's volume in its largest component (a
  contour broken into scattered islands is rarely one GTV);
* **in the lung** (0.10): the share inside the lung mask (bleed into the mediastinum or
  chest wall lowers it);
* **shape** (0.10): marching-cubes sphericity of the largest component, full marks from
  0.6 (solid tumours are 0.6-0.9; spiculated or bleeding masks are lower);
* **volume** (0.05): plausible GTV volumes (0.5-800 mL) score 1, falling off on a log
  scale to 0 at 0.03 mL and 1500 mL.

Besides the score, one rule flags a contour whatever its score: a **competing detection**.
When the post-processing keeps only the most probable component(s) (``max_components``) and
a dropped one holds at least a given share of the kept one's summed probability, the
network found two comparably tumour-like structures and radnode picked one; that pick is a
guess a planner must check. It catches the confidently wrong contour that the
self-consistency signals cannot see (a vessel bundle found with high probability and
stable under mirroring, while the nodule lay elsewhere). The share is calibrated per model
like the threshold (``competitor_ratio`` of the calibration entry, fitted after the
threshold); uncalibrated models use :data:`COMPETITOR_RATIO`. It does not enter the score.

The weights are fixed a priori (agreement and confidence carry most, as in the TTA and
probability-based quality-control literature); only the **threshold** is fitted, on the
calibration set of ``scripts/calibrate_contour_quality.py``, and written with the
model's name and version to :data:`CALIBRATION_FILE` (or a bundle's own
``quality_calibration.json``). Below the threshold the contour is flagged
:data:`UNCERTAIN_TEXT`. A model without a calibration uses :data:`DEFAULT_THRESHOLD` and
says that it is not calibrated.

Cost: one network window (``roi_size``) per augmentation, over the largest component of
the contour plus a margin: one extra window per case by default (the main pass runs several windows
over three detector boxes). A first version over the whole contour's box cost more than
the segmentation itself on the real CTs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from radnode.models.candidates import Box, box_from_mask, mm_to_voxels
from radnode.models.inference import (
    GridSegmentation,
    InferenceSettings,
    box_extent_mm,
    postprocess_mask,
    predict_probabilities,
    with_coarse,
)
from radnode.models.metrics import dice
from radnode.models.preprocess import PreprocessedCase
from radnode.models.raseg import RASeg
from radnode.models.regions import sphericity

#: The flag's wording, used verbatim in result.json, the SR, the RTSTRUCT, status and logs.
UNCERTAIN_TEXT = "tumour contour uncertain — review required"
#: The same in ASCII, for DICOM text whose character set is the source's (RTSTRUCT, SEG).
UNCERTAIN_TEXT_ASCII = UNCERTAIN_TEXT.replace("\u2014", "-")
#: Short form for names limited in length (RTSTRUCT ROI Name, 64 characters).
UNCERTAIN_SUFFIX = " (uncertain)"
#: Calibrations shipped with radnode, one per (model name, version).
CALIBRATION_FILE = Path(__file__).with_name("quality_calibration.json")
#: A bundle may carry its own calibration under this name.
BUNDLE_CALIBRATION = "quality_calibration.json"
#: Threshold for a model without a calibration (flagged as uncalibrated).
DEFAULT_THRESHOLD = 0.6

#: Weight of each part in the combined score (sum 1); see the module docstring.
WEIGHTS: dict[str, float] = {
    "tta_agreement": 0.40,
    "confidence": 0.25,
    "one_object": 0.10,
    "in_lung": 0.10,
    "shape": 0.10,
    "volume": 0.05,
}
#: A dropped component with at least this share of the kept one's summed probability makes
#: the choice between them a guess: the contour is flagged whatever its score (the value for
#: a model whose calibration does not fit its own).
COMPETITOR_RATIO = 0.5
#: The reason given for that flag.
COMPETING_DETECTION = "competing_detection"
#: Sphericity from which the shape part is 1.
FULL_SPHERICITY = 0.6
#: Plausible GTV volumes (mL): 1 inside, log-scale ramp to 0 at the outer limits.
PLAUSIBLE_ML = (0.5, 800.0)
IMPLAUSIBLE_ML = (0.03, 1500.0)

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


class QualityError(ValueError):
    """The quality score cannot be computed as asked (bad calibration file, shapes)."""


@dataclass(frozen=True)
class TTAParams:
    """The test-time augmentations of the agreement signal.

    Attributes
    ----------
    flip_axes
        Axes (z, y, x of the preprocessed grid) to mirror, one pass each; 2 = left-right.
    shift_vox
        One extra pass with the window moved by these voxels (z, y, x), e.g. ``(3, 5, 5)``
        (not multiples of 8, the network's total stride); ``None`` (default): no shift.
        On the calibration set the shifted pass separated good from bad contours less well
        than the flip (AUC 0.939 against 0.957 as the only augmentation) and added nothing
        to it (0.957 with both), at the cost of a second network pass.
    margin_mm
        Context around the largest component's bounding box (must exceed the shift); the
        region is capped at one ``roi_size`` window (see :func:`_assessed_region`).
    """

    flip_axes: tuple[int, ...] = (2,)
    shift_vox: tuple[int, int, int] | None = None
    margin_mm: float = 12.0


@dataclass(frozen=True)
class QualitySignals:
    """Every measured signal of one contour (JSON-ready through :func:`dataclasses.asdict`)."""

    tta_dice: tuple[float, ...]
    probability_mean: float
    probability_std: float
    components: int
    largest_component_fraction: float
    outside_lung_fraction: float
    volume_ml: float
    sphericity: float | None
    competitor_ratio: float | None = None

    @property
    def tta_agreement(self) -> float | None:
        """Mean Dice of the augmented contours with the contour sent (``None``: no TTA ran)."""
        return float(np.mean(self.tta_dice)) if self.tta_dice else None


@dataclass(frozen=True)
class QualityCalibration:
    """Where the threshold comes from."""

    threshold: float
    calibrated: bool
    competitor_ratio: float = COMPETITOR_RATIO
    model_name: str | None = None
    model_version: str | None = None
    auc: float | None = None
    n: int | None = None
    date: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class ContourQuality:
    """The quality assessment of one tumour contour.

    Attributes
    ----------
    signals
        The raw signals (``None`` when there is no contour).
    parts
        Each signal mapped to [0, 1] (1 = no sign of trouble).
    score
        Weighted mean of ``parts`` (:data:`WEIGHTS`); ``None`` when there is no contour.
    uncertain
        ``score < calibration.threshold``, or a competing detection
        (``calibration.competitor_ratio``): the contour needs a person's review.
    reasons
        The parts below 0.5, worst first (what a reviewer should look at).
    calibration
        The threshold used and its provenance.
    seconds
        Wall time of the assessment (the TTA passes dominate).
    """

    signals: QualitySignals | None
    parts: dict[str, float]
    score: float | None
    uncertain: bool
    reasons: list[str]
    calibration: QualityCalibration
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for result.json and the job record."""
        signals = None
        if self.signals is not None:
            signals = {k: _round(v) for k, v in asdict(self.signals).items()}
            signals["tta_agreement"] = _round(self.signals.tta_agreement)
        return {
            "score": _round(self.score),
            "threshold": self.calibration.threshold,
            "uncertain": self.uncertain,
            "flag": UNCERTAIN_TEXT if self.uncertain else None,
            "reasons": list(self.reasons),
            "parts": {k: _round(v) for k, v in self.parts.items()},
            "signals": signals,
            "calibration": asdict(self.calibration),
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, (tuple, list)):
        return [_round(v) for v in value]
    return value


# --------------------------------------------------------------------------- signals


def _ramp(value: float, zero: float, one: float) -> float:
    """0 at ``zero``, 1 at ``one``, linear between, clipped."""
    return float(np.clip((value - zero) / (one - zero), 0.0, 1.0))


def volume_part(volume_ml: float) -> float:
    """1 for plausible GTV volumes, falling to 0 on a log scale outside (see :data:`PLAUSIBLE_ML`)."""
    if volume_ml <= 0:
        return 0.0
    v = math.log10(volume_ml)
    low = _ramp(v, math.log10(IMPLAUSIBLE_ML[0]), math.log10(PLAUSIBLE_ML[0]))
    high = _ramp(-v, -math.log10(IMPLAUSIBLE_ML[1]), -math.log10(PLAUSIBLE_ML[1]))
    return min(low, high)


def score_parts(signals: QualitySignals, threshold: float = 0.5) -> dict[str, float]:
    """Each signal mapped to [0, 1]; ``threshold`` is the network's tumour probability cut."""
    agreement = signals.tta_agreement
    return {
        "tta_agreement": 1.0 if agreement is None else float(agreement),
        "confidence": _ramp(signals.probability_mean, threshold, 1.0),
        "one_object": float(signals.largest_component_fraction),
        "in_lung": 1.0 - float(signals.outside_lung_fraction),
        "shape": 0.0 if signals.sphericity is None else _ramp(signals.sphericity, 0.0, FULL_SPHERICITY),
        "volume": volume_part(signals.volume_ml),
    }


def combine(parts: Mapping[str, float]) -> float:
    """The combined score: the :data:`WEIGHTS`-weighted mean of the parts."""
    missing = sorted(set(WEIGHTS) - set(parts))
    if missing:
        raise QualityError(f"quality parts missing: {missing}")
    return float(sum(WEIGHTS[k] * parts[k] for k in WEIGHTS))


def competitor_ratio(component_masses: Sequence[float], max_components: int | None) -> float | None:
    """The best dropped component's summed probability over the weakest kept one's.

    ``component_masses`` are those of :func:`~radnode.models.inference.postprocess_components`
    (largest first); ``None`` when nothing was chosen between (no ``max_components``, or
    no more components than it keeps): then there was no pick to doubt.
    """
    if max_components is None or len(component_masses) <= max_components:
        return None
    kept = component_masses[max_components - 1]
    return float(component_masses[max_components] / kept) if kept > 0 else None


def contour_signals(
    mask: np.ndarray,
    probability: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: Sequence[float],
    tta_dice: Sequence[float] = (),
    competitor: float | None = None,
) -> QualitySignals:
    """The signals of a non-empty contour on one grid (all arrays the same shape);
    ``competitor`` is :func:`competitor_ratio` of the post-processing's choice."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != probability.shape or mask.shape != lung.shape:
        raise QualityError(f"mask {mask.shape}, probability {probability.shape} and lung {lung.shape} must match")
    if not mask.any():
        raise QualityError("quality signals need a non-empty contour")
    inside = probability[mask]
    box = box_from_mask(mask, spacing_zyx)
    assert box is not None
    mask, lung = mask[box.slices], lung[box.slices]  # labelling the contour's box, not the grid
    labels, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    spher = sphericity(largest, spacing_zyx)
    return QualitySignals(
        tta_dice=tuple(float(d) for d in tta_dice),
        probability_mean=float(inside.mean()),
        probability_std=float(inside.std()),
        components=int(count),
        largest_component_fraction=float(sizes.max() / sizes.sum()),
        outside_lung_fraction=float(1.0 - (lung[mask] != 0).mean()),
        volume_ml=float(mask.sum() * np.prod(spacing_zyx) / 1000.0),
        sphericity=None if math.isnan(spher) else spher,
        competitor_ratio=competitor,
    )


# --------------------------------------------------------------------------- test-time augmentation


def _largest_component_box(mask: np.ndarray, spacing: Sequence[float]) -> Box:
    """The bounding box of the largest 26-connected component of a non-empty ``mask``."""
    whole = box_from_mask(mask, spacing)
    assert whole is not None
    labels, _count = ndimage.label(mask[whole.slices], structure=_FULL_CONNECTIVITY)
    largest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    local = box_from_mask(largest, spacing)
    assert local is not None
    return Box(tuple(a + o for a, o in zip(local.start, whole.start)),  # type: ignore[arg-type]
               tuple(b + o for b, o in zip(local.stop, whole.start)))  # type: ignore[arg-type]


def _assessed_region(box: Box, shape: Sequence[int], spacing: Sequence[float], settings: InferenceSettings,
                     params: TTAParams) -> Box:
    """Where the augmentations run: the largest component's ``box`` (:func:`_largest_component_box`)
    plus the margin, at most one ``roi_size`` window (centred on that component) of a grid of
    ``shape``, so each augmentation is one network pass.

    The largest component is the one that matters most to a planner; scattered islands
    are already counted by the ``one_object`` part.
    """
    region = box.grow(mm_to_voxels(params.margin_mm, spacing), shape)
    start, stop = list(region.start), list(region.stop)
    for i, (size, limit) in enumerate(zip(region.shape, settings.roi_size)):
        if size > limit:
            centre = (box.start[i] + box.stop[i]) // 2
            start[i] = int(np.clip(centre - limit // 2, 0, shape[i] - limit))
            stop[i] = start[i] + limit
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]


def _offset_window(region: Box, contour: Box, shift: Sequence[int]) -> Box:
    """``region`` with ``shift`` voxels taken off one side per axis, so the content is offset
    against the network's windows and strides.

    The side cut is the one where the margin leaves the contour whole (the start when both
    do); this works on a grid no larger than the region, where moving it could not.
    """
    start, stop = list(region.start), list(region.stop)
    for i, s in enumerate(shift):
        if stop[i] - start[i] <= s:
            continue
        if start[i] + s <= contour.start[i] or stop[i] - s < contour.stop[i]:
            start[i] += s
        else:
            stop[i] -= s
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]


def box_input(grid: GridSegmentation, shape: Sequence[int]) -> np.ndarray:
    """The a2t box channel the main pass used: the union of its boxes (all ones without a box)."""
    if not grid.boxes:
        return np.ones(tuple(shape), dtype=np.float32)
    return np.maximum.reduce([b.mask(shape) for b in grid.boxes])


def tta_agreement(
    model: RASeg,
    case: PreprocessedCase,
    grid: GridSegmentation,
    settings: InferenceSettings,
    params: TTAParams | None = None,
) -> list[float]:
    """Dice of each augmented, post-processed contour with the contour sent (``grid.mask``).

    Each augmentation runs the main path's own functions (sliding-window
    :func:`predict_probabilities` and, for a large tumour, the coarse pass of
    :func:`~radnode.models.inference.with_coarse`, then :func:`postprocess_mask` with the same settings)
    on the assessed region; the flip is undone before comparing, the shifted pass runs on
    the region with a few voxels cut off one side (:func:`_offset_window`) and is compared
    on that window.
    """
    params = params or TTAParams()
    if not grid.mask.any():
        return []
    spacing = case.record.spacing_zyx
    shape = case.image.shape
    component = _largest_component_box(grid.mask, spacing)
    region = _assessed_region(component, shape, spacing, settings, params)
    boxes = box_input(grid, shape)

    def contour(window: Box, probability: np.ndarray) -> np.ndarray:
        # exactly the post-processing of the contour sent (search region, confidence rules)
        search = grid.search if grid.search is not None else case.lung
        return postprocess_mask(
            probability >= settings.threshold, search[window.slices], spacing,
            settings.min_component_mm3, settings.min_lung_fraction, settings.fill_holes, settings.lung_margin_mm,
            probability=probability, min_component_confidence=settings.min_component_confidence,
            max_components=settings.max_components,
        )

    # A large tumour had the coarse pass too; judge the prediction it came from. Its box is
    # taken as the detector's would be: the component plus the box margin on each side.
    extent = box_extent_mm(component, spacing) + 2 * settings.detector.box_margin_mm

    def predict(image: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
        return with_coarse(model, image, box_mask, predict_probabilities(model, image, box_mask, settings), extent,
                           settings)

    agreement: list[float] = []
    image, box_mask = case.image[region.slices], boxes[region.slices]
    for axis in params.flip_axes:
        flipped = predict(np.ascontiguousarray(np.flip(image, axis)), np.ascontiguousarray(np.flip(box_mask, axis)))
        agreement.append(dice(contour(region, np.flip(flipped, axis)), grid.mask[region.slices]))
    if params.shift_vox is not None:
        contour_box = box_from_mask(grid.mask[region.slices], spacing)
        assert contour_box is not None
        local = _offset_window(Box((0, 0, 0), region.shape), contour_box, params.shift_vox)
        moved = Box(tuple(a + o for a, o in zip(local.start, region.start)),  # type: ignore[arg-type]
                    tuple(b + o for b, o in zip(local.stop, region.start)))  # type: ignore[arg-type]
        probability = predict(case.image[moved.slices], boxes[moved.slices])
        agreement.append(dice(contour(moved, probability), grid.mask[moved.slices]))
    return agreement


# --------------------------------------------------------------------------- calibration


def _read_calibrations(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise QualityError(f"{path}: cannot read the quality calibration ({exc})") from exc
    entries = data.get("calibrations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise QualityError(f"{path}: expected an object with a 'calibrations' list")
    return entries


def calibration_for(model_name: str, model_version: str, bundle_path: Path | None = None,
                    shipped: Path = CALIBRATION_FILE) -> QualityCalibration:
    """The threshold for this model: the bundle's own calibration, else radnode's, else the default.

    A calibration counts only for the exact model name and version it was measured on:
    other weights need their own (``scripts/calibrate_contour_quality.py``).
    """
    sources = [p for p in ((bundle_path / BUNDLE_CALIBRATION) if bundle_path else None, shipped) if p and p.is_file()]
    for path in sources:
        for entry in _read_calibrations(path):
            if entry.get("model_name") == model_name and str(entry.get("model_version")) == str(model_version):
                try:
                    threshold = float(entry["threshold"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise QualityError(f"{path}: calibration of {model_name} {model_version} has no numeric threshold") from exc
                return QualityCalibration(
                    threshold=threshold, calibrated=True,
                    competitor_ratio=float(entry.get("competitor_ratio", COMPETITOR_RATIO)),
                    model_name=model_name, model_version=str(model_version),
                    auc=entry.get("auc"), n=entry.get("n"), date=entry.get("date"), source=path.name,
                )
    return QualityCalibration(threshold=DEFAULT_THRESHOLD, calibrated=False, model_name=model_name,
                              model_version=str(model_version))


# --------------------------------------------------------------------------- the assessment


def judge(signals: QualitySignals | None, calibration: QualityCalibration, probability_threshold: float = 0.5,
          seconds: float = 0.0) -> ContourQuality:
    """Score the signals and compare with the calibrated threshold (no contour: nothing to flag)."""
    notes = [] if calibration.calibrated else [
        f"quality threshold not calibrated for {calibration.model_name} {calibration.model_version}: "
        f"default {DEFAULT_THRESHOLD} used"
    ]
    if signals is None:
        return ContourQuality(None, {}, None, False, ["no tumour contour"], calibration, seconds, notes)
    parts = score_parts(signals, probability_threshold)
    score = combine(parts)
    reasons = [k for k, v in sorted(parts.items(), key=lambda kv: kv[1]) if v < 0.5]
    competing = signals.competitor_ratio is not None and signals.competitor_ratio >= calibration.competitor_ratio
    if competing:
        reasons.insert(0, COMPETING_DETECTION)
    uncertain = score < calibration.threshold or competing
    return ContourQuality(signals, parts, score, uncertain, reasons, calibration, seconds, notes)


def assess_contour(
    model: RASeg,
    case: PreprocessedCase,
    grid: GridSegmentation,
    settings: InferenceSettings,
    calibration: QualityCalibration,
    params: TTAParams | None = None,
) -> ContourQuality:
    """The whole assessment of the contour in ``grid`` (on the preprocessed grid, where the network ran)."""
    start = time.perf_counter()
    signals = None
    if grid.mask.any():
        agreement = tta_agreement(model, case, grid, settings, params)
        signals = contour_signals(grid.mask, grid.probability, case.lung, case.record.spacing_zyx, agreement,
                                  competitor_ratio(grid.component_masses, settings.max_components))
    return judge(signals, calibration, settings.threshold, time.perf_counter() - start)
