"""The written objects checked by real tools: dciodvfy, dsrdump, plastimatch, Orthanc.

Data: the IBSI 1 CT phantom (tumour GTV-1) and NSCLC-Radiomics LUNG1-002 (lungs L/R and
GTV-1 from its planning RTSTRUCT), cropped to the slices around the tumour to keep the
run short.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pynetdicom import AE

from radnode.dicom_io import codes
from radnode.dicom_io.regions import (
    AlgorithmInfo,
    MeasurementSet,
    Prediction,
    Region,
    RegionMeasurements,
)
from radnode.dicom_io.rtstruct_read import rasterise_roi, read_rtstruct
from radnode.dicom_io.rtstruct_writer import build_rtstruct
from radnode.dicom_io.seg_writer import build_seg, seg_to_masks
from radnode.dicom_io.series import load_series
from radnode.dicom_io.sr_writer import build_sr
from radnode.testing import OrthancServer

ALGORITHM = AlgorithmInfo(name="radnode-seg", version="1.2.3", model_versions={"unet": "0.4"},
                          demo=True)
#: LUNG1-002 slices kept: GTV-1 lies on slices 28-53 (README), lungs on 9-97.
LUNG1_CROP = slice(24, 58)
#: dciodvfy warnings caused by the source data, not by radnode (see the test's docstring).
SOURCE_WARNINGS = (
    re.compile(r"needed to build DICOMDIR - Study (Date|Time|ID)"),
    re.compile(r"Retired Person Name form"),
    re.compile(r"Unrecognized defined term <XNAT> .*Coding Scheme Designator"),
)
#: Ours, on purpose: the private coding scheme (PS3.16 §8.2), declared in the object.
PRIVATE_SCHEME_WARNING = re.compile(r"Unrecognized defined term <99RADNODE>")
#: Ours, on purpose: IHE AIR's Device UID of each algorithm in Contributing Equipment,
#: which dciodvfy's dictionary does not list in that sequence (see docs/conformance.md).
AIR_DEVICE_UID_WARNINGS = (
    re.compile(r"\(0x0018,0x1002\) UI Device UID"),
    re.compile(r"this is a Standard Extended SOP Class"),
)


@dataclass
class Written:
    path: Path
    dataset: pydicom.Dataset


def _save(ds: pydicom.Dataset, path: Path) -> Written:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Written(path, ds)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def ibsi(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = shared_data / "ibsi_ct_phantom"
    out = tmp_path_factory.mktemp("ibsi")
    series = load_series(root / "dicom" / "image")
    gtv = rasterise_roi(root / "dicom" / "mask" / "DCM_RS_00060.dcm", series, "GTV-1")
    lung = series.array < -500
    regions = [Region.of_kind("lung", lung), Region.of_kind("tumour", gtv)]
    seg = build_seg(series, regions, ALGORITHM)
    rt = build_rtstruct(series, regions, ALGORITHM)
    measurements = MeasurementSet(
        regions=[
            RegionMeasurements("Tumour", volume_ml=358.7, mean_hu=-46.9, min_hu=-1000,
                               max_hu=723, longest_diameter_mm=120.0, sphericity=0.6,
                               features={"original_glcm_Contrast": 3.2,
                                         "wavelet-HHH_firstorder_Skewness": 0.1}),
            RegionMeasurements("Lungs", volume_ml=1200.0),
        ],
        predictions=[Prediction("EGFR", 0.73, "egfr-rf", "0.9", "Lung1", demo=True)],
    )
    sr = build_sr(series, seg, measurements, ALGORITHM)
    empty = [Region.of_kind("lung", lung), Region.of_kind("tumour", np.zeros_like(gtv))]
    seg_empty = build_seg(series, empty, ALGORITHM)
    return {
        "series": series,
        "gtv": gtv,
        "root": root,
        "SEG": _save(seg, out / "seg.dcm"),
        "RTSTRUCT": _save(rt, out / "rtstruct.dcm"),
        "SR": _save(sr, out / "sr.dcm"),
        "SEG no tumour": _save(seg_empty, out / "seg_empty.dcm"),
        "RTSTRUCT no tumour": _save(build_rtstruct(series, empty, ALGORITHM), out / "rt_empty.dcm"),
        "SR no tumour": _save(
            build_sr(series, seg_empty, MeasurementSet(), ALGORITHM), out / "sr_empty.dcm"
        ),
        "RTSTRUCT smoothed": _save(
            build_rtstruct(series, regions, ALGORITHM, smoothing=True), out / "rt_smooth.dcm"
        ),
    }


@pytest.fixture(scope="module")
def lung1(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    case = shared_data / "nsclc_radiomics" / "LUNG1-002"
    out = tmp_path_factory.mktemp("lung1")
    full = load_series(case / "CT")
    planning = read_rtstruct(case / "RTSTRUCT" / "1.dcm")
    masks = {
        kind: rasterise_roi(planning, full, name)[LUNG1_CROP]
        for kind, name in (("lung_left", "Lung L"), ("lung_right", "Lung R"), ("tumour", "GTV-1"))
    }
    crop = load_series(list(full.files[LUNG1_CROP]))
    datasets = list(crop.datasets)
    assert [d.SOPInstanceUID for d in datasets] == [
        d.SOPInstanceUID for d in full.datasets[LUNG1_CROP]
    ]
    ct_dir = out / "ct"
    ct_dir.mkdir()
    for path in full.files[LUNG1_CROP]:
        (ct_dir / path.name).symlink_to(path)
    regions = [Region.of_kind(kind, mask) for kind, mask in masks.items()]
    return {
        "series": crop,
        "datasets": datasets,
        "ct_dir": ct_dir,
        "regions": regions,
        "SEG": _save(build_seg(datasets, regions, ALGORITHM), out / "seg.dcm"),
        "RTSTRUCT": _save(build_rtstruct(datasets, regions, ALGORITHM), out / "rtstruct.dcm"),
        "RTSTRUCT smoothed": _save(
            build_rtstruct(datasets, regions, ALGORITHM, smoothing=True), out / "rt_smooth.dcm"
        ),
    }


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


@pytest.mark.parametrize(
    "name",
    ["SEG", "RTSTRUCT", "SR", "SEG no tumour", "RTSTRUCT no tumour", "SR no tumour",
     "RTSTRUCT smoothed"],
)
def test_dciodvfy_finds_no_errors_ibsi(ibsi: dict, name: str) -> None:
    """0 errors; every warning is either caused by the phantom's own headers (no study
    date/time/ID, a one-component patient name) or the declared private coding scheme."""
    errors, warnings = _dciodvfy(ibsi[name].path)
    print(f"dciodvfy {name}: {len(errors)} errors, warnings: {sorted(set(warnings))}")
    assert errors == []
    ours = [
        w for w in warnings
        if not any(p.search(w) for p in (*SOURCE_WARNINGS, *AIR_DEVICE_UID_WARNINGS))
        and not PRIVATE_SCHEME_WARNING.search(w)
    ]
    assert ours == []


@pytest.mark.parametrize("name", ["SEG", "RTSTRUCT", "RTSTRUCT smoothed"])
def test_dciodvfy_finds_no_errors_lung1(lung1: dict, name: str) -> None:
    errors, warnings = _dciodvfy(lung1[name].path)
    print(f"dciodvfy LUNG1-002 {name}: {len(errors)} errors, warnings: {sorted(set(warnings))}")
    assert errors == []
    assert [w for w in warnings if not any(p.search(w) for p in SOURCE_WARNINGS)] == []


@pytest.mark.parametrize("name", ["SR", "SR no tumour"])
def test_dsrdump_renders_the_report(ibsi: dict, name: str) -> None:
    result = subprocess.run(
        ["dsrdump", str(ibsi[name].path)],
        capture_output=True, timeout=60, check=False,
    )
    text = result.stdout.decode("utf-8", errors="replace")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert "Comprehensive 3D SR Document" in text
    assert '"Imaging Measurement Report"' in text
    assert '"Qualitative Evaluations"' in text
    if name == "SR":
        assert '"Probability of EGFR positive")="0.73"' in text
        assert codes.DEMO_TEXT in text
        assert "(SG image,,2)" in text  # the tumour group references SEG segment 2
    else:
        assert codes.NO_TUMOUR_TEXT in text
        assert '(2667000,SCT,"Absent")' in text


def _plastimatch(rtstruct: Path, ct_dir: Path, out: Path) -> dict[str, np.ndarray]:
    subprocess.run(
        ["plastimatch", "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_dir),
         "--output-prefix", str(out), "--prefix-format", "nrrd"],
        capture_output=True, timeout=120, check=True,
    )
    return {
        p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool)
        for p in out.glob("*.nrrd")
    }


def test_plastimatch_rasterises_ibsi_tumour(ibsi: dict, tmp_path: Path) -> None:
    for name in ("RTSTRUCT", "RTSTRUCT smoothed"):
        masks = _plastimatch(ibsi[name].path, ibsi["root"] / "dicom" / "image", tmp_path / name)
        dice = _dice(masks["Tumour"], ibsi["gtv"])
        print(f"plastimatch IBSI {name} Tumour: Dice {dice:.6f}")
        assert dice >= 0.99


def test_plastimatch_rasterises_lung1_lungs_and_tumour(lung1: dict, tmp_path: Path) -> None:
    for name in ("RTSTRUCT", "RTSTRUCT smoothed"):
        masks = _plastimatch(lung1[name].path, lung1["ct_dir"], tmp_path / name)
        for region in lung1["regions"]:
            assert masks[region.name].shape == region.mask.shape
            dice = _dice(masks[region.name], region.mask)
            print(f"plastimatch LUNG1-002 {name} {region.name}: Dice {dice:.6f}")
            assert dice >= 0.95


def test_own_rasteriser_reads_lung1_lungs_and_tumour(lung1: dict) -> None:
    for name in ("RTSTRUCT", "RTSTRUCT smoothed"):
        for region in lung1["regions"]:
            back = rasterise_roi(lung1[name].path, lung1["series"], region.name)
            dice = _dice(back, region.mask)
            print(f"rtstruct_read LUNG1-002 {name} {region.name}: Dice {dice:.6f}")
            assert dice >= 0.95


def test_lung1_seg_reads_back_exactly(lung1: dict) -> None:
    back = seg_to_masks(lung1["SEG"].path, lung1["datasets"])
    for region in lung1["regions"]:
        assert np.array_equal(back[region.name], region.mask), region.name


def test_orthanc_indexes_all_three_in_the_ct_study(ibsi: dict) -> None:
    series = ibsi["series"]
    objects = [ibsi[name].dataset for name in ("SEG", "RTSTRUCT", "SR")]
    ae = AE(ae_title="RADNODE")
    ae.add_requested_context(series.datasets[0].SOPClassUID, pydicom.uid.ImplicitVRLittleEndian)
    for ds in objects:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    orthanc = OrthancServer()
    with orthanc:
        workdir = orthanc.workdir
        assert orthanc.system()["DicomPort"] == orthanc.dicom_port
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        assert assoc.is_established
        try:
            for path in series.files:
                assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
            for ds in objects:
                assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        study_uid = str(series.datasets[0].StudyInstanceUID)
        in_study = orthanc.study_series(study_uid)
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in in_study)
        assert modalities == ["CT", "RTSTRUCT", "SEG", "SR"]
        assert orthanc.statistics()["CountStudies"] == 1
        for ds in objects:
            tags = orthanc.instance_tags(str(ds.SOPInstanceUID))
            assert tags is not None and tags["StudyInstanceUID"] == study_uid
        assert len(orthanc.series_instances(str(series.datasets[0].SeriesInstanceUID))) == 60
    # the harness stopped Orthanc and removed its temporary storage
    assert not orthanc.running and not workdir.exists()
