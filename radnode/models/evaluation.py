"""``radnode evaluate seg``: automatic contours against reference contours, per case.

Inputs
------
``pred`` and ``truth`` are each a file or a folder of files:

* NIfTI (``.nii``/``.nii.gz``): a label image, non-zero is tumour; the case id is the file
  name without its suffix (and without nnU-Net's ``_0000``);
* DICOM Segmentation (PS3.3 A.51) or RT Structure Set (PS3.3 A.19): read onto the CT
  series they reference, which must be under ``ct`` (a folder searched for that Series
  Instance UID); the case id is the referenced series UID. The segment / ROI is the one
  named by ``pred_roi`` / ``truth_roi``, else the only one, else the one whose name
  contains "GTV" or "tumo(u)r".

Folders are paired by case id; two single files are one case. Both masks must lie on the
same grid (size, and spacing within 1e-3 mm).

Outputs (in ``out_dir``)
------------------------
``metrics.csv``
    One row per case: ids, the files, and every field of
    :class:`radnode.models.metrics.SegmentationMetrics` (Dice, surface Dice at τ, HD95,
    added path length, volumes).
``<case>.png``
    The axial slice with the largest reference area, CT in a lung window (W 1500 / L -600
    HU; black without a CT), the reference outline in green and the automatic outline in
    red.
``summary.png``
    Dice and surface Dice per case as bars, with the means.

Images are drawn with Pillow (already installed with scikit-image) and numpy, so
evaluation adds no plotting library.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.errors import InvalidDicomError
from scipy import ndimage as ndi

from radnode.models.metrics import (
    DEFAULT_SURFACE_TOLERANCE_MM,
    SegmentationMetrics,
    evaluate_segmentation,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.png"
#: Lung window (HU) of the overlays: width 1500, level -600.
LUNG_WINDOW = (-1350.0, 150.0)
TRUTH_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
#: Overlays are enlarged (nearest neighbour, whole factors) to at least this many pixels.
MIN_OVERLAY_PX = 384
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"
_NIFTI = (".nii.gz", ".nii")
_TUMOUR_NAME = re.compile(r"gtv|tumou?r", re.IGNORECASE)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EvaluationError(ValueError):
    """Inputs cannot be read, paired or compared."""


@dataclass
class MaskSource:
    """One input file: what it is and the case it belongs to."""

    path: Path
    kind: str  # nifti | seg | rtstruct
    case_id: str
    series_uid: str | None = None


@dataclass
class CaseMask:
    """A boolean mask (z, y, x) with its spacing (z, y, x) mm and, when known, the CT in HU."""

    mask: np.ndarray
    spacing_zyx: tuple[float, float, float]
    ct: np.ndarray | None = None


@dataclass
class CaseEvaluation:
    """One evaluated case."""

    case_id: str
    pred: Path
    truth: Path
    metrics: SegmentationMetrics
    png: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        """CSV row."""
        return {"case_id": self.case_id, "pred": str(self.pred), "truth": str(self.truth), **self.metrics.as_dict()}


def _nifti_case_id(path: Path) -> str | None:
    for suffix in _NIFTI:
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            return stem.removesuffix("_0000")
    return None


def _referenced_series(ds: pydicom.Dataset) -> str | None:
    for item in ds.get("ReferencedSeriesSequence", []):  # SEG (C.7.4.A / Common Instance Reference)
        return str(item.SeriesInstanceUID)
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):  # RTSTRUCT (C.8.8.5)
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                return str(series.SeriesInstanceUID)
    return None


def classify(path: Path) -> MaskSource | None:
    """What ``path`` is (NIfTI, SEG, RTSTRUCT) or ``None`` for anything else."""
    case_id = _nifti_case_id(path)
    if case_id is not None:
        return MaskSource(path, "nifti", case_id)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError):  # not DICOM: ignored
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    kind = {SEG_SOP_CLASS_UID: "seg", RTSTRUCT_SOP_CLASS_UID: "rtstruct"}.get(sop_class)
    if kind is None:
        return None
    uid = _referenced_series(ds)
    if uid is None:
        raise EvaluationError(f"{path}: {kind.upper()} references no series (Referenced Series Sequence)")
    return MaskSource(path, kind, uid, uid)


def collect(path: str | Path) -> list[MaskSource]:
    """The mask files at ``path`` (a file or a folder, not recursive)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        raise EvaluationError(f"{path}: no such file or folder")
    sources = [s for f in files if (s := classify(f)) is not None]
    if not sources:
        raise EvaluationError(f"{path}: no NIfTI, DICOM SEG or RTSTRUCT file found")
    return sources


