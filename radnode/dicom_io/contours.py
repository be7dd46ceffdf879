"""Slice masks to planar polygons for an RTSTRUCT (PS3.3 C.8.8.6), holes included.

Polygons are traced with marching squares at level 0.5 on the slice mask: every vertex
lies midway between a pixel centre inside the mask and one outside, so every pixel
centre is at least ``sqrt(2)/4 ≈ 0.354`` pixel from the polygon. Any reader that fills
the pixels whose *centres* lie inside (plastimatch, skimage, most planning systems)
therefore gets the mask back exactly; no centre can fall on the boundary, where readers
disagree.

Holes (background enclosed by the mask) are written in one of two ways:

``keyhole`` (default)
    Each hole is joined to its enclosing contour by a zero-width cut, so every
    connected piece of the slice is *one* simple-looking polygon whose boundary runs
    out along the cut, around the hole and back. PS3.3 C.8.8.6.3 describes this as the
    way to encode holes for systems that do not treat an inner contour as a hole; every
    planning system imports it. The cut is always drawn along a half-integer pixel row
    (between two pixel rows), so it passes through no pixel centre and changes no pixel
    for any centre-sampling reader. Holes are joined from left to right, each to the
    nearest boundary to its left (the classic "hole elimination" of polygon
    triangulation), so no cut ever crosses another contour.
``inner``
    Each hole is its own contour inside the outer one (even-odd rule, the other
    convention of PS3.3 C.8.8.6.3).

Optional smoothing (Laplacian, a few passes) moves each vertex at most
:data:`MAX_SMOOTHING_SHIFT` pixel (a quarter pixel; far below the half voxel allowed),
never moves the ends of a keyhole cut, and -- because no pixel centre is nearer than
0.354 pixel to the traced polygon -- never changes which pixel centres are inside.

Coordinates here are continuous pixel indices ``(row, column)``; the RTSTRUCT writer
maps them to patient coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from skimage import measure

logger = logging.getLogger(__name__)

#: Largest displacement of a vertex by smoothing, in pixels (< 0.354, see module doc).
MAX_SMOOTHING_SHIFT = 0.25
#: Laplacian smoothing passes.
SMOOTHING_PASSES = 4
#: Tolerance for geometric equality of vertices (pixels).
_EPS = 1e-9


class HoleStyle(StrEnum):
    """How holes in a slice are encoded (see module docstring)."""

    KEYHOLE = "keyhole"
    INNER = "inner"


@dataclass
class _Contour:
    points: np.ndarray  # (n, 2) row, col; not closed (first != last)
    area: float  # signed, > 0 counter-clockwise in (x=col, y=row)
    depth: int = 0
    parent: int | None = None


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 1], points[:, 0]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _points_inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Crossing-number test of many points against one polygon (row, col)."""
    r0, c0 = polygon[:, 0], polygon[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    pr = points[:, 0][:, None]
    pc = points[:, 1][:, None]
    straddles = (r0[None, :] > pr) != (r1[None, :] > pr)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_c = c0[None, :] + (pr - r0[None, :]) * (c1 - c0)[None, :] / (r1 - r0)[None, :]
    hits = straddles & (pc < cross_c)
    return (np.count_nonzero(hits, axis=1) % 2) == 1


def trace(mask2d: np.ndarray) -> list[_Contour]:
    """Closed marching-squares contours of one slice, with nesting depth and parent."""
    padded = np.pad(np.asarray(mask2d, dtype=np.float32), 1)
    raw = measure.find_contours(padded, 0.5, fully_connected="low")
    contours: list[_Contour] = []
    for c in raw:
        pts = c[:-1] - 1.0 if np.allclose(c[0], c[-1]) else c - 1.0
        if len(pts) < 3:
            continue
        contours.append(_Contour(points=pts, area=_signed_area(pts)))
    if len(contours) > 1:
        _nest(contours)
    return contours


def _nest(contours: list[_Contour]) -> None:
    lo = np.array([c.points.min(axis=0) for c in contours])
    hi = np.array([c.points.max(axis=0) for c in contours])
    probes = np.array([c.points[0] for c in contours])
    abs_area = np.array([abs(c.area) for c in contours])
    containers: list[list[int]] = [[] for _ in contours]
    for j, outer in enumerate(contours):
        candidates = np.flatnonzero(
            np.all(probes >= lo[j], axis=1) & np.all(probes <= hi[j], axis=1)
        )
        candidates = candidates[candidates != j]
        if candidates.size == 0:
            continue
        inside = _points_inside(probes[candidates], outer.points)
        for i in candidates[inside]:
            containers[int(i)].append(j)
    for i, owners in enumerate(containers):
        contours[i].depth = len(owners)
        if owners:
            contours[i].parent = min(owners, key=lambda j: abs_area[j])


def _oriented(points: np.ndarray, positive: bool) -> np.ndarray:
    return points if (_signed_area(points) > 0) == positive else points[::-1].copy()


def _crossings(poly: np.ndarray, row: float) -> tuple[np.ndarray, np.ndarray]:
    """Columns where the closed polygon meets ``row``, with the edge index of each."""
    r0, c0 = poly[:, 0], poly[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    cols: list[np.ndarray] = []
    edges: list[np.ndarray] = []
    slanted = (np.minimum(r0, r1) <= row) & (np.maximum(r0, r1) >= row) & (r0 != r1)
    idx = np.flatnonzero(slanted)
    if idx.size:
        t = (row - r0[idx]) / (r1[idx] - r0[idx])
        cols.append(c0[idx] + t * (c1[idx] - c0[idx]))
        edges.append(idx)
    flat = np.flatnonzero((r0 == row) & (r1 == row))
    if flat.size:
        cols.extend([c0[flat], c1[flat]])
        edges.extend([flat, flat])
    if not cols:
        return np.empty(0), np.empty(0, dtype=int)
    return np.concatenate(cols), np.concatenate(edges)


def _hole_start(hole: np.ndarray) -> tuple[float, float, int]:
    """Leftmost point where the hole meets a half-integer row: (row, col, edge index)."""
    r0, c0 = hole[:, 0], hole[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
    first = np.ceil(lo - 0.5) + 0.5
    last = np.floor(hi - 0.5) + 0.5
    has = first <= hi + _EPS
    best: tuple[float, float, int] | None = None
    for row_values in (first, last):
        idx = np.flatnonzero(has)
        rows = row_values[idx]
        dr = r1[idx] - r0[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(dr != 0, (rows - r0[idx]) / dr, 0.0)
        cc = c0[idx] + t * (c1[idx] - c0[idx])
        # a flat edge on the row: its left end is the leftmost point
        cc = np.where(dr == 0, np.minimum(c0[idx], c1[idx]), cc)
        if cc.size:
            k = int(np.argmin(cc))
            if best is None or cc[k] < best[1]:
                best = (float(rows[k]), float(cc[k]), int(idx[k]))
    if best is None:  # pragma: no cover - a traced hole always spans a half row
        raise ValueError("hole contour meets no half-integer row")
    return best


def _insert_point(poly: np.ndarray, edge: int, point: np.ndarray) -> tuple[np.ndarray, int]:
    """Return the polygon with ``point`` on edge ``edge`` as a vertex, and its index."""
    n = len(poly)
    if np.all(np.abs(poly[edge] - point) < _EPS):
        return poly, edge
    nxt = (edge + 1) % n
    if np.all(np.abs(poly[nxt] - point) < _EPS):
        return poly, nxt
    return np.insert(poly, edge + 1, point, axis=0), edge + 1


def _merge_hole(
    outer: np.ndarray, pinned: np.ndarray, hole: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Join ``hole`` into ``outer`` by a cut leftwards along a half-integer row."""
    row, col, hole_edge = _hole_start(hole)
    start = np.array([row, col])
    hole, h = _insert_point(hole, hole_edge, start)
    cols, edges = _crossings(outer, row)
    left = cols < col - _EPS
    if not np.any(left):
        raise ValueError(f"no enclosing boundary left of hole point (row {row}, col {col})")
    k = int(np.flatnonzero(left)[np.argmax(cols[left])])
    target = np.array([row, float(cols[k])])
    outer_pinned = pinned
    before = len(outer)
    outer, q = _insert_point(outer, int(edges[k]), target)
    if len(outer) != before:
        outer_pinned = np.insert(pinned, q, False)
    ring = np.concatenate([hole[h:], hole[:h], hole[h:h + 1]])
    merged = np.concatenate([outer[: q + 1], ring, outer[q:]])
    merged_pinned = np.concatenate(
        [outer_pinned[: q + 1], np.zeros(len(ring), dtype=bool), outer_pinned[q:]]
    )
    # the cut's four ends must not move when smoothing
    merged_pinned[q] = True
    merged_pinned[q + 1] = True
    merged_pinned[q + len(ring)] = True
    merged_pinned[q + len(ring) + 1] = True
    return merged, merged_pinned


def _smooth(points: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """Laplacian smoothing with pinned vertices and a hard cap on displacement."""
    original = points
    current = points.copy()
    for _ in range(SMOOTHING_PASSES):
        neighbours = 0.5 * (np.roll(current, 1, axis=0) + np.roll(current, -1, axis=0))
        current = 0.5 * current + 0.5 * neighbours
        current[pinned] = original[pinned]
    shift = current - original
    length = np.linalg.norm(shift, axis=1)
    too_far = length > MAX_SMOOTHING_SHIFT
    shift[too_far] *= (MAX_SMOOTHING_SHIFT / length[too_far])[:, None]
    return original + shift


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on the straight line between their neighbours."""
    if len(points) <= 3:
        return points
    prev = np.roll(points, 1, axis=0)
    nxt = np.roll(points, -1, axis=0)
    a = points - prev
    b = nxt - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    same_direction = (a * b).sum(axis=1) > 0
    keep = ~((np.abs(cross) < _EPS) & same_direction)
    # zero-length edges (duplicated consecutive points) go too
    keep &= np.linalg.norm(a, axis=1) > _EPS
    if keep.sum() < 3:
        return points
    return points[keep]


def slice_polygons(
    mask2d: np.ndarray,
    *,
    smoothing: bool = False,
    hole_style: HoleStyle | str = HoleStyle.KEYHOLE,
) -> list[np.ndarray]:
    """Polygons ``(n, 2)`` of (row, col) pixel indices that encode one slice mask.

    Parameters
    ----------
    mask2d
        Boolean ``(rows, columns)`` slice.
    smoothing
        Smooth the polygons (each point moves at most :data:`MAX_SMOOTHING_SHIFT`
        pixel; no pixel centre changes side).
    hole_style
        ``keyhole`` (holes joined by zero-width cuts) or ``inner`` (holes as separate
        contours, even-odd).

    Returns
    -------
    list of numpy.ndarray
        Each polygon has at least 3 vertices and is implicitly closed. Outer
        boundaries run counter-clockwise, holes clockwise (in x = column, y = row).
    """
    style = HoleStyle(hole_style)
    contours = trace(mask2d)
    polygons: list[np.ndarray] = []
    pins: list[np.ndarray] = []
    holes_of: dict[int, list[int]] = {}
    for i, contour in enumerate(contours):
        if contour.depth % 2 == 1 and contour.parent is not None:
            holes_of.setdefault(contour.parent, []).append(i)
    for i, contour in enumerate(contours):
        is_hole = contour.depth % 2 == 1
        if is_hole and style is HoleStyle.KEYHOLE:
            continue
        points = _oriented(contour.points, positive=not is_hole)
        pinned = np.zeros(len(points), dtype=bool)
        if style is HoleStyle.KEYHOLE and i in holes_of:
            holes = [_oriented(contours[j].points, positive=False) for j in holes_of[i]]
            holes.sort(key=lambda hole: _hole_start(hole)[1])
            for hole in holes:
                points, pinned = _merge_hole(points, pinned, hole)
        polygons.append(points)
        pins.append(pinned)
    out: list[np.ndarray] = []
    for points, pinned in zip(polygons, pins, strict=True):
        if smoothing:
            points = _smooth(points, pinned)
        out.append(_drop_collinear(points))
    return out
