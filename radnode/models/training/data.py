"""Training data: find cases, load them onto RA-Seg's grid, split them into folds.

Two layouts are recognised under the data folder:

MSD / nnU-Net
    ``imagesTr/`` and ``labelsTr/`` of NIfTI files (Medical Segmentation Decathlon Task06
    Lung, nnU-Net raw data). An image ``<id>.nii.gz`` (MSD) or ``<id>_0000.nii.gz``
    (nnU-Net channel 0) pairs with the label ``labelsTr/<id>.nii.gz``; any non-zero label
    is tumour. macOS resource forks (``._*``, shipped in the MSD archives) are ignored.
DICOM CT + RTSTRUCT
    One sub-folder per case (walked recursively) holding one CT series and one RT
    Structure Set drawn on it (PS3.3 A.19); the tumour is the ROI named by ``roi``
    (ROI Name (3006,0026), exact match). The case id is the sub-folder's name.

A loaded case (:class:`TrainingCase`) is already on the network's grid: the CT is clipped,
normalised, resampled to 1 × 1 × 1.5 mm and cropped to the lung VOI by
:func:`radnode.models.preprocess.preprocess_ct`, exactly as at inference, with the
classical lung mask (:func:`radnode.models.lungmask.segment_lungs`) joined with the tumour
so that a tumour the lung mask misses is never cropped away. The reference label goes
through the same nearest-neighbour index map (:func:`~radnode.models.preprocess.labels_to_grid`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from radnode.models.candidates import Box, DetectorParams, detect_candidates
from radnode.models.preprocess import (
    PreprocessParams,
    PreprocessRecord,
    labels_to_grid,
    preprocess_ct,
)

log = logging.getLogger(__name__)

IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: nnU-Net names channel 0 of an image ``<id>_0000``.
NNUNET_CHANNEL0 = "_0000"
#: Modality (0008,0060) of an RT Structure Set.
RTSTRUCT_MODALITY = "RTSTRUCT"
#: Modality of a CT image.
CT_MODALITY = "CT"


class TrainingDataError(ValueError):
    """The data folder holds no usable cases, or a case cannot be read."""


@dataclass(frozen=True)
class CaseSource:
    """Where one training case lives.

    Attributes
    ----------
    case_id
        Unique id (file stem or sub-folder name); never a patient name.
    layout
        ``nifti`` or ``dicom``.
    image
        NIfTI image file, or the folder holding the CT series.
    label
        NIfTI label file, or the RTSTRUCT file.
    roi
        ROI Name of the tumour in the RTSTRUCT (``dicom`` only).
    """

    case_id: str
    layout: str
    image: Path
    label: Path
    roi: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready mapping (for the bundle's training description)."""
        return {"case_id": self.case_id, "layout": self.layout, "image": str(self.image),
                "label": str(self.label), "roi": self.roi}


@dataclass(frozen=True)
class TrainingCase:
    """One case on the network's grid.

    Attributes
    ----------
    case_id
        As in :class:`CaseSource`.
    image
        Normalised intensities, float32 (z, y, x), on the cropped 1 × 1 × 1.5 mm grid.
    label
        Tumour mask, uint8 (0/1), same grid.
    record
        Preprocessing record (grid geometry).
    negatives
        Hard negatives: boxes of the candidate detector's proposals that do not touch the
        tumour (vessel bundles, hilar nodes, chest-wall bumps). At inference the network
        also sees such boxes (the detector's runners-up), so it must learn to answer
        "no tumour here" for a box; see :func:`hard_negatives`.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    record: PreprocessRecord
    negatives: tuple[Box, ...] = ()

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Grid spacing in mm."""
        return self.record.spacing_zyx


