"""Segmentation agreement metrics in physical space (mm, mL), for ``radnode evaluate seg``.

All functions take two boolean masks on the same grid, ``pred`` (automatic) and ``truth``
(reference), shape ``(z, y, x)``, and the voxel spacing ``(z, y, x)`` in mm. The metric
set is DuneAI's (Primakov et al., *Nat Commun* 2022, "Evaluation metrics"): volumetric
Dice and Jaccard, 95th-percentile Hausdorff distance, surface Dice at tolerance τ
(Nikolov et al. 2021; DuneAI's τ = 1.18 mm for NSCLC, from five experts' variability) and
added path length (Vaassen et al. 2020), plus volumes.

Definitions used here
---------------------
Surface
    A mask's surface voxels are its voxels with at least one face-neighbour outside the
    mask (outside the array counts as outside). Distances are measured between voxel
    centres with the voxel spacing (exact Euclidean distance transforms), so two
    surfaces one voxel apart are one spacing apart.
Surface element weight
    Each surface voxel stands for the area of its exposed faces (a face normal to z has
    area ``sy*sx``, and so on), so anisotropic voxels count by the surface they carry,
    as in Nikolov's surfel-based definition.
HD95
    ``max(P95(d(S_pred -> S_truth)), P95(d(S_truth -> S_pred)))``: the larger of the two
    directed 95th percentiles over surface voxels (unweighted, as MONAI's
    ``compute_hausdorff_distance(percentile=95)``). :func:`hausdorff_distance` gives the
    100th percentile (the classical Hausdorff distance).
Surface Dice at τ
    ``(A(S_pred within τ of S_truth) + A(S_truth within τ of S_pred)) / (A(S_pred) +
    A(S_truth))`` with ``A`` the summed face areas above.
Added path length (APL)
    DuneAI eq. 7 after Vaassen et al.: per axial slice, the reference contour pixels
    (in-plane boundary pixels of ``truth``) that are not on the automatic contour
    (optionally: not within ``tolerance_mm`` of it, in-plane), counted over all slices
    and multiplied by the in-plane pixel size; the length (mm) a clinician would have to
    draw to correct the automatic contour. DuneAI's printed formula carries a factor 10
    and reports cm; here the result is in mm (divide by 10 for cm). For non-square
    pixels the pixel size is ``sqrt(sy*sx)``.

Empty masks
-----------
Dice/Jaccard of two empty masks is 1 (perfect agreement on "nothing"); surface metrics
need both surfaces and return ``nan`` (HD95, surface Dice) when either mask is empty,
which :class:`SegmentationMetrics` records in ``notes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

#: DuneAI's surface-Dice tolerance for NSCLC (mm).
DEFAULT_SURFACE_TOLERANCE_MM = 1.18
#: z sampling (mm) that makes a 3-D distance transform act slice by slice.
_NO_Z = 1.0e5
_FACES_3D = ndi.generate_binary_structure(3, 1)
_FACES_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FACES_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SegmentationMetrics:
    """All agreement metrics of one prediction against one reference.

    Attributes
    ----------
    dice, jaccard
        Volumetric overlap (DuneAI eqs. 3-4).
    hd95_mm, hausdorff_mm
        95th-percentile and maximum symmetric surface distance (``nan`` if a mask is empty).
    mean_surface_distance_mm
        Average symmetric surface distance (``nan`` if a mask is empty).
    surface_dice
        Surface Dice at ``tolerance_mm`` (``nan`` if a mask is empty).
    tolerance_mm
        The τ used.
    added_path_length_mm
        APL in mm (see the module docstring).
    volume_pred_ml, volume_truth_ml
        Volumes.
    volume_difference_ml
        ``volume_pred_ml - volume_truth_ml``.
    notes
        Remarks, e.g. why a metric is ``nan``.
    """

    dice: float
    jaccard: float
    hd95_mm: float
    hausdorff_mm: float
    mean_surface_distance_mm: float
    surface_dice: float
    tolerance_mm: float
    added_path_length_mm: float
    volume_pred_ml: float
    volume_truth_ml: float
    volume_difference_ml: float
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (e.g. a CSV row); ``notes`` joined with ``'; '``."""
        row = asdict(self)
        row["notes"] = "; ".join(self.notes)
        return row


