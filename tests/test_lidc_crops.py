"""LIDC-IDRI nodule crops as training cases: pairing, patient-level selection, grid, weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.models.training.data import TrainingDataError
from radnode.models.training.lidc_crops import discover_crops, load_crop, select_crops, split_patients
from radnode.models.training.loop import TrainConfig, case_weight
from radnode.models.training.real_cases import LIDC_SLAB_PATIENTS


@pytest.fixture(scope="module")
def crops(shared_data: Path):
    return discover_crops(shared_data / "lidc_nodule_crops")


def test_every_published_crop_is_paired_with_its_mask(crops) -> None:
    assert len(crops) == 994  # 996 masks, two without an image
    assert len({c.patient for c in crops}) == 551
    assert all(c.image.name == c.mask.name and c.case_id.startswith("crop-" + c.patient) for c in crops)
    assert len({c.case_id for c in crops}) == len(crops)


def test_selection_keeps_whole_patients_and_never_the_held_out_slab_patients(crops) -> None:
    chosen, patients = split_patients(crops, 60, exclude=LIDC_SLAB_PATIENTS, seed=3)
    assert not set(patients) & set(LIDC_SLAB_PATIENTS)
    assert {c.patient for c in chosen} == set(patients)
    for patient in patients:  # all of a chosen patient's crops, never part of them
        assert {c.case_id for c in chosen if c.patient == patient} == {c.case_id for c in crops if c.patient == patient}
    again, _ = split_patients(crops, 60, exclude=LIDC_SLAB_PATIENTS, seed=3)
    other, _ = split_patients(crops, 60, exclude=LIDC_SLAB_PATIENTS, seed=4)
    assert again == chosen and other != chosen
    everything, _ = split_patients(crops, len(crops), exclude=LIDC_SLAB_PATIENTS)
    assert {c.patient for c in everything} == {c.patient for c in crops} - set(LIDC_SLAB_PATIENTS)


def test_a_crop_lands_on_the_network_grid_with_its_nodule(crops) -> None:
    source = next(c for c in crops if c.case_id == "crop-LIDC-IDRI-0004-1")
    case = load_crop(source)
    mask = sitk.ReadImage(str(source.mask))
    volume_mm3 = float(sitk.GetArrayViewFromImage(mask).astype(bool).sum() * np.prod(mask.GetSpacing()))
    assert case.spacing_zyx == (1.5, 1.0, 1.0)
    grid_mm3 = float(case.label.sum() * 1.5)
    assert abs(grid_mm3 - volume_mm3) < 0.35 * volume_mm3 + 20
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert all(not case.label[b.slices].any() for b in case.negatives)


def test_small_nodules_are_not_selected(crops) -> None:
    cases, patients = select_crops(crops, 6, exclude=LIDC_SLAB_PATIENTS, seed=1, min_volume_mm3=400.0)
    assert len(cases) == 6 and all(float(c.label.sum()) * 1.5 >= 400.0 for c in cases)
    assert {c.case_id.removeprefix("crop-").rsplit("-", 1)[0] for c in cases} <= set(patients)


def test_crops_are_weighted_apart_from_whole_ct_cases() -> None:
    config = TrainConfig(real_case_weight=4.0, crop_case_weight=0.25)
    assert case_weight("phantom-001", config) == 1.0
    assert case_weight("LUNG1-002", config) == 4.0
    assert case_weight("crop-LIDC-IDRI-0004-1", config) == 0.25


def test_a_folder_without_crops_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="image/ and mask/"):
        discover_crops(tmp_path)
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    sitk.WriteImage(sitk.Image(4, 4, 2, sitk.sitkInt16), str(tmp_path / "image" / "LIDC-IDRI-0009_R_1.nii.gz"))
    with pytest.raises(TrainingDataError, match="no mask"):
        discover_crops(tmp_path)