def _nifti_stem(path: Path) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def discover_nifti(data_dir: Path) -> list[CaseSource]:
    """Cases of an MSD / nnU-Net folder (``imagesTr/`` + ``labelsTr/``), sorted by id."""
    images_dir, labels_dir = data_dir / IMAGES_DIR, data_dir / LABELS_DIR
    labels = {
        stem: path
        for path in sorted(labels_dir.iterdir())
        if not path.name.startswith(".") and (stem := _nifti_stem(path)) is not None
    }
    cases: list[CaseSource] = []
    unmatched: list[str] = []
    for path in sorted(images_dir.iterdir()):
        stem = _nifti_stem(path)
        if path.name.startswith(".") or stem is None:
            continue
        case_id = stem.removesuffix(NNUNET_CHANNEL0)
        if case_id not in labels:
            unmatched.append(path.name)
            continue
        cases.append(CaseSource(case_id, "nifti", path, labels[case_id]))
    if unmatched:
        log.warning("%d images in %s have no label in %s (e.g. %s); left out",
                    len(unmatched), images_dir, labels_dir, unmatched[:3])
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise TrainingDataError(f"{images_dir}: case ids are not unique (several channels per case?)")
    return cases


def _modality(path: Path) -> str | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, EOFError, ValueError):  # not DICOM (README, NIfTI, ...): not part of the case
        return None
    return str(ds.get("Modality", "")) or None


def _dicom_case(folder: Path, roi: str) -> CaseSource | None:
    """The case in ``folder`` (one RTSTRUCT + CT files below it), or ``None`` if it is not one."""
    from radnode.dicom_io.rtstruct_read import read_rtstruct_rois

    rtstructs: list[Path] = []
    ct_dirs: set[Path] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        modality = _modality(path)
        if modality == RTSTRUCT_MODALITY:
            rtstructs.append(path)
        elif modality == CT_MODALITY:
            ct_dirs.add(path.parent)
    if not rtstructs or not ct_dirs:
        return None
    if len(rtstructs) > 1:
        raise TrainingDataError(f"{folder}: {len(rtstructs)} RTSTRUCT files; keep one per case folder")
    if len(ct_dirs) > 1:
        raise TrainingDataError(f"{folder}: CT files in {len(ct_dirs)} folders; keep one CT series per case")
    names = [info.name for info in read_rtstruct_rois(rtstructs[0])]
    if roi not in names:
        raise TrainingDataError(f"{rtstructs[0]}: no ROI named {roi!r} (ROI Names there: {names})")
    return CaseSource(folder.name, "dicom", ct_dirs.pop(), rtstructs[0], roi)


def discover_dicom(data_dir: Path, roi: str) -> list[CaseSource]:
    """Cases of a DICOM folder: each sub-folder with a CT series and an RTSTRUCT, sorted by id."""
    cases = [case for sub in sorted(p for p in data_dir.iterdir() if p.is_dir())
             if (case := _dicom_case(sub, roi)) is not None]
    if not cases:  # the folder itself may be a single case
        single = _dicom_case(data_dir, roi)
        cases = [single] if single else []
    return cases


