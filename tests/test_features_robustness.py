"""Feature robustness: seeded perturbations in mm, radnode's extractor, ICC(3,1), and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi
from typer.testing import CliRunner

from radnode.cli.main import app
from radnode.models.radiomics import extract_region, profile_from_settings
from radnode.models.radiomics.perturb import (
    PerturbationSpec,
    perturb_case,
    perturb_mask,
    perturbations,
)
from radnode.models.radiomics.robustness import (
    RobustnessCase,
    RobustnessInputError,
    assess_robustness,
    read_icc_csv,
)

SPACING_XYZ = (1.0, 1.0, 2.0)
#: Shape and first-order features on the original image, no resampling: fast and enough to test.
PROFILE = profile_from_settings(
    {"label": 1, "binWidth": 25, "minimumROIDimensions": 2},
    feature_classes={"shape": None, "firstorder": None},
    min_voxels=5,
)
RADII_MM = (5.0, 7.0, 9.0, 11.0, 13.0)


def _sphere_case(i: int, radius_mm: float) -> RobustnessCase:
    rng = np.random.default_rng(100 + i)
    shape = (20, 56, 56)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    r = np.sqrt(((x - 28) * SPACING_XYZ[0]) ** 2 + ((y - 27) * SPACING_XYZ[1]) ** 2 + ((z - 10) * SPACING_XYZ[2]) ** 2)
    mask = r <= radius_mm
    texture = ndi.gaussian_filter(rng.normal(0, 60, shape), 1.0)
    hu = np.where(r <= radius_mm + 0.5, 30.0 + 4 * i + texture, -800.0 + texture / 3).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(SPACING_XYZ)
    return RobustnessCase(f"s{i}", image, mask)


@pytest.fixture(scope="module")
def cases() -> list[RobustnessCase]:
    return [_sphere_case(i, r) for i, r in enumerate(RADII_MM)]


def test_perturbations_are_physical_and_seeded(cases: list[RobustnessCase]) -> None:
    case = cases[2]
    spacing_zyx = (2.0, 1.0, 1.0)
    voxel_ml = 2.0
    grown = perturb_mask(case.mask, spacing_zyx, 2.0, 0.0, 3.0, np.random.default_rng(0))
    radius = lambda m: (3 * m.sum() * voxel_ml / (4 * np.pi)) ** (1 / 3)
    assert radius(grown) - radius(case.mask) == pytest.approx(2.0, abs=0.4)
    shrunk = perturb_mask(case.mask, spacing_zyx, -2.0, 0.0, 3.0, np.random.default_rng(0))
    assert radius(case.mask) - radius(shrunk) == pytest.approx(2.0, abs=0.4)
    rough = perturb_mask(case.mask, spacing_zyx, 0.0, 1.0, 3.0, np.random.default_rng(1))
    changed = rough ^ case.mask
    assert 0 < changed.sum() and abs(int(rough.sum()) - int(case.mask.sum())) < 0.3 * case.mask.sum()
    # Rotation + shift move image and mask together: the shift shows in the centroid, in mm.
    spec = PerturbationSpec(count=1, rotation_deg=0.0, translation_mm=3.0, dilation_mm=0.0, randomise_mm=0.0)
    plan = perturbations(spec)
    assert plan[0].identity and not plan[1].identity
    _, moved = perturb_case(case.image, case.mask, plan[1], spec, subject=0)
    shift_zyx = np.subtract(ndi.center_of_mass(moved), ndi.center_of_mass(case.mask)) * spacing_zyx
    # The moved mask is re-thresholded on the grid: up to half a voxel (1 mm in z) of rounding.
    assert np.all(np.abs(shift_zyx[::-1] - np.array(plan[1].translation_mm)) <= 0.5 * np.array(SPACING_XYZ))
    turned_spec = PerturbationSpec(count=1, rotation_deg=10.0, translation_mm=0.0, dilation_mm=0.0, randomise_mm=0.0)
    turned_image, turned = perturb_case(case.image, case.mask, perturbations(turned_spec)[1], turned_spec, 0)
    assert turned.sum() == pytest.approx(case.mask.sum(), rel=0.05)
    assert turned_image.GetSize() == case.image.GetSize()
    # Same seed, same perturbations; another seed, others.
    assert perturbations(PerturbationSpec(seed=4)) == perturbations(PerturbationSpec(seed=4))
    assert perturbations(PerturbationSpec(seed=4)) != perturbations(PerturbationSpec(seed=5))


def test_icc_over_subjects_and_perturbations(cases: list[RobustnessCase]) -> None:
    spec = PerturbationSpec(count=3, seed=0)
    result = assess_robustness(cases, PROFILE, spec, region="tumour")
    assert result.values.shape == (len(cases), 4, len(result.names))
    assert all(n.startswith("tumour_original_") for n in result.names)
    # Version 0 is the unperturbed input through the same extractor.
    plain = extract_region(cases[0].image, cases[0].mask, PROFILE)
    index = {n: i for i, n in enumerate(result.names)}
    assert result.values[0, 0, index["tumour_original_shape_MeshVolume"]] == plain.features["original_shape_MeshVolume"]
    # The perturbed versions really differ from the original.
    assert not np.allclose(result.values[:, 0], result.values[:, 1])
    icc = dict(zip(result.names, result.icc.icc))
    print({k: round(float(v), 3) for k, v in icc.items() if "shape_MeshVolume" in k or "Minimum" in k})
    assert icc["tumour_original_shape_MeshVolume"] > 0.95  # radii 5-13 mm vs moves of about 1 mm
    assert "tumour_original_shape_MeshVolume" in result.robust(0.75)
    assert result.robust(0.75) == [n for n in result.robust(0.0) if icc[n] >= 0.75]
    again = assess_robustness(cases, PROFILE, spec, region="tumour")
    np.testing.assert_array_equal(again.values, result.values)
    with pytest.raises(RobustnessInputError, match="at least 3 subjects"):
        assess_robustness(cases[:2], PROFILE, spec)


def _write_cases(cases: list[RobustnessCase], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        sitk.WriteImage(case.image, str(folder / f"{case.case_id}_ct.nii.gz"))
        label = sitk.GetImageFromArray(case.mask.astype(np.uint8))
        label.CopyInformation(case.image)
        sitk.WriteImage(label, str(folder / f"{case.case_id}_mask.nrrd"))
        rows.append([case.case_id, f"{case.case_id}_ct.nii.gz", f"{case.case_id}_mask.nrrd"])
    with (folder / "cases.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "image", "mask"])
        writer.writerows(rows)
    return folder / "cases.csv"


def test_cli_robustness(cases: list[RobustnessCase], tmp_path: Path) -> None:
    table = _write_cases(cases, tmp_path / "in")
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "radnode: {name: test, version: 1, description: shape and first order, min_voxels: 5}\n"
        "setting: {label: 1, binWidth: 25}\nimageType: {Original: {}}\nfeatureClass: {shape: , firstorder: }\n"
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["features", "robustness", "--cases", str(table), "--profile", str(profile),
                                   "--perturbations", "2", "--out", str(out), "--threshold", "0.9"])
    assert res.exit_code == 0, res.output
    icc = read_icc_csv(out / "icc.csv")
    robust = (out / "robust_features.txt").read_text().split()
    assert "tumour_original_shape_MeshVolume" in robust
    assert all(icc[n] >= 0.9 for n in robust) and all(v < 0.9 for n, v in icc.items() if n not in robust and np.isfinite(v))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subjects"] == 5 and summary["perturbations_per_subject"] == 3
    with (out / "perturbed_features.csv").open() as fh:
        assert sum(1 for _ in fh) == 1 + 5 * 3
    # Too few subjects, and a cases table without its columns, are clear usage errors.
    two = CliRunner().invoke(app, ["features", "robustness", "--image", str(tmp_path / "in" / "s0_ct.nii.gz"),
                                   "--mask", str(tmp_path / "in" / "s0_mask.nrrd"), "--out", str(out)])
    assert two.exit_code == 2 and "at least 3 subjects" in two.output
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,ct\ns0,x.nii.gz\n")
    missing = CliRunner().invoke(app, ["features", "robustness", "--cases", str(bad), "--out", str(out)])
    assert missing.exit_code == 2 and "mask" in missing.output
