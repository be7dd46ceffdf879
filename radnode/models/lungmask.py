"""Classical (weight-free) lung isolation on CT, after DuneAI's lung-region step.

DuneAI (Primakov et al., *Nat Commun* 2022, "Lung region isolation") removes the CT couch,
finds the air-filled connected volumes and cleans them with region growing and morphology
so the tumour network only sees the lungs. radnode needs the same VOI and also a lung mask
it can report, so this module returns a labelled mask ``1 = right lung, 2 = left lung``
that keeps tumours inside the lung even when they touch the chest wall or mediastinum.

Steps (all on a working grid of about 2 mm, see :class:`LungMaskParams`):

1. **Downsample** the HU volume by block averaging to ``working_spacing_mm`` in-plane (and
   along z when slices are thinner): the morphology below then costs a quarter or less,
   and averaging damps noise before thresholding.
2. **Body**: voxels above ``body_threshold_hu``, opened in-plane so the couch/table (joined
   to the patient only through thin contact) falls off, largest 3-D component, holes
   filled slice by slice. Everything outside it (room air, couch, its foam core) is gone.
3. **Air inside the body**: voxels below ``air_threshold_hu`` (-320 HU: lung parenchyma
   is about -900..-700, soft tissue above -100).
4. **Airways**: a trachea seed is looked for in the most superior slices (a round air
   blob of 1.5-9 cm² near the body's left-right centre, present on consecutive slices);
   a 3-D region grows from it at very low HU, the threshold raised step by step until
   the volume jumps (a leak into the parenchyma) or exceeds a cap. The grown tree,
   dilated by ``airway_dilation_mm`` for the wall's partial volume, is removed, which
   takes off the trachea and main bronchi and disconnects the two lungs.
5. **Lungs**: the largest 3-D component, plus the second when it is large enough and
   reaches the upper half of the first (stomach and bowel gas do not).  When the lungs
   still touch (thin anterior/posterior junction lines) the component is eroded until it
   breaks in two large parts, and every voxel is reassigned to the nearest part.
6. **Per-lung clean-up**: holes filled per slice and in 3-D (vessels, bronchi walls),
   closing with ``smoothing_radius_mm`` to take in juxta-hilar vessels and to smooth.
7. **Juxtapleural and juxtamediastinal masses** (the point of the exercise): a tumour on
   the pleura is soft tissue, not "air", so thresholding carves it out. Two fills put it
   back, each restricted to soft tissue (``air_threshold_hu`` .. ``bone_threshold_hu``,
   not airway, not the other lung) and to regions attached to the lung:

   a. *Rolling-ball closing along the pleural surface*, per slice and per lung, with a
      disk of ``ball_radius_mm`` (20 mm): a concavity whose mouth is narrower than the
      disk (a juxtapleural nodule, a mass pressed against the mediastinum, hilar
      vessels) is filled, while the wide impressions of the heart, aorta and diaphragm
      are left alone. A second, wider disk (``pocket_radius_mm``, 50 mm) bridges
      larger pleural pockets, but only where the same lung lies within ``pocket_z_mm``
      above *and* below: a mass pressed into the lung has lung over and under it, the
      heart and the diaphragm dome have not. Both closings are exact and cheap: two
      Euclidean distance transforms each on a 4 mm grid, with the z sampling made
      huge so they act slice by slice.
   b. *Contralateral-mirror fill for large masses* (DuneAI's flip about the spine
      axis): a mass too big for the ball (LUNG1-002's 360 mL tumour) shows up as soft
      tissue inside the lung's per-slice convex hull where the mirror image of the
      other lung says there should be lung. Such regions thicker than
      ``mirror_min_thickness_mm`` are added. This is applied to the **right lung only**:
      with the heart and descending aorta left of the midline (situs solitus), the
      mirror of the right lung falls onto them, and on LUNG1-002/003 the flip would
      add 150-250 mL of heart to the left lung. A large left-sided mass touching the
      heart therefore relies on the rolling ball alone, and may be partly outside the
      label mask; it stays inside :attr:`LungMaskResult.voi`.

   After the fills each lung's holes are filled again (per slice and in 3-D): a mass
   reached only around its rim is then taken whole.

8. **Upsampling** back to the CT grid: each lung's indicator is interpolated linearly at
   the CT voxel centres and thresholded at 0.5, so the edges are not blocky.
9. **VOI**: DuneAI's isolation mask, the union of the lungs and their mirror image about
   the spine axis, dilated by ``voi_margin_mm`` and kept inside the body. It is generous
   (it takes in part of the heart) and is the region to crop to / to keep tumour
   components in, since it contains masses the label mask may miss.

Limitations
-----------
* Dense lung (atelectasis, consolidation) is not air; it is in the mask only where one
  of the fills reaches it. On LUNG1-002 the mirror fill also takes in part of a
  posterior effusion that the clinical contour leaves out.
* A large left-sided mass against the heart is only partly in the label mask (see 7b);
  use :attr:`LungMaskResult.voi` to crop and to keep tumour components.
* Axial acquisitions are assumed (slices roughly perpendicular to the patient's z axis,
  columns running left-right), as the mirror axis and the trachea search rely on it.
* Without a trachea in the field of view the airways stay in; the lungs are then split
  by erosion where they join.

Orientation convention
----------------------
Labels follow the *patient*, not the image: label 1 is the lung whose centroid has the
smaller patient-x in DICOM LPS coordinates (+x points to the patient's left, PS3.3
C.7.6.2.1.1), i.e. the patient's right lung. The centroid is mapped with the image
direction matrix and origin, so it does not matter how the rows/columns are stored; for
the usual axial orientation (direction = identity) the right lung is on the image left
(small column index). When a bare array is given without ``direction``, identity is
assumed (stated in the result's ``notes``).

Measured against real clinical contours
---------------------------------------
NSCLC-Radiomics LUNG1-002/003 (``tests/test_lungmask.py``): Dice 0.949 / 0.956 (002
right / left) and 0.968 / 0.957 (003) against the planning system's "Lung R/L" joined
with GTV-1 on the tumour side (the clinical lung excludes the GTV, this mask includes
it), over the contoured slices. GTV-1 inside the label mask: 0.98 (002, 358 mL, touching
chest wall and mediastinum; the clinical lung holds 0.16 of it), 0.87 (003, apical,
against the spine); inside the VOI: 1.00 for both.

Speed
-----
Everything is vectorised scipy.ndimage / numpy on the working grid (coarser grids for
the body outline, the lung split, the closings and the VOI); the distance-based
morphology uses exact Euclidean distance transforms with the grid's spacing. A 512 ×
512 × 150 CT takes about 3 s on one CPU core (``benchmarks/lungmask.py``; target < 5 s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from radnode.models import morphology as morph

logger = logging.getLogger(__name__)

#: Label values of the output volume.
RIGHT_LUNG = 1
LEFT_LUNG = 2
LABEL_NAMES: dict[int, str] = {RIGHT_LUNG: "right lung", LEFT_LUNG: "left lung"}

#: Trachea seed: lumen HU, cross-section area (mm²), distance from the body's centre (mm),
#: and how far down from the top of the air-containing slices to look (mm).
_TRACHEA_HU = -900.0
_TRACHEA_AREA_MM2 = (150.0, 900.0)
_TRACHEA_MAX_OFFSET_MM = 30.0
_TRACHEA_SEARCH_MM = 120.0
#: The mirror fill stays inside the per-slice convex hull of the lung as seen within this
#: distance (mm) above and below the slice (a mass can fill a lung's whole cross-section).
_MIRROR_HULL_Z_MM = 9.0
#: Airway growing is confined to this half-width (mm) around the seed, in-plane.
_AIRWAY_BOX_MM = 90.0


@dataclass(frozen=True)
class LungMaskParams:
    """Tunables of :func:`segment_lungs`; defaults suit adult chest CT.

    Attributes
    ----------
    air_threshold_hu
        Voxels below this are air/lung (DuneAI-style isolation uses about -320 HU).
    body_threshold_hu
        Voxels above this are body tissue (used for the body outline only).
    working_spacing_mm
        Target in-plane (and minimum through-plane) spacing of the working grid.
    body_opening_mm
        In-plane opening radius that detaches the couch from the body.
    airway_start_hu, airway_step_hu, airway_max_hu
        Adaptive airway region growing: first, step and last threshold.
    airway_leak_ratio
        A threshold step that multiplies the airway volume by more than this is a leak
        into the parenchyma; the previous step is kept.
    airway_leak_min_ml
        The ratio test applies only once the airway holds this much (the first steps
        grow fast from the lumen seed into the trachea, which is no leak).
    airway_max_volume_ml
        Airway volume above this is a leak too (trachea + main/lobar bronchi are
        typically 30-150 mL).
    airway_dilation_mm
        Margin removed around the grown airway (wall partial volume).
    second_lung_min_fraction
        A second component is a lung only if at least this fraction of the largest one.
    smoothing_radius_mm
        In-plane closing radius of the per-lung clean-up.
    ball_radius_mm
        Radius of the rolling-ball closing along the pleura (step 7a); ``0`` disables it.
    pocket_radius_mm
        Radius of the wide "pocket" closing (step 7a), kept only where the lung lies
        above and below; ``0`` disables it.
    pocket_z_mm
        How far above and below (mm) the lung must be found for a pocket voxel.
    ball_grid_mm
        In-plane spacing of the grid both closings run on (coarser is faster; 2 mm keeps
        about 5-10 % more of a small juxtapleural tumour at three times the cost).
    mirror_fill
        Whether to run the contralateral-mirror fill of the right lung (step 7b).
    mirror_min_thickness_mm
        Mirror-fill regions thinner than this are dropped (they are pleural slivers
        or the patient's own asymmetry, not a mass).
    bone_threshold_hu
        Voxels above this are bone: never added to a lung.
    spine_threshold_hu
        Voxels above this, behind the body's centre, locate the spine (mirror axis).
    voi_margin_mm
        Dilation of the DuneAI-style VOI (DuneAI: a 5-pixel disk).
    """

    air_threshold_hu: float = -320.0
    body_threshold_hu: float = -500.0
    working_spacing_mm: float = 2.0
    body_opening_mm: float = 4.0
    airway_start_hu: float = -990.0
    airway_step_hu: float = 15.0
    airway_max_hu: float = -800.0
    airway_leak_ratio: float = 1.8
    airway_leak_min_ml: float = 20.0
    airway_max_volume_ml: float = 250.0
    airway_dilation_mm: float = 2.0
    second_lung_min_fraction: float = 0.05
    smoothing_radius_mm: float = 4.0
    ball_radius_mm: float = 20.0
    ball_grid_mm: float = 4.0
    pocket_radius_mm: float = 50.0
    pocket_z_mm: float = 30.0
    mirror_fill: bool = True
    mirror_min_thickness_mm: float = 15.0
    bone_threshold_hu: float = 200.0
    spine_threshold_hu: float = 250.0
    voi_margin_mm: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "working_spacing_mm",
            "airway_step_hu",
            "airway_leak_ratio",
            "airway_max_volume_ml",
            "ball_grid_mm",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"LungMaskParams.{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "body_opening_mm",
            "airway_leak_min_ml",
            "airway_dilation_mm",
            "smoothing_radius_mm",
            "ball_radius_mm",
            "pocket_radius_mm",
            "pocket_z_mm",
            "mirror_min_thickness_mm",
            "voi_margin_mm",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"LungMaskParams.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.second_lung_min_fraction <= 1:
            raise ValueError(
                "LungMaskParams.second_lung_min_fraction must be in [0, 1], "
                f"got {self.second_lung_min_fraction}"
            )
        if self.airway_max_hu < self.airway_start_hu:
            raise ValueError(
                f"LungMaskParams.airway_max_hu ({self.airway_max_hu}) must be >= "
                f"airway_start_hu ({self.airway_start_hu})"
            )
        if not self.air_threshold_hu < self.bone_threshold_hu:
            raise ValueError(
                f"LungMaskParams.air_threshold_hu ({self.air_threshold_hu}) must be below "
                f"bone_threshold_hu ({self.bone_threshold_hu})"
            )


@dataclass(frozen=True)
class LungMaskResult:
    """Output of :func:`segment_lungs`.

    Attributes
    ----------
    labels
        ``uint8`` array ``(z, y, x)`` on the CT grid: 0 background, 1 right lung, 2 left
        lung (patient sides, see the module's orientation convention).
    voi
        Boolean ``(z, y, x)``: the DuneAI-style lung VOI (lungs and their mirror image,
        dilated), a superset of the lungs meant for cropping and for keeping tumours.
    spacing
        Voxel spacing ``(z, y, x)`` in mm of ``labels``.
    right_volume_ml, left_volume_ml
        Volumes of the two labels.
    airway_volume_ml
        Volume of the airway tree that was removed (0 when no trachea was found).
    pleural_fill_ml, mirror_fill_ml
        Volume the pleural closings (rolling ball and pocket) and the mirror fill put
        back (step 7), on the working grid.
    trachea_found
        Whether a trachea seed was found (when not, the airways were not removed).
    split
        How the two lungs were separated: ``"components"`` (already two components),
        ``"erosion"`` (touching lungs split), ``"single"`` (only one lung found) or
        ``"none"`` (no lung found).
    seconds
        Wall time of the whole call.
    timings
        Seconds per step.
    notes
        Human-readable remarks (assumptions taken, fall-backs used).
    """

    labels: np.ndarray
    voi: np.ndarray
    spacing: tuple[float, float, float]
    right_volume_ml: float
    left_volume_ml: float
    airway_volume_ml: float
    pleural_fill_ml: float
    mirror_fill_ml: float
    trachea_found: bool
    split: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def lungs(self) -> np.ndarray:
        """Both lungs as one boolean mask ``(z, y, x)``."""
        return self.labels > 0

    @property
    def right(self) -> np.ndarray:
        """The right lung (label 1) as a boolean mask."""
        return self.labels == RIGHT_LUNG

    @property
    def left(self) -> np.ndarray:
        """The left lung (label 2) as a boolean mask."""
        return self.labels == LEFT_LUNG

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays) for result files and logs."""
        return {
            "right_volume_ml": round(self.right_volume_ml, 2),
            "left_volume_ml": round(self.left_volume_ml, 2),
            "airway_volume_ml": round(self.airway_volume_ml, 2),
            "pleural_fill_ml": round(self.pleural_fill_ml, 2),
            "mirror_fill_ml": round(self.mirror_fill_ml, 2),
            "trachea_found": self.trachea_found,
            "split": self.split,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": list(self.notes),
        }


@dataclass
class _Geometry:
    """Voxel-to-patient mapping in numpy ``(z, y, x)`` order."""

    spacing: np.ndarray  # (z, y, x) mm
    direction: np.ndarray  # 3x3, columns = LPS directions of the sitk x, y, z index axes
    origin: np.ndarray  # LPS mm of voxel (0, 0, 0)

    def superior_is_high_index(self) -> bool:
        """Whether increasing slice index moves towards the head (+z in LPS)."""
        return bool(self.direction[2, 2] >= 0)

    def posterior_is_high_row(self) -> bool:
        """Whether increasing row index moves towards the back (+y in LPS)."""
        return bool(self.direction[1, 1] >= 0)

    def patient_x(self, zyx_index: np.ndarray) -> float:
        """LPS x (mm, + = patient left) of a continuous ``(z, y, x)`` voxel index."""
        ijk = np.asarray(zyx_index, dtype=float)[::-1] * self.spacing[::-1]
        return float(self.origin[0] + self.direction[0] @ ijk)


class _Timer:
    """Collects per-step wall times."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._last
        self._last = now


# --- public entry ---------------------------------------------------------------------------


def segment_lungs(
    image: sitk.Image | np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    direction: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    params: LungMaskParams | None = None,
) -> LungMaskResult:
    """Segment and label the two lungs of a chest CT.

    Parameters
    ----------
    image
        The CT in Hounsfield units: a SimpleITK image (spacing, direction and origin are
        taken from it) or a numpy array ``(z, y, x)`` as ``sitk.GetArrayFromImage`` gives.
    spacing
        Voxel spacing ``(z, y, x)`` in mm; required for an array, ignored for an image.
    direction
        Only for an array: the 9 direction cosines in SimpleITK order (row-major 3×3 whose
        columns are the patient-LPS directions of the x, y, z index axes). Identity when
        omitted, which is stated in ``notes``.
    origin
        Only for an array: LPS position (mm) of voxel ``[0, 0, 0]``.
    params
        Tunables; :class:`LungMaskParams` defaults when omitted.

    Returns
    -------
    LungMaskResult
        Label volume and VOI on the input grid, volumes, timings and notes.

    Raises
    ------
    ValueError
        If the array is not 3-D, ``spacing`` is missing or not three positive numbers, or
        the direction is not 9 numbers.
    """
    params = params or LungMaskParams()
    start = time.perf_counter()
    timer = _Timer()
    notes: list[str] = []
    hu, geometry = _as_array(image, spacing, direction, origin, notes)
    timer.lap("input")

    factors = morph.block_factors(geometry.spacing, params.working_spacing_mm)
    work = morph.block_mean(hu, factors)
    work_spacing = geometry.spacing * np.asarray(factors)
    work_geometry = _Geometry(work_spacing, geometry.direction, geometry.origin)
    voxel_ml = float(np.prod(work_spacing)) / 1000.0
    timer.lap("downsample")

    body = _body_mask(work, work_spacing, params)
    air = (work < params.air_threshold_hu) & body
    timer.lap("body")

    airway = np.zeros_like(air)
    airway_zone = airway
    seed = _find_trachea_seed(work, body, work_spacing, work_geometry)
    if seed is None:
        notes.append("no trachea found in the superior slices; airways not removed")
    else:
        airway = _grow_airway(work, body, seed, work_spacing, params)
        airway_zone = morph.dilate_mm(airway, work_spacing, params.airway_dilation_mm)
        air &= ~airway_zone
    timer.lap("airway")

    components, split = _select_lungs(air, work_spacing, work_geometry, params, notes)
    timer.lap("components")

    cleaned = [_clean_lung(lung, work_spacing, params) for lung in components]
    _resolve_overlap(cleaned)
    lungs = dict(zip(*_sides(cleaned, work_geometry, body)[::-1]))
    timer.lap("cleanup")

    axis = _mirror_axis(work, body, work_spacing, work_geometry, params)
    tissue = (
        (work >= params.air_threshold_hu)
        & (work < params.bone_threshold_hu)
        & body
        & ~airway_zone
    )
    pleural_ml = 0.0
    if params.ball_radius_mm > 0 or params.pocket_radius_mm > 0:
        for side in list(lungs):
            added = _pleural_fill(lungs, side, tissue, work_spacing, params)
            lungs[side] = lungs[side] | added
            pleural_ml += float(added.sum()) * voxel_ml
    timer.lap("pleural_fill")

    mirror_ml = 0.0
    if params.mirror_fill and RIGHT_LUNG in lungs and LEFT_LUNG in lungs:
        added = _mirror_fill(lungs, RIGHT_LUNG, axis, tissue, work_spacing, params)
        lungs[RIGHT_LUNG] = lungs[RIGHT_LUNG] | added
        mirror_ml = float(added.sum()) * voxel_ml
    for side, lung in lungs.items():
        # A mass put back only around its rim leaves a hole; close it (per slice, 3-D).
        box = morph.padded_box(lung, 1)
        filled = np.zeros_like(lung)
        filled[box] = ndi.binary_fill_holes(morph.fill_holes_per_slice(lung[box]))
        for other_side, other in lungs.items():
            if other_side != side:
                filled &= ~other
        lungs[side] = filled
    timer.lap("mirror_fill")

    labels_work = np.zeros(work.shape, dtype=np.uint8)
    for side, lung in lungs.items():
        labels_work[lung & (labels_work == 0)] = side
    voi_factors = (1, 2, 2)
    voi_coarse = _voi(
        morph.block_mean(labels_work > 0, voi_factors) > 0,
        axis / 2.0 - 0.25,  # the mirror axis in coarse columns
        morph.block_mean(body, voi_factors) >= 0.5,
        work_spacing * np.asarray(voi_factors),
        params.voi_margin_mm,
    )
    timer.lap("voi")

    labels = morph.upsample_labels(labels_work, factors, hu.shape)
    full_factors = (factors[0], factors[1] * 2, factors[2] * 2)
    voi = morph.upsample_bool(voi_coarse, full_factors, hu.shape) | (labels > 0)
    timer.lap("upsample")

    full_ml = float(np.prod(geometry.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    result = LungMaskResult(
        labels=labels,
        voi=voi,
        spacing=(float(geometry.spacing[0]), float(geometry.spacing[1]), float(geometry.spacing[2])),
        right_volume_ml=float(counts[RIGHT_LUNG]) * full_ml,
        left_volume_ml=float(counts[LEFT_LUNG]) * full_ml,
        airway_volume_ml=float(airway.sum()) * voxel_ml,
        pleural_fill_ml=pleural_ml,
        mirror_fill_ml=mirror_ml,
        trachea_found=seed is not None,
        split=split,
        seconds=time.perf_counter() - start,
        timings=timer.timings,
        notes=tuple(notes),
    )
    logger.info(
        "lung mask: right %.0f mL, left %.0f mL, airway %.0f mL, fills %.0f+%.0f mL, "
        "split=%s, %.2f s",
        result.right_volume_ml,
        result.left_volume_ml,
        result.airway_volume_ml,
        pleural_ml,
        mirror_ml,
        split,
        result.seconds,
    )
    return result


# --- input and grids ----------------------------------------------------------------------------


def _as_array(
    image: sitk.Image | np.ndarray,
    spacing: Sequence[float] | None,
    direction: Sequence[float] | None,
    origin: Sequence[float] | None,
    notes: list[str],
) -> tuple[np.ndarray, _Geometry]:
    """The HU array ``(z, y, x)`` and its geometry from an image or an array."""
    if isinstance(image, sitk.Image):
        if image.GetDimension() != 3:
            raise ValueError(f"the CT image must be 3-D, got {image.GetDimension()}-D")
        hu = sitk.GetArrayViewFromImage(image)
        geometry = _Geometry(
            spacing=np.asarray(image.GetSpacing(), dtype=float)[::-1],
            direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
            origin=np.asarray(image.GetOrigin(), dtype=float),
        )
        return hu, geometry
    hu = np.asarray(image)
    if hu.ndim != 3:
        raise ValueError(f"the CT array must be 3-D (z, y, x), got shape {hu.shape}")
    if spacing is None:
        raise ValueError("spacing (z, y, x) in mm is required when the CT is a numpy array")
    spacing_arr = np.asarray(spacing, dtype=float)
    if spacing_arr.shape != (3,) or not np.all(spacing_arr > 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    if direction is None:
        notes.append("no direction given: identity assumed (columns = patient left, rows = posterior)")
        direction_arr = np.eye(3)
    else:
        direction_arr = np.asarray(direction, dtype=float)
        if direction_arr.size != 9:
            raise ValueError(f"direction must be 9 direction cosines, got {direction_arr.size}")
        direction_arr = direction_arr.reshape(3, 3)
    origin_arr = np.zeros(3) if origin is None else np.asarray(origin, dtype=float)
    return hu, _Geometry(spacing_arr, direction_arr, origin_arr)


# --- body and airways ------------------------------------------------------------------------------


def _body_mask(work: np.ndarray, spacing: np.ndarray, params: LungMaskParams) -> np.ndarray:
    """The patient's outline, couch and outside air excluded, holes filled per slice.

    Computed on a grid twice as coarse in-plane (the outline needs no 2 mm precision),
    then brought back and eroded by one working voxel in-plane so no rim of outside air
    is left inside it.
    """
    half = (1, 2, 2)
    coarse = morph.block_mean(work, half)
    coarse_spacing = spacing * np.asarray(half)
    tissue = coarse > params.body_threshold_hu
    if params.body_opening_mm > 0:
        disk = morph.disk(params.body_opening_mm, coarse_spacing[1:])
        opened = ndi.binary_opening(tissue, structure=disk)
    else:
        opened = tissue
    body = morph.largest_component(opened)
    if params.body_opening_mm > 0:
        # Give back the surface the opening shaved off, without re-attaching the couch.
        body |= ndi.binary_dilation(body, structure=morph.STRUCT_INPLANE) & tissue
    body = morph.fill_holes_per_slice(body)
    up = morph.upsample_bool(body, half, work.shape)
    return ndi.binary_erosion(up, structure=morph.STRUCT_INPLANE, border_value=0)


def _find_trachea_seed(
    work: np.ndarray, body: np.ndarray, spacing: np.ndarray, geometry: _Geometry
) -> np.ndarray | None:
    """A seed mask inside the trachea, from the most superior slices, or ``None``.

    The trachea is a round air blob of 1.5-9 cm² near the body's left-right centre; a
    blob counts only when it recurs, overlapping, on the next two slices downwards (a
    tube, not a lung apex or a bubble).
    """
    low = (work < _TRACHEA_HU) & body
    slices = np.flatnonzero(low.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    top_high = geometry.superior_is_high_index()
    order = slices[::-1] if top_high else slices
    search = order[: max(3, int(np.ceil(_TRACHEA_SEARCH_MM / spacing[0])))]
    step = -1 if top_high else 1
    pixel_mm2 = float(spacing[1] * spacing[2])

    def candidates(z: int) -> list[np.ndarray]:
        labels, n = ndi.label(low[z])
        body_x = np.flatnonzero(body[z].any(axis=0))
        if n == 0 or body_x.size == 0:
            return []
        centre_x = 0.5 * (body_x[0] + body_x[-1])
        found: list[tuple[float, np.ndarray]] = []
        for index, box in enumerate(ndi.find_objects(labels), start=1):
            if box is None:
                continue
            comp = labels[box] == index
            area = comp.sum() * pixel_mm2
            if not _TRACHEA_AREA_MM2[0] <= area <= _TRACHEA_AREA_MM2[1]:
                continue
            if comp.sum() < 0.45 * comp.size:  # not round/compact
                continue
            offset = abs(0.5 * (box[1].start + box[1].stop - 1) - centre_x) * spacing[2]
            if offset > _TRACHEA_MAX_OFFSET_MM:
                continue
            blob = np.zeros(low.shape[1:], dtype=bool)
            blob[box] = comp
            found.append((offset, blob))
        return [blob for _, blob in sorted(found, key=lambda t: t[0])]

    for z in (int(v) for v in search):
        for blob in candidates(z):
            previous = blob
            for k in (1, 2):
                zz = z + step * k
                nxt = [c for c in candidates(zz) if (c & previous).any()] if 0 <= zz < len(work) else []
                if not nxt:
                    break
                previous = nxt[0]
            else:
                seed = np.zeros(work.shape, dtype=bool)
                seed[z] = blob
                return seed
    return None


def _grow_airway(
    work: np.ndarray,
    body: np.ndarray,
    seed: np.ndarray,
    spacing: np.ndarray,
    params: LungMaskParams,
) -> np.ndarray:
    """Adaptive-threshold 3-D region growing of the airway tree from the trachea seed.

    The threshold starts very low (only the lumen, about -1000 HU) and rises by
    ``airway_step_hu``; the last result before a leak (volume ratio or cap) is kept.
    Growing is confined to a box ``_AIRWAY_BOX_MM`` either side of the seed in-plane,
    which holds the trachea and main bronchi and keeps the labelling cheap.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    centre = [int(np.mean(ix)) for ix in np.nonzero(seed)]
    half = [int(np.ceil(_AIRWAY_BOX_MM / s)) for s in spacing[1:]]
    box = (
        slice(0, work.shape[0]),
        slice(max(0, centre[1] - half[0]), centre[1] + half[0] + 1),
        slice(max(0, centre[2] - half[1]), centre[2] + half[1] + 1),
    )
    sub, sub_body, sub_seed = work[box], body[box], seed[box]
    best = np.zeros_like(sub_seed)
    best_ml = 0.0
    threshold = params.airway_start_hu
    while threshold <= params.airway_max_hu + 1e-6:
        grown = _component_touching(sub < threshold, sub_seed, sub_body)
        ml = float(grown.sum()) * voxel_ml
        if ml > params.airway_max_volume_ml or (
            best_ml >= params.airway_leak_min_ml and ml > params.airway_leak_ratio * best_ml
        ):
            logger.debug("airway growing stopped at %.0f HU (%.0f mL: leak)", threshold, ml)
            break
        if ml > 0:
            best, best_ml = grown, ml
        threshold += params.airway_step_hu
    airway = np.zeros_like(seed)
    airway[box] = best if best_ml > 0 else sub_seed
    logger.debug("airway: %.1f mL", best_ml)
    return airway


def _component_touching(mask: np.ndarray, seed: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Union of the 6-connected components of ``mask & body`` that contain a seed voxel."""
    region = mask & body
    labels, n = ndi.label(region, structure=morph.STRUCT_6)
    hit = np.unique(labels[seed & region])
    hit = hit[hit > 0]
    if hit.size == 0:
        return np.zeros_like(mask)
    keep = np.zeros(n + 1, dtype=bool)
    keep[hit] = True
    return keep[labels]


# --- lung components ---------------------------------------------------------------------------------


def _select_lungs(
    air: np.ndarray,
    spacing: np.ndarray,
    geometry: _Geometry,
    params: LungMaskParams,
    notes: list[str],
) -> tuple[list[np.ndarray], str]:
    """The one or two lung components of the air mask, split when they touch."""
    labels, n = ndi.label(air, structure=morph.STRUCT_6)
    if n == 0:
        notes.append("no air inside the body below the air threshold: no lung found")
        return [], "none"
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    boxes = ndi.find_objects(labels)
    first = labels == order[0]
    z_first = boxes[order[0] - 1][0]
    top_high = geometry.superior_is_high_index()
    half = (z_first.stop - z_first.start) // 2
    lungs = [first]
    for index in order[1:]:
        if sizes[index] < params.second_lung_min_fraction * sizes[order[0]] or sizes[index] == 0:
            break
        z_comp = boxes[index - 1][0]
        # A lung reaches the upper half of the other; stomach and bowel gas stay below it.
        if top_high:
            reaches = z_comp.stop - 1 >= z_first.start + half
        else:
            reaches = z_comp.start <= z_first.stop - 1 - half
        if reaches:
            lungs.append(labels == index)
            break
    if len(lungs) == 2:
        return lungs, "components"
    halves = _split_touching(first, spacing)
    if halves is not None:
        notes.append("the lungs touched; split by erosion and nearest-part reassignment")
        return halves, "erosion"
    notes.append("only one lung found")
    return lungs, "single"


def _split_touching(mask: np.ndarray, spacing: np.ndarray) -> list[np.ndarray] | None:
    """Split one component holding both lungs into two, or ``None`` if it will not split.

    On a grid twice as coarse in-plane: erode (2 mm steps, up to 20 mm, thresholds of
    one distance transform) until two parts each hold at least 10 % of the remaining
    volume, then give every voxel of the mask to the nearest part (distance transform
    with indices), so the cut runs along the thin junction.
    """
    half = (1, 2, 2)
    box = morph.padded_box(mask, 0)
    sub = mask[box]
    coarse = morph.block_mean(sub, half) >= 0.5
    coarse_spacing = spacing * np.asarray(half)
    depth = ndi.distance_transform_edt(np.pad(coarse, 1), sampling=coarse_spacing)[1:-1, 1:-1, 1:-1]
    for radius in np.arange(2.0, 20.1, 2.0):
        labels, n = ndi.label(depth > radius, structure=morph.STRUCT_6)
        if n == 0:
            return None
        if n < 2:
            continue
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        a, b = np.argsort(sizes)[::-1][:2]
        if sizes[b] < 0.1 * sizes[a]:
            continue
        seeds = np.where(labels == a, 1, np.where(labels == b, 2, 0)).astype(np.uint8)
        _, idx = ndi.distance_transform_edt(seeds == 0, sampling=coarse_spacing, return_indices=True)
        nearest = morph.upsample_bool(seeds[tuple(idx)], half, sub.shape)
        parts = []
        for value in (1, 2):
            part = np.zeros_like(mask)
            part[box] = sub & (nearest == value)
            parts.append(part)
        return parts
    return None


def _sides(
    lungs: list[np.ndarray], geometry: _Geometry, body: np.ndarray
) -> tuple[list[np.ndarray], list[int]]:
    """Pair each lung with its label by the patient-x of its centroid (LPS: +x = left)."""
    if not lungs:
        return [], []
    xs = [geometry.patient_x(np.array(ndi.center_of_mass(m))) for m in lungs]
    if len(lungs) == 1:
        # One lung: its side is where its centroid lies against the body's centroid.
        centre_x = geometry.patient_x(np.array(ndi.center_of_mass(body)))
        return lungs, [RIGHT_LUNG if xs[0] < centre_x else LEFT_LUNG]
    order = np.argsort(xs)
    return [lungs[i] for i in order], [RIGHT_LUNG, LEFT_LUNG]


# --- per-lung clean-up and mass inclusion -----------------------------------------------------------


def _clean_lung(lung: np.ndarray, spacing: np.ndarray, params: LungMaskParams) -> np.ndarray:
    """Fill vessels/bronchi (holes per slice and in 3-D), close in-plane, keep one component."""
    box = morph.padded_box(lung, [0] + [int(np.ceil(params.smoothing_radius_mm / s)) + 2 for s in spacing[1:]])
    sub = lung[box]
    if params.smoothing_radius_mm > 0:
        sub = ndi.binary_closing(sub, structure=morph.disk(params.smoothing_radius_mm, spacing[1:])) | sub
    sub = ndi.binary_fill_holes(morph.fill_holes_per_slice(sub))
    out = np.zeros_like(lung)
    out[box] = morph.largest_component(sub)
    return out


def _resolve_overlap(lungs: list[np.ndarray]) -> None:
    """Voxels claimed by both lungs after the closings stay with the first one."""
    if len(lungs) == 2:
        lungs[1] &= ~lungs[0]


def _pleural_fill(
    lungs: dict[int, np.ndarray],
    side: int,
    tissue: np.ndarray,
    spacing: np.ndarray,
    params: LungMaskParams,
) -> np.ndarray:
    """Soft tissue in the pleural concavities of one lung (step 7a).

    Two in-plane closings run on a coarser grid (``ball_grid_mm``) inside the lung's
    bounding box:

    * the rolling ball (``ball_radius_mm``): every concavity narrower than the disk;
    * the pocket disk (``pocket_radius_mm``): wider pockets too, but kept only where this
      lung lies within ``pocket_z_mm`` both above and below in the same column. A mass
      pressed into the lung from the pleura has lung above and below it; the heart,
      aorta and the dome of the diaphragm, whose impressions are as wide, do not.

    What they add is mapped back to the working grid and kept where it is soft tissue,
    not the other lung, and attached to this lung.
    """
    lung = lungs[side]
    factors = morph.block_factors(spacing, params.ball_grid_mm)
    factors = (1, factors[1], factors[2])  # the closings are per slice: keep every slice
    coarse_spacing = spacing * np.asarray(factors)
    radius = max(params.ball_radius_mm, params.pocket_radius_mm)
    margin = [0] + [int(np.ceil(radius / s)) + f for s, f in zip(spacing[1:], factors[1:])]
    box = morph.padded_box(lung, margin)
    sub = lung[box]
    coarse = morph.block_mean(sub, factors) >= 0.5
    added = np.zeros_like(coarse)
    if params.ball_radius_mm > 0:
        added |= morph.close_in_plane(coarse, coarse_spacing, params.ball_radius_mm)
    if params.pocket_radius_mm > 0:
        pocket = morph.close_in_plane(coarse, coarse_spacing, params.pocket_radius_mm)
        added |= pocket & _lung_above_and_below(coarse, coarse_spacing, params.pocket_z_mm)
    added = morph.upsample_bool(added & ~coarse, factors, sub.shape) & tissue[box] & ~sub
    for other_side, other in lungs.items():
        if other_side != side:
            added &= ~other[box]
    out = np.zeros_like(lung)
    out[box] = morph.components_touching(added, sub)
    return out


def _lung_above_and_below(mask: np.ndarray, spacing: np.ndarray, reach_mm: float) -> np.ndarray:
    """Voxels with ``mask`` within ``reach_mm`` above and within ``reach_mm`` below (same column)."""
    reach = max(1, int(round(reach_mm / spacing[0])))
    n = mask.shape[0]
    count = np.zeros((n + 1,) + mask.shape[1:], dtype=np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=count[1:])
    idx = np.arange(n)
    above = count[np.minimum(idx + 1 + reach, n)] - count[idx + 1]  # slices (z, z+reach]
    below = count[idx] - count[np.maximum(idx - reach, 0)]  # slices [z-reach, z)
    return (above > 0) & (below > 0)


def _mirror_axis(
    work: np.ndarray,
    body: np.ndarray,
    spacing: np.ndarray,
    geometry: _Geometry,
    params: LungMaskParams,
) -> np.ndarray:
    """Column (x index, float) of the spine's mid-sagittal line on every slice.

    As in DuneAI the axis follows the spine: the mean column of bone voxels within
    30 mm of the body's left-right centre and behind its antero-posterior centre,
    median-filtered over about 2 cm of slices; the body's centre where no bone is seen.
    """
    nz, ny, nx = work.shape
    cols = np.arange(nx, dtype=np.float32)
    rows = np.arange(ny, dtype=np.float32)
    any_x = body.any(axis=1)
    any_y = body.any(axis=2)
    has_body = any_x.any(axis=1)
    first_x = np.argmax(any_x, axis=1)
    last_x = nx - 1 - np.argmax(any_x[:, ::-1], axis=1)
    centre_x = np.where(has_body, 0.5 * (first_x + last_x), 0.5 * (nx - 1))
    first_y = np.argmax(any_y, axis=1)
    last_y = ny - 1 - np.argmax(any_y[:, ::-1], axis=1)
    centre_y = 0.5 * (first_y + last_y)
    band = np.abs(cols[None, :] - centre_x[:, None]) * spacing[2] <= 30.0  # (z, x)
    if geometry.posterior_is_high_row():
        back = rows[None, :] > centre_y[:, None]  # (z, y)
    else:
        back = rows[None, :] < centre_y[:, None]
    spine = (work > params.spine_threshold_hu) & body & band[:, None, :] & back[:, :, None]
    count = spine.sum(axis=(1, 2))
    sum_x = (spine.sum(axis=1) * cols[None, :]).sum(axis=1)
    axis = np.where(count >= 10, sum_x / np.maximum(count, 1), centre_x)
    size = max(1, int(round(20.0 / spacing[0])) | 1)
    return ndi.median_filter(axis.astype(np.float32), size=size, mode="nearest")


def _mirror(mask: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Reflect ``mask`` left-right about the column ``axis[z]`` of each slice."""
    nz, ny, nx = mask.shape
    src = np.rint(2.0 * axis[:, None] - np.arange(nx)[None, :]).astype(np.intp)  # (z, x)
    valid = (src >= 0) & (src < nx)
    src = np.clip(src, 0, nx - 1)
    out = np.take_along_axis(mask, np.broadcast_to(src[:, None, :], (nz, ny, nx)), axis=2)
    return out & valid[:, None, :]


def _mirror_fill(
    lungs: dict[int, np.ndarray],
    side: int,
    axis: np.ndarray,
    tissue: np.ndarray,
    spacing: np.ndarray,
    params: LungMaskParams,
) -> np.ndarray:
    """Soft tissue where the mirrored other lung says this lung should be (step 7b).

    Kept inside this lung's per-slice convex hull, thicker than
    ``mirror_min_thickness_mm`` (an opening) and attached to the lung.
    """
    lung = lungs[side]
    others = np.zeros_like(lung)
    for other_side, other in lungs.items():
        if other_side != side:
            others |= other
    reach = max(0, int(round(_MIRROR_HULL_Z_MM / spacing[0])))
    stacked = ndi.maximum_filter1d(lung, size=2 * reach + 1, axis=0) if reach else lung
    candidate = morph.hull_per_slice(stacked) & _mirror(others, axis) & tissue & ~lung & ~others
    if params.mirror_min_thickness_mm > 0 and candidate.any():
        # The opening only tells thick from thin: a grid twice as coarse in-plane will do.
        half = (1, 2, 2)
        box = morph.padded_box(candidate, [1, 2, 2])
        coarse = morph.block_mean(candidate[box], half) >= 0.5
        opened = morph.open_mm(coarse, spacing * np.asarray(half), params.mirror_min_thickness_mm / 2)
        keep = np.zeros_like(candidate)
        keep[box] = morph.upsample_bool(opened, half, candidate[box].shape)
        candidate &= keep
    return morph.components_touching(candidate, lung)


def _voi(
    lungs: np.ndarray, axis: np.ndarray, body: np.ndarray, spacing: np.ndarray, margin_mm: float
) -> np.ndarray:
    """DuneAI's lung VOI: lungs united with their mirror image, dilated, inside the body."""
    if not lungs.any():
        return lungs.copy()
    return morph.dilate_mm(lungs | _mirror(lungs, axis), spacing, margin_mm) & body
