"""Overlay previews: PNG slices of the CT with each region's outline in its SEG colour.

A reviewer on the dashboard should see at a glance whether the contours are plausible
without opening a viewer. The worker renders these when a job finishes and stores them
with the results (``<results>/<job id>/overlays/``), so the dashboard only serves files:
no CT is read, and no pixel work happens, in the web process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from radnode.dicom_io.regions import Region, RegionKind

#: Sub-folder of a job's results that holds the PNGs (the dashboard serves only these names).
OVERLAY_DIR = "overlays"
#: The files written, in display order.
OVERLAY_NAMES = ("axial.png", "coronal.png", "sagittal.png", "grid.png")
#: Lung window (level -600, width 1500): lungs, tumour and chest wall all readable.
WINDOW_LOW, WINDOW_HIGH = -1350.0, 150.0


def _grey(hu: np.ndarray) -> np.ndarray:
    scaled = (np.clip(hu, WINDOW_LOW, WINDOW_HIGH) - WINDOW_LOW) / (WINDOW_HIGH - WINDOW_LOW)
    return np.repeat((scaled * 255).astype(np.uint8)[..., None], 3, axis=-1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels in this 2-D slice (what a contour looks like on screen)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _paint(hu: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]]) -> np.ndarray:
    rgb = _grey(hu)
    for mask, colour in masks:
        rgb[_outline(mask)] = colour
    return rgb


def _to_png(rgb: np.ndarray, pixel_hw: tuple[float, float], path: Path, flip: bool = False) -> Path:
    """Save with square pixels (coronal/sagittal slices are stretched by the slice spacing)."""
    if flip:  # slice index grows towards the head on a sorted CT: head up on screen
        rgb = rgb[::-1]
    height, width = rgb.shape[:2]
    scale = pixel_hw[0] / pixel_hw[1]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if abs(scale - 1.0) > 1e-3:
        image = image.resize((width, max(1, round(height * scale))), Image.Resampling.NEAREST)
    image.save(path, format="PNG")
    return path


def overlay_centre(regions: Sequence[Region], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The voxel the three planes pass through: the tumour's centre, else the lungs', else the volume's."""
    for kinds in ((RegionKind.TUMOUR,), (RegionKind.LUNG, RegionKind.LUNG_LEFT, RegionKind.LUNG_RIGHT)):
        masks = [r.mask for r in regions if r.kind in kinds and r.mask.any()]
        if masks:
            union = np.logical_or.reduce(masks)
            return tuple(int(round(c)) for c in ndimage.center_of_mass(union))  # type: ignore[return-value]
    return (shape[0] // 2, shape[1] // 2, shape[2] // 2)


def render_overlays(
    volume: np.ndarray, spacing_zyx: tuple[float, float, float], regions: Sequence[Region], out_dir: Path
) -> dict[str, Path]:
    """Write axial/coronal/sagittal PNGs through the tumour centre and a 3×3 axial grid through the lungs.

    ``volume`` is the CT in HU, ``(z, y, x)``, on the grid of the region masks. Returns
    ``{"axial": path, ...}``.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {volume.shape}")
    for region in regions:
        if region.mask.shape != volume.shape:
            raise ValueError(f"region {region.name!r} has shape {region.mask.shape}, CT has {volume.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    dz, dy, dx = spacing_zyx
    z, y, x = overlay_centre(regions, volume.shape)
    coloured = [(r.mask, r.colour) for r in regions]  # colour is always set (Region fills the default)
    files: dict[str, Path] = {}
    files["axial"] = _to_png(_paint(volume[z], [(m[z], c) for m, c in coloured]), (dy, dx), out_dir / "axial.png")
    files["coronal"] = _to_png(
        _paint(volume[:, y, :], [(m[:, y, :], c) for m, c in coloured]), (dz, dx), out_dir / "coronal.png", flip=True
    )
    files["sagittal"] = _to_png(
        _paint(volume[:, :, x], [(m[:, :, x], c) for m, c in coloured]), (dz, dy), out_dir / "sagittal.png", flip=True
    )
    lungs = [r.mask for r in regions if r.kind in (RegionKind.LUNG, RegionKind.LUNG_LEFT, RegionKind.LUNG_RIGHT)]
    occupied = np.flatnonzero(np.logical_or.reduce(lungs).any(axis=(1, 2))) if lungs else np.array([], dtype=int)
    first, last = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, volume.shape[0] - 1)
    tiles = [
        _paint(volume[k], [(m[k], c) for m, c in coloured])
        for k in np.linspace(first, last, 9).round().astype(int)
    ]
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in (0, 3, 6)]
    files["grid"] = _to_png(np.concatenate(rows, axis=0), (dy, dx), out_dir / "grid.png")
    return files
