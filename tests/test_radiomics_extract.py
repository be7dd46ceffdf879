"""Per-region radiomics: profiles, parallel == serial, bad regions, non-finite values, LBP-3D."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.models.radiomics import (
    ENGINE_VERSION,
    extract_region,
    extract_regions,
    load_profile,
    profile_from_settings,
    profile_names,
)
from radnode.models.radiomics.lbp3d import icosphere, lbp3d_arrays
from radnode.models.regions import build_regions

FULL_IMAGE_TYPES = {"original", "log", "wavelet", "square", "squareroot", "logarithm", "exponential", "gradient", "lbp"}


@pytest.fixture(scope="module")
def lung2_crop(shared_data: Path) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """A crop of the real lung2 CT around its tumour, with tumour, ring and a crude lung region."""
    image = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung2_image.nrrd"))
    label = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung2_label.nrrd"))
    tumour = sitk.GetArrayFromImage(label) == 1
    idx = np.argwhere(tumour)
    lo = np.maximum(idx.min(0) - (2, 12, 12), 0)
    hi = idx.max(0) + (3, 13, 13)
    crop = sitk.RegionOfInterest(image, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])
    hu = sitk.GetArrayFromImage(crop)
    t = tumour[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    lung = (hu < -400) | t
    regions = build_regions(t, lung, crop.GetSpacing()[::-1])
    return crop, regions.masks()


def _small_profile(name: str = "small"):
    return profile_from_settings(
        {"binWidth": 25, "resampledPixelSpacing": [2.0, 2.0, 2.0], "interpolator": "sitkLinear",
         "resegmentRange": [-1000, 400], "label": 1, "additionalInfo": False},
        name=name,
        image_types={"Original": {}, "LoG": {"sigma": [2.0]}, "LBP3D": {"binWidth": 1.0}},
    )


def test_parallel_equals_serial_bit_for_bit(lung2_crop) -> None:
    image, masks = lung2_crop
    profiles = {k: _small_profile() for k in masks}
    parallel = extract_regions(image, masks, profiles, parallel=True, workers=2)
    serial = extract_regions(image, masks, profiles, parallel=False)
    assert parallel.mode == "parallel" and parallel.workers == 2 and parallel.start_method in ("spawn", "forkserver")
    assert serial.mode == "serial"
    for name in masks:
        a, b = parallel.regions[name], serial.regions[name]
        assert a.status == b.status == "done", (a.notes, b.notes)
        assert list(a.features) == list(b.features) and len(a.features) > 300
        assert any(k.startswith("lbp-3D-m2_") for k in a.features)
        for key, value in a.features.items():
            # Bit-identical: same bytes, NaN included.
            assert np.float64(value).tobytes() == np.float64(b.features[key]).tobytes(), (name, key)


def test_region_split_by_image_type_equals_unsplit(lung2_crop) -> None:
    """One region on two workers is split into image-type parts; merged == unsplit, order included."""
    image, masks = lung2_crop
    profile = _small_profile()
    split = extract_regions(image, {"lung": masks["lung"]}, {"lung": profile}, workers=2)
    whole = extract_region(image, masks["lung"], profile, region="lung")
    result = split.regions["lung"]
    assert result.parts == 2 and result.status == "done"
    assert list(result.features) == list(whole.features)
    assert all(np.float64(v).tobytes() == np.float64(whole.features[k]).tobytes() for k, v in result.features.items())
    assert sum(k.startswith("original_shape_") for k in result.features) == 14


def test_plan_parts_splits_only_the_dominant_region() -> None:
    from radnode.models.radiomics.schedule import plan_parts, unit_costs

    full = load_profile("tumour-v1").params
    lung = load_profile("lung-v1").params
    costs = {"tumour": unit_costs(full, 15_000), "ring": unit_costs(full, 15_000), "lung": unit_costs(lung, 480_000)}
    plan = plan_parts(costs, workers=2)
    assert len(plan["tumour"]) == len(plan["ring"]) == 1
    assert len(plan["lung"]) >= 2
    assert sorted(t for part in plan["lung"] for t in part) == sorted(lung["imageType"])
    assert plan_parts(costs, workers=1)["lung"] == [list(lung["imageType"])]


def test_spawn_start_method_also_works(lung2_crop) -> None:
    image, masks = lung2_crop
    profile = profile_from_settings({"binWidth": 25, "label": 1, "additionalInfo": False},
                                    feature_classes={"firstorder": None, "shape": None})
    sub = {"tumour": masks["tumour"], "ring": masks["ring"]}
    result = extract_regions(image, sub, {k: profile for k in sub}, start_method="spawn")
    reference = extract_regions(image, sub, {k: profile for k in sub}, parallel=False)
    assert result.start_method == "spawn"
    for name in sub:
        assert result.regions[name].features == reference.regions[name].features


def test_shipped_profiles_are_versioned_and_valid() -> None:
    names = profile_names()
    assert {"tumour-v1", "ring-v1", "lung-v1", "published-full-v1"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.label == name
        assert profile.description and profile.version >= 1
        assert set(profile.params) == {"setting", "imageType", "featureClass"}
    lung = load_profile("lung-v1")
    assert lung.params["setting"]["resampledPixelSpacing"] == [2.0, 2.0, 2.0]
    assert "LBP3D" not in lung.params["imageType"]


def test_full_profile_feature_count_and_image_types(shared_data: Path) -> None:
    image = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung1_image.nrrd"))
    label = sitk.ReadImage(str(shared_data / "pyradiomics" / "lung1_label.nrrd"))
    result = extract_region(image, label, "published-full-v1", region="tumour")
    assert result.status == "done", result.notes
    assert result.profile == "published-full-v1"
    assert 1300 <= len(result.features) <= 2100
    types = Counter(k.split("_")[0].split("-")[0] for k in result.features)
    assert set(types) == FULL_IMAGE_TYPES
    assert types["log"] == 5 * types["square"] and types["wavelet"] == 8 * types["square"]
    assert result.features["original_shape_VoxelVolume"] > 0
    assert not result.nonfinite


def test_regions_object_and_default_profiles_are_accepted(lung2_crop) -> None:
    image, masks = lung2_crop
    empty = {k: np.zeros_like(v) for k, v in masks.items()}

    class _Regions:  # duck type of radnode.models.regions.Regions
        def masks(self) -> dict[str, np.ndarray]:
            return empty

    result = extract_regions(image, _Regions(), parallel=False)
    assert result.profiles == {"tumour": "tumour-v1", "ring": "ring-v1", "lung": "lung-v1"}
    assert all(r.status == "skipped" for r in result.regions.values())
    assert result.engine["name"] == "pyradiomics" and result.engine["version"] == ENGINE_VERSION


def test_empty_tiny_and_rejected_regions_are_skipped_with_notes(lung2_crop) -> None:
    image, masks = lung2_crop
    tiny = np.zeros_like(masks["tumour"])
    idx = np.argwhere(masks["tumour"])[0]
    tiny[tuple(idx)] = True
    tiny[idx[0], idx[1], idx[2] + 1] = True
    single = np.zeros_like(tiny)
    single[tuple(idx)] = True
    regions = {"tumour": masks["tumour"], "empty": np.zeros_like(tiny), "tiny": tiny, "single": single}
    base = profile_from_settings({"binWidth": 25, "label": 1, "additionalInfo": False},
                                 feature_classes={"firstorder": None})
    strict = profile_from_settings({"binWidth": 25, "label": 1, "additionalInfo": False},
                                   feature_classes={"firstorder": None}, min_voxels=10)
    profiles = {"tumour": base, "empty": base, "tiny": strict, "single": base}
    result = extract_regions(image, regions, profiles, parallel=False)
    assert result.regions["tumour"].status == "done"
    assert result.regions["empty"].status == "skipped" and "0 voxel" in result.regions["empty"].notes[0]
    assert result.regions["tiny"].status == "skipped" and "at least 10" in result.regions["tiny"].notes[0]
    single_result = result.regions["single"]
    assert single_result.status == "skipped" and "pyradiomics rejected" in single_result.notes[0]
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["regions"]["empty"]["features"] == {}


def test_nonfinite_values_are_noted_and_written_as_null() -> None:
    hu = np.zeros((10, 20, 20))
    region = np.zeros(hu.shape, dtype=bool)
    region[3:7, 5:15, 5:15] = True
    hu[region] = 1e200  # squares overflow: energy, variance, RMS become inf
    hu[3:5, 5:15, 5:15] = 2e200
    profile = profile_from_settings({"binCount": 4, "label": 1, "additionalInfo": False},
                                    feature_classes={"firstorder": None})
    with np.errstate(over="ignore"):
        result = extract_region(hu, region, profile, region="huge", spacing=(2.0, 1.0, 1.0))
    assert result.status == "done"
    assert "original_firstorder_Energy" in result.nonfinite
    assert all(not math.isfinite(result.features[k]) for k in result.nonfinite)
    assert any("reported as null" in n for n in result.notes)
    written = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert written["features"]["original_firstorder_Energy"] is None
    assert written["features"]["original_firstorder_Mean"] == pytest.approx(1.5e200)


def test_bad_inputs_raise_with_names() -> None:
    with pytest.raises(ValueError, match="unknown radiomics profile 'nope-v9'"):
        load_profile("nope-v9")
    with pytest.raises(ValueError, match="spacing"):
        extract_regions(np.zeros((4, 4, 4)), {"tumour": np.ones((4, 4, 4), bool)})
    with pytest.raises(ValueError, match="region 'ring' mask shape"):
        extract_regions(np.zeros((4, 4, 4)), {"ring": np.ones((4, 4, 5), bool)}, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="no radiomics profile for region 'liver'"):
        extract_regions(np.zeros((4, 4, 4)), {"liver": np.ones((4, 4, 4), bool)}, spacing=(1, 1, 1))


def test_profile_file_without_radnode_section_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bare.yaml"
    path.write_text("setting:\n  binWidth: 25\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a top-level 'radnode' mapping"):
        load_profile(path)


def test_lbp3d_matches_its_definition_at_a_voxel() -> None:
    """LBP-3D images equal pyradiomics' formula evaluated directly at one voxel.

    m1 = sqrt(Nv) * count(neighbour >= centre) / (4 pi); m2 = L2 norm over the sphere of
    sum_m c_1m Y_1m(v) with c_1m = sum_u b(u) Y_1m(u) (pyradiomics' arithmetic: no complex
    conjugate, its angle order); k = biased Fisher kurtosis of the neighbour samples.
    (The port was also compared once with pyradiomics' own getLBP3DImage run under
    SciPy/trimesh shims: max difference 7e-15.)
    """
    from scipy.ndimage import map_coordinates
    from scipy.special import sph_harm_y
    from scipy.stats import kurtosis

    from radnode.models.radiomics.lbp3d import _legacy_sph_harm

    rng = np.random.default_rng(5)
    image = rng.normal(0, 50, (14, 15, 16)).cumsum(axis=2)
    mask = np.zeros(image.shape, dtype=bool)
    mask[3:11, 3:12, 3:13] = True
    levels, kurt = lbp3d_arrays(image, mask, levels=2)
    vertices = icosphere(1, 1.0)
    assert len(vertices) == 42
    np.testing.assert_allclose(np.linalg.norm(vertices, axis=1), 1.0, rtol=1e-15)

    centre = (6, 7, 8)
    samples = map_coordinates(image, (np.array(centre)[None, :] + vertices).T, order=3)
    binary = (samples >= image[centre]).astype(float)
    assert levels[0][centre] == pytest.approx(math.sqrt(42) * binary.sum() / (4 * math.pi), rel=1e-12)
    assert kurt[centre] == pytest.approx(kurtosis(samples), rel=1e-10)

    theta = np.arccos(vertices[:, 2])
    phi = np.arctan2(vertices[:, 1], vertices[:, 0])
    recon = np.zeros(42, dtype=complex)
    for m in (-1, 0, 1):
        y = _legacy_sph_harm(m, 1, theta, phi)
        recon += np.sum(binary * y) * y
    assert levels[1][centre] == pytest.approx(np.real(np.sqrt(np.sum(recon**2))), rel=1e-10)

    # The former SciPy harmonic equals today's sph_harm_y where the polar angle is in [0, pi].
    azimuth, polar = rng.uniform(-np.pi, np.pi, 40), rng.uniform(0, np.pi, 40)
    for n in range(3):
        for m in range(-n, n + 1):
            np.testing.assert_allclose(_legacy_sph_harm(m, n, azimuth, polar), sph_harm_y(n, m, polar, azimuth), atol=1e-14)
