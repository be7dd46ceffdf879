"""The three radiomics regions (tumour, peritumoral ring, whole lung) and their statistics.

Regions
-------
Tumour
    The tumour mask as given (bool ``(z, y, x)``).
Peritumoral ring
    Voxels *outside* the tumour whose centre lies within ``ring_width_mm`` (default 3 mm)
    of the tumour's surface, measured in physical space: a Euclidean distance transform
    of the tumour's complement with the CT spacing as sampling
    (``scipy.ndimage.distance_transform_edt(sampling=...)``) finds the nearest tumour
    voxel, and half that voxel's extent towards the ring voxel is subtracted (details in
    :func:`_distance_to_region`). A 3 mm ring is thus 3 mm thick along z on 3 mm slices
    and along x on 0.7 mm pixels alike (a dilation by a fixed number of voxels would not
    be), and on thick slices it keeps its layer above and below the tumour. Optionally
    restricted to the lung mask, so that a juxtapleural tumour's ring does not run into
    the chest wall.
Whole lung
    The lung mask (both lungs) as given; radnode's lung mask contains the tumour
    (:mod:`radnode.models.lungmask`), ``exclude_tumour_from_lung`` removes it.

An empty tumour gives an empty ring and the flag ``Regions.tumour_empty`` (with a note);
it is not an error, so that the job can still deliver its other results.

Statistics (:func:`region_statistics`)
--------------------------------------
volume (mL, voxel count × voxel volume), HU mean / standard deviation (population,
``ddof=0``) / min / max, the longest 3-D diameter, the marching-cubes surface area and
the sphericity.

Longest 3-D diameter
    The largest distance between two points of the *voxelised* region, i.e. between two
    corners of its voxels (each voxel a box of the spacing): for a box of voxels it is
    the box's space diagonal. Computed exactly and cheaply: the extreme corners of a
    union of voxels are corners of the voxels whose centres are vertices of the convex
    hull of the surface-voxel centres (a Minkowski sum of the centre set with one voxel),
    so only those candidates enter the pairwise search (``scipy.spatial.ConvexHull``).
    pyradiomics' ``Maximum3DDiameter`` measures between marching-cubes mesh vertices
    instead, which cuts voxel corners and is up to about one voxel diagonal shorter.
Sphericity
    pyradiomics' definition ``(36 π V²)^(1/3) / A`` with ``A`` the marching-cubes mesh
    surface area and ``V`` the mesh volume (``skimage.measure.marching_cubes`` at level
    0.5 on the padded mask with the CT spacing). About 1 for a well-sampled ball; a cube
    gives about 0.806 minus a little because the mesh bevels its edges.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import marching_cubes, mesh_surface_area

logger = logging.getLogger(__name__)

#: Default width of the peritumoral ring (mm).
DEFAULT_RING_WIDTH_MM = 3.0
#: Below this many candidate points the diameter is searched without a convex hull.
_BRUTE_FORCE_POINTS = 2000
_FACES_3D = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class Regions:
    """The three regions on one CT grid.

    Attributes
    ----------
    tumour, ring, lung
        Boolean masks ``(z, y, x)``.
    ring_width_mm
        Width of the ring.
    ring_restricted_to_lung
        Whether the ring was cut to the lung mask.
    tumour_empty
        True when the tumour mask had no voxel (the ring is then empty too).
    ring_empty
        True when the ring has no voxel (empty tumour, or nothing of the lung around it).
    notes
        Remarks for the result file.
    """

    tumour: np.ndarray
    ring: np.ndarray
    lung: np.ndarray
    ring_width_mm: float
    ring_restricted_to_lung: bool
    tumour_empty: bool
    ring_empty: bool
    notes: tuple[str, ...] = ()

    def masks(self) -> dict[str, np.ndarray]:
        """``{"tumour": ..., "ring": ..., "lung": ...}``."""
        return {"tumour": self.tumour, "ring": self.ring, "lung": self.lung}


@dataclass(frozen=True)
class RegionStats:
    """Statistics of one region (see the module docstring for the definitions).

    Values that an empty region cannot have are ``None``; ``empty`` says so.
    """

    name: str
    voxels: int
    volume_ml: float
    hu_mean: float | None
    hu_std: float | None
    hu_min: float | None
    hu_max: float | None
    max_diameter_mm: float | None
    surface_area_mm2: float | None
    sphericity: float | None
    empty: bool
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


# --- regions ----------------------------------------------------------------------------------------


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=float)
    if s.shape != (3,) or not np.all(s > 0):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing}")
    return s


def _bool3d(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"{name} must be a 3-D (z, y, x) mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def peritumoral_ring(
    tumour: np.ndarray,
    spacing: Sequence[float],
    width_mm: float = DEFAULT_RING_WIDTH_MM,
    lung: np.ndarray | None = None,
) -> np.ndarray:
    """The ring of voxels within ``width_mm`` of the tumour, tumour excluded.

    Parameters
    ----------
    tumour
        Boolean tumour mask ``(z, y, x)``.
    spacing
        Voxel spacing ``(z, y, x)`` in mm (the distance transform's sampling).
    width_mm
        Ring width in mm (> 0).
    lung
        When given, the ring is cut to this mask.

    Returns
    -------
    numpy.ndarray
        Boolean ring mask; empty when the tumour is empty.
    """
    t = _bool3d(tumour, "tumour")
    s = _spacing(spacing)
    if not width_mm > 0:
        raise ValueError(f"the ring width must be > 0 mm, got {width_mm}")
    ring = np.zeros_like(t)
    if not t.any():
        return ring
    # Only the tumour's bounding box plus the width can be in the ring.
    found = ndi.find_objects(t.astype(np.uint8))[0]
    margin = [int(math.ceil(width_mm / si)) + 1 for si in s]
    box = tuple(
        slice(max(0, sl.start - m), min(n, sl.stop + m)) for sl, m, n in zip(found, margin, t.shape)
    )
    ring[box] = _distance_to_region(t[box], s) <= width_mm
    ring &= ~t
    if lung is not None:
        lung_b = _bool3d(lung, "lung")
        if lung_b.shape != t.shape:
            raise ValueError(f"lung mask shape {lung_b.shape} differs from tumour shape {t.shape}")
        ring &= lung_b
    return ring


def _distance_to_region(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from every voxel centre to the region's surface (0 inside).

    The nearest region voxel is found by centre distance (exact EDT with indices, CT
    spacing as sampling); from that centre distance ``d`` the voxel's own half-extent
    along the connecting direction ``u`` is subtracted, taking the voxel as the
    ellipsoid inscribed in it: ``d - 1 / sqrt(sum((u_i / (s_i/2))^2))``. So a voxel on
    the next 5 mm slice is 2.5 mm from the tumour, not 5 mm, and a 3 mm ring still has
    a layer above and below the tumour; for a ball the ring volume is within about 10 %
    of ``4/3 π ((r+w)³ − r³)`` from 1 mm isotropic to 0.6 × 0.6 × 5 mm voxels (a
    centre-to-centre distance falls 10-35 % short, the distance to the voxel boxes
    overshoots by 20-35 % because their corners stick out).
    """
    _, nearest = ndi.distance_transform_edt(~mask, sampling=spacing, return_indices=True)
    distance_sq = np.zeros(mask.shape, dtype=np.float64)
    scaled_sq = np.zeros(mask.shape, dtype=np.float64)
    for axis in range(3):
        grid = np.arange(mask.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
        delta = np.abs(nearest[axis] - grid) * spacing[axis]
        distance_sq += delta**2
        scaled_sq += (delta / (spacing[axis] / 2.0)) ** 2
    distance = np.sqrt(distance_sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        half_extent = np.where(scaled_sq > 0, distance / np.sqrt(scaled_sq), 0.0)
    out = distance - half_extent
    out[mask] = 0.0
    return out


def build_regions(
    tumour: np.ndarray,
    lung: np.ndarray,
    spacing: Sequence[float],
    *,
    ring_width_mm: float = DEFAULT_RING_WIDTH_MM,
    restrict_ring_to_lung: bool = True,
    exclude_tumour_from_lung: bool = False,
) -> Regions:
    """Tumour, peritumoral ring and whole lung on one grid.

    Parameters
    ----------
    tumour, lung
        Boolean masks ``(z, y, x)`` of the same shape (``lung`` any non-zero label).
    spacing
        Voxel spacing ``(z, y, x)`` in mm.
    ring_width_mm
        Ring width in mm.
    restrict_ring_to_lung
        Cut the ring to the lung (no chest wall or mediastinum in it).
    exclude_tumour_from_lung
        Remove the tumour from the whole-lung region.

    Raises
    ------
    ValueError
        On shape mismatch, bad spacing or a non-positive ring width.
    """
    t = _bool3d(tumour, "tumour")
    lung_b = _bool3d(lung, "lung")
    if lung_b.shape != t.shape:
        raise ValueError(f"lung mask shape {lung_b.shape} differs from tumour shape {t.shape}")
    notes: list[str] = []
    ring = peritumoral_ring(t, spacing, ring_width_mm, lung_b if restrict_ring_to_lung else None)
    tumour_empty = not t.any()
    if tumour_empty:
        notes.append("tumour mask is empty: no tumour and no peritumoral ring")
    elif not ring.any():
        notes.append(
            f"peritumoral ring is empty: no lung within {ring_width_mm} mm of the tumour"
            if restrict_ring_to_lung
            else "peritumoral ring is empty"
        )
    if t.any() and not (t & lung_b).any():
        notes.append("the tumour lies entirely outside the lung mask")
    whole = lung_b & ~t if exclude_tumour_from_lung else lung_b.copy()
    return Regions(
        tumour=t.copy(),
        ring=ring,
        lung=whole,
        ring_width_mm=float(ring_width_mm),
        ring_restricted_to_lung=restrict_ring_to_lung,
        tumour_empty=tumour_empty,
        ring_empty=not ring.any(),
        notes=tuple(notes),
    )


# --- statistics --------------------------------------------------------------------------------------


def max_diameter_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest distance (mm) between two voxel corners of the region (0 if empty).

    See the module docstring: exact for the voxelised region, via the convex hull of the
    surface-voxel centres.
    """
    m = _bool3d(mask, "mask")
    s = _spacing(spacing)
    if not m.any():
        return 0.0
    surface = m & ~ndi.binary_erosion(m, structure=_FACES_3D, border_value=0)
    centres = np.argwhere(surface).astype(float) * s
    candidates = _hull_vertices(centres)
    offsets = np.array([[dz, dy, dx] for dz in (-0.5, 0.5) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)]) * s
    corners = (candidates[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
    corners = _hull_vertices(corners)
    return float(math.sqrt(_max_squared_distance(corners)))


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of ``points`` (all points when few or degenerate)."""
    if len(points) <= _BRUTE_FORCE_POINTS:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        # Flat or collinear regions (one slice, one row): the hull is lower-dimensional.
        # Joggling (QJ) still finds its vertices; failing that, search all points.
        try:
            return points[ConvexHull(points, qhull_options="QJ").vertices]
        except QhullError:
            return points


def _max_squared_distance(points: np.ndarray, chunk: int = 2048) -> float:
    """Largest squared pairwise distance, in chunks to bound memory."""
    best = 0.0
    for start in range(0, len(points), chunk):
        block = points[start : start + chunk]
        d2 = ((block[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
        best = max(best, float(d2.max()))
    return best


def mesh_area_and_volume(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """Marching-cubes surface area (mm²) and enclosed mesh volume (mm³) of a region.

    The mask is cropped to its bounding box and padded by one voxel so the mesh closes;
    the volume comes from the divergence theorem over the triangles.
    """
    m = _bool3d(mask, "mask")
    s = _spacing(spacing)
    if not m.any():
        return 0.0, 0.0
    box = ndi.find_objects(m.astype(np.uint8))[0]
    sub = np.pad(m[box], 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(sub, level=0.5, spacing=tuple(s))
    area = float(mesh_surface_area(verts, faces))
    tri = verts[faces]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    return area, float(abs(signed.sum()))


def sphericity(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """pyradiomics sphericity ``(36 π V²)^(1/3) / A`` from the marching-cubes mesh (nan if empty)."""
    area, volume = mesh_area_and_volume(mask, spacing)
    if area <= 0:
        return math.nan
    return float((36.0 * math.pi * volume**2) ** (1.0 / 3.0) / area)


def region_statistics(
    mask: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    name: str = "region",
    *,
    shape: bool = True,
) -> RegionStats:
    """Volume, HU statistics and (optionally) shape descriptors of one region.

    Parameters
    ----------
    mask
        Boolean region mask ``(z, y, x)``.
    image
        HU array of the same shape.
    spacing
        Voxel spacing ``(z, y, x)`` in mm.
    name
        Region name for the record.
    shape
        Compute diameter, surface area and sphericity (marching cubes over a whole lung
        takes about a second; callers may skip it).
    """
    m = _bool3d(mask, "mask")
    s = _spacing(spacing)
    img = np.asarray(image)
    if img.shape != m.shape:
        raise ValueError(f"image shape {img.shape} differs from the {name} mask shape {m.shape}")
    voxels = int(np.count_nonzero(m))
    volume = voxels * float(np.prod(s)) / 1000.0
    if voxels == 0:
        return RegionStats(
            name=name, voxels=0, volume_ml=0.0, hu_mean=None, hu_std=None, hu_min=None,
            hu_max=None, max_diameter_mm=None, surface_area_mm2=None, sphericity=None,
            empty=True, notes=(f"{name} is empty",),
        )
    values = img[m].astype(np.float64)
    diameter = area = spher = None
    if shape:
        diameter = max_diameter_mm(m, s)
        area, mesh_volume = mesh_area_and_volume(m, s)
        spher = float((36.0 * math.pi * mesh_volume**2) ** (1.0 / 3.0) / area) if area > 0 else None
    return RegionStats(
        name=name,
        voxels=voxels,
        volume_ml=volume,
        hu_mean=float(values.mean()),
        hu_std=float(values.std()),
        hu_min=float(values.min()),
        hu_max=float(values.max()),
        max_diameter_mm=diameter,
        surface_area_mm2=area,
        sphericity=spher,
        empty=False,
    )


def regions_statistics(
    regions: Regions, image: np.ndarray, spacing: Sequence[float], *, lung_shape: bool = False
) -> dict[str, RegionStats]:
    """Statistics of the three regions; the lung's shape descriptors only when asked."""
    return {
        "tumour": region_statistics(regions.tumour, image, spacing, "tumour"),
        "ring": region_statistics(regions.ring, image, spacing, "ring"),
        "lung": region_statistics(regions.lung, image, spacing, "lung", shape=lung_shape),
    }