# --- checks ----------------------------------------------------------------------------------------


def _check(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean copies of both masks and the spacing, validated (shape, 3-D, spacing > 0)."""
    a = np.asarray(pred).astype(bool, copy=False)
    b = np.asarray(truth).astype(bool, copy=False)
    if a.shape != b.shape:
        raise ValueError(f"pred and truth must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 3:
        raise ValueError(f"masks must be 3-D (z, y, x), got {a.ndim}-D")
    s = np.asarray(spacing, dtype=float)
    if s.shape != (3,) or not np.all(s > 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    return a, b, s


# --- volumes and overlap --------------------------------------------------------------------------


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a boolean mask in mL (voxel count × voxel volume)."""
    s = np.asarray(spacing, dtype=float)
    return float(np.count_nonzero(mask)) * float(np.prod(s)) / 1000.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient ``2|A∩B| / (|A|+|B|)``; 1.0 when both are empty."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def jaccard(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index ``|A∩B| / |A∪B|``; 1.0 when both are empty."""
    a = np.asarray(pred, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(a & b)) / union


# --- surfaces ----------------------------------------------------------------------------------------


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (the array edge is outside)."""
    m = np.asarray(mask, dtype=bool)
    return m & ~ndi.binary_erosion(m, structure=_FACES_3D, border_value=0)


def surface_face_areas(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exposed face area (mm²) of every voxel of ``mask`` (0 for interior voxels)."""
    m = np.asarray(mask, dtype=bool)
    s = np.asarray(spacing, dtype=float)
    face_area = (s[1] * s[2], s[0] * s[2], s[0] * s[1])  # faces normal to z, y, x
    padded = np.pad(m, 1)
    area = np.zeros(m.shape, dtype=float)
    core = (slice(1, -1),) * 3
    for axis in range(3):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis=axis)[core]
            area += (m & ~neighbour) * face_area[axis]
    return area


def _distance_to(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from every voxel centre to the nearest voxel of ``mask``."""
    return ndi.distance_transform_edt(~mask, sampling=spacing)


def _directed(
    pred: np.ndarray, truth: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Surface-to-surface distances both ways and the surface masks.

    Returns ``(d_pred_to_truth, d_truth_to_pred, surface_pred, surface_truth)``, the
    distances as 1-D arrays over the surface voxels (C order).
    """
    sp, st = surface_voxels(pred), surface_voxels(truth)
    box = _joint_box(sp | st)
    sp_b, st_b = sp[box], st[box]
    d_pt = _distance_to(st_b, spacing)[sp_b]
    d_tp = _distance_to(sp_b, spacing)[st_b]
    return d_pt, d_tp, sp, st


def _joint_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``mask`` (the whole array when empty): distances need no more."""
    found = ndi.find_objects(mask.astype(np.uint8))
    return found[0] if found else tuple(slice(0, n) for n in mask.shape)


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (``nan`` if a mask is empty)."""
    return hausdorff_distance(pred, truth, spacing, percentile=95.0)


def hausdorff_distance(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percentile: float = 100.0
) -> float:
    """Symmetric Hausdorff distance at ``percentile`` (max of both directed percentiles)."""
    a, b, s = _check(pred, truth, spacing)
    if not a.any() or not b.any():
        return math.nan
    d_pt, d_tp, _, _ = _directed(a, b, s)
    return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))


