"""Tubes in a voxel grid: vessels, airways and great vessels as chains of capsules.

A tubular structure is a list of straight segments, each a capsule (all points within
``radius`` of the segment). Rendering touches only the voxels of each segment's bounding box, where the distance
to the segment is computed with numpy broadcasting; segments with boxes of similar size
are processed together as one array.

Partial volume: a CT voxel averages what it contains, so a vessel thinner than a voxel
shows up as a faint dot rather than vanishing or filling whole voxels. The fraction of a
voxel covered by a tube is approximated by a linear ramp one voxel wide around the tube
surface, scaled down for tubes thinner than a voxel so the blended mass stays the
tube's real cross-section.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from radnode.phantom.geometry import VolumeGeometry


@dataclass(frozen=True)
class Segments:
    """Capsules: start points, end points (``(n, 3)``, patient x, y, z in mm) and radii (mm)."""

    p0: np.ndarray
    p1: np.ndarray
    radius: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.radius)
        if self.p0.shape != (n, 3) or self.p1.shape != (n, 3):
            raise ValueError(
                f"Segments need p0 and p1 of shape ({n}, 3), got {self.p0.shape} and {self.p1.shape}"
            )

    def __len__(self) -> int:
        return len(self.radius)

    @classmethod
    def empty(cls) -> Segments:
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))

    @classmethod
    def polyline(cls, points: list[tuple[float, float, float]], radius: float | list[float]) -> Segments:
        """Consecutive points joined by segments (one radius, or one per segment)."""
        pts = np.asarray(points, dtype=np.float64)
        radii = np.broadcast_to(np.asarray(radius, dtype=np.float64), (len(pts) - 1,)).copy()
        return cls(pts[:-1].copy(), pts[1:].copy(), radii)

    @staticmethod
    def concat(parts: list[Segments]) -> Segments:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Segments.empty()
        return Segments(
            np.concatenate([p.p0 for p in parts]),
            np.concatenate([p.p1 for p in parts]),
            np.concatenate([p.radius for p in parts]),
        )

    def scaled_radius(self, factor: float, offset: float = 0.0) -> Segments:
        """The same axes with radius ``factor * r + offset`` (e.g. an airway's lumen)."""
        return Segments(self.p0, self.p1, self.radius * factor + offset)


#: Bounding-box sizes (voxels) that boxes are padded up to, so boxes of similar size
#: are processed together as one array (at most 1.5 times larger than needed per axis).
_BOX_SIZES = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048])
#: Voxels per batch (bounds the memory of one vectorised step).
_BATCH_VOXELS = 2_000_000


