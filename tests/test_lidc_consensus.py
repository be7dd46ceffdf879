"""LIDC-IDRI reader outlines → consensus nodule mask, on the real shared slabs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.dicom_io.series import load_series
from radnode.models.training.lidc import LidcError, consensus_mask


def _slab(shared_data: Path, patient: str) -> tuple[list[Path], list[str], tuple[int, int, int], float]:
    root = shared_data / "lidc_slabs" / patient
    series = load_series(next(p.parent for p in root.rglob("*.dcm")), strict=False)
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    voxel_ml = float(np.prod(series.image.GetSpacing())) / 1000.0
    return sorted(root.rglob("*.xml")), uids, sitk.GetArrayViewFromImage(series.image).shape, voxel_ml


@pytest.mark.parametrize("patient", ["LIDC-IDRI-0001", "LIDC-IDRI-0003"])
def test_consensus_lies_between_the_readers(shared_data: Path, patient: str) -> None:
    xml, uids, shape, voxel_ml = _slab(shared_data, patient)
    rows = [r for r in csv.DictReader((shared_data / "lidc_slabs" / "nodules_in_slabs.csv").open())
            if r["patient"] == patient]
    reader_ml = [float(r["volume_ml_in_slab"]) for r in rows]
    union = consensus_mask(xml, uids, shape, min_fraction=1e-6)
    half = consensus_mask(xml, uids, shape)
    everyone = consensus_mask(xml, uids, shape, min_fraction=1.0)
    assert everyone.any() and not (everyone & ~half).any() and not (half & ~union).any()
    # The union is at least the largest reader, the intersection at most the smallest.
    assert union.sum() * voxel_ml >= max(reader_ml) * 0.99
    assert everyone.sum() * voxel_ml <= min(reader_ml) * 1.01
    # The consensus sits where the readers put the nodule (CSV centroids, pixel units).
    z, row, col = np.argwhere(half).mean(axis=0)
    assert abs(col - np.mean([float(r["centroid_col"]) for r in rows])) < 3
    assert abs(row - np.mean([float(r["centroid_row"]) for r in rows])) < 3


def test_outlines_on_other_slices_or_bad_xml_are_errors(shared_data: Path, tmp_path: Path) -> None:
    xml, uids, shape, _ = _slab(shared_data, "LIDC-IDRI-0001")
    with pytest.raises(LidcError, match="no reader"):
        consensus_mask(xml, ["1.2.3"] * len(uids), shape)
    broken = tmp_path / "broken.xml"
    broken.write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(LidcError, match="broken.xml"):
        consensus_mask([broken], uids, shape)
