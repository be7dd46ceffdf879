"""What every external-model adapter shares: errors, provenance, the label map, geometry.

An adapter turns a model in its own format (nnU-Net v2, MONAI bundle) into a label image
*on the CT grid*; the label map (``models.label_map``) then says which of its values are
radnode's tumour and lungs. Keeping the geometry and the label map here means each adapter
only has to call its package correctly, and every adapter is checked the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from radnode.models.lungmask import LEFT_LUNG, RIGHT_LUNG

#: ``models.label_map`` keys, in the order regions are filled.
REGIONS = ("tumour", "lung_right", "lung_left")


class ExternalModelError(ValueError):
    """An external model folder is missing, broken, or does not fit the configured label map."""


@dataclass(frozen=True)
class Provenance:
    """What produced a segmentation: written into result.json and every DICOM object."""

    format: str  # "nnunetv2" | "monai"
    name: str
    version: str
    weights_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # weight file (relative) -> its SHA-256
    details: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"format": self.format, "weights_sha256": self.weights_sha256, "weight_files": dict(self.files),
                **self.details}


class ExternalModel(Protocol):
    """A loaded external model: its provenance and labels, and a CT -> label-array call."""

    provenance: Provenance
    #: The model's label values -> its names for them; ``None`` when the model does not say.
    labels: Mapping[int, str] | None

    def predict(self, ct: sitk.Image) -> np.ndarray:
        """Integer label array ``(z, y, x)`` on the grid of ``ct``."""
        ...


def require(module: str, extra: str) -> ModuleType:
    """Import an optional dependency or say which radnode extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExternalModelError(
            f"this model needs the Python package {module!r}, which is not installed: "
            f"install radnode[{extra}] (e.g. pip install 'radnode[{extra}]', or make install) ({exc})"
        ) from exc


def read_json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON file as a dict; anything else is an :class:`ExternalModelError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExternalModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ExternalModelError(f"{path}: must hold a JSON object")
    return data


def combined_sha256(files: Mapping[str, str]) -> str:
    """One checksum for a set of weight files: the file's own for one file, else the
    SHA-256 of their ``sha256sum``-style lines (``<sha>  <name>``, sorted by name)."""
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_label_map(label_map: Mapping[str, list[int]], labels: Mapping[int, str] | None, where: str) -> None:
    """Fail when the label map names a value the model does not produce (when the model says which it does)."""
    if not label_map:
        known = "unknown" if labels is None else ", ".join(f"{v}: {n}" for v, n in sorted(labels.items()))
        raise ExternalModelError(
            f"{where}: models.label_map is required for this model (radnode region -> its label value, "
            f"e.g. {{tumour: 1}}); the model's labels are {known}"
        )
    if labels is None:
        return
    for region, values in label_map.items():
        unknown = [v for v in values if v not in labels]
        if unknown:
            listed = ", ".join(f"{v}: {n}" for v, n in sorted(labels.items()))
            raise ExternalModelError(
                f"{where}: models.label_map {region}: {unknown} is not a label of this model; its labels are {listed}"
            )
        background = [v for v in values if labels.get(v, "").lower() == "background"]
        if background:
            raise ExternalModelError(f"{where}: models.label_map {region}: label {background} is the model's background")


def split_labels(labels: np.ndarray, label_map: Mapping[str, list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's label array -> (tumour mask, lung labels 1 right / 2 left or ``None`` when not mapped)."""
    tumour = np.isin(labels, label_map["tumour"])
    if "lung_right" not in label_map and "lung_left" not in label_map:
        return tumour, None
    lungs = np.zeros(labels.shape, dtype=np.uint8)
    lungs[np.isin(labels, label_map.get("lung_right", []))] = RIGHT_LUNG
    lungs[np.isin(labels, label_map.get("lung_left", []))] = LEFT_LUNG
    return tumour, lungs


def reorient(ct: sitk.Image, orientation: str) -> sitk.Image:
    """``ct`` with its voxel axes permuted/flipped to ``orientation`` (DICOM letters, e.g. LPS)."""
    return sitk.DICOMOrient(ct, orientation.upper())


def labels_to_ct(labels: sitk.Image, ct: sitk.Image) -> np.ndarray:
    """Nearest-neighbour resampling of a label image (any grid, same patient space) onto the CT grid.

    On an identical grid (the usual case after an adapter undid its own reorientation) this
    copies the voxels; it is the one place where physical coordinates decide, so a flipped
    or permuted label image still lands where it belongs.
    """
    resampled = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def array_on(reference: sitk.Image, array_zyx: np.ndarray) -> sitk.Image:
    """``array_zyx`` as an image with the grid of ``reference``."""
    image = sitk.GetImageFromArray(array_zyx)
    image.CopyInformation(reference)
    return image
