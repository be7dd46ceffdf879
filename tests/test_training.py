"""RA-Seg training: data discovery, folds, augmentations, the loop (learns, resumes), bundles, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import typer
from typer.testing import CliRunner

from radnode.cli import train_cmd
from radnode.models.bundle import load_bundle
from radnode.models.candidates import box_from_mask, mm_to_voxels
from radnode.models.inference import segment_ct
from radnode.models.metrics import dice
from radnode.models.raseg import RASegConfig
from radnode.models.training.data import (
    TrainingCase,
    TrainingDataError,
    discover_cases,
    kfold_split,
    load_case,
    prepare_case,
    read_case,
)
from radnode.models.training.loop import (
    TrainConfig,
    train_and_bundle,
    train_model,
    validate,
)
from radnode.models.training.transforms import (
    BBOX,
    IMAGE,
    LABEL,
    sample_dict,
    spatial_augmentations,
    training_transforms,
)
from radnode.phantom import SyntheticVolume, synthesize_volume

TINY = RASegConfig(channels=(8, 16, 32, 64), dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def phantom() -> SyntheticVolume:
    return synthesize_volume(3, slices=40, tumors=1, matrix=256, tumor_types=("solid",), tumor_diameter_mm=(18, 22))


@pytest.fixture(scope="module")
def crop_case(phantom: SyntheticVolume) -> TrainingCase:
    """The phantom on the network grid, cropped to its tumour plus ~12 mm."""
    case = prepare_case("p3", phantom.image("hu"), phantom.tumors > 0, lung=phantom.lungs)
    box = box_from_mask(case.label, case.spacing_zyx).grow((6, 12, 12), case.label.shape)
    return TrainingCase("p3", case.image[box.slices].copy(), case.label[box.slices].copy(), case.record)


def _write_nifti(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))


# --- data ------------------------------------------------------------------------------------------


def test_prepare_case_puts_the_tumour_on_the_grid(phantom: SyntheticVolume) -> None:
    case = prepare_case("p3", phantom.image("hu"), phantom.tumors > 0, lung=phantom.lungs)
    truth_ml = np.count_nonzero(phantom.tumors) * np.prod(phantom.geometry.spacing_xyz) / 1000
    grid_ml = np.count_nonzero(case.label) * np.prod(case.spacing_zyx) / 1000
    assert case.image.shape == case.label.shape and case.image.dtype == np.float32
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert grid_ml == pytest.approx(truth_ml, rel=0.1)
    # The tumour is dense: its voxels are bright in the [-200, 250] HU window.
    assert case.image[case.label > 0].mean() > case.image[case.label == 0].mean() + 0.1


def test_msd_layout_discovery_and_loading(tmp_path: Path, phantom: SyntheticVolume) -> None:
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    ct = phantom.image("hu")
    _write_nifti(phantom.hu, ct, images / "lung_003.nii.gz")
    _write_nifti((phantom.tumors > 0).astype(np.uint8), ct, labels / "lung_003.nii.gz")
    # nnU-Net channel naming, a macOS resource fork (shipped in MSD archives), an unlabelled image
    small = np.zeros((4, 8, 8), np.int16)
    ref = sitk.GetImageFromArray(small)
    _write_nifti(small, ref, images / "case_007_0000.nii.gz")
    _write_nifti(small.astype(np.uint8), ref, labels / "case_007.nii.gz")
    (images / "._lung_003.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    _write_nifti(small, ref, images / "lung_999.nii.gz")

    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["case_007", "lung_003"]
    assert all(c.layout == "nifti" for c in cases)
    loaded = load_case(cases[1])  # the classical lung mask, then the grid
    expected_ml = np.count_nonzero(phantom.tumors) * np.prod(phantom.geometry.spacing_xyz) / 1000
    assert np.count_nonzero(loaded.label) * np.prod(loaded.spacing_zyx) / 1000 == pytest.approx(expected_ml, rel=0.1)


def test_dicom_rtstruct_discovery_on_real_data(shared_data: Path) -> None:
    root = shared_data / "nsclc_radiomics"
    cases = discover_cases(root, roi="GTV-1")
    assert [c.case_id for c in cases] == ["LUNG1-002", "LUNG1-003"]
    assert all(c.layout == "dicom" and c.label.parent.name == "RTSTRUCT" for c in cases)
    ct, tumour = read_case(cases[0])
    assert tuple(reversed(ct.GetSize())) == tumour.shape == (111, 512, 512)
    volume_ml = np.count_nonzero(tumour) * np.prod(ct.GetSpacing()) / 1000
    assert volume_ml == pytest.approx(358.5, rel=0.02)  # README: GTV-1 358.53 mL
    with pytest.raises(TrainingDataError, match="GTV-9.*GTV-1"):
        discover_cases(root, roi="GTV-9")
    with pytest.raises(TrainingDataError, match="--roi"):
        discover_cases(root)


def test_kfold_split_is_stable_and_disjoint() -> None:
    ids = [f"case{i:02d}" for i in range(23)]
    folds = kfold_split(ids, 5, seed=7)
    again = kfold_split(list(reversed(ids)), 5, seed=7)
    assert folds == again
    validation = [set(f.validation) for f in folds]
    assert sum(len(v) for v in validation) == len(ids) and set().union(*validation) == set(ids)
    assert {len(v) for v in validation} <= {4, 5}
    for fold, val in zip(folds, validation):
        assert not val & set(fold.train) and set(fold.train) | val == set(ids)
    assert [f.validation for f in kfold_split(ids, 5, seed=8)] != [f.validation for f in folds]
    with pytest.raises(TrainingDataError, match="at least 5"):
        kfold_split(ids[:3], 5)


# --- transforms ------------------------------------------------------------------------------------


def _blob_sample() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((30, 60, 60), np.float32)
    zz, yy, xx = np.ogrid[:30, :60, :60]
    label[((zz - 14) / 6.0) ** 2 + ((yy - 25) / 9.0) ** 2 + ((xx - 33) / 7.0) ** 2 <= 1] = 1
    label[12:16, 20:30, 40:48] = 1  # asymmetric: a flip of one array only would show
    return 0.2 + 0.6 * label, label


def test_flip_keeps_image_label_and_box_aligned() -> None:
    image, label = _blob_sample()
    flips = spatial_augmentations(prob=1.0)[:3]
    data = sample_dict(image, label)
    for flip in flips:
        data = flip(data)
    flipped = np.asarray(data[LABEL])[0]
    assert np.array_equal(flipped, label[::-1, ::-1, ::-1])
    assert np.array_equal(np.asarray(data[IMAGE])[0], image[::-1, ::-1, ::-1])
    box = training_transforms((30, 60, 60), (1.5, 1, 1), augment=False, margin_mm=0, jitter_mm=0)(data)[0][BBOX]
    expected = box_from_mask(flipped, (1.5, 1, 1))
    assert np.array_equal(np.asarray(box)[0], expected.mask(flipped.shape))


@pytest.mark.parametrize("seed", range(4))
def test_random_augmentation_keeps_channels_aligned(seed: int) -> None:
    image, label = _blob_sample()
    chain = training_transforms((24, 48, 48), (1.5, 1, 1), pos_fraction=1.0, augment_prob=1.0,
                                margin_mm=0, jitter_mm=0)
    chain.set_random_state(seed)
    out = chain(sample_dict(image, label))[0]
    img, lab, box = (np.asarray(out[k])[0] for k in (IMAGE, LABEL, BBOX))
    assert img.shape == lab.shape == box.shape == (24, 48, 48)
    assert lab.any() and set(np.unique(lab)) <= {0.0, 1.0}
    assert dice(img > 0.5, lab > 0) > 0.9  # the image moved with its label
    assert np.array_equal(box, box_from_mask(lab, (1.5, 1, 1)).mask(lab.shape))  # tight box, no jitter


def test_box_jitter_stays_near_the_tumour() -> None:
    image, label = _blob_sample()
    chain = training_transforms((30, 60, 60), (1.5, 1, 1), augment=False, pos_fraction=1.0,
                                margin_mm=5.0, jitter_mm=3.0)
    tight = box_from_mask(label, (1.5, 1, 1))
    margin, jitter = np.array(mm_to_voxels(5.0, (1.5, 1, 1))), np.array(mm_to_voxels(3.0, (1.5, 1, 1)))
    boxes = set()
    for seed in range(6):
        chain.set_random_state(seed)
        box = box_from_mask(np.asarray(chain(sample_dict(image, label))[0][BBOX])[0] > 0, (1, 1, 1))
        boxes.add((box.start, box.stop))
        offset_lo = np.array(tight.start) - margin - np.array(box.start)
        offset_hi = np.array(box.stop) - np.array(tight.stop) - margin
        assert np.all(np.abs(offset_lo) <= jitter) and np.all(np.abs(offset_hi) <= jitter)
    assert len(boxes) > 1  # the jitter does move the faces


# --- loop -----------------------------------------------------------------------------------------


def test_training_overfits_one_case_and_writes_a_usable_bundle(
    tmp_path: Path, phantom: SyntheticVolume, crop_case: TrainingCase
) -> None:
    config = TrainConfig(
        steps=80, batch_size=1, learning_rate=3e-3, patch_size=crop_case.image.shape, augment=False,
        box_jitter_mm=0.0, pos_fraction=1.0, device="cpu", num_threads=1, checkpoint_every=40,
        val_roi_size=crop_case.image.shape, val_context_mm=30.0,
    )
    report = train_and_bundle([crop_case], tmp_path / "bundle", TINY, config, folds=1, data_description="phantom")
    assert report.final.step == 80 and (tmp_path / "bundle.work" / "all" / "last.pt").is_file()
    assert report.final.losses[-1] < report.final.losses[0] / 5
    learned = validate(report.final.model, [crop_case], config, torch.device("cpu"))["p3"]
    print(f"overfit Dice after 80 steps: {learned:.3f}")
    assert learned > 0.9

    bundle = load_bundle(tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert meta["metrics"]["steps"] == 80 and "phantom" in meta["training_data"]
    assert meta["training"]["case_ids"] == ["p3"]
    params = [p.detach() for p in report.final.model.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(params, bundle.model.state_dict().values()))
    settings = bundle.inference_settings(device="cpu", num_threads=1, deep_features=False)
    result = segment_ct(bundle.model, phantom.image("hu"), phantom.lungs, settings=settings)
    assert result.mask.shape == phantom.hu.shape and result.grid.box is not None
    # Trained on a tumour crop only, it is not expected to segment the whole VOI well; but the
    # bundle must behave exactly as the model that was trained.
    direct = segment_ct(report.final.model, phantom.image("hu"), phantom.lungs, settings=settings)
    assert np.array_equal(result.grid.probability, direct.grid.probability)
    print(f"bundle through segment_ct: Dice {dice(result.mask > 0, phantom.tumors > 0):.3f}")


def test_resume_continues_exactly(tmp_path: Path, crop_case: TrainingCase) -> None:
    arch = RASegConfig(channels=(4, 8, 16, 32), dropout=0.1)  # dropout: the per-step seeds matter too
    config = TrainConfig(
        steps=10, batch_size=2, learning_rate=1e-3, patch_size=(16, 32, 32), augment=True, augment_prob=0.7,
        device="cpu", num_threads=1, checkpoint_every=5,
    )
    whole = train_model([crop_case], [], arch, config, tmp_path / "whole")
    half = train_model([crop_case], [], arch, TrainConfig(**{**config.__dict__, "steps": 5}), tmp_path / "split")
    assert half.step == 5
    resumed = train_model([crop_case], [], arch, config, tmp_path / "split", resume=True)
    assert resumed.resumed_from == 5 and resumed.step == 10
    assert resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # A checkpoint of another architecture is refused, not silently mixed.
    with pytest.raises(RuntimeError, match="architecture"):
        train_model([crop_case], [], TINY, config, tmp_path / "split", resume=True)


def test_train_cli_writes_a_bundle(tmp_path: Path, phantom: SyntheticVolume) -> None:
    images, labels = tmp_path / "data" / "imagesTr", tmp_path / "data" / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    ct = phantom.image("hu")
    _write_nifti(phantom.hu, ct, images / "lung_003.nii.gz")
    _write_nifti((phantom.tumors > 0).astype(np.uint8), ct, labels / "lung_003.nii.gz")
    app = typer.Typer()
    train_cmd.register(app)
    out = tmp_path / "model.zip"
    args = ["train", "seg", "--data", str(tmp_path / "data"), "--out", str(out), "--folds", "1",
            "--steps", "2", "--batch-size", "1", "--width", "small", "--device", "cpu", "--threads", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "bundle written" in result.output
    bundle = load_bundle(out)
    assert bundle.meta.architecture.channels == (16, 32, 64, 128) and bundle.meta.metrics["steps"] == 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(app, [*args[:6], "--fold", "x", "--overwrite"])
    assert bad.exit_code == 2


def test_a_fold_scores_only_the_case_it_held_out(tmp_path: Path, crop_case: TrainingCase) -> None:
    from radnode.models.training.folds import FoldError, fold_checkpoint, load_fold_model

    config = TrainConfig(steps=2, batch_size=1, patch_size=(16, 32, 32), augment=False, device="cpu", num_threads=1)
    trained = train_model([crop_case], [], TINY, config, tmp_path / "loo-held-out-case").model
    loaded = load_fold_model(tmp_path, "held-out-case")
    assert loaded is not None and not loaded.training
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_fold_model(tmp_path, "no-such-case") is None
    # A fold whose training cases include the case cannot score it as held out.
    train_model([crop_case], [], TINY, config, tmp_path / f"loo-{crop_case.case_id}")
    with pytest.raises(FoldError, match="trained on p3"):
        load_fold_model(tmp_path, crop_case.case_id)
    # Nor can a fold that has not finished its steps.
    checkpoint = fold_checkpoint(tmp_path, "held-out-case")
    payload = torch.load(checkpoint, weights_only=False)
    payload["config"]["steps"] = 10
    torch.save(payload, checkpoint)
    with pytest.raises(FoldError, match="still training"):
        load_fold_model(tmp_path, "held-out-case")