def discover_cases(data_dir: str | Path, roi: str | None = None) -> list[CaseSource]:
    """Find the training cases under ``data_dir`` (layouts in the module docstring).

    Raises
    ------
    TrainingDataError
        When the folder is missing or holds no case, or a DICOM layout lacks ``roi``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingDataError(f"{data_dir}: not a folder")
    if (data_dir / IMAGES_DIR).is_dir() and (data_dir / LABELS_DIR).is_dir():
        cases = discover_nifti(data_dir)
    elif roi is None:
        raise TrainingDataError(
            f"{data_dir}: no {IMAGES_DIR}/ + {LABELS_DIR}/ (MSD / nnU-Net layout); for DICOM CT + "
            "RTSTRUCT folders give the tumour's ROI name (--roi)"
        )
    else:
        cases = discover_dicom(data_dir, roi)
    if not cases:
        raise TrainingDataError(
            f"{data_dir}: no cases found (expected {IMAGES_DIR}/ + {LABELS_DIR}/ NIfTI, or sub-folders "
            "with a CT series and an RTSTRUCT)"
        )
    log.info("found %d training cases in %s", len(cases), data_dir)
    return cases


def read_case(source: CaseSource) -> tuple[sitk.Image, np.ndarray]:
    """The CT (HU image) and the tumour mask (bool (z, y, x), CT grid) of a case."""
    if source.layout == "nifti":
        image = sitk.ReadImage(str(source.image))
        label_image = sitk.ReadImage(str(source.label))
        if label_image.GetSize() != image.GetSize():
            raise TrainingDataError(
                f"{source.label}: size {label_image.GetSize()} differs from image {source.image} "
                f"{image.GetSize()}"
            )
        return image, sitk.GetArrayFromImage(label_image) != 0
    from radnode.dicom_io.rtstruct_read import rasterise_roi
    from radnode.dicom_io.series import load_series

    series = load_series(source.image, strict=False)
    mask = rasterise_roi(source.label, series, source.roi or "")
    return series.image, mask


def hard_negatives(
    hu: np.ndarray,
    lung: np.ndarray,
    label: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    detector: DetectorParams | None = None,
    limit: int = 8,
) -> tuple[Box, ...]:
    """The detector's best ``limit`` proposals whose box holds no tumour voxel.

    These are the boxes the network will be shown at inference when it is run on the
    detector's runners-up (``InferenceSettings.max_candidates`` > 1); training on them
    with an empty label teaches it to leave a vessel bundle alone even when a box says
    "look here".
    """
    found = detect_candidates(hu, lung, spacing_zyx, detector)
    return tuple(c.box for c in found if not label[c.box.slices].any())[:limit]


def prepare_case(
    case_id: str,
    ct: sitk.Image,
    tumour: np.ndarray,
    params: PreprocessParams | None = None,
    lung: np.ndarray | None = None,
    negatives: bool = False,
) -> TrainingCase:
    """Put one CT and its tumour mask on the network's grid (see the module docstring).

    ``lung`` defaults to :func:`radnode.models.lungmask.segment_lungs` of the CT;
    ``negatives`` also collects the case's :func:`hard_negatives`.
    """
    tumour = np.asarray(tumour) != 0
    if not tumour.any():
        raise TrainingDataError(f"case {case_id}: the tumour mask is empty")
    if lung is None:
        from radnode.models.lungmask import segment_lungs

        lung = segment_lungs(ct).lungs
    voi = (np.asarray(lung) != 0) | tumour
    case = preprocess_ct(ct, voi.astype(np.uint8), params)
    label = labels_to_grid(tumour.astype(np.uint8), case.record)
    if not label.any():
        raise TrainingDataError(f"case {case_id}: the tumour vanished on the 1 x 1 x 1.5 mm grid (too small)")
    boxes = hard_negatives(case.record.params.to_hu(case.image), case.lung, label, case.record.spacing_zyx) \
        if negatives else ()
    return TrainingCase(case_id, case.image, label.astype(np.uint8), case.record, boxes)


def load_case(source: CaseSource, params: PreprocessParams | None = None, negatives: bool = False) -> TrainingCase:
    """Read and prepare one case (with its hard negatives when ``negatives``)."""
    ct, tumour = read_case(source)
    return prepare_case(source.case_id, ct, tumour, params, negatives=negatives)


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: case ids to train on and to validate on."""

    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]


def kfold_split(case_ids: Sequence[str], folds: int = 5, seed: int = 0) -> list[Fold]:
    """Split case ids into ``folds`` disjoint validation sets (a fixed-seed shuffle).

    The ids are sorted first, so the split depends only on the set of ids and the seed,
    never on discovery order. ``folds == 1`` means no validation (train on all).
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise TrainingDataError("case ids must be unique")
    if folds < 1:
        raise TrainingDataError(f"folds: must be >= 1, got {folds}")
    if folds == 1:
        return [Fold(0, tuple(ids), ())]
    if len(ids) < folds:
        raise TrainingDataError(f"{folds}-fold cross-validation needs at least {folds} cases, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = np.array_split(order, folds)
    result = []
    for k, part in enumerate(parts):
        val = {ids[i] for i in part}
        result.append(Fold(k, tuple(i for i in ids if i not in val), tuple(sorted(val))))
    return result
