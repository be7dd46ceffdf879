"""Segmentation models hospitals already have: nnU-Net v2 model folders and MONAI bundles.

``models.segmentation_bundle`` may name such a folder instead of a radnode bundle;
``models.segmentation_format`` says which kind it is (``auto``: from the folder's content,
see :func:`detect_format`) and ``models.label_map`` which of the model's label values are
radnode's tumour (and, optionally, lungs). Each format has its own small adapter module
(:mod:`.nnunet`, :mod:`.monai_bundle`) that returns labels on the CT grid; this module turns
them into the chain's :class:`~radnode.models.tumour.TumourSegmentation` with the model's
name, version and weights checksum, which the chain writes into every object.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from radnode.config.model import ModelSettings
from radnode.models.external.common import ExternalModel, ExternalModelError, Provenance, check_label_map, split_labels

if TYPE_CHECKING:
    from radnode.models.tumour import TumourSegmentation

__all__ = ["ExternalModelError", "Provenance", "detect_format", "load_external", "external_tumour"]

log = logging.getLogger(__name__)

EXTERNAL_FORMATS = ("nnunetv2", "monai")


def detect_format(path: Path) -> str:
    """``radnode`` (bundle.json or a zip), ``nnunetv2`` (plans.json / fold_N) or ``monai`` (configs/)."""
    from radnode.models.external.monai_bundle import looks_like_monai
    from radnode.models.external.nnunet import looks_like_nnunet

    if not path.is_dir() or (path / "bundle.json").is_file():
        return "radnode"  # a zip or a missing path: the radnode loader gives its own clear error
    if looks_like_nnunet(path):
        return "nnunetv2"
    if looks_like_monai(path):
        return "monai"
    return "radnode"


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_external(path: Path, fmt: str, models: ModelSettings) -> ExternalModel:
    """Load and check an external model (files, checkpoints, label map) or raise :class:`ExternalModelError`."""
    device = resolve_device(models.device)
    if fmt == "nnunetv2":
        from radnode.models.external.nnunet import NnUNetModel

        model: ExternalModel = NnUNetModel(path, models.nnunet, device)
    elif fmt == "monai":
        from radnode.models.external.monai_bundle import MonaiBundleModel

        model = MonaiBundleModel(path, device)
    else:
        raise ExternalModelError(f"{path}: unknown external model format {fmt!r}; known: {EXTERNAL_FORMATS}")
    check_label_map(models.label_map, model.labels, f"{path} ({fmt})")
    return model


def external_tumour(
    ct: sitk.Image, path: Path, fmt: str, models: ModelSettings, expected_sha256: str | None = None
) -> TumourSegmentation:
    """Run an external model on ``ct`` and return radnode's tumour (and lungs, when mapped).

    ``expected_sha256`` (``models.segmentation_sha256``) pins the model's weights digest, as
    for radnode bundles: weights replaced on disk are refused before they run.
    """
    from radnode.models.tumour import TumourSegmentation

    start = time.perf_counter()
    model = load_external(path, fmt, models)
    loaded = time.perf_counter()
    if expected_sha256 is not None and model.provenance.weights_sha256 != expected_sha256:
        raise ExternalModelError(
            f"{path}: weights sha256 {model.provenance.weights_sha256} is not the pinned "
            f"models.segmentation_sha256 {expected_sha256}"
        )
    labels = model.predict(ct)
    done = time.perf_counter()
    if labels.shape != sitk.GetArrayViewFromImage(ct).shape:
        raise ExternalModelError(f"{path}: labels of shape {labels.shape} do not fit the CT")
    tumour, lungs = split_labels(labels, models.label_map)
    found = sorted(int(v) for v in np.unique(labels) if v)
    unmapped = [v for v in found if not any(v in values for values in models.label_map.values())]
    prov = model.provenance
    notes = [f"{fmt} model {prov.name} {prov.version} (weights sha256 {prov.weights_sha256})"]
    if unmapped:
        notes.append(f"model labels {unmapped} are not in models.label_map and were not used")
    if lungs is not None:
        notes.append("lungs from the external model (models.label_map), replacing the classical lung mask")
    log.info("external %s model %s %s: labels %s, %.1f s", fmt, prov.name, prov.version, found, done - start)
    return TumourSegmentation(
        mask=tumour,
        method=prov.name,
        version=prov.version,
        demo=False,
        notes=notes,
        timings={"load": loaded - start, "predict": done - loaded},
        weights_sha256=prov.weights_sha256,
        checksum=prov.weights_sha256,
        provenance=prov.summary(),
        lungs=lungs,
    )