def pair(preds: Sequence[MaskSource], truths: Sequence[MaskSource]) -> list[tuple[str, MaskSource, MaskSource]]:
    """Pairs (case id, pred, truth); two single files are one case."""
    if len(preds) == 1 and len(truths) == 1:
        return [(preds[0].case_id, preds[0], truths[0])]
    truth_by_id = {t.case_id: t for t in truths}
    pairs = [(p.case_id, p, truth_by_id[p.case_id]) for p in preds if p.case_id in truth_by_id]
    missing = sorted({p.case_id for p in preds} - set(truth_by_id))
    if missing:
        log.warning("%d predictions have no reference (e.g. %s); left out", len(missing), missing[:3])
    if not pairs:
        raise EvaluationError("no prediction matches a reference by case id (NIfTI name or referenced series UID)")
    return pairs


class _CTCache:
    """CT series under a folder, loaded once per series UID."""

    def __init__(self, ct: Path | None) -> None:
        self.ct = ct
        self._series: dict[str, object] = {}

    def series(self, uid: str, needed_by: Path) -> object:
        if self.ct is None:
            raise EvaluationError(f"{needed_by}: DICOM SEG/RTSTRUCT input needs the CT folder (--ct)")
        if uid not in self._series:
            from radnode.dicom_io.series import load_series

            try:
                self._series[uid] = load_series(self.ct, series_uid=uid, strict=False)
            except Exception as exc:  # the reader's own error says what is wrong
                raise EvaluationError(f"{self.ct}: cannot load CT series {uid} referenced by {needed_by}: {exc}") from exc
        return self._series[uid]


