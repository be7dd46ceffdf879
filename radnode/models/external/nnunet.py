"""nnU-Net v2 trained-model folders, run through the ``nnunetv2`` package's own predictor.

The folder is what nnU-Net's training writes (``nnUNet_results/DatasetNNN_Name/
<trainer>__<plans>__<configuration>``): ``plans.json``, ``dataset.json`` and
``fold_N/checkpoint_final.pth`` per trained fold. The folds present (or those configured in
``models.nnunet.folds``) are ensembled by :class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`.

Geometry: nnU-Net takes a ``(channel, z, y, x)`` array with the spacing in that same
``(z, y, x)`` order, exactly what its ``SimpleITKIO`` reader makes of an image file; it
does not look at origin or direction, so the voxel *orientation* must be the one the model
was trained on. radnode reorients the CT to that orientation (``models.nnunet.orientation``;
by default LPS, how SimpleITK reads a DICOM or NIfTI file of an axial CT, or RAS for
plans that use ``NibabelIOWithReorient``), lets the predictor resample to the plans'
spacing and back, and maps the returned labels back onto the CT grid through physical
coordinates (:func:`radnode.models.external.common.labels_to_ct`).

nnU-Net loads checkpoints with pickle (``weights_only=False``): point radnode only at
folders you trust. Each checkpoint's SHA-256 is recorded in every output, and each is
checked to be an intact PyTorch archive before nnU-Net opens it, so a truncated copy fails
with a message that names the file instead of deep inside the unpickler.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from radnode.config.model import NnUNetSettings
from radnode.models.checksums import sha256_file
from radnode.models.external.common import (
    ExternalModelError,
    Provenance,
    array_on,
    combined_sha256,
    labels_to_ct,
    read_json_object,
    reorient,
    require,
)

log = logging.getLogger(__name__)

PLANS = "plans.json"
DATASET = "dataset.json"
FOLD = re.compile(r"^fold_(\d+|all)$")
#: Plans' reader that reorients to RAS before the network sees the image.
REORIENTING_READERS = {"NibabelIOWithReorient"}


def looks_like_nnunet(folder: Path) -> bool:
    """A folder with plans.json and dataset.json (and usually fold_N/): nnU-Net's training output."""
    return (folder / PLANS).is_file() or ((folder / DATASET).is_file() and any(_fold_dirs(folder)))


def _fold_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and FOLD.match(p.name)) if folder.is_dir() else []


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExternalModelError(
            f"{path}: missing; an nnU-Net v2 trained-model folder holds {PLANS}, {DATASET} and "
            f"fold_N/checkpoint_final.pth (models.segmentation_bundle = {folder})"
        )
    return read_json_object(path)


