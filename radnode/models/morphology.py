"""Morphology on 3-D masks in physical units (mm), and the working-grid resampling around it.

The lung isolation (:mod:`radnode.models.lungmask`) works on a coarse grid and thinks in
millimetres: a ball of 5 mm, a disk of 20 mm in one slice. These helpers do that exactly
(Euclidean distance transforms, not voxel-counted structuring elements, so anisotropic
CT spacing is honoured) and cheaply (inside the mask's bounding box). Arrays are indexed
``(z, y, x)``; ``spacing`` is in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

#: Face-connected (6-neighbour) 3-D structure; thin contacts do not join components.
STRUCT_6 = ndi.generate_binary_structure(3, 1)
#: 4-neighbour structure acting in-plane only (one slice at a time), as a 3-D array.
STRUCT_INPLANE = np.zeros((3, 3, 3), dtype=bool)
STRUCT_INPLANE[1] = ndi.generate_binary_structure(2, 1)
#: z sampling (mm) that makes a 3-D distance transform act slice by slice.
NO_Z = 1.0e5


def block_factors(spacing: np.ndarray, target_mm: float) -> tuple[int, int, int]:
    """Integer block size per axis that brings the spacing up to about ``target_mm``."""
    fz, fy, fx = (max(1, int(round(target_mm / s))) for s in spacing)
    return fz, fy, fx


def block_mean(data: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Average non-overlapping blocks (float32); a last partial block repeats its edge.

    Summed with strided slices, one block offset at a time: cheaper than a reshape and a
    multi-axis reduction for the small factors used here.
    """
    arr = np.asarray(data)
    if factors == (1, 1, 1):
        return arr.astype(np.float32)
    padded_shape = [-(-n // f) * f for n, f in zip(arr.shape, factors)]
    pad = [(0, p - n) for p, n in zip(padded_shape, arr.shape)]
    if any(p[1] for p in pad):
        arr = np.pad(arr, pad, mode="edge")
    fz, fy, fx = factors
    acc_type = np.int32 if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool else np.float32
    total: np.ndarray | None = None
    for dz in range(fz):
        for dy in range(fy):
            for dx in range(fx):
                part = arr[dz::fz, dy::fy, dx::fx].astype(acc_type)
                if total is None:
                    total = part
                else:
                    total += part
    assert total is not None
    return total.astype(np.float32) / np.float32(fz * fy * fx)


def upsample_labels(
    labels: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]
) -> np.ndarray:
    """Labels of the working grid on the CT grid, with edges interpolated, not blocky.

    Each label's indicator is linearly interpolated at the CT voxel centres (a working
    voxel covers ``factors`` CT voxels, so CT voxel ``i`` sits at working coordinate
    ``(i + 0.5) / f - 0.5``) and the label wins where it exceeds 0.5. Done inside each
    label's bounding box, one axis at a time, to stay cheap.
    """
    if factors == (1, 1, 1):
        return labels.copy()
    out = np.zeros(shape, dtype=np.uint8)
    for value in (v for v in np.unique(labels) if v != 0):
        mask = labels == value
        box = padded_box(mask, 1)
        sub = mask[box].astype(np.float32)
        lo = [s.start for s in box]
        full = [
            slice(s.start * f, min(n, s.stop * f)) for s, f, n in zip(box, factors, shape)
        ]
        for axis, (sl, f, lo_i) in enumerate(zip(full, factors, lo)):
            coords = (np.arange(sl.start, sl.stop, dtype=np.float32) + 0.5) / f - 0.5 - lo_i
            sub = interp_axis(sub, coords, axis)
        region = out[full[0], full[1], full[2]]
        region[(sub > 0.5) & (region == 0)] = value
    return out


def interp_axis(data: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``data`` along ``axis`` at fractional ``coords`` (edge-clamped)."""
    n = data.shape[axis]
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * data.ndim
    shape[axis] = -1
    w = (c - i0).astype(np.float32).reshape(shape)
    return np.take(data, i0, axis=axis) * (1 - w) + np.take(data, i1, axis=axis) * w


def upsample_bool(
    mask: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, ...]
) -> np.ndarray:
    """Nearest-neighbour upsampling by integer factors, cropped to ``shape``."""
    up = mask
    for axis, f in enumerate(factors):
        if f > 1:
            up = np.repeat(up, f, axis=axis)
    return up[: shape[0], : shape[1], : shape[2]]


# --- morphology in physical units ------------------------------------------------------------


def dilate_mm(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Dilation by a ball of ``radius_mm`` (exact, via the Euclidean distance transform)."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    box = padded_box(mask, [int(np.ceil(radius_mm / s)) + 1 for s in spacing])
    out = np.zeros_like(mask)
    out[box] = ndi.distance_transform_edt(~mask[box], sampling=spacing) <= radius_mm
    return out


def erode_mm(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Erosion by a ball of ``radius_mm``; outside the array counts as background."""
    if radius_mm <= 0 or not mask.any():
        return mask.copy()
    box = padded_box(mask, 1)
    padded = np.pad(mask[box], 1)
    out = np.zeros_like(mask)
    out[box] = ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1] > radius_mm
    return out


def open_mm(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Opening by a ball of ``radius_mm``: removes parts thinner than its diameter."""
    return dilate_mm(erode_mm(mask, spacing, radius_mm), spacing, radius_mm) & mask


def close_in_plane(mask: np.ndarray, spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Slice-by-slice closing with a disk of ``radius_mm`` (exact, distance-transform based).

    A huge z sampling makes the 3-D Euclidean distance transform act per slice. The mask
    is padded in-plane by more than the radius so the array edge never stops the disk.
    """
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing[1:]]
    padded = np.pad(mask, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    sampling = np.array([NO_Z, spacing[1], spacing[2]])
    dilated = ndi.distance_transform_edt(~padded, sampling=sampling) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=sampling) > radius_mm
    return closed[:, pad[0] : -pad[0], pad[1] : -pad[1]] | mask


def disk(radius_mm: float, spacing_yx: np.ndarray) -> np.ndarray:
    """In-plane disk structuring element (as a 1-slice 3-D array) of ``radius_mm``."""
    ry, rx = (max(0, int(np.floor(radius_mm / s))) for s in spacing_yx)
    yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = (yy * spacing_yx[0]) ** 2 + (xx * spacing_yx[1]) ** 2 <= radius_mm**2
    return disk[None]


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (background not reachable in-plane from the slice edge)."""
    return ndi.binary_fill_holes(mask, structure=STRUCT_INPLANE)


def largest_component(mask: np.ndarray, structure: np.ndarray = STRUCT_6) -> np.ndarray:
    labels, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def components_touching(mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Components of ``mask`` that touch (face-adjacent) ``target``."""
    if not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=STRUCT_6)
    touching = ndi.binary_dilation(target, structure=STRUCT_6) & mask
    hit = np.unique(labels[touching])
    keep = np.zeros(n + 1, dtype=bool)
    keep[hit[hit > 0]] = True
    return keep[labels]


def padded_box(mask: np.ndarray, margin: int | Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` widened by ``margin`` voxels (per axis), clipped to the array.

    The whole array when ``mask`` is empty. Projections (``any``) are much cheaper than
    ``ndimage.find_objects`` on a large volume.
    """
    margins = [margin] * mask.ndim if isinstance(margin, int) else list(margin)
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return tuple(slice(0, n) for n in mask.shape)
        m = margins[axis]
        box.append(slice(max(0, int(hit[0]) - m), min(mask.shape[axis], int(hit[-1]) + 1 + m)))
    return tuple(box)


def hull_per_slice(mask: np.ndarray) -> np.ndarray:
    """Convex hull of every slice of ``mask`` (computed inside its bounding box)."""
    out = np.zeros_like(mask)
    box = padded_box(mask, 1)
    sub = mask[box]
    hull = out[box]
    for z in np.flatnonzero(sub.any(axis=(1, 2))):
        hull[z] = convex_hull_image(sub[z])
    return out
