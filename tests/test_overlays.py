"""Overlay PNGs (radnode.dicom_io.overlays): planes through the tumour, outlines in SEG colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radnode.dicom_io.overlays import overlay_centre, render_overlays
from radnode.dicom_io.regions import KIND_DEFAULTS, Region, RegionKind


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2


def _colours(path: Path) -> set[tuple[int, int, int]]:
    image = Image.open(path).convert("RGB")
    return {c for _, c in image.getcolors(1 << 20)}


def test_planes_pass_through_the_tumour_and_draw_each_outline(tmp_path: Path) -> None:
    shape = (30, 64, 80)
    volume = np.full(shape, -800, dtype=np.int16)
    lung = np.zeros(shape, bool)
    lung[3:27, 8:56, 6:38] = True
    tumour = _ball(shape, (20, 40, 25), 4)
    volume[tumour] = 40
    ring = _ball(shape, (20, 40, 25), 6) & ~tumour & lung
    regions = [
        Region.of_kind(RegionKind.LUNG_RIGHT, lung), Region.of_kind(RegionKind.TUMOUR, tumour),
        Region.of_kind(RegionKind.PERITUMORAL_RING, ring),
    ]
    assert overlay_centre(regions, shape) == (20, 40, 25)
    files = render_overlays(volume, (2.5, 0.8, 0.8), regions, tmp_path)
    red = KIND_DEFAULTS[RegionKind.TUMOUR].colour
    yellow = KIND_DEFAULTS[RegionKind.PERITUMORAL_RING].colour
    blue = KIND_DEFAULTS[RegionKind.LUNG_RIGHT].colour
    for view in ("axial", "coronal", "sagittal"):
        assert {red, yellow, blue} <= _colours(files[view]), view
    axial = np.asarray(Image.open(files["axial"]).convert("RGB"))
    ys, xs = np.nonzero(np.all(axial == red, axis=-1))
    assert abs(ys.mean() - 40) < 1 and abs(xs.mean() - 25) < 1  # the outline sits on the tumour
    # Square pixels: 30 slices of 2.5 mm shown as 30 * 2.5 / 0.8 rows.
    assert Image.open(files["coronal"]).size == (80, round(30 * 2.5 / 0.8))
    assert Image.open(files["sagittal"]).size == (64, round(30 * 2.5 / 0.8))
    assert Image.open(files["grid"]).size == (3 * 80, 3 * 64)


def test_without_a_tumour_the_planes_go_through_the_lungs(tmp_path: Path) -> None:
    shape = (10, 20, 20)
    lung = np.zeros(shape, bool)
    lung[2:7, 4:9, 10:17] = True
    regions = [Region.of_kind(RegionKind.LUNG_LEFT, lung), Region.of_kind(RegionKind.TUMOUR, np.zeros(shape, bool))]
    assert overlay_centre(regions, shape) == (4, 6, 13)
    files = render_overlays(np.zeros(shape, np.int16), (1.0, 1.0, 1.0), regions, tmp_path)
    assert KIND_DEFAULTS[RegionKind.TUMOUR].colour not in _colours(files["axial"])


def test_a_mask_on_another_grid_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        render_overlays(np.zeros((4, 8, 8)), (1, 1, 1), [Region.of_kind(RegionKind.TUMOUR, np.zeros((4, 8, 9), bool))], tmp_path)
