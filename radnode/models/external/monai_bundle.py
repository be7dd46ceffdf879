"""MONAI bundles, run with the bundle's own inference configuration.

A MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html) holds
``configs/inference.json`` (or ``.yaml``), ``configs/metadata.json`` (name, version, the
output channels) and ``models/model.pt`` (a state_dict for the config's ``network_def``) or
``models/model.ts`` (TorchScript). radnode parses the config with
:class:`monai.bundle.ConfigParser` and runs its ``preprocessing``, ``inferer`` and
``postprocessing`` items on the CT, so the bundle's own loading, orientation, spacing and
intensity transforms (and its ``Invertd``, when it has one) decide the geometry, exactly as
in the bundle author's own evaluation.

The CT goes in as a NIfTI file (written by SimpleITK with its full geometry) because a
bundle's first transform is ``LoadImaged`` on a path; the prediction comes back as a
``MetaTensor`` whose affine says where its voxels are, and is mapped onto the CT grid
through physical coordinates, whether or not the bundle inverted its own resampling.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from radnode.models.checksums import sha256_file
from radnode.models.external.common import ExternalModelError, Provenance, labels_to_ct, read_json_object

log = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA = "metadata.json"
WEIGHT_FILES = ("model.pt", "model.ts")
#: LPS (DICOM, SimpleITK) <-> RAS (MONAI, NIfTI affines): flip the first two axes.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


def looks_like_monai(folder: Path) -> bool:
    """A folder with configs/inference.(json|yaml) or configs/metadata.json: a MONAI bundle."""
    configs = folder / "configs"
    return any((configs / n).is_file() for n in (*CONFIG_NAMES, METADATA))


def _metadata(folder: Path) -> dict[str, Any]:
    path = folder / "configs" / METADATA
    if not path.is_file():
        return {}
    return read_json_object(path)


def channel_labels(metadata: Mapping[str, Any]) -> dict[int, str] | None:
    """metadata ``network_data_format.outputs.<first>.channel_def`` as label value -> name, if given."""
    outputs = (metadata.get("network_data_format") or {}).get("outputs") or {}
    for output in outputs.values():
        channels = output.get("channel_def") if isinstance(output, dict) else None
        if isinstance(channels, dict) and channels:
            try:
                return {int(k): str(v) for k, v in channels.items()}
            except (TypeError, ValueError):
                return None
    return None


def _input_key(metadata: Mapping[str, Any]) -> str:
    inputs = (metadata.get("network_data_format") or {}).get("inputs") or {}
    return next(iter(inputs), "image")


def _state_dict(blob: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(blob, Mapping) and not all(isinstance(v, torch.Tensor) for v in blob.values()):
        for key in ("model", "state_dict", "network"):
            if isinstance(blob.get(key), Mapping):
                blob = blob[key]
                break
    if not isinstance(blob, Mapping) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ExternalModelError(f"{path}: must hold a state_dict (parameter name -> tensor) for network_def")
    return dict(blob)


class MonaiBundleModel:
    """A loaded MONAI bundle (see the module docstring)."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from monai.bundle import ConfigParser

        self.folder = folder
        if not folder.is_dir():
            raise ExternalModelError(f"{folder}: no such MONAI bundle folder")
        config = next((folder / "configs" / n for n in CONFIG_NAMES if (folder / "configs" / n).is_file()), None)
        if config is None:
            raise ExternalModelError(
                f"{folder}/configs: no {' or '.join(CONFIG_NAMES)}; a MONAI bundle needs its inference config"
            )
        metadata = _metadata(folder)
        self.labels = channel_labels(metadata)
        self.input_key = _input_key(metadata)
        self.device = torch.device(device)
        self.parser = ConfigParser()
        try:
            self.parser.read_config(str(config))
        except Exception as exc:
            raise ExternalModelError(f"{config}: cannot be read ({type(exc).__name__}: {exc})") from exc
        self.parser["bundle_root"] = str(folder)
        if "device" in self.parser:
            self.parser["device"] = f"$torch.device('{self.device}')"
        self.config = config
        self.network, weights = self._network()
        self._transforms(tempfile.gettempdir())  # fail at load, not on the first case
        sha = sha256_file(weights)
        name = metadata.get("name") or folder.name
        self.provenance = Provenance(
            format="monai",
            name=f"monai-{name}".replace(" ", "_"),
            version=str(metadata.get("version") or f"sha256:{sha[:12]}"),
            weights_sha256=sha,
            files={str(weights.relative_to(folder)): sha},
            details={"bundle": folder.name, "config": config.name, "monai": _monai_version()},
        )

    def _transforms(self, output_dir: str) -> tuple[Any, Any, Any]:
        """The bundle's preprocessing, inferer and postprocessing, with ``output_dir`` set first
        (a ``SaveImaged`` in the postprocessing then writes there, never into the bundle)."""
        if "output_dir" in self.parser:
            self.parser["output_dir"] = output_dir
        return (
            self._item("preprocessing", self.config),
            self._item("inferer", self.config),
            self._item("postprocessing", self.config, required=False),
        )

    def _item(self, key: str, config: Path, required: bool = True) -> Any:
        if key not in self.parser:
            if required:
                raise ExternalModelError(f"{config}: has no '{key}' item (a MONAI inference config defines it)")
            return None
        try:
            return self.parser.get_parsed_content(key, instantiate=True)
        except Exception as exc:
            raise ExternalModelError(f"{config}: item '{key}' cannot be built ({type(exc).__name__}: {exc})") from exc

    def _network(self) -> tuple[torch.nn.Module, Path]:
        models = self.folder / "models"
        present = [models / n for n in WEIGHT_FILES if (models / n).is_file()]
        if not present:
            raise ExternalModelError(f"{models}: no {' or '.join(WEIGHT_FILES)} (the bundle's weights)")
        state_path = models / "model.pt"
        if state_path in present and "network_def" in self.parser:
            network = self._item("network_def", self.folder / "configs")
            try:
                blob = torch.load(state_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ExternalModelError(f"{state_path}: not a readable PyTorch weights file ({exc})") from exc
            try:
                network.load_state_dict(_state_dict(blob, state_path), strict=True)
            except RuntimeError as exc:
                raise ExternalModelError(f"{state_path}: weights do not fit network_def ({exc})") from exc
            return network.to(self.device).eval(), state_path
        script = models / "model.ts"
        if script not in present:
            raise ExternalModelError(f"{state_path}: needs a 'network_def' item in the inference config")
        try:
            return torch.jit.load(str(script), map_location=self.device).eval(), script
        except Exception as exc:
            raise ExternalModelError(f"{script}: not a readable TorchScript model ({exc})") from exc

    def predict(self, ct: sitk.Image) -> np.ndarray:
        """The bundle's label array for ``ct``, on the CT grid ``(z, y, x)``."""
        with tempfile.TemporaryDirectory(prefix="radnode-monai-") as tmp:
            image_path = Path(tmp) / "ct.nii"
            sitk.WriteImage(ct, str(image_path))
            preprocessing, inferer, postprocessing = self._transforms(tmp)
            try:
                data = preprocessing({self.input_key: str(image_path)})
                batch = data[self.input_key][None].to(self.device)
                with torch.no_grad():
                    data["pred"] = inferer(batch, self.network)[0].cpu()
                if postprocessing is not None:
                    data = postprocessing(data)
            except Exception as exc:
                raise ExternalModelError(
                    f"{self.folder}: the bundle's inference failed ({type(exc).__name__}: {exc})"
                ) from exc
        return labels_to_ct(prediction_image(data["pred"], self.folder), ct)


def prediction_image(pred: Any, folder: Path) -> sitk.Image:
    """A MONAI prediction (channel-first MetaTensor, RAS affine) as an LPS SimpleITK label image."""
    affine = getattr(pred, "affine", None)
    if affine is None:
        raise ExternalModelError(f"{folder}: the bundle's prediction carries no affine (keep MONAI's MetaTensor)")
    array = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    if array.ndim == 4:
        array = array[0] if array.shape[0] == 1 else np.argmax(array, axis=0)
    if array.ndim != 3:
        raise ExternalModelError(f"{folder}: expected a 3-D prediction, got shape {array.shape}")
    labels = np.rint(array).astype(np.int32)
    affine = np.asarray(affine, dtype=float)
    matrix = _RAS_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))  # (x, y, z) -> (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (matrix / spacing).flatten()])
    image.SetOrigin([float(v) for v in _RAS_LPS @ affine[:3, 3]])
    return image


def _monai_version() -> str:
    import monai

    return str(monai.__version__)
