"""The bundled DEMO RA-Seg model: what it claims, and that the default chain runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import typer
from typer.testing import CliRunner

from radnode.cli import train_cmd
from radnode.config import settings_from_mapping
from radnode.dicom_io.rtstruct_read import rasterise_roi
from radnode.dicom_io.seg_writer import seg_to_masks
from radnode.dicom_io.series import load_series
from radnode.models.bundle import load_bundle, read_bundle_meta
from radnode.models.metrics import dice
from radnode.models.tumour import DEMO_BUNDLE_PATH, resolve_bundle
from radnode.pipeline.chain import run_chain

#: The issue's limit on a bundle shipped inside the package.
MAX_BUNDLE_MB = 50
#: Real cases of the shared data folder the demo model is evaluated on (leave-one-out).
REAL_CASES = {"LUNG1-002", "LUNG1-003", "pyradiomics-lung1", "pyradiomics-lung2", "LIDC-IDRI-0001", "LIDC-IDRI-0003"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_the_default_setting_selects_the_shipped_demo_bundle() -> None:
    settings = settings_from_mapping({})
    assert resolve_bundle(settings.models.segmentation_bundle) == DEMO_BUNDLE_PATH
    assert resolve_bundle("none") is None
    # An older configuration's null still means "no tumour model".
    assert resolve_bundle(settings_from_mapping({"models": {"segmentation_bundle": None}}).models.segmentation_bundle) \
        is None
    assert resolve_bundle("/srv/models/mine.zip") == Path("/srv/models/mine.zip")


def test_demo_bundle_is_small_verified_and_says_what_it_is() -> None:
    size_mb = sum(p.stat().st_size for p in DEMO_BUNDLE_PATH.rglob("*") if p.is_file()) / 2**20
    assert size_mb <= MAX_BUNDLE_MB
    bundle = load_bundle(DEMO_BUNDLE_PATH)  # verifies the sha256 and the architecture
    meta = bundle.meta
    assert meta.demo is True and "not for clinical use" in meta.intended_use
    assert "synthetic" in meta.training_data and "train_demo_segmentation.py" in meta.training_data
    # The held-out figures the README quotes are in the bundle, one per real case, and
    # their summary is computed from them.
    loo = meta.metrics["leave_one_out"]
    assert set(loo) == REAL_CASES
    assert meta.metrics["dice_mean"] == pytest.approx(float(np.mean([v["dice"] for v in loo.values()])))
    assert bundle.inference_settings().max_candidates >= 1


def test_tampered_demo_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "demo"
    copy.mkdir()
    for item in DEMO_BUNDLE_PATH.iterdir():
        data = item.read_bytes()
        if item.suffix == ".safetensors":
            data = data[:-1] + bytes([data[-1] ^ 1])
        (copy / item.name).write_bytes(data)
    assert read_bundle_meta(copy).name == "raseg-demo"
    with pytest.raises(ValueError, match="sha256"):
        load_bundle(copy)


@pytest.fixture(scope="module")
def default_chain(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real chest CT (LUNG1-002, DICOM) through the chain with the default settings."""
    out = tmp_path_factory.mktemp("out")
    settings = settings_from_mapping({"models": {"device": "cpu"}, "radiomics": {"enabled": False}})
    result = run_chain(shared_data / "nsclc_radiomics" / "LUNG1-002" / "CT", out, settings)
    assert result.status == "done", result.error
    return out


def test_default_chain_segments_the_real_tumour(shared_data: Path, default_chain: Path) -> None:
    # LUNG1-002 is one of the demo model's training cases: this checks that the shipped
    # weights and the whole inference path work; the held-out figures are in the bundle.
    payload = json.loads((default_chain / "result.json").read_text())
    tumour = payload["models"]["tumour"]
    assert tumour["method"] == "raseg-demo" and tumour["demo"] is True
    assert any("not for clinical use" in note for note in tumour["notes"])
    series = load_series(shared_data / "nsclc_radiomics" / "LUNG1-002" / "CT", strict=False)
    masks = seg_to_masks(default_chain / "SEG.dcm", series)
    rtstruct = next((shared_data / "nsclc_radiomics" / "LUNG1-002" / "RTSTRUCT").iterdir())
    truth = rasterise_roi(rtstruct, series, "GTV-1")
    # The contour's quality was assessed with the shipped calibration; a flagged contour
    # keeps its segment under the suffixed name.
    (label,) = [k for k in masks if k.startswith("Tumour")]
    assert tumour["quality"]["calibration"]["calibrated"] is True
    assert payload["review"]["tumour_quality_score"] is not None
    assert (label == "Tumour (uncertain)") is payload["review"]["required"]
    assert dice(masks[label], truth) > 0.6


def test_every_object_names_the_demo_model(default_chain: Path) -> None:
    meta = read_bundle_meta(DEMO_BUNDLE_PATH)
    for name in ("SEG.dcm", "RTSTRUCT.dcm", "SR.dcm"):
        ds = pydicom.dcmread(default_chain / name, stop_before_pixels=True)
        assert any(f"{meta.name} {meta.version}" in str(v) for v in ds.SoftwareVersions), name
    sr = pydicom.dcmread(default_chain / "SR.dcm")
    assert "demo — not for clinical use" in json.dumps(sr.to_json_dict(), ensure_ascii=False)


def test_train_seg_fine_tunes_from_the_demo_bundle(tmp_path: Path) -> None:
    from radnode.phantom import synthesize_volume

    volume = synthesize_volume(77, slices=40, tumors=1, matrix=256, tumor_types=("solid",))
    images, labels = tmp_path / "data" / "imagesTr", tmp_path / "data" / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    ct = volume.image("hu")
    sitk.WriteImage(ct, str(images / "case_001.nii.gz"))
    sitk.WriteImage(volume.image("tumors"), str(labels / "case_001.nii.gz"))
    app = typer.Typer()
    train_cmd.register(app)
    common = ["train", "seg", "--data", str(tmp_path / "data"), "--folds", "1", "--steps", "1", "--batch-size", "1",
              "--device", "cpu", "--threads", "1", "--negative-fraction", "0.3", "--init", "demo"]
    result = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "tuned"), "--width", "small"])
    assert result.exit_code == 0, result.output
    assert load_bundle(tmp_path / "tuned").meta.architecture.channels == (16, 32, 64, 128)
    wrong = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "x"), "--width", "faithful"])
    assert wrong.exit_code == 2 and "architecture" in wrong.output
