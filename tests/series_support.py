"""CT series re-labelled for geometry tests of the writers (SEG and RTSTRUCT share them)."""

from __future__ import annotations

from pathlib import Path

import pydicom

from radnode.dicom_io.series import CTSeries, load_series
from radnode.dicom_io.uids import derive_uid


def coronal_copy(series: CTSeries, out: Path) -> CTSeries:
    """The series' files re-labelled as a coronal stack (normal +y, 3 mm apart), with new UIDs, loaded again.

    The pixel data stay as they are: what the writers must get right is the geometry
    (slice order along +y, contour points in the coronal planes), not the anatomy.
    """
    out.mkdir()
    for k, path in enumerate(series.files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-174.3945, -50.0 + 3.0 * k, 80.0]
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, derive_uid("2.25", str(ds[keyword].value), "coronal"))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{k:03d}.dcm")
    return load_series(out)