def _near_voxels(
    geometry: VolumeGeometry, segments: Segments, reach: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Voxels within ``reach[i]`` (mm) of segment ``i``, in batches.

    Yields ``(flat_index, distance_mm, segment_index)`` arrays. Segments are grouped by
    the (padded) size of their bounding boxes and each group is handled as one
    ``(n, bz, by, bx)`` array, so the Python loop runs over groups, not segments.
    """
    if len(segments) == 0:
        return
    origin = np.asarray(geometry.origin_xyz)
    spacing = np.asarray(geometry.spacing_xyz)
    size = np.asarray(geometry.shape_zyx[::-1])
    r = reach[:, None]
    lo = np.clip(np.ceil((np.minimum(segments.p0, segments.p1) - r - origin) / spacing).astype(int), 0, size)
    hi = np.clip(np.floor((np.maximum(segments.p0, segments.p1) + r - origin) / spacing).astype(int) + 1, 0, size)
    ext = hi - lo
    live = np.flatnonzero(np.all(ext > 0, axis=1))
    if live.size == 0:
        return
    padded = _BOX_SIZES[np.searchsorted(_BOX_SIZES, ext[live])]
    keys, group = np.unique(padded, axis=0, return_inverse=True)
    nx, ny = int(size[0]), int(size[1])
    for g, (bx, by, bz) in enumerate(keys):
        members = live[group.ravel() == g]
        per = max(1, _BATCH_VOXELS // int(bx * by * bz))
        for start in range(0, members.size, per):
            idx = members[start : start + per]
            a = segments.p0[idx]
            v = segments.p1[idx] - a
            ix = lo[idx, 0, None] + np.arange(bx)
            iy = lo[idx, 1, None] + np.arange(by)
            iz = lo[idx, 2, None] + np.arange(bz)
            x = (origin[0] + spacing[0] * ix - a[:, 0, None])[:, None, None, :]
            y = (origin[1] + spacing[1] * iy - a[:, 1, None])[:, None, :, None]
            z = (origin[2] + spacing[2] * iz - a[:, 2, None])[:, :, None, None]
            vx, vy, vz = (v[:, k, None, None, None] for k in range(3))
            vv = np.maximum(vx * vx + vy * vy + vz * vz, 1e-12)
            t = np.clip((x * vx + y * vy + z * vz) / vv, 0.0, 1.0)
            dist = np.sqrt((x - t * vx) ** 2 + (y - t * vy) ** 2 + (z - t * vz) ** 2)
            inside = (
                (ix < hi[idx, 0, None])[:, None, None, :]
                & (iy < hi[idx, 1, None])[:, None, :, None]
                & (iz < hi[idx, 2, None])[:, :, None, None]
                & (dist <= reach[idx, None, None, None])
            )
            n, k, j, i = np.nonzero(inside)
            flat = (iz[n, k] * ny + iy[n, j]) * nx + ix[n, i]
            yield flat, dist[n, k, j, i], idx[n]


def blend_segments(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    segments: Segments,
    value: float,
    allowed: np.ndarray | None = None,
) -> None:
    """Blend ``value`` into ``volume`` (float, in place) with the tubes' partial-volume fraction.

    Each voxel becomes ``value + (v - value) * prod(1 - f_i)`` over the tubes ``i``
    covering it by fractions ``f_i``: the same as blending them one after the other, so
    joints between segments do not brighten. Where ``allowed`` (bool, same shape) is
    given, voxels outside it are left alone: intrapulmonary branches that cut across the
    heart or the chest wall are not drawn there.
    """
    if len(segments) == 0:
        return
    ramp = float(np.cbrt(geometry.voxel_volume_mm3))
    radius = segments.radius
    r_eff = np.maximum(radius, ramp / 2.0)
    # The ramp profile of radius r_eff holds pi * (r_eff^2 + ramp^2 / 12) of material per
    # unit length; tubes thinner than a voxel are scaled to hold their true pi * r^2.
    scale = np.where(radius >= ramp, 1.0, radius**2 / (r_eff**2 + ramp**2 / 12.0))
    if not volume.flags.c_contiguous:
        raise ValueError("blend_segments needs a C-contiguous volume (it writes through a flat view)")
    where: list[np.ndarray] = []
    weight: list[np.ndarray] = []
    for flat, dist, seg in _near_voxels(geometry, segments, r_eff + 0.5 * ramp):
        frac = np.clip(0.5 + (r_eff[seg] - dist) / ramp, 0.0, 1.0) * scale[seg]
        where.append(flat)
        weight.append(np.log1p(-np.minimum(frac, 0.999999)))
    if not where:
        return
    flat_all = np.concatenate(where)
    weight_all = np.concatenate(weight)
    if flat_all.size * 8 < volume.size:  # few voxels: sort them rather than scan the volume
        touched, inverse = np.unique(flat_all, return_inverse=True)
        log_keep = np.bincount(inverse, weights=weight_all)
    else:
        full = np.bincount(flat_all, weights=weight_all, minlength=volume.size)
        touched = np.flatnonzero(full)
        log_keep = full[touched]
    if allowed is not None:
        keep = allowed.reshape(-1)[touched]
        touched, log_keep = touched[keep], log_keep[keep]
    cover = (-np.expm1(log_keep)).astype(volume.dtype)
    flat_volume = volume.reshape(-1)
    flat_volume[touched] += (value - flat_volume[touched]) * cover


def rasterize_segments(
    mask: np.ndarray, geometry: VolumeGeometry, segments: Segments, margin: float = 0.0
) -> None:
    """Set ``mask`` (bool, in place) where a voxel centre lies within ``radius + margin``."""
    if not mask.flags.c_contiguous:
        raise ValueError("rasterize_segments needs a C-contiguous mask (it writes through a flat view)")
    flat_mask = mask.reshape(-1)
    for flat, _, _ in _near_voxels(geometry, segments, segments.radius + margin):
        flat_mask[flat] = True


@dataclass(frozen=True)
class TreeStyle:
    """How a territory tree grows.

    Parameters
    ----------
    r_min
        Smallest radius drawn (mm); smaller branches are dropped with their subtree.
    step_fraction
        Each branch runs this fraction of the way to the centroid of its territory.
    split_balance
        Fraction of the territory that goes to the first child (asymmetric branching).
    leaf_points
        A territory this small ends in a terminal branch to its centroid.
    """

    r_min: float
    step_fraction: tuple[float, float] = (0.35, 0.6)
    split_balance: tuple[float, float] = (0.3, 0.7)
    leaf_points: int = 1


def territory_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    points: np.ndarray,
    root_radius: float,
    style: TreeStyle,
) -> Segments:
    """Grow a tree that supplies ``points`` by recursive territory splitting.

    Each branch runs from its start part of the way towards the centroid of the points
    it supplies, then divides them in two across their principal axis; each half gets a
    child whose radius follows Murray's law with flow proportional to the territory
    (``r_child = r * (n_child / n) ** (1/3)``). Points sampled uniformly in the lung
    therefore yield a tree that fills the lung and tapers towards the pleura, like the
    pulmonary arteries, veins and bronchi.

    Parameters
    ----------
    rng
        Random source (split positions, step lengths).
    start
        Root point (the hilum), patient x, y, z in mm.
    points
        ``(n, 3)`` points the tree must reach.
    root_radius
        Radius (mm) of the root branch.
    style
        Step fraction, split balance and smallest radius drawn.
    """
    p0: list[np.ndarray] = []
    p1: list[np.ndarray] = []
    radii: list[float] = []
    stack: list[tuple[np.ndarray, np.ndarray, float]] = [(np.asarray(start, float), points, root_radius)]
    while stack:
        here, pts, radius = stack.pop()
        centroid = pts.mean(axis=0)
        if len(pts) <= style.leaf_points:
            p0.append(here)
            p1.append(centroid)
            radii.append(radius)
            continue
        end = here + rng.uniform(*style.step_fraction) * (centroid - here)
        p0.append(here)
        p1.append(end)
        radii.append(radius)
        centred = pts - centroid
        _, vecs = np.linalg.eigh(centred.T @ centred)
        axis = vecs[:, -1]
        axis = axis if axis[np.argmax(np.abs(axis))] > 0 else -axis  # LAPACK's sign is arbitrary
        proj = centred @ axis
        order = np.argsort(proj, kind="stable")
        cut = int(np.clip(round(rng.uniform(*style.split_balance) * len(pts)), 1, len(pts) - 1))
        for part in (pts[order[:cut]], pts[order[cut:]]):
            child = radius * (len(part) / len(pts)) ** (1.0 / 3.0)
            if child >= style.r_min:
                stack.append((end, part, child))
    if not radii:
        return Segments.empty()
    return Segments(np.array(p0), np.array(p1), np.array(radii))
