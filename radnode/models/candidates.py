"""First stage of RA-Seg at inference: where is the tumour? (the box for the a2t module)

RA-Seg's attention module needs a 3-D box around the tumour. In training it comes from the
reference contour (:func:`box_from_mask`); at inference something must propose it. The
issue allows a coarse network pass or a classical detector; radnode uses the **classical
candidate detector** below, because:

* **Cost.** A coarse pass of the network over the whole lung VOI is the expensive case of
  BENCHMARKS.md (~29 s for 256×256×160 on this 2-core CPU with the plain U-Net, more with
  the ConvLSTM block): it alone would spend the 30 s budget. The detector costs about a
  second, and the box lets the network run on a tumour-centred crop only (~5 s), which
  is what makes CPU segmentation fit.
* **No weights.** It works identically with the demo bundle, a user-trained bundle or a
  bundle in training, so a weak or new model cannot also corrupt its own prior; and its
  behaviour is inspectable (each candidate carries the measurements it was ranked by).
* **The question is easy classically.** Inside the lung mask almost everything is air
  (-850 HU); solid tumours are *dense, thick, compact* blobs, and the only other dense
  structures are vessels and bronchial walls, which are *thin and elongated*.

Detection, on the preprocessed grid (1 × 1 × 1.5 mm):

1. soft tissue = lung mask ∧ HU > ``soft_tissue_hu`` (default -100 HU: solid tissue; pure
   ground-glass lesions, -700 to -300 HU, are deliberately not proposed);
2. morphological **openings** at the radii ``opening_radii_mm`` (3 and 5 mm), all from one
   Euclidean distance transform (voxels at least that deep form the cores; each core is
   grown back by the same radius inside the soft tissue): vessels and walls thinner than
   2 × radius vanish, and a tumour is cut free of the vessels that touch it. The larger
   radius frees a tumour that abuts a thick (6-10 mm) vessel, which the smaller one keeps
   fused to it; a blob found at both radii keeps its finer (3 mm) outline;
3. per grown-back core: volume, inscribed radius (the distance-transform maximum),
   **elongation** √(λ₁/λ₃) of the principal axes in mm, and mean HU. Thick vessels near the
   hilum survive the opening but are elongated and dropped (``max_elongation``); blobs
   under ``min_volume_mm3`` are dropped;
4. ranking by volume / elongation (large and compact first). The box is the best
   candidate's bounding box grown by ``box_margin_mm``.

When nothing qualifies the caller falls back to the whole lung VOI (see
:mod:`radnode.models.inference`). Limits: one tumour per box (the best); ground-glass and
sub-centimetre nodules are not proposed; a tumour fused with the mediastinum is only found
if the lung mask keeps it inside (the lung mask's job).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Box:
    """A half-open index box (z, y, x) on a grid."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3 or any(b <= a for a, b in zip(self.start, self.stop)):
            raise ValueError(f"box: need 3 axes with stop > start, got start={self.start} stop={self.stop}")

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Numpy slices selecting the box."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Size of the box in voxels."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def grow(self, margin_vox: Sequence[int], shape: Sequence[int]) -> Box:
        """The box grown by ``margin_vox`` on each side, clipped to a grid of ``shape``."""
        return Box(
            tuple(max(0, a - m) for a, m in zip(self.start, margin_vox)),  # type: ignore[arg-type]
            tuple(min(n, b + m) for b, m, n in zip(self.stop, margin_vox, shape)),  # type: ignore[arg-type]
        )

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        """A float32 array of ``shape``: 1 inside the box, 0 outside (the network's bbox input)."""
        out = np.zeros(tuple(shape), dtype=np.float32)
        out[self.slices] = 1.0
        return out

    def to_dict(self) -> dict[str, list[int]]:
        """JSON-ready mapping."""
        return {"start": list(self.start), "stop": list(self.stop)}


def mm_to_voxels(mm: float, spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """A distance in mm as whole voxels per axis (rounded up)."""
    return tuple(int(np.ceil(mm / s - 1e-9)) for s in spacing_zyx)  # type: ignore[return-value]


def box_from_mask(mask: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float = 0.0) -> Box | None:
    """Bounding box of the non-zero voxels grown by ``margin_mm``; ``None`` for an empty mask.

    Training uses this on the reference contour to build the a2t module's box input.
    """
    nonzero = np.nonzero(mask)
    if not nonzero[0].size:
        return None
    box = Box(
        tuple(int(i.min()) for i in nonzero),  # type: ignore[arg-type]
        tuple(int(i.max()) + 1 for i in nonzero),  # type: ignore[arg-type]
    )
    return box.grow(mm_to_voxels(margin_mm, spacing_zyx), mask.shape)


@dataclass(frozen=True)
class DetectorParams:
    """Thresholds of the classical candidate detector (see the module docstring)."""

    soft_tissue_hu: float = -100.0
    opening_radii_mm: tuple[float, ...] = (3.0, 5.0)
    min_volume_mm3: float = 150.0
    max_elongation: float = 3.0
    box_margin_mm: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "opening_radii_mm", tuple(float(r) for r in self.opening_radii_mm))
        if not self.opening_radii_mm or min(self.opening_radii_mm) <= 0:
            raise ValueError(f"opening_radii_mm: one or more positive radii, got {self.opening_radii_mm}")
        if self.max_elongation < 1:
            raise ValueError(f"max_elongation: must be >= 1, got {self.max_elongation}")


