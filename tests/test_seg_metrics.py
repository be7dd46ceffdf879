"""Segmentation metrics against hand-computed cases (and one independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from radnode.models import metrics as mt


def _cube_pair(shift: int, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Two n³ cubes, the second shifted by ``shift`` voxels along x."""
    a = np.zeros((n + 4, n + 4, n + 4 + shift), dtype=bool)
    b = np.zeros_like(a)
    a[2 : 2 + n, 2 : 2 + n, 2 : 2 + n] = True
    b[2 : 2 + n, 2 : 2 + n, 2 + shift : 2 + n + shift] = True
    return a, b


def _ball(
    radius_mm: float,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    centre_mm: np.ndarray,
) -> np.ndarray:
    grids = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d2 = sum(((g * s) - c) ** 2 for g, s, c in zip(grids, spacing, centre_mm))
    return d2 <= radius_mm**2


def test_dice_and_jaccard_of_offset_cubes() -> None:
    a, b = _cube_pair(shift=3, n=10)
    overlap = 10 * 10 * 7
    assert mt.dice(a, b) == pytest.approx(2 * overlap / 2000)
    assert mt.jaccard(a, b) == pytest.approx(overlap / (2000 - overlap))
    assert mt.dice(a, a) == 1.0
    assert mt.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert mt.dice(a, np.zeros_like(a)) == 0.0


def test_volume_in_ml() -> None:
    a, _ = _cube_pair(shift=0, n=10)
    assert mt.volume_ml(a, (2.0, 0.5, 0.5)) == pytest.approx(1000 * 0.5 / 1000)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9)])
def test_surface_dice_of_shifted_cube(spacing: tuple[float, float, float]) -> None:
    """Shift by one voxel along x; τ below the x spacing.

    Hand count (n = 10): faces of A whose voxel lies on B's surface are the four side
    faces except their x = 0 column (weights: side face areas) and the +x face's rim
    of 4n-4 voxels; the -x face and the rest of the +x face are one voxel away.
    """
    n = 10
    sz, sy, sx = spacing
    a, b = _cube_pair(shift=1, n=n)
    side = 2 * n * (n - 1) * (sz * sx) + 2 * n * (n - 1) * (sy * sx)
    rim = (4 * n - 4) * (sy * sz)
    total = 2 * n * n * (sy * sz) + 2 * n * n * (sz * sx) + 2 * n * n * (sy * sx)
    expected = (side + rim) / total  # the same for B by symmetry
    assert mt.surface_dice(a, b, spacing, tolerance_mm=0.5 * sx) == pytest.approx(expected)
    assert mt.surface_dice(a, b, spacing, tolerance_mm=sx) == pytest.approx(1.0)
    assert mt.surface_dice(a, a, spacing) == pytest.approx(1.0)


def test_hausdorff_of_shifted_cubes() -> None:
    # Shift 1: a third of A's surface voxels (the -x face and the +x face inside its rim,
    # 100 + 64 of 488) are 1 mm away, the rest 0: both the 95th percentile and the max are 1.
    a, b = _cube_pair(shift=1, n=10)
    assert mt.hausdorff95(a, b, (1, 1, 1)) == pytest.approx(1.0)
    assert mt.hausdorff_distance(a, b, (1, 1, 1)) == pytest.approx(1.0)
    assert mt.mean_surface_distance(a, b, (1, 1, 1)) == pytest.approx(164 / 488)
    # Along x with 0.8 mm pixels the distances scale with the spacing.
    assert mt.hausdorff_distance(a, b, (3.0, 1.0, 0.8)) == pytest.approx(0.8)


