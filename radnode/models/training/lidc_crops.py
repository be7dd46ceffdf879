"""LIDC-IDRI nodule crops (``lidc_nodule_crops/``) as training cases for RA-Seg.

The folder holds small CT crops around one nodule each (``image/LIDC-IDRI-PPPP_R_N.nii.gz``,
about 43 × 43 voxels in-plane and 3-12 slices) with a binary nodule mask of the same name
under ``mask/``. They teach the network what a nodule looks like next to vessels, bronchial
walls and pleura, the structures the candidate detector proposes as well:

* the **positive** patch is the crop with its mask (padded to the training patch by the
  sampler);
* the **hard negatives** are the candidate detector's proposals inside the crop that do not
  touch the nodule (a vessel crossing the crop, a pleural bump), found exactly as for a
  whole CT (:func:`~radnode.models.training.data.hard_negatives`) with the whole crop as the
  search region (a crop is almost all lung and has no lung mask of its own).

Crops are not NSCLC planning GTVs (mostly small peripheral nodules): they add nodule/vessel
discrimination, while the large-GTV cases stay the real CTs. A patient is never on both
sides of a split: :func:`split_patients` splits by patient, and the patients of the LIDC
slabs (held out in the leave-one-out over the real CTs) are excluded from every crop set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from radnode.models.preprocess import PreprocessParams
from radnode.models.training.data import TrainingCase, TrainingDataError, prepare_case
from radnode.models.training.loop import CROP_PREFIX
_NAME = re.compile(r"^(LIDC-IDRI-\d{4})_R_(\d+)\.nii(\.gz)?$")


@dataclass(frozen=True)
class CropSource:
    """One crop: its image and mask files and the patient it comes from."""

    case_id: str
    patient: str
    image: Path
    mask: Path


def discover_crops(root: str | Path) -> list[CropSource]:
    """Every ``image/*.nii.gz`` of ``root`` with a mask of the same name, sorted by case id.

    Masks without an image (two in the published folder) are ignored; an image without a
    mask is an error (the folder is incomplete).
    """
    root = Path(root)
    images, masks = root / "image", root / "mask"
    if not images.is_dir() or not masks.is_dir():
        raise TrainingDataError(f"{root}: expected image/ and mask/ folders of LIDC nodule crops")
    found = []
    for path in sorted(images.iterdir()):
        match = _NAME.match(path.name)
        if not match:
            continue
        mask = masks / path.name
        if not mask.is_file():
            raise TrainingDataError(f"{path}: no mask {mask}")
        found.append(CropSource(f"{CROP_PREFIX}{match.group(1)}-{match.group(2)}", match.group(1), path, mask))
    if not found:
        raise TrainingDataError(f"{images}: no LIDC-IDRI-PPPP_R_N.nii.gz crops")
    return found


def split_patients(
    sources: Sequence[CropSource], count: int, exclude: Iterable[str] = (), seed: int = 0,
) -> tuple[list[CropSource], list[str]]:
    """``count`` crops of whole patients drawn with ``seed``, none of the ``exclude`` patients.

    Returns the crops and the sorted patients they come from. Patients are drawn in a
    seeded order and all their crops taken until ``count`` crops are reached (a patient is
    never split), so the choice depends only on the folder, ``count`` and ``seed``.
    """
    excluded = set(exclude)
    by_patient: dict[str, list[CropSource]] = {}
    for source in sources:
        if source.patient not in excluded:
            by_patient.setdefault(source.patient, []).append(source)
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    chosen: list[CropSource] = []
    taken: list[str] = []
    for index in order:
        if len(chosen) >= count:
            break
        chosen.extend(by_patient[patients[index]])
        taken.append(patients[index])
    return chosen, sorted(taken)


def load_crop(source: CropSource, params: PreprocessParams | None = None, negatives: bool = True) -> TrainingCase:
    """One crop on the network's grid, with its hard negatives (see the module docstring)."""
    image = sitk.ReadImage(str(source.image), sitk.sitkFloat32)
    mask_image = sitk.ReadImage(str(source.mask))
    mask = sitk.GetArrayFromImage(mask_image) != 0
    if mask.shape != sitk.GetArrayViewFromImage(image).shape:
        raise TrainingDataError(f"{source.mask}: mask {mask.shape} does not match its image")
    everywhere = np.ones(mask.shape, dtype=np.uint8)
    return prepare_case(source.case_id, image, mask, params, lung=everywhere, negatives=negatives)


def select_crops(
    sources: Sequence[CropSource],
    count: int,
    exclude: Iterable[str] = (),
    seed: int = 0,
    min_volume_mm3: float = 150.0,
    params: PreprocessParams | None = None,
) -> tuple[list[TrainingCase], list[str]]:
    """Up to ``count`` crops prepared for training, whole patients in a seeded order.

    Like :func:`split_patients`, but a crop counts only when its nodule keeps at least
    ``min_volume_mm3`` on the network's grid (default: the candidate detector's smallest
    proposal; a nodule the detector never proposes teaches the inference path nothing).
    Returns the cases and the sorted patients they come from.
    """
    chosen, _ = split_patients(sources, len(sources), exclude, seed)
    cases: list[TrainingCase] = []
    patients: set[str] = set()
    for source in chosen:
        if len(cases) >= count:
            break
        case = load_crop(source, params)
        if float(case.label.sum()) * float(np.prod(case.spacing_zyx)) >= min_volume_mm3:
            cases.append(case)
            patients.add(source.patient)
    return cases, sorted(patients)