def model_labels(dataset: Mapping[str, Any], where: Path) -> dict[int, str] | None:
    """dataset.json ``labels`` (name -> value) as value -> name; ``None`` for region-based labels."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ExternalModelError(f"{where}: field 'labels' is missing (name -> label value, e.g. {{\"background\": 0}})")
    if any(isinstance(v, list) for v in labels.values()):
        order = dataset.get("regions_class_order")
        if not isinstance(order, list):
            return None
        names = [n for n, v in labels.items() if isinstance(v, list)]
        return {int(v): names[i] if i < len(names) else f"region {v}" for i, v in enumerate(order)}
    try:
        return {int(v): str(n) for n, v in labels.items()}
    except (TypeError, ValueError) as exc:
        raise ExternalModelError(f"{where}: field 'labels' must map names to integer values ({exc})") from exc


def _check_checkpoint(path: Path) -> None:
    """An intact torch zip archive (``torch.save``'s format), or a clear error naming the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExternalModelError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {exc})") from exc
    if bad is not None:
        raise ExternalModelError(f"{path}: corrupt PyTorch checkpoint (member {bad!r} fails its CRC check)")


def select_folds(folder: Path, settings: NnUNetSettings) -> list[int | str]:
    """The folds to ensemble: those configured (each must exist), else every fold with the checkpoint."""
    present = {p.name.removeprefix("fold_"): p for p in _fold_dirs(folder) if (p / settings.checkpoint).is_file()}
    if settings.folds is not None:
        missing = [f for f in settings.folds if str(f) not in present]
        if missing:
            raise ExternalModelError(
                f"{folder}: fold(s) {missing} of models.nnunet.folds have no fold_N/{settings.checkpoint}; "
                f"present: {sorted(present) or 'none'}"
            )
        return [f if f == "all" else int(f) for f in settings.folds]
    if not present:
        raise ExternalModelError(
            f"{folder}: no fold_N/{settings.checkpoint} found (an nnU-Net v2 trained-model folder has one per "
            "trained fold; set models.nnunet.checkpoint if yours is called otherwise)"
        )
    folds = sorted(k for k in present if k != "all")
    return [int(f) for f in folds] if folds else ["all"]


class NnUNetModel:
    """A loaded nnU-Net v2 model folder (see the module docstring)."""

    def __init__(self, folder: Path, settings: NnUNetSettings, device: str = "cpu") -> None:
        self.folder = folder
        if not folder.is_dir():
            raise ExternalModelError(f"{folder}: no such nnU-Net v2 model folder")
        plans = _read_json(folder / PLANS, folder)
        dataset = _read_json(folder / DATASET, folder)
        self.labels = model_labels(dataset, folder / DATASET)
        self.folds = select_folds(folder, settings)
        files: dict[str, str] = {}
        for fold in self.folds:
            path = folder / f"fold_{fold}" / settings.checkpoint
            _check_checkpoint(path)
            files[f"fold_{fold}/{settings.checkpoint}"] = sha256_file(path)
        reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
        self.orientation = (settings.orientation or ("RAS" if reader in REORIENTING_READERS else "LPS")).upper()
        self.predictor = self._predictor(settings, device)
        dataset_name = str(plans.get("dataset_name", folder.parent.name))
        version = dataset.get("release") or dataset.get("version") or f"sha256:{combined_sha256(files)[:12]}"
        configuration = self.predictor.configuration_manager
        self.provenance = Provenance(
            format="nnunetv2",
            name=f"nnunetv2-{dataset_name}-{folder.name.split('__')[-1]}",
            version=str(version),
            weights_sha256=combined_sha256(files),
            files=files,
            details={
                "folder": folder.name,
                "trainer": self.predictor.trainer_name,
                "folds": [str(f) for f in self.folds],
                "orientation": self.orientation,
                "model_spacing_zyx": list(configuration.spacing),
                "nnunetv2": _package_version("nnunetv2"),
            },
        )

    def _predictor(self, settings: NnUNetSettings, device: str) -> Any:
        with _quiet():  # nnU-Net prints notices (nnUNet_raw not set, device) on stdout
            require("nnunetv2", "nnunet")
            return self._initialised(settings, device)

    def _initialised(self, settings: NnUNetSettings, device: str) -> Any:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            tile_step_size=settings.tile_step_size,
            use_gaussian=True,
            use_mirroring=settings.mirroring,
            perform_everything_on_device=device == "cuda",
            device=torch.device(device),
            verbose=False,
            allow_tqdm=False,
        )
        try:
            predictor.initialize_from_trained_model_folder(str(self.folder), tuple(self.folds), settings.checkpoint)
        except Exception as exc:  # nnU-Net raises anything from KeyError to RuntimeError here
            raise ExternalModelError(
                f"{self.folder}: nnU-Net could not load folds {self.folds} ({type(exc).__name__}: {exc}); "
                f"check that {PLANS}, {DATASET} and the checkpoints come from the same training"
            ) from exc
        return predictor

    def predict(self, ct: sitk.Image) -> np.ndarray:
        """nnU-Net's label array for ``ct``, on the CT grid ``(z, y, x)``."""
        oriented = reorient(ct, self.orientation)
        image, properties = nnunet_input(oriented)
        with _quiet():
            seg = np.asarray(self.predictor.predict_single_npy_array(image, properties))
        if seg.shape != image.shape[1:]:
            raise ExternalModelError(f"{self.folder}: nnU-Net returned shape {seg.shape} for input {image.shape[1:]}")
        return labels_to_ct(array_on(oriented, seg.astype(np.int32)), ct)


def nnunet_input(image: sitk.Image) -> tuple[np.ndarray, dict[str, list[float]]]:
    """An image as nnU-Net's SimpleITKIO hands it over: ``(1, z, y, x)`` float32 and spacing ``(z, y, x)``."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)[None]
    return array, {"spacing": [float(s) for s in image.GetSpacing()[::-1]]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """nnU-Net's print()s go to the debug log instead of radnode's stdout (the CLI's output)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if buffer.getvalue().strip():
            log.debug("nnU-Net: %s", buffer.getvalue().strip())


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