def mean_surface_distance(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm (``nan`` if a mask is empty)."""
    a, b, s = _check(pred, truth, spacing)
    if not a.any() or not b.any():
        return math.nan
    d_pt, d_tp, _, _ = _directed(a, b, s)
    return float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))


def surface_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_SURFACE_TOLERANCE_MM,
) -> float:
    """Surface Dice at tolerance ``tolerance_mm`` (area-weighted; ``nan`` if a mask is empty)."""
    a, b, s = _check(pred, truth, spacing)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not a.any() or not b.any():
        return math.nan
    d_pt, d_tp, sp, st = _directed(a, b, s)
    w_p = surface_face_areas(a, s)[sp]
    w_t = surface_face_areas(b, s)[st]
    overlap = w_p[d_pt <= tolerance_mm].sum() + w_t[d_tp <= tolerance_mm].sum()
    return float(overlap / (w_p.sum() + w_t.sum()))


def added_path_length(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 0.0,
) -> float:
    """Added path length in mm: reference contour pixels missing from the automatic contour.

    Per axial slice, the in-plane boundary pixels of ``truth`` (4-neighbour boundary)
    that are not boundary pixels of ``pred`` — or, with ``tolerance_mm > 0``, lie
    farther than that (in-plane) from every ``pred`` boundary pixel — are counted; the
    count times the pixel size ``sqrt(sy*sx)`` is the length (see the module docstring).
    """
    a, b, s = _check(pred, truth, spacing)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    contour_truth = b & ~ndi.binary_erosion(b, structure=_FACES_IN_PLANE, border_value=0)
    contour_pred = a & ~ndi.binary_erosion(a, structure=_FACES_IN_PLANE, border_value=0)
    if tolerance_mm > 0 and contour_pred.any():
        sampling = np.array([_NO_Z, s[1], s[2]])
        matched = ndi.distance_transform_edt(~contour_pred, sampling=sampling) <= tolerance_mm
    else:
        matched = contour_pred
    missing = int(np.count_nonzero(contour_truth & ~matched))
    return missing * math.sqrt(s[1] * s[2])


# --- all at once ----------------------------------------------------------------------------------


def evaluate_segmentation(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    *,
    tolerance_mm: float = DEFAULT_SURFACE_TOLERANCE_MM,
    apl_tolerance_mm: float = 0.0,
) -> SegmentationMetrics:
    """Compute every metric of :class:`SegmentationMetrics` (surface distances once).

    Parameters
    ----------
    pred, truth
        Boolean masks ``(z, y, x)`` on the same grid.
    spacing
        Voxel spacing ``(z, y, x)`` in mm.
    tolerance_mm
        Surface-Dice tolerance τ (DuneAI: 1.18 mm).
    apl_tolerance_mm
        In-plane tolerance of the added path length (0: exact contour pixels).

    Raises
    ------
    ValueError
        On shape mismatch, non-3-D masks, bad spacing or negative tolerances.
    """
    a, b, s = _check(pred, truth, spacing)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    notes: list[str] = []
    vp, vt = volume_ml(a, s), volume_ml(b, s)
    if a.any() and b.any():
        d_pt, d_tp, sp, st = _directed(a, b, s)
        hd95 = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
        hd = float(max(d_pt.max(), d_tp.max()))
        msd = float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
        w_p = surface_face_areas(a, s)[sp]
        w_t = surface_face_areas(b, s)[st]
        overlap = w_p[d_pt <= tolerance_mm].sum() + w_t[d_tp <= tolerance_mm].sum()
        sdice = float(overlap / (w_p.sum() + w_t.sum()))
    else:
        hd95 = hd = msd = sdice = math.nan
        empty = [name for name, m in (("pred", a), ("truth", b)) if not m.any()]
        notes.append(f"{' and '.join(empty)} empty: surface metrics undefined (nan)")
    return SegmentationMetrics(
        dice=dice(a, b),
        jaccard=jaccard(a, b),
        hd95_mm=hd95,
        hausdorff_mm=hd,
        mean_surface_distance_mm=msd,
        surface_dice=sdice,
        tolerance_mm=float(tolerance_mm),
        added_path_length_mm=added_path_length(a, b, s, apl_tolerance_mm),
        volume_pred_ml=vp,
        volume_truth_ml=vt,
        volume_difference_ml=vp - vt,
        notes=tuple(notes),
    )