def test_hd95_of_shifted_spheres() -> None:
    """Two r = 15 mm balls 3 mm apart: distances t·|cos θ|, so HD = t and HD95 ≈ 0.95 t."""
    spacing = (1.0, 1.0, 1.0)
    shift = 3.0
    shape = (44, 44, 48)
    centre = np.array([21.5, 21.5, 21.5])
    a = _ball(15.0, spacing, shape, centre)
    b = _ball(15.0, spacing, shape, centre + np.array([0.0, 0.0, shift]))
    hd = mt.hausdorff_distance(a, b, spacing)
    hd95 = mt.hausdorff95(a, b, spacing)
    assert hd == pytest.approx(shift, abs=0.5)
    assert 0.8 * shift <= hd95 <= shift + 1e-9
    # Independent check: brute-force nearest neighbours between surface voxel centres.
    sa = np.argwhere(mt.surface_voxels(a)) * np.array(spacing)
    sb = np.argwhere(mt.surface_voxels(b)) * np.array(spacing)
    d_ab = cKDTree(sb).query(sa)[0]
    d_ba = cKDTree(sa).query(sb)[0]
    assert hd95 == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
    assert hd == pytest.approx(max(d_ab.max(), d_ba.max()))


def test_added_path_length_hand_cases() -> None:
    spacing = (3.0, 0.8, 0.8)
    truth = np.zeros((3, 20, 20), dtype=bool)
    truth[:, 5:15, 5:15] = True
    # Nothing predicted: the whole contour (36 pixels per slice) must be drawn.
    assert mt.added_path_length(np.zeros_like(truth), truth, spacing) == pytest.approx(3 * 36 * 0.8)
    assert mt.added_path_length(truth, truth, spacing) == 0.0
    # One column to the right: the left edge (10) and the right edge's inner 8 pixels
    # are not on the predicted contour, the top and bottom rows (2 x 9) are.
    shifted = np.zeros_like(truth)
    shifted[:, 5:15, 6:16] = True
    assert mt.added_path_length(shifted, truth, spacing) == pytest.approx(3 * 18 * 0.8)
    # With a tolerance of one pixel nothing is missing.
    assert mt.added_path_length(shifted, truth, spacing, tolerance_mm=0.8) == 0.0
    # A missing slice costs exactly its contour.
    one_missing = truth.copy()
    one_missing[1] = False
    assert mt.added_path_length(one_missing, truth, spacing) == pytest.approx(36 * 0.8)


def test_evaluate_segmentation_collects_everything() -> None:
    a, b = _cube_pair(shift=1, n=10)
    spacing = (2.0, 1.0, 1.0)
    m = mt.evaluate_segmentation(a, b, spacing, tolerance_mm=1.18)
    assert m.dice == pytest.approx(mt.dice(a, b))
    assert m.jaccard == pytest.approx(mt.jaccard(a, b))
    assert m.hd95_mm == pytest.approx(mt.hausdorff95(a, b, spacing))
    assert m.surface_dice == pytest.approx(mt.surface_dice(a, b, spacing, 1.18))
    assert m.added_path_length_mm == pytest.approx(mt.added_path_length(a, b, spacing))
    assert m.volume_pred_ml == pytest.approx(2.0)
    assert m.volume_difference_ml == pytest.approx(0.0)
    assert m.tolerance_mm == 1.18
    row = m.as_dict()
    assert row["dice"] == m.dice and row["notes"] == ""


def test_empty_masks_give_nan_surface_metrics() -> None:
    a, _ = _cube_pair(shift=0)
    empty = np.zeros_like(a)
    m = mt.evaluate_segmentation(empty, a, (1, 1, 1))
    assert m.dice == 0.0
    assert math.isnan(m.hd95_mm) and math.isnan(m.surface_dice)
    assert "pred" in m.notes[0]
    assert math.isnan(mt.hausdorff95(a, empty, (1, 1, 1)))


def test_default_tolerance_is_duneai() -> None:
    assert mt.DEFAULT_SURFACE_TOLERANCE_MM == pytest.approx(1.18)


def test_input_validation() -> None:
    a, b = _cube_pair(shift=1)
    with pytest.raises(ValueError, match="same shape"):
        mt.evaluate_segmentation(a, b[:, :, :-1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        mt.surface_dice(a, b, (1, -1, 1))
    with pytest.raises(ValueError, match="tolerance"):
        mt.surface_dice(a, b, (1, 1, 1), tolerance_mm=-1)
    with pytest.raises(ValueError, match="3-D"):
        mt.hausdorff95(a[0], b[0], (1, 1, 1))
