"""nnU-Net v2 model folders and MONAI bundles as radnode's tumour model.

The tiny models of :mod:`external_model_support` label exactly the voxels brighter than a
threshold; the phantom has one planted blob that bright. So the tumour radnode sends must
be the blob, in the right place, whatever the model resampled or reoriented on the way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

from external_model_support import (  # noqa: E402
    TUMOUR_LABEL,
    blob_phantom,
    build_monai_bundle,
    build_nnunet_folder,
)

from radnode.cli import app  # noqa: E402
from radnode.config import settings_from_mapping  # noqa: E402
from radnode.dicom_io.rtstruct_read import rasterise_roi  # noqa: E402
from radnode.dicom_io.seg_writer import seg_to_masks  # noqa: E402
from radnode.dicom_io.series import load_series  # noqa: E402
from radnode.models.external import ExternalModelError, detect_format, load_external  # noqa: E402
from radnode.models.external.common import labels_to_ct, reorient, split_labels  # noqa: E402
from radnode.models.external.lungs import replace_lungs  # noqa: E402
from radnode.models.external.monai_bundle import MonaiBundleModel  # noqa: E402
from radnode.models.external.nnunet import nnunet_input  # noqa: E402
from radnode.models.tumour import segment_tumour  # noqa: E402

def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def centroid_mm(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Patient-space (LPS) centre of a (z, y, x) mask on ``image``'s grid."""
    zyx = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return blob_phantom(tmp_path_factory.mktemp("blob"))


@pytest.fixture(scope="module")
def ct(phantom: tuple[Path, np.ndarray]) -> sitk.Image:
    return load_series(phantom[0]).image


@pytest.fixture(scope="module")
def nnunet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nnunet_folder(tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="module")
def monai_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_monai_bundle(tmp_path_factory.mktemp("monai") / "tiny_bundle")


def models(path: Path, **extra: object) -> dict:
    return {"models": {"segmentation_bundle": str(path), "device": "cpu", "label_map": {"tumour": TUMOUR_LABEL},
                       "classifier_bundles": {}, **extra}}


def check_blob(mask: np.ndarray, blob: np.ndarray, ct: sitk.Image) -> None:
    """The mask is the blob: overlapping, same centre (< 1 voxel), and not its mirror image."""
    assert mask.shape == blob.shape
    assert dice(mask, blob) > 0.6, dice(mask, blob)
    spacing = min(ct.GetSpacing())
    assert np.linalg.norm(centroid_mm(mask, ct) - centroid_mm(blob, ct)) < spacing
    # The blob is off-centre: a left-right or front-back flip would put it elsewhere.
    assert dice(mask, blob[:, :, ::-1]) < 0.2 and dice(mask, blob[:, ::-1, :]) < 0.2


# --- geometry units ---------------------------------------------------------------------------


def test_nnunet_gets_zyx_arrays_with_zyx_spacing_in_the_trained_orientation() -> None:
    # A feet-first, anisotropic CT: voxel index z runs from head to feet.
    array = np.zeros((5, 6, 7), dtype=np.int16)
    array[0, 2, 1] = 100  # most superior slice
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    data, props = nnunet_input(reorient(image, "LPS"))
    assert data.shape == (1, 5, 6, 7) and data.dtype == np.float32
    assert props["spacing"] == pytest.approx([2.5, 0.8, 0.7])
    # In LPS the superior slice is the last one; rows and columns keep their order.
    assert np.argwhere(data[0] == 100).tolist() == [[4, 2, 1]]
    ras, _ = nnunet_input(reorient(image, "RAS"))
    assert np.argwhere(ras[0] == 100).tolist() == [[4, 6 - 1 - 2, 7 - 1 - 1]]


def test_labels_on_a_reoriented_grid_come_back_to_the_ct_grid() -> None:
    array = np.zeros((4, 5, 6), dtype=np.int16)
    array[1, 2, 3] = 1
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.5, 3.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1))
    flipped = reorient(image, "RAS")
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), array)
    assert np.array_equal(labels_to_ct(flipped, image), array)


def test_label_map_splits_tumour_and_lungs_and_lungs_replace_the_classical_mask(ct: sitk.Image) -> None:
    labels = np.array([[[0, 1, 2, 3, 4]]])
    tumour, lungs = split_labels(labels, {"tumour": [1, 4], "lung_right": [2], "lung_left": [3]})
    assert tumour.tolist() == [[[False, True, False, False, True]]]
    assert lungs is not None and lungs.tolist() == [[[0, 0, 1, 2, 0]]]
    assert split_labels(labels, {"tumour": [1]})[1] is None
    from radnode.models.lungmask import segment_lungs

    classical = segment_lungs(ct)
    model_lungs = np.zeros_like(classical.labels)
    model_lungs[10:12, 20:30, 20:30] = 2
    replaced = replace_lungs(classical, model_lungs, (2.0, 1.0, 1.0))
    assert np.array_equal(replaced.left, model_lungs == 2) and not replaced.right.any()
    assert replaced.left_volume_ml == pytest.approx(200 * 2.0 / 1000)


