"""Fast exact shape: identical to pyradiomics' own brute-force shape pass.

The reference is pyradiomics' C routine ``cShape.calculate_coefficients`` (all vertex
pairs) and its ``RadiomicsShape`` class, run on the same padded masks. Masks stay below
~50k mesh vertices so the quadratic reference stays affordable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import cShape
from radiomics.shape import RadiomicsShape

from radnode.models.radiomics.fast_shape import (
    FastRadiomicsShape,
    mesh_area_volume,
    mesh_diameters,
    mesh_vertex_indices,
    shape_coefficients,
)

#: Area and volume are the same sums in another order: only rounding may differ.
SUM_ORDER_RTOL = 1e-12
MAX_BRUTE_FORCE_VERTICES = 50_000


def _crop(mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    return mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]


def _assert_identical_to_pyradiomics(mask: np.ndarray, spacing: np.ndarray) -> None:
    padded = np.pad(mask.astype(bool), 1)
    assert len(mesh_vertex_indices(padded, padded=True)) <= MAX_BRUTE_FORCE_VERTICES
    ref_area, ref_volume, ref_diameters = cShape.calculate_coefficients(padded, spacing)
    area, volume, diameters = shape_coefficients(padded, spacing)
    # Diameters: the same maximum over the same doubles, so bit-identical.
    assert diameters == tuple(ref_diameters)
    assert area == pytest.approx(ref_area, rel=SUM_ORDER_RTOL, abs=0)
    assert volume == pytest.approx(ref_volume, rel=SUM_ORDER_RTOL, abs=0)


@pytest.fixture(scope="module")
def tumours(shared_data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for case in ("lung1", "lung2"):
        label = sitk.ReadImage(str(shared_data / "pyradiomics" / f"{case}_label.nrrd"))
        mask = sitk.GetArrayFromImage(label) == 1
        out[case] = (_crop(mask), np.array(label.GetSpacing()[::-1]))
    return out


@pytest.mark.parametrize("case", ["lung1", "lung2"])
def test_real_tumours_match_pyradiomics(tumours: dict, case: str) -> None:
    mask, spacing = tumours[case]
    _assert_identical_to_pyradiomics(mask, spacing)


def test_shape_class_identical_on_lung2(shared_data: Path) -> None:
    """Every shape feature of the fast class equals pyradiomics' class on the real tumour."""
    image = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung2_image.nrrd"))
    label = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung2_label.nrrd"))
    reference = RadiomicsShape(image, label, label=1)
    reference.enableAllFeatures()
    fast = FastRadiomicsShape(image, label, label=1)
    fast.enableAllFeatures()
    ref_values, fast_values = reference.execute(), fast.execute()
    assert ref_values.keys() == fast_values.keys() and len(ref_values) >= 14
    for name, ref in ref_values.items():
        if "Diameter" in name or "Axis" in name or name in ("Elongation", "Flatness", "VoxelVolume"):
            assert fast_values[name] == ref, name
        else:  # from mesh area/volume: summation order only
            assert fast_values[name] == pytest.approx(ref, rel=1e-11, abs=0), name


def _spiculated_blob(seed: int) -> np.ndarray:
    """A lobulated ball with spikes and a rough surface (many near-extreme vertices)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:50, :96, :96].astype(float)
    dz, dy, dx = (z - 25) * 1.6, y - 48, x - 48
    r = np.sqrt(dz**2 + dy**2 + dx**2)
    azimuth = np.arctan2(dy, dx)
    elevation = np.arctan2(dz, np.hypot(dy, dx))
    radius = 22 + 6 * np.sin(5 * azimuth) * np.cos(3 * elevation) + rng.normal(0, 0.8, r.shape)
    blob = r < radius
    for _ in range(10):  # spikes: thin rays out of the body
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for t in np.linspace(18, 40, 90):
            p = np.round(np.array([25, 48, 48]) + t * direction * np.array([1 / 1.6, 1, 1])).astype(int)
            if all(0 <= p[i] < blob.shape[i] for i in range(3)):
                blob[tuple(p)] = True
    return blob


@pytest.mark.parametrize("seed,spacing", [(1, (2.5, 0.7, 0.7)), (2, (1.0, 1.0, 1.0)), (3, (5.0, 0.6269531, 0.6269531))])
def test_spiculated_blob_matches_pyradiomics(seed: int, spacing: tuple[float, float, float]) -> None:
    _assert_identical_to_pyradiomics(_spiculated_blob(seed), np.array(spacing))


def test_lung_mask_crop_matches_pyradiomics() -> None:
    """A crop of a phantom lung: a big concave surface with vessels (holes) and a cut face."""
    from radnode.phantom import synthesize_volume

    volume = synthesize_volume(seed=11, slices=40, tumors=0, matrix=256)
    lung = volume.lungs == 1
    _, y, x = np.nonzero(lung)
    crop = lung[:, y.min() : y.min() + 110, x.min() : x.min() + 64]
    assert crop.sum() > 50_000
    spacing = np.array(volume.geometry.spacing_xyz[::-1])
    _assert_identical_to_pyradiomics(crop, spacing)


@pytest.mark.parametrize(
    "name",
    ["single voxel", "one slice", "one row", "flat plate", "two far blobs"],
)
def test_degenerate_masks_match_pyradiomics(name: str) -> None:
    """Thin, flat and disconnected masks (degenerate hulls per plane) still match."""
    m = np.zeros((7, 30, 30), dtype=bool)
    if name == "single voxel":
        m[3, 10, 10] = True
    elif name == "one slice":
        m[3, 5:25, 8:20] = True
    elif name == "one row":
        m[3, 10, 2:28] = True
    elif name == "flat plate":
        m[2:5, 12, 3:27] = True
    else:
        m[1:3, 1:4, 1:4] = True
        m[5:7, 25:29, 24:29] = True
    _assert_identical_to_pyradiomics(m, np.array([3.0, 0.8, 0.75]))


def test_empty_mask_gives_zeros_like_pyradiomics() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert mesh_diameters(empty, (1.0, 1.0, 1.0)).as_tuple() == (0.0, 0.0, 0.0, 0.0)
    assert mesh_area_volume(empty, (1.0, 1.0, 1.0)) == (0.0, 0.0)


def test_bad_spacing_is_rejected_with_its_value() -> None:
    with pytest.raises(ValueError, match="spacing"):
        mesh_diameters(np.ones((2, 2, 2), bool), (1.0, 0.0, 1.0))
