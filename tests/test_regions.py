"""Three regions and their statistics on analytic shapes."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from radnode.models import regions as rg


def _ball(radius_mm: float, spacing: tuple[float, float, float], margin_mm: float = 8.0) -> np.ndarray:
    shape = [int(math.ceil((radius_mm + margin_mm) / s)) * 2 + 3 for s in spacing]
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centre = [(n - 1) / 2 for n in shape]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing)) <= radius_mm**2


def _pyradiomics_shape(mask: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """pyradiomics' own shape features, the reference for sphericity."""
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    from radiomics import shape

    image = sitk.GetImageFromArray(np.zeros(mask.shape, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.CopyInformation(image)
    features = shape.RadiomicsShape(image, label)
    features.enableAllFeatures()
    return {k: float(v) for k, v in features.execute().items()}


# --- ring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(2.0, 0.7, 0.8), (5.0, 0.6, 0.6), (1.0, 1.0, 1.0)])
def test_ring_volume_of_a_ball(spacing: tuple[float, float, float]) -> None:
    radius, width = 12.0, 3.0
    tumour = _ball(radius, spacing)
    ring = rg.peritumoral_ring(tumour, spacing, width)
    volume = ring.sum() * np.prod(spacing) / 1000.0
    expected = 4.0 / 3.0 * math.pi * ((radius + width) ** 3 - radius**3) / 1000.0
    assert volume == pytest.approx(expected, rel=0.12)
    assert not (ring & tumour).any()


def test_ring_width_is_physical_not_voxels() -> None:
    """Box tumour on 3 mm slices with 0.5 mm pixels: 3 mm is 6 pixels in-plane, 1 slice in z.

    A voxel k steps away along an axis is ``k*s - s/2`` mm from the tumour's face.
    """
    spacing = (3.0, 0.5, 0.5)
    tumour = np.zeros((11, 40, 40), dtype=bool)
    tumour[5, 15:25, 15:25] = True
    ring = rg.peritumoral_ring(tumour, spacing, 3.0)
    row = ring[5, 20, :]
    assert np.flatnonzero(row[:15]).tolist() == list(range(9, 15))  # 6 pixels to the left
    assert np.flatnonzero(row[25:]).tolist() == list(range(0, 6))  # 6 pixels to the right
    column = ring[:, 20, 20]
    assert np.flatnonzero(column).tolist() == [4, 6]  # one slice above and below
    # Widening to 5 mm reaches the next slice (2 * 3 - 1.5 = 4.5 mm).
    assert np.flatnonzero(rg.peritumoral_ring(tumour, spacing, 5.0)[:, 20, 20]).tolist() == [3, 4, 6, 7]


def test_empty_tumour_gives_empty_ring_and_flag() -> None:
    lung = np.ones((5, 20, 20), dtype=bool)
    regions = rg.build_regions(np.zeros_like(lung), lung, (2.0, 1.0, 1.0))
    assert regions.tumour_empty and regions.ring_empty
    assert not regions.ring.any()
    assert any("empty" in note for note in regions.notes)
    assert regions.lung.sum() == lung.sum()


def test_ring_restricted_to_lung_for_a_tumour_on_the_lung_border() -> None:
    spacing = (2.0, 1.0, 1.0)
    shape = (20, 60, 60)
    lung = np.zeros(shape, dtype=bool)
    lung[:, :, :30] = True  # the lung ends at x = 30 (the "pleura")
    tumour = np.zeros(shape, dtype=bool)
    tumour[8:12, 25:35, 22:30] = True  # touches the border from inside
    restricted = rg.build_regions(tumour, lung, spacing, ring_width_mm=3.0)
    free = rg.build_regions(tumour, lung, spacing, ring_width_mm=3.0, restrict_ring_to_lung=False)
    assert restricted.ring_restricted_to_lung and not free.ring_restricted_to_lung
    assert not (restricted.ring & ~lung).any()
    assert (free.ring & ~lung).any()  # the unrestricted ring runs into the chest wall
    assert np.array_equal(restricted.ring, free.ring & lung)
    # Nothing of the ring beyond the border; all of it on the lung side kept.
    assert restricted.ring[:, :, 30:].sum() == 0
    assert restricted.ring.sum() > 0


def test_ring_empty_when_tumour_is_outside_the_lung() -> None:
    spacing = (2.0, 1.0, 1.0)
    lung = np.zeros((10, 40, 40), dtype=bool)
    lung[:, :, :10] = True
    tumour = np.zeros_like(lung)
    tumour[4:6, 15:20, 25:30] = True
    regions = rg.build_regions(tumour, lung, spacing)
    assert regions.ring_empty and not regions.tumour_empty
    assert any("outside the lung" in note for note in regions.notes)


def test_whole_lung_with_or_without_tumour() -> None:
    lung = np.zeros((6, 30, 30), dtype=bool)
    lung[:, 5:25, 5:25] = True
    tumour = np.zeros_like(lung)
    tumour[2:4, 10:14, 10:14] = True
    assert rg.build_regions(tumour, lung, (1, 1, 1)).lung.sum() == lung.sum()
    excluded = rg.build_regions(tumour, lung, (1, 1, 1), exclude_tumour_from_lung=True).lung
    assert excluded.sum() == lung.sum() - tumour.sum()


def test_ring_rejects_bad_width_and_shapes() -> None:
    tumour = np.zeros((4, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="width"):
        rg.peritumoral_ring(tumour, (1, 1, 1), 0.0)
    with pytest.raises(ValueError, match="shape"):
        rg.build_regions(tumour, np.zeros((4, 8, 9), dtype=bool), (1, 1, 1))


# --- shape -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.7, 0.8)])
def test_diameter_of_a_box_is_its_space_diagonal(spacing: tuple[float, float, float]) -> None:
    box = np.zeros((20, 60, 50), dtype=bool)
    box[3:13, 5:55, 2:42] = True
    expected = math.sqrt((10 * spacing[0]) ** 2 + (50 * spacing[1]) ** 2 + (40 * spacing[2]) ** 2)
    assert rg.max_diameter_mm(box, spacing) == pytest.approx(expected)
    single = np.zeros((3, 3, 3), dtype=bool)
    single[1, 1, 1] = True
    assert rg.max_diameter_mm(single, spacing) == pytest.approx(math.sqrt(sum(s * s for s in spacing)))
    flat = np.zeros((3, 30, 30), dtype=bool)
    flat[1, 2:28, 4:9] = True  # one slice: a degenerate hull
    assert rg.max_diameter_mm(flat, spacing) == pytest.approx(
        math.sqrt(spacing[0] ** 2 + (26 * spacing[1]) ** 2 + (5 * spacing[2]) ** 2)
    )


def test_diameter_hull_shortcut_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    blob = np.zeros((30, 60, 60), dtype=bool)
    for _ in range(8):
        z, y, x = rng.integers(8, 22), rng.integers(12, 48), rng.integers(12, 48)
        blob |= _ball_at(blob.shape, (z, y, x), 5 + 4 * rng.random())
    surface = blob & ~ndimage.binary_erosion(blob, border_value=0)
    assert surface.sum() > rg._BRUTE_FORCE_POINTS  # the hull shortcut is taken
    spacing = (2.0, 0.8, 0.7)
    centres = np.argwhere(blob).astype(float)
    offsets = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))
    corners = ((centres[:, None, :] + offsets[None]) * np.array(spacing)).reshape(-1, 3)
    from scipy.spatial import ConvexHull

    hull = corners[ConvexHull(corners).vertices]
    brute = math.sqrt(max(((hull[:, None] - hull[None]) ** 2).sum(-1).max(), 0.0))
    assert rg.max_diameter_mm(blob, spacing) == pytest.approx(brute)


def _ball_at(shape: tuple[int, ...], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def test_sphericity_of_ball_and_cube_like_pyradiomics() -> None:
    spacing = (2.0, 0.7, 0.8)
    ball = _ball(12.0, spacing)
    cube = np.zeros((34, 34, 34), dtype=bool)
    cube[2:32, 2:32, 2:32] = True
    ball_value = rg.sphericity(ball, spacing)
    cube_value = rg.sphericity(cube, (1.0, 1.0, 1.0))
    assert ball_value == pytest.approx(_pyradiomics_shape(ball, spacing)["Sphericity"], rel=1e-6)
    assert cube_value == pytest.approx(_pyradiomics_shape(cube, (1.0, 1.0, 1.0))["Sphericity"], rel=1e-6)
    ideal_cube = (36 * math.pi) ** (1 / 3) / 6  # 0.806: the mesh bevels edges, a bit rounder
    assert cube_value == pytest.approx(ideal_cube, abs=0.03)
    assert 0.85 < ball_value <= 1.0
    assert ball_value > cube_value + 0.03
    # A finely sampled ball comes closer to 1.
    assert rg.sphericity(_ball(20.0, (0.5, 0.5, 0.5), 2.0), (0.5, 0.5, 0.5)) > ball_value


def test_region_statistics_values() -> None:
    spacing = (2.0, 1.0, 0.5)
    mask = np.zeros((8, 20, 20), dtype=bool)
    mask[2:6, 5:15, 4:16] = True
    image = np.arange(mask.size, dtype=np.float64).reshape(mask.shape) % 97 - 40
    stats = rg.region_statistics(mask, image, spacing, "tumour")
    values = image[mask]
    assert stats.voxels == 4 * 10 * 12
    assert stats.volume_ml == pytest.approx(480 * 1.0 / 1000)
    assert stats.hu_mean == pytest.approx(values.mean())
    assert stats.hu_std == pytest.approx(values.std())
    assert (stats.hu_min, stats.hu_max) == (values.min(), values.max())
    assert stats.max_diameter_mm == pytest.approx(math.sqrt(8**2 + 10**2 + 6**2))
    assert stats.sphericity is not None and 0.5 < stats.sphericity < 0.9
    assert stats.as_dict()["name"] == "tumour"
    empty = rg.region_statistics(np.zeros_like(mask), image, spacing, "ring")
    assert empty.empty and empty.hu_mean is None and empty.volume_ml == 0.0


def test_regions_statistics_for_three_regions() -> None:
    spacing = (2.0, 1.0, 1.0)
    lung = np.zeros((20, 60, 60), dtype=bool)
    lung[2:18, 5:55, 5:55] = True
    tumour = _ball_at(lung.shape, (10, 30, 30), 6)
    image = np.where(tumour, 30.0, np.where(lung, -850.0, 40.0))
    regions = rg.build_regions(tumour, lung, spacing)
    stats = rg.regions_statistics(regions, image, spacing)
    assert set(stats) == {"tumour", "ring", "lung"}
    assert stats["tumour"].hu_mean == pytest.approx(30.0)
    assert stats["ring"].hu_mean == pytest.approx(-850.0)
    assert stats["lung"].max_diameter_mm is None  # lung shape only when asked
    assert stats["lung"].volume_ml == pytest.approx(lung.sum() * 2.0 / 1000)