def test_the_format_is_detected_from_the_folder(nnunet_folder: Path, monai_bundle: Path, tmp_path: Path) -> None:
    from radnode.models.tumour import DEMO_BUNDLE_PATH

    assert detect_format(nnunet_folder) == "nnunetv2"
    assert detect_format(monai_bundle) == "monai"
    assert detect_format(DEMO_BUNDLE_PATH) == "radnode"
    assert detect_format(tmp_path / "missing.zip") == "radnode"


# --- end to end -------------------------------------------------------------------------------


def test_nnunet_folder_runs_end_to_end_through_radnode_process(
    phantom: tuple[Path, np.ndarray], ct: sitk.Image, nnunet_folder: Path, tmp_path: Path
) -> None:
    ct_dir, blob = phantom
    config = tmp_path / "radnode.yaml"
    # RAS: the phantom is stored LPS, so the model sees it flipped in x and y and radnode must flip back.
    config.write_text(json.dumps({**models(nnunet_folder, nnunet={"orientation": "RAS", "mirroring": False}), "radiomics": {"enabled": False}}))
    out = tmp_path / "out"
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["--config", str(config), "process", str(ct_dir), "--out", str(out)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "result.json").read_text())
    assert payload["status"] == "done", payload["error"]
    tumour = payload["models"]["tumour"]
    # Provenance: the dataset and configuration, dataset.json's release, and the checksum of
    # the two fold checkpoints that were ensembled (sha256sum-style lines, hashed).
    files = {f"fold_{f}/checkpoint_final.pth": sha256(nnunet_folder / f"fold_{f}" / "checkpoint_final.pth") for f in (0, 1)}
    lines = "".join(f"{files[k]}  {k}\n" for k in sorted(files))
    expected_sha = hashlib.sha256(lines.encode()).hexdigest()
    assert tumour["method"] == "nnunetv2-Dataset990_RadnodeTiny-3d_fullres"
    assert tumour["version"] == "0.3-test"
    assert tumour["weights_sha256"] == expected_sha and tumour["weight_files"] == files
    assert tumour["folds"] == ["0", "1"] and tumour["format"] == "nnunetv2" and tumour["demo"] is False
    assert tumour["orientation"] == "RAS"
    # Geometry, read back from the DICOM objects that would go to the archive.
    series = load_series(ct_dir)
    masks = seg_to_masks(out / "SEG.dcm", series)
    check_blob(masks["Tumour"], blob, ct)
    check_blob(rasterise_roi(out / "RTSTRUCT.dcm", series, "Tumour"), blob, ct)
    for name in ("SEG.dcm", "RTSTRUCT.dcm", "SR.dcm"):
        ds = pydicom.dcmread(out / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every value within its VR's length (LO: 64)
            ds.SoftwareVersions
        assert any("nnunetv2-Dataset990_RadnodeTiny-3d_fullres 0.3-test" in v for v in ds.SoftwareVersions), name
        assert expected_sha in json.dumps(ds.to_json_dict()), f"{name} lacks the weights checksum"
    print(f"tiny nnU-Net (2 folds) via radnode process: {seconds:.1f} s, "
          f"predict {tumour['timings']['predict']:.1f} s")


def test_monai_bundle_runs_end_to_end_through_the_chain(
    phantom: tuple[Path, np.ndarray], ct: sitk.Image, monai_bundle: Path, tmp_path: Path
) -> None:
    from radnode.pipeline.chain import run_chain

    ct_dir, blob = phantom
    settings = settings_from_mapping({**models(monai_bundle), "radiomics": {"enabled": False}})
    result = run_chain(ct_dir, tmp_path / "out", settings)
    assert result.status == "done", result.error
    tumour = result.models["tumour"]
    weights = sha256(monai_bundle / "models" / "model.pt")
    assert (tumour["method"], tumour["version"]) == ("monai-radnode_tiny_threshold", "0.2.0-test")
    assert tumour["weights_sha256"] == weights and tumour["format"] == "monai"
    masks = seg_to_masks(tmp_path / "out" / "SEG.dcm", load_series(ct_dir))
    check_blob(masks["Tumour"], blob, ct)
    seg = pydicom.dcmread(tmp_path / "out" / "SEG.dcm")
    assert weights in json.dumps(seg.to_json_dict())
    # The bundle's SaveImaged-free postprocessing wrote nothing into the bundle.
    assert sorted(p.name for p in monai_bundle.iterdir()) == ["configs", "models"]


def test_mapped_lung_labels_replace_the_classical_lungs_in_the_objects(
    phantom: tuple[Path, np.ndarray], ct: sitk.Image, tmp_path: Path
) -> None:
    from radnode.pipeline.chain import run_chain

    bundle = build_monai_bundle(tmp_path / "lung_bundle", lung_below_hu=-500)
    settings = settings_from_mapping(
        {**models(bundle, label_map={"tumour": TUMOUR_LABEL, "lung_left": 2}), "radiomics": {"enabled": False}}
    )
    result = run_chain(phantom[0], tmp_path / "out", settings)
    assert result.status == "done", result.error
    assert result.models["lung_mask"]["method"] == "monai-radnode_tiny_threshold"
    masks = seg_to_masks(tmp_path / "out" / "SEG.dcm", load_series(phantom[0]))
    dark = sitk.GetArrayFromImage(ct) < -500
    assert dice(masks["Lung left"], dark) > 0.95
    assert "Lung right" not in masks or not masks["Lung right"].any()
    check_blob(masks["Tumour"], phantom[1], ct)


def test_torchscript_bundle_without_invertd_is_resampled_back_by_radnode(
    phantom: tuple[Path, np.ndarray], ct: sitk.Image, tmp_path: Path
) -> None:
    # No Invertd: the prediction stays on the bundle's RAS 3.5 mm grid; radnode maps it back.
    bundle = build_monai_bundle(tmp_path / "ts_bundle", torchscript=True, invert=False)
    model = MonaiBundleModel(bundle)
    assert model.provenance.files == {"models/model.ts": sha256(bundle / "models" / "model.ts")}
    labels = model.predict(ct)
    check_blob(labels == TUMOUR_LABEL, phantom[1], ct)


# --- clear errors for broken folders ----------------------------------------------------------


def error_of(path: Path, **extra: object) -> str:
    settings = settings_from_mapping(models(path, **extra))
    with pytest.raises(ExternalModelError) as info:
        load_external(path, detect_format(path), settings.models)
    return str(info.value)


def test_missing_fold_is_named(nnunet_folder: Path) -> None:
    message = error_of(nnunet_folder, nnunet={"folds": [0, 3]})
    assert "[3]" in message and "present: ['0', '1']" in message


def test_missing_plans_json_is_named(nnunet_folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(nnunet_folder, tmp_path / "nnunet_copy")
    (copy / "plans.json").unlink()
    message = error_of(copy)
    assert "plans.json: missing" in message


def test_folder_without_checkpoints_is_named(nnunet_folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(nnunet_folder, tmp_path / "nnunet_copy")
    for fold in copy.glob("fold_*"):
        shutil.rmtree(fold)
    assert "no fold_N/checkpoint_final.pth" in error_of(copy)


def test_wrong_label_map_lists_the_models_labels(nnunet_folder: Path, monai_bundle: Path) -> None:
    message = error_of(nnunet_folder, label_map={"tumour": 7})
    assert "tumour: [7] is not a label of this model" in message and "1: blob" in message
    message = error_of(monai_bundle, label_map={"tumour": 1, "lung_left": 5})
    assert "lung_left: [5]" in message and "2: lung" in message


def test_missing_label_map_says_what_to_set(nnunet_folder: Path) -> None:
    settings = settings_from_mapping({"models": {"segmentation_bundle": str(nnunet_folder), "device": "cpu"}})
    with pytest.raises(ExternalModelError, match=r"models.label_map is required.*1: blob, 2: lung"):
        load_external(nnunet_folder, "nnunetv2", settings.models)


def test_corrupt_checkpoint_is_named(nnunet_folder: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(nnunet_folder, tmp_path / "nnunet_copy")
    checkpoint = copy / "fold_1" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    message = error_of(copy)
    assert "fold_1/checkpoint_final.pth" in message and "corrupt" in message


def test_broken_monai_bundle_is_named(monai_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(monai_bundle, tmp_path / "bundle_copy")
    (copy / "models" / "model.pt").unlink()
    assert "model.pt or model.ts" in error_of(copy)
    (copy / "models" / "model.pt").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch weights file" in error_of(copy)


def test_a_failing_model_fails_the_job_with_the_reason(phantom: tuple[Path, np.ndarray], nnunet_folder: Path,
                                                      tmp_path: Path) -> None:
    from radnode.pipeline.chain import run_chain

    settings = settings_from_mapping({**models(nnunet_folder, label_map={"tumour": 9}), "radiomics": {"enabled": False}})
    result = run_chain(phantom[0], tmp_path / "out", settings)
    assert result.status == "failed" and "tumour: [9] is not a label of this model" in (result.error or "")


def test_label_map_on_a_radnode_bundle_is_refused(ct: sitk.Image) -> None:
    from radnode.models.tumour import DEMO_BUNDLE_PATH

    with pytest.raises(ValueError, match="label_map applies to an nnU-Net / MONAI model folder"):
        settings_from_mapping({"models": {"label_map": {"tumour": 1}}})  # segmentation_bundle: demo
    settings = settings_from_mapping({"models": {"segmentation_bundle": str(DEMO_BUNDLE_PATH), "label_map": {"tumour": 1}}})
    lung = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=bool)
    with pytest.raises(ExternalModelError, match="a radnode bundle, but models.label_map is set"):
        segment_tumour(ct, lung, settings.models.segmentation_bundle, "cpu", models=settings.models)


def test_without_nnunetv2_the_error_says_which_extra_to_install(
    nnunet_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # what an environment without the package sees
    assert "install radnode[nnunet]" in error_of(nnunet_folder)
