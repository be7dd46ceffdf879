"""The real CTs with a tumour reference in the shared data folder, as (CT, reference mask).

One loader per case so that the demo training script and the accuracy benchmark read the
same references in the same way (a benchmark that re-reads them differently would measure
something else):

* NSCLC-Radiomics LUNG1-002 (GTV-1) and LUNG1-003 (GTV-1 ∪ GTV-2 ∪ GTV-3), RTSTRUCT;
* the PyRadiomics ``lung1`` / ``lung2`` cases (NRRD label maps);
* the LIDC-IDRI-0001 / -0003 slabs (50 % consensus of the four readers' XML outlines).

The IBSI CT phantom is not here: it is a crop of the LUNG1-002 patient, so it would leak a
held-out case into training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from radnode.models.training.lidc import consensus_mask

#: What each case's reference is (for tables).
REFERENCES: dict[str, str] = {
    "LUNG1-002": "GTV-1 (RTSTRUCT)",
    "LUNG1-003": "GTV-1+2+3 (RTSTRUCT)",
    "pyradiomics-lung1": "label map",
    "pyradiomics-lung2": "label map",
    "LIDC-IDRI-0001": "50 % of 4 readers",
    "LIDC-IDRI-0003": "50 % of 4 readers",
}


def _nsclc(data: Path, case: str, rois: list[str]) -> tuple[sitk.Image, np.ndarray]:
    from radnode.dicom_io.rtstruct_read import rasterise_roi
    from radnode.dicom_io.series import load_series

    series = load_series(data / "nsclc_radiomics" / case / "CT", strict=False)
    rtstruct = next((data / "nsclc_radiomics" / case / "RTSTRUCT").iterdir())
    mask = np.zeros(sitk.GetArrayViewFromImage(series.image).shape, dtype=bool)
    for roi in rois:
        mask |= rasterise_roi(rtstruct, series, roi)
    return series.image, mask


def _pyradiomics(data: Path, case: str) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(data / "pyradiomics" / f"{case}_image.nrrd"), sitk.sitkFloat32)
    label = sitk.ReadImage(str(data / "pyradiomics" / f"{case}_label.nrrd"))
    return image, sitk.GetArrayFromImage(label) != 0


def _lidc(data: Path, case: str) -> tuple[sitk.Image, np.ndarray]:
    from radnode.dicom_io.series import load_series

    root = data / "lidc_slabs" / case
    ct_dir = next(p.parent for p in root.rglob("*.dcm"))
    series = load_series(ct_dir, strict=False)
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    shape = sitk.GetArrayViewFromImage(series.image).shape
    return series.image, consensus_mask(sorted(root.rglob("*.xml")), uids, shape)


#: Case id -> loader of (CT in HU, boolean reference on the CT grid) from the data folder.
REAL_CASES: dict[str, Callable[[Path], tuple[sitk.Image, np.ndarray]]] = {
    "LUNG1-002": lambda d: _nsclc(d, "LUNG1-002", ["GTV-1"]),
    "LUNG1-003": lambda d: _nsclc(d, "LUNG1-003", ["GTV-1", "GTV-2", "GTV-3"]),
    "pyradiomics-lung1": lambda d: _pyradiomics(d, "lung1"),
    "pyradiomics-lung2": lambda d: _pyradiomics(d, "lung2"),
    "LIDC-IDRI-0001": lambda d: _lidc(d, "LIDC-IDRI-0001"),
    "LIDC-IDRI-0003": lambda d: _lidc(d, "LIDC-IDRI-0003"),
}

#: Patients behind the real cases (LIDC crops of these patients must stay on their side).
LIDC_SLAB_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
