"""Ground truth beside the series: label images on the CT grid and ``labels.json``.

The NIfTI files are written by SimpleITK from the same :class:`VolumeGeometry` as the
DICOM series, so read back with SimpleITK their origin, spacing and direction equal the
series' Image Position (Patient) of slice 0, Pixel Spacing / slice spacing and Image
Orientation (Patient) (ITK works in LPS like DICOM; the NIfTI header itself stores the
equivalent RAS transform, which nibabel reports).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from radnode.phantom.geometry import VolumeGeometry

#: Version of the labels.json layout.
LABELS_SCHEMA = "radnode-phantom-labels/1"


def to_sitk(array: np.ndarray, geometry: VolumeGeometry) -> Any:
    """A SimpleITK image of ``array`` ``(z, y, x)`` placed on ``geometry``."""
    import SimpleITK as sitk

    if array.shape != geometry.shape_zyx:
        raise ValueError(f"array shape {array.shape} does not match the grid {geometry.shape_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(geometry.origin_xyz)
    image.SetSpacing(geometry.spacing_xyz)
    image.SetDirection(geometry.direction)
    return image


def write_label_image(labels: np.ndarray, geometry: VolumeGeometry, path: Path) -> Path:
    """Write a uint8 label image as compressed NIfTI on the CT grid."""
    import SimpleITK as sitk

    if labels.dtype != np.uint8:
        raise ValueError(f"label image for {path} must be uint8, got {labels.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(labels, geometry), str(path), useCompression=True)
    return path


def write_labels_json(document: dict[str, Any], path: Path) -> Path:
    """Write ``labels.json`` (UTF-8, indented, trailing newline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path
