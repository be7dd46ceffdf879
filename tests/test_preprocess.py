"""RA-Seg preprocessing: intensities, geometry, crop, and the exact inverse for labels."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.models.preprocess import (
    PreprocessError,
    PreprocessParams,
    PreprocessRecord,
    labels_to_ct,
    labels_to_ct_image,
    labels_to_grid,
    preprocess_ct,
)

# Odd sizes and anisotropic spacing finer than the 1 x 1 x 1.5 mm target; a flipped
# direction so that origin/direction handling is exercised too. The spacings put no CT
# voxel exactly half-way between two grid voxels (checked below), where "nearest" would
# be a matter of floating-point luck.
SIZE_ZYX = (47, 61, 53)
SPACING_XYZ = (0.713, 0.827, 1.273)
ORIGIN = (-31.2, 12.5, -140.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)


def _ct(values: np.ndarray, spacing_xyz: tuple[float, ...] = SPACING_XYZ) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _border_lung(shape: tuple[int, int, int]) -> np.ndarray:
    """A lung touching the first z slice and the last x column: the crop hits both borders."""
    lung = np.zeros(shape, dtype=bool)
    lung[0 : shape[0] - 12, 14 : shape[1] - 15, 20:] = True
    return lung


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(3)
    hu = rng.normal(-400, 400, SIZE_ZYX).astype(np.int16)
    return preprocess_ct(_ct(hu), _border_lung(SIZE_ZYX))


def test_crop_is_lung_box_plus_margin_clipped_at_borders(case) -> None:
    record = case.record
    lung_grid = labels_to_grid(_border_lung(SIZE_ZYX), record, crop=False)
    idx = np.nonzero(lung_grid)
    margin = [int(np.ceil(record.params.lung_margin_mm / s)) for s in record.spacing_zyx]
    for axis in range(3):
        lo, hi = idx[axis].min(), idx[axis].max() + 1
        assert record.crop_start[axis] == max(0, lo - margin[axis])
        assert record.crop_stop[axis] == min(record.resampled_size_zyx[axis], hi + margin[axis])
    # The lung starts at z = 0 and ends at the last x column: clipped there.
    assert record.crop_start[0] == 0 and record.crop_stop[2] == record.resampled_size_zyx[2]
    assert case.image.shape == case.lung.shape == record.shape
    assert case.lung.sum() == lung_grid.sum()  # the crop keeps the whole lung


def test_grid_to_ct_to_grid_is_exact_on_any_label_map(case) -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, case.record.shape).astype(np.uint8)
    on_ct = labels_to_ct(labels, case.record)
    assert on_ct.shape == SIZE_ZYX
    assert np.array_equal(labels_to_grid(on_ct, case.record), labels)


def test_inverse_agrees_with_simpleitk_nearest_neighbour(case) -> None:
    record = case.record
    positions = [np.arange(n) * s / t for n, s, t in zip(SIZE_ZYX, record.ct_spacing_zyx, record.spacing_zyx)]
    assert all(np.abs(p % 1 - 0.5).min() > 1e-3 for p in positions)  # no ties
    rng = np.random.default_rng(5)
    labels = rng.integers(1, 4, record.shape).astype(np.uint8)
    ours = labels_to_ct(labels, record)
    ct_ref = _ct(np.zeros(SIZE_ZYX, np.int16))
    oracle = sitk.GetArrayFromImage(
        sitk.Resample(record.grid_image(labels), ct_ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )
    assert (oracle != 0).mean() > 0.5
    assert np.array_equal(ours[oracle != 0], oracle[oracle != 0])
    # SimpleITK gives 0 beyond half a grid voxel past the last grid centre; radnode takes
    # the edge value there (the nearest voxel that exists). Nowhere else may they differ.
    beyond = np.zeros(SIZE_ZYX, bool)
    for axis, (p, m) in enumerate(zip(positions, record.resampled_size_zyx)):
        shape = [1, 1, 1]
        shape[axis] = -1
        beyond |= (p > m - 0.5).reshape(shape)
    assert not (ours != oracle)[~beyond].any()
    assert labels_to_ct_image(labels, record).GetSize() == ct_ref.GetSize()


def test_ct_to_grid_to_ct_is_exact_when_ct_is_on_the_target_grid() -> None:
    rng = np.random.default_rng(6)
    shape = (33, 45, 39)
    ct = _ct(np.zeros(shape, np.int16), spacing_xyz=(1.0, 1.0, 1.5))
    lung = np.zeros(shape, bool)
    lung[5:20, 0:30, 10:39] = True
    record = preprocess_ct(ct, lung).record
    labels = rng.integers(0, 3, shape).astype(np.uint8)
    back = labels_to_ct(labels_to_grid(labels, record), record)
    crop = tuple(slice(a, b) for a, b in zip(record.crop_start, record.crop_stop))
    assert np.array_equal(back[crop], labels[crop])
    outside = np.ones(shape, bool)
    outside[crop] = False
    assert outside.any() and not back[outside].any()


def test_intensities_clipped_normalised_and_placed_on_the_grid() -> None:
    # HU rises linearly along x (mm from the origin), inside the window: linear
    # interpolation reproduces a ramp exactly, so each grid voxel is checked against its
    # own x position. Blocks of -1000 and +1000 HU at the first/last slices test the clip.
    size = (21, 25, 57)
    x_mm = np.arange(size[2]) * SPACING_XYZ[0]
    hu = np.broadcast_to(-180.0 + 8.0 * x_mm, size).astype(np.float32).copy()
    hu[:4] = -1000.0
    hu[-4:] = 1000.0
    params = PreprocessParams()
    case = preprocess_ct(_ct(hu), np.ones(size, bool), params)
    grid_x = (case.record.crop_start[2] + np.arange(case.record.shape[2])) * case.record.spacing_zyx[2]
    expected = (-180.0 + 8.0 * grid_x - params.hu_min) / (params.hu_max - params.hu_min)
    middle = case.image.shape[0] // 2
    assert np.allclose(case.image[middle], expected[None, :], atol=1e-4)
    assert np.all(case.image[0] == 0.0) and np.all(case.image[-1] == 1.0)
    assert case.image.dtype == np.float32


def test_record_round_trips_through_json_mapping(case) -> None:
    again = PreprocessRecord.from_dict(case.record.to_dict())
    assert again == case.record
    grid = case.record.grid_image(np.zeros(case.record.shape, np.uint8))
    # Grid voxel 0 sits at the CT's physical position of its crop start (indices x, y, z).
    ct = _ct(np.zeros(SIZE_ZYX, np.int16))
    start_mm = np.array(case.record.crop_start[::-1]) * np.array(case.record.spacing_zyx[::-1])
    expected = ct.TransformContinuousIndexToPhysicalPoint(tuple(start_mm / np.array(SPACING_XYZ)))
    assert np.allclose(grid.GetOrigin(), expected)


def test_errors_name_what_is_wrong() -> None:
    ct = _ct(np.zeros(SIZE_ZYX, np.int16))
    with pytest.raises(PreprocessError, match="empty"):
        preprocess_ct(ct, np.zeros(SIZE_ZYX, bool))
    with pytest.raises(PreprocessError, match="lung_mask"):
        preprocess_ct(ct, np.ones((3, 3, 3), bool))
    with pytest.raises(PreprocessError, match="hu_max"):
        PreprocessParams(hu_min=100, hu_max=0)
    with pytest.raises(PreprocessError, match="spacng"):
        PreprocessParams.from_dict({"spacng": 1})
