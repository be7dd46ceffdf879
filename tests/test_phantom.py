"""Tests of the synthetic chest CT phantom (radnode.phantom and ``radnode phantom``).

Small grids (96..128 pixels, 2.8 mm) keep the suite fast; one full-size series
(512 x 512 x 100) is generated once for the DICOM conformance check with dciodvfy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import typer
from typer.testing import CliRunner

from radnode.cli.phantom_cmd import register
from radnode.phantom import (
    PhantomParameters,
    PhantomResult,
    generate_phantom,
    parse_mutation,
    synthesize_volume,
)
from radnode.phantom.anatomy import Tissue

SMALL = {"slices": 40, "matrix": 128}
TYPES = ("solid", "ground_glass", "part_solid", "juxtapleural", "spiculated")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Errors and warnings dciodvfy reports for one file."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_series(ct_dir: Path) -> list[pydicom.Dataset]:
    """All slices, sorted along the slice normal (not by file name or Instance Number)."""
    datasets = [pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm"))]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> PhantomResult:
    """A small phantom with one tumour of every type."""
    out = tmp_path_factory.mktemp("small")
    return generate_phantom(
        out, seed=3, tumors=5, tumor_types=TYPES, tumor_diameter_mm=(16.0, 26.0), mutation=0, **SMALL
    )


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> PhantomResult:
    """The default 512 x 512 x 100 phantom."""
    return generate_phantom(tmp_path_factory.mktemp("full"), seed=11, tumors=2)


# -- DICOM conformance -------------------------------------------------------------------


def test_full_size_series_passes_dciodvfy(full_size: PhantomResult) -> None:
    files = sorted(full_size.ct_dir.glob("*.dcm"))
    assert len(files) == 100
    problems = {}
    for path in files:
        errors, _ = _dciodvfy(path)
        if errors:
            problems[path.name] = errors
    assert not problems, f"dciodvfy errors: {problems}"


def test_small_series_passes_dciodvfy(small: PhantomResult) -> None:
    for path in small.ct_files:
        errors, _ = _dciodvfy(path)
        assert not errors, f"{path.name}: {errors}"


def test_dicom_header_identifies_a_phantom_ct(full_size: PhantomResult) -> None:
    ds = pydicom.dcmread(full_size.ct_files[0])
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE == ds.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.ImplementationClassUID.startswith("2.25.")
    assert ds.Modality == "CT" and ds.Manufacturer == "radnode-phantom"
    assert str(ds.PatientName) == "PHANTOM^11"
    assert "not a patient" in ds.SeriesDescription and "not a patient" in ds.ImageComments
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    assert (ds.Rows, ds.Columns) == (512, 512)
    # The stored pixels and the rescale give back exactly the in-memory HU.
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    k = int(ds.InstanceNumber) - 1
    assert np.array_equal(hu, full_size.volume.hu[k])
    # The planted label is ground truth, not metadata a classifier could read.
    assert "mutation" not in str(ds).lower()


def test_all_slices_share_series_and_have_unique_instances(small: PhantomResult) -> None:
    series = _read_series(small.ct_dir)
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, len(series) + 1))


# -- determinism -------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(tumors=2, slices=16, matrix=96, mutation="random")
    first = generate_phantom(tmp_path / "a", seed=21, **kwargs)
    second = generate_phantom(tmp_path / "b", seed=21, **kwargs)
    other = generate_phantom(tmp_path / "c", seed=22, **kwargs)

    def pixel_hashes(result: PhantomResult) -> list[str]:
        return [hashlib.sha256(pydicom.dcmread(p).PixelData).hexdigest() for p in result.ct_files]

    def uids(result: PhantomResult) -> list[tuple[str, str, str]]:
        out = []
        for p in result.ct_files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        return out

    assert pixel_hashes(first) == pixel_hashes(second)
    assert uids(first) == uids(second)
    assert [_sha256(p) for p in first.ct_files] == [_sha256(p) for p in second.ct_files]
    assert first.labels_path.read_text() == second.labels_path.read_text()
    for name in ("tumor_path", "lungs_path"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(getattr(first, name))))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(getattr(second, name))))
        assert np.array_equal(a, b)

    other_hashes = pixel_hashes(other)
    assert all(a != b for a, b in zip(pixel_hashes(first), other_hashes, strict=True))
    other_uids = uids(other)
    for mine, theirs in zip(uids(first), other_uids, strict=True):
        assert not set(mine) & set(theirs)


# -- geometry ----------------------------------------------------------------------------


def test_truth_is_on_the_dicom_grid(small: PhantomResult) -> None:
    series = _read_series(small.ct_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in series])
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps, steps[0], atol=1e-4), "slice positions are not evenly spaced"
    iop = np.array([float(v) for v in series[0].ImageOrientationPatient])
    for ds in series:
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], iop)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    spacing_between = float(np.linalg.norm(steps[0]))
    assert np.allclose(steps[0] / spacing_between, normal, atol=1e-6)
    assert spacing_between == pytest.approx(float(series[0].SliceThickness), abs=1e-4)
    row_spacing, col_spacing = (float(v) for v in series[0].PixelSpacing)

    for path in (small.tumor_path, small.lungs_path):
        image = sitk.ReadImage(str(path))
        assert image.GetSize() == (int(series[0].Columns), int(series[0].Rows), len(series))
        assert np.allclose(image.GetOrigin(), positions[0], atol=1e-3)
        assert np.allclose(image.GetSpacing(), (col_spacing, row_spacing, spacing_between), atol=1e-5)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        assert np.allclose(direction[:, 0], row) and np.allclose(direction[:, 1], col)
        assert np.allclose(direction[:, 2], normal)

    # SimpleITK reads the series to the same grid and the same HU as the volume in memory.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(small.ct_dir)))
    ct = reader.Execute()
    assert np.allclose(ct.GetOrigin(), positions[0], atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(ct), small.volume.hu)


# -- anatomy and tumours -----------------------------------------------------------------


def test_anatomy_is_plausible(small: PhantomResult) -> None:
    hu = small.volume.hu.astype(np.float64)
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(small.lungs_path)))
    tumors = sitk.GetArrayFromImage(sitk.ReadImage(str(small.tumor_path)))
    parenchyma = (lungs > 0) & (tumors == 0)
    assert -900.0 <= hu[parenchyma].mean() <= -750.0
    # Right lung (label 1) lies on the patient's right: smaller LPS x than the left lung.
    columns = np.nonzero(lungs)[2]
    labels_at = lungs[np.nonzero(lungs)]
    assert set(np.unique(lungs)) == {0, 1, 2}
    assert columns[labels_at == 1].mean() < columns[labels_at == 2].mean()
    # The image, not just the tissue map, shows the tissues at their CT numbers.
    tissue = small.volume.tissue
    expected = {
        Tissue.FAT: (-130.0, -60.0),
        Tissue.MUSCLE: (20.0, 80.0),
        Tissue.HEART: (20.0, 70.0),
        Tissue.BONE_CORTEX: (400.0, 1200.0),
        Tissue.AIR: (-1030.0, -970.0),
    }
    for kind, (lo, hi) in expected.items():
        mask = tissue == kind
        assert mask.any(), f"no {kind.name} in the phantom"
        assert lo <= hu[mask].mean() <= hi, f"{kind.name}: mean {hu[mask].mean():.0f} HU"


def test_large_airways_are_outside_the_lung_mask(full_size: PhantomResult) -> None:
    vol = full_size.volume
    # Air inside the patient but outside the lungs: trachea, main bronchi (and gas
    # below the diaphragm). The trachea must be there, near the midline, in the top slices.
    inner_air = (vol.hu < -900) & vol.tissue.astype(bool) & (vol.lungs == 0)
    top = inner_air[-5:]
    assert top.sum() > 100, "no trachea in the upper slices"
    x = vol.geometry.x_mm()
    cols = np.nonzero(top)[2]
    assert abs(float(np.median(x[cols]))) < 30.0
    # ... and no lung voxel is dark enough to be airway lumen next to that column.
    assert not np.any(vol.lungs[-5:][top])


def test_tumours_match_labels_json_and_their_type(small: PhantomResult) -> None:
    labels = json.loads(small.labels_path.read_text())
    image = sitk.ReadImage(str(small.tumor_path))
    tumors = sitk.GetArrayFromImage(image)
    lungs = sitk.GetArrayFromImage(sitk.ReadImage(str(small.lungs_path)))
    hu = small.volume.hu.astype(np.float64)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    assert [t["index"] for t in labels["tumors"]] == [1, 2, 3, 4, 5]
    assert set(np.unique(tumors)) == {0, 1, 2, 3, 4, 5}
    assert np.all(lungs[tumors > 0] > 0), "tumour voxels outside the lung mask"
    assert [t["type"] for t in labels["tumors"]] == list(TYPES)
    ranges = {"solid": (-100.0, 100.0), "ground_glass": (-750.0, -300.0), "part_solid": (-650.0, -100.0)}
    for entry in labels["tumors"]:
        mask = tumors == entry["index"]
        count = int(mask.sum())
        assert entry["voxel_count"] == count
        assert entry["volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-6)
        zz, yy, xx = np.nonzero(mask)
        centroid = image.TransformContinuousIndexToPhysicalPoint((xx.mean(), yy.mean(), zz.mean()))
        assert np.allclose(entry["centre_mm"], centroid, atol=0.01)
        mean = hu[mask].mean()
        lo, hi = ranges[entry["density"]]
        assert lo <= mean <= hi, f"{entry['type']}: mean {mean:.0f} HU"
        assert entry["mean_hu"] == pytest.approx(mean, abs=1e-2)
        if entry["density"] == "part_solid":
            solid_fraction = float((hu[mask] > -200.0).mean())
            assert 0.02 <= solid_fraction <= 0.6, f"part-solid core fraction {solid_fraction:.2f}"
    # A juxtapleural tumour touches the chest wall: some of its voxels border non-lung tissue
    # that is muscle or bone, not mediastinum.
    jp = labels["tumors"][3]
    mask = tumors == jp["index"]
    grown = np.zeros_like(mask)
    grown[:, 1:, :] |= mask[:, :-1, :]
    grown[:, :-1, :] |= mask[:, 1:, :]
    grown[:, :, 1:] |= mask[:, :, :-1]
    grown[:, :, :-1] |= mask[:, :, 1:]
    touching = small.volume.tissue[grown & (lungs == 0)]
    wall = np.isin(touching, [Tissue.MUSCLE, Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.FAT])
    assert wall.sum() >= 3


def test_requested_number_of_tumours_is_present() -> None:
    for count in (1, 4):
        vol = synthesize_volume(5, slices=30, tumors=count, matrix=96)
        assert sorted(set(np.unique(vol.tumors)) - {0}) == list(range(1, count + 1))
        assert len(vol.tumor_info) == count


# -- the planted mutation ----------------------------------------------------------------


def _irregularity(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """Surface area (voxel faces) over that of a sphere of equal volume."""
    padded = np.pad(mask, 1).astype(np.int8)
    sz, sy, sx = spacing_zyx
    area = (
        np.abs(np.diff(padded, axis=0)).sum() * sy * sx
        + np.abs(np.diff(padded, axis=1)).sum() * sz * sx
        + np.abs(np.diff(padded, axis=2)).sum() * sz * sy
    )
    volume = mask.sum() * sz * sy * sx
    return float(area / (36.0 * np.pi * volume**2) ** (1.0 / 3.0))


def test_mutation_changes_texture_and_shape_as_documented() -> None:
    common = dict(slices=40, tumors=1, matrix=128, tumor_types=("solid",), tumor_diameter_mm=(20.0, 28.0))
    ratios, irregular = [], []
    for seed in range(4):
        wild = synthesize_volume(seed, mutation=0, **common)
        mutant = synthesize_volume(seed, mutation=1, mutation_effect=1.0, **common)
        assert (wild.mutation, mutant.mutation) == (0, 1)
        spacing = wild.geometry.spacing_xyz[::-1]
        w_mask, m_mask = wild.tumors == 1, mutant.tumors == 1
        ratios.append(mutant.hu[m_mask].std() / wild.hu[w_mask].std())
        irregular.append((_irregularity(w_mask, spacing), _irregularity(m_mask, spacing)))
    assert min(ratios) > 1.4, f"texture std ratios mutant / wild type: {ratios}"
    assert all(m > w * 1.1 for w, m in irregular), f"irregularity (wild, mutant): {irregular}"


def test_mutation_effect_zero_leaves_the_image_unchanged() -> None:
    common = dict(slices=30, tumors=2, matrix=96)
    wild = synthesize_volume(8, mutation=0, **common)
    mutant = synthesize_volume(8, mutation=1, mutation_effect=0.0, **common)
    half = synthesize_volume(8, mutation=1, mutation_effect=0.5, **common)
    assert (wild.mutation, mutant.mutation) == (0, 1)
    assert np.array_equal(wild.hu, mutant.hu) and np.array_equal(wild.tumors, mutant.tumors)
    assert not np.array_equal(wild.hu, half.hu)


def test_mutation_probability_draws_a_seeded_label() -> None:
    labels = [PhantomParameters(seed=s, mutation=0.5).draw_mutation() for s in range(40)]
    assert 8 <= sum(labels) <= 32, labels
    assert labels == [PhantomParameters(seed=s, mutation="random").draw_mutation() for s in range(40)]
    assert {PhantomParameters(seed=s, mutation=1).draw_mutation() for s in range(10)} == {1}
    assert {PhantomParameters(seed=s, mutation=0).draw_mutation() for s in range(10)} == {0}
    for seed in (labels.index(0), labels.index(1)):
        assert synthesize_volume(seed, slices=8, tumors=0, matrix=64, mutation=0.5).mutation == labels[seed]


def test_options_are_validated_with_their_names() -> None:
    assert parse_mutation("random") == 0.5 and parse_mutation("1") == 1.0 and parse_mutation(0) == 0.0
    with pytest.raises(ValueError, match="mutation"):
        parse_mutation("sometimes")
    with pytest.raises(ValueError, match="mutation"):
        parse_mutation(1.5)
    with pytest.raises(ValueError, match="seed"):
        PhantomParameters(seed=-1)
    with pytest.raises(ValueError, match="tumors"):
        PhantomParameters(seed=1, tumors=99)
    with pytest.raises(ValueError, match="tumor_types"):
        PhantomParameters(seed=1, tumors=2, tumor_types=("solid", "blob"))


# -- command line ------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test application holding only the phantom command."""

    register(app)
    return app


def test_cli_writes_series_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["phantom", "--out", str(out), "--seed", "5", "--slices", "12", "--tumors", "2", "--matrix", "96",
            "--mutation", "1", "--mutation-effect", "0.5", "--patient-id", "SYN-5"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    files = sorted((out / "ct").glob("*.dcm"))
    assert len(files) == 12
    for name in ("tumor.nii.gz", "lungs.nii.gz", "labels.json"):
        assert (out / "truth" / name).is_file()
    labels = json.loads((out / "truth" / "labels.json").read_text())
    assert labels["mutation"]["label"] == 1 and labels["mutation"]["applied_effect"] == 0.5
    assert len(labels["tumors"]) == 2
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.PatientID == "SYN-5" and str(ds.PatientName) == "PHANTOM^5"
    assert labels["uids"]["series_instance_uid"] == ds.SeriesInstanceUID

    again = CliRunner().invoke(_cli(), args)
    assert again.exit_code == 2 and "overwrite" in again.output
    bad = CliRunner().invoke(_cli(), ["phantom", "--out", str(tmp_path / "x"), "--seed", "1", "--mutation", "often"])
    assert bad.exit_code == 2 and "mutation" in bad.output