def _pick(names: Sequence[str], wanted: str | None, path: Path, what: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise EvaluationError(f"{path}: no {what} named {wanted!r} (there: {list(names)})")
        return wanted
    if len(names) == 1:
        return names[0]
    matches = [n for n in names if _TUMOUR_NAME.search(n)]
    if len(matches) == 1:
        return matches[0]
    raise EvaluationError(f"{path}: several {what}s {list(names)}; name the tumour one (--pred-roi/--truth-roi)")


def read_mask(source: MaskSource, cts: _CTCache, name: str | None = None) -> CaseMask:
    """Read one input as a boolean mask on its grid (see the module docstring)."""
    if source.kind == "nifti":
        image = sitk.ReadImage(str(source.path))
        spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
        return CaseMask(sitk.GetArrayFromImage(image) != 0, spacing)  # type: ignore[arg-type]
    series = cts.series(source.series_uid or "", source.path)
    ct_image = series.image  # type: ignore[attr-defined]
    spacing = tuple(float(s) for s in reversed(ct_image.GetSpacing()))
    hu = sitk.GetArrayFromImage(ct_image)
    if source.kind == "seg":
        from radnode.dicom_io.seg_writer import seg_to_masks

        masks = seg_to_masks(source.path, series)  # type: ignore[arg-type]
        label = _pick(list(masks), name, source.path, "segment")
        return CaseMask(masks[label], spacing, hu)  # type: ignore[arg-type]
    from radnode.dicom_io.rtstruct_read import rasterise_roi, read_rtstruct_rois

    names = [info.name for info in read_rtstruct_rois(source.path)]
    roi = _pick(names, name, source.path, "ROI")
    return CaseMask(rasterise_roi(source.path, series, roi), spacing, hu)  # type: ignore[arg-type]


def _ct_for_nifti(ct: Path | None, case_id: str) -> np.ndarray | None:
    """A NIfTI CT for the overlay: ``ct`` itself if a file, else ``ct/<case_id>[_0000].nii.gz``."""
    if ct is None:
        return None
    candidates = [ct] if ct.is_file() else [ct / f"{case_id}{s}" for s in ("_0000.nii.gz", ".nii.gz", ".nii")]
    for path in candidates:
        if path.is_file() and _nifti_case_id(path) is not None:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return None


def outline(mask2d: np.ndarray) -> np.ndarray:
    """In-plane boundary pixels of a 2-D mask (4-neighbour)."""
    m = np.asarray(mask2d, dtype=bool)
    return m & ~ndi.binary_erosion(m, border_value=0)


def overlay_image(ct: np.ndarray | None, truth: np.ndarray, pred: np.ndarray, title: str = "") -> Image.Image:
    """RGB overlay of one axial slice (2-D arrays): CT in the lung window, outlines on top."""
    if ct is not None:
        lo, hi = LUNG_WINDOW
        grey = (np.clip((ct.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    else:
        grey = np.zeros(truth.shape, dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    scale = max(1, math.ceil(MIN_OVERLAY_PX / max(truth.shape)))
    rgb = np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8))
    for mask, colour in ((truth, TRUTH_COLOUR), (pred, PRED_COLOUR)):
        big = np.kron(np.asarray(mask, dtype=np.uint8), np.ones((scale, scale), dtype=np.uint8)).astype(bool)
        edge = outline(big)
        edge = edge | ndi.binary_dilation(edge) & big if scale > 2 else edge  # 2 px lines when enlarged
        rgb[edge] = colour
    image = Image.fromarray(rgb, mode="RGB")
    if title:
        ImageDraw.Draw(image).text((4, 4), title, fill=(255, 255, 255))
    return image


def largest_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """Axial index with the largest reference area (the prediction's when the reference is empty)."""
    for mask in (truth, pred):
        areas = np.asarray(mask, dtype=bool).sum(axis=(1, 2))
        if areas.any():
            return int(np.argmax(areas))
    return truth.shape[0] // 2


def summary_image(results: Sequence[CaseEvaluation], width: int = 640) -> Image.Image:
    """Bars of Dice (blue) and surface Dice (orange) per case, 0..1, with the means in the title."""
    row_h, left, top = 22, 160, 30
    height = top + row_h * max(1, len(results)) + 10
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    span = width - left - 20
    dices = [r.metrics.dice for r in results]
    sdices = [r.metrics.surface_dice for r in results]
    mean_sd = np.nanmean(sdices) if any(not math.isnan(v) for v in sdices) else float("nan")
    draw.text((4, 6), f"Dice (blue) mean {np.mean(dices):.3f}   surface Dice (orange) mean {mean_sd:.3f}   n={len(results)}",
              fill=(0, 0, 0))
    for i, result in enumerate(results):
        y = top + i * row_h
        draw.text((4, y + 4), result.case_id[:24], fill=(0, 0, 0))
        for j, (value, colour) in enumerate(((result.metrics.dice, (31, 119, 180)),
                                             (result.metrics.surface_dice, (255, 127, 14)))):
            if math.isnan(value):
                continue
            y0 = y + 2 + j * 9
            draw.rectangle((left, y0, left + max(1, round(value * span)), y0 + 7), fill=colour)
    for tick in (0.0, 0.5, 1.0):
        x = left + int(tick * span)
        draw.line((x, top - 4, x, height - 6), fill=(160, 160, 160))
    return image


def evaluate_cases(
    pred: str | Path,
    truth: str | Path,
    out_dir: str | Path,
    *,
    ct: str | Path | None = None,
    tolerance_mm: float = DEFAULT_SURFACE_TOLERANCE_MM,
    pred_roi: str | None = None,
    truth_roi: str | None = None,
    images: bool = True,
) -> list[CaseEvaluation]:
    """Evaluate every paired case and write the CSV and images (see the module docstring).

    Raises
    ------
    EvaluationError
        Unreadable or unpaired inputs, masks on different grids.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cts = _CTCache(Path(ct) if ct is not None else None)
    results: list[CaseEvaluation] = []
    for case_id, p_src, t_src in pair(collect(pred), collect(truth)):
        p = read_mask(p_src, cts, pred_roi)
        t = read_mask(t_src, cts, truth_roi)
        if p.mask.shape != t.mask.shape or not np.allclose(p.spacing_zyx, t.spacing_zyx, atol=1e-3):
            raise EvaluationError(
                f"case {case_id}: {p_src.path} (shape {p.mask.shape}, spacing {p.spacing_zyx}) and {t_src.path} "
                f"(shape {t.mask.shape}, spacing {t.spacing_zyx}) are not on the same grid"
            )
        metrics = evaluate_segmentation(p.mask, t.mask, t.spacing_zyx, tolerance_mm=tolerance_mm)
        result = CaseEvaluation(case_id, p_src.path, t_src.path, metrics)
        if images:
            hu = t.ct if t.ct is not None else p.ct
            if hu is None and p_src.kind == "nifti" and ct is not None:
                hu = _ct_for_nifti(Path(ct), case_id)
            if hu is not None and hu.shape != t.mask.shape:
                hu = None
            z = largest_slice(t.mask, p.mask)
            png = out_dir / f"{_SAFE.sub('_', case_id)}.png"
            overlay_image(None if hu is None else hu[z], t.mask[z], p.mask[z],
                          f"{case_id[:40]}  z={z}  Dice {metrics.dice:.3f}").save(png)
            result.png = png
        log.info("case %s: Dice %.3f, HD95 %.2f mm", case_id, metrics.dice, metrics.hd95_mm)
        results.append(result)
    write_csv(results, out_dir / METRICS_FILE)
    if images:
        summary_image(results).save(out_dir / SUMMARY_FILE)
    return results


def write_csv(results: Sequence[CaseEvaluation], path: Path) -> Path:
    """The per-case metrics as CSV (``repr`` precision floats)."""
    rows = [r.row() for r in results]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        writer.writerows(rows)
    return path