@dataclass(frozen=True)
class Candidate:
    """One proposed tumour and the measurements it was ranked by.

    ``box`` includes the margin; ``centroid_zyx`` is in voxels of the grid searched.
    """

    box: Box
    centroid_zyx: tuple[float, float, float]
    volume_mm3: float
    radius_mm: float
    elongation: float
    mean_hu: float

    @property
    def score(self) -> float:
        """Ranking key: large and compact first."""
        return self.volume_mm3 / self.elongation


def _elongation(coords_mm: np.ndarray) -> float:
    if len(coords_mm) < 4:
        return float("inf")
    eig = np.linalg.eigvalsh(np.cov(coords_mm.T))
    return float(np.sqrt(max(eig[-1], 1e-12) / max(eig[0], 1e-12)))


def detect_candidates(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: Sequence[float],
    params: DetectorParams | None = None,
) -> list[Candidate]:
    """Tumour candidates inside ``lung``, best first.

    Parameters
    ----------
    hu
        Intensities in HU on a (z, y, x) grid (a clipped window is fine as long as it
        contains ``soft_tissue_hu``).
    lung
        Lung mask on the same grid (juxtapleural tumours inside it).
    spacing_zyx
        Grid spacing in mm.
    params
        Detector thresholds.
    """
    params = params or DetectorParams()
    if hu.shape != lung.shape:
        raise ValueError(f"hu shape {hu.shape} != lung shape {lung.shape}")
    spacing = np.asarray(spacing_zyx, dtype=float)
    soft = (hu > params.soft_tissue_hu) & (lung != 0)
    found = [np.nonzero(soft.any(axis=other))[0] for other in ((1, 2), (0, 2), (0, 1))]
    if not all(len(f) for f in found):
        return []
    # Work inside the soft tissue's bounding box plus one background voxel on every side,
    # so that depths count from a blob's cut face where it meets the array's edge.
    window = tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)
    offset = np.array([w.start - 1 for w in window])
    soft = np.pad(soft[window], 1)
    depth = ndimage.distance_transform_edt(soft, sampling=spacing)
    candidates: list[Candidate] = []
    for radius in sorted(params.opening_radii_mm):
        for candidate in _open_and_measure(soft, depth, hu, offset, spacing, radius, params):
            # A blob found at a finer radius already holds this one: keep the finer outline.
            if not any(_inside(candidate.centroid_zyx, c.box) for c in candidates):
                candidates.append(candidate)
    candidates.sort(key=lambda c: c.score, reverse=True)
    log.debug("%d tumour candidates", len(candidates))
    return candidates


def _inside(point: Sequence[float], box: Box) -> bool:
    return all(a <= p < b for p, a, b in zip(point, box.start, box.stop))


def _open_and_measure(
    soft: np.ndarray,
    depth: np.ndarray,
    hu: np.ndarray,
    offset: np.ndarray,
    spacing: np.ndarray,
    radius: float,
    params: DetectorParams,
) -> list[Candidate]:
    """Candidates that survive an opening of ``radius`` mm of ``soft`` (a window at ``offset`` in ``hu``)."""
    cores, _count = ndimage.label(depth >= radius, structure=_FULL_CONNECTIVITY)
    reach = mm_to_voxels(radius, spacing)
    margin = mm_to_voxels(params.box_margin_mm, spacing)
    voxel_mm3 = float(np.prod(spacing))
    found = []
    for index, core_slices in enumerate(ndimage.find_objects(cores), start=1):
        if core_slices is None:
            continue
        local = tuple(
            slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(core_slices, reach, soft.shape)
        )
        core = cores[local] == index
        # Opening = grow the core back by the radius, inside the soft tissue.
        region = soft[local] & (ndimage.distance_transform_edt(~core, sampling=spacing) <= radius)
        coords = np.argwhere(region)
        volume = len(coords) * voxel_mm3
        if volume < params.min_volume_mm3:
            continue
        elongation = _elongation(coords * spacing)
        if elongation > params.max_elongation:
            continue
        origin = np.array([s.start for s in local]) + offset
        lo = coords.min(axis=0) + origin
        hi = coords.max(axis=0) + 1 + origin
        tight = Box(tuple(int(v) for v in lo), tuple(int(v) for v in hi))  # type: ignore[arg-type]
        box = tight.grow(margin, hu.shape)
        found.append(
            Candidate(
                box=box,
                centroid_zyx=tuple(float(v) for v in coords.mean(axis=0) + origin),  # type: ignore[arg-type]
                volume_mm3=volume,
                radius_mm=float(depth[local][core].max()),
                elongation=elongation,
                mean_hu=float(hu[tuple((coords + origin).T)].mean()),
            )
        )
    return found
