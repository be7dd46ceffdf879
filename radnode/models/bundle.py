"""Model bundles: RA-Seg weights plus everything needed to use them correctly.

A bundle is a directory, or a zip of one, holding the weights and ``bundle.json``::

    {
      "format": "radnode-bundle", "format_version": 1,
      "name": "raseg-demo", "version": "0.1.0",
      "architecture": {"name": "RA-Seg", "channels": [...], ...},
      "preprocessing": {"hu_min": -200, "hu_max": 250, "target_spacing_zyx": [1.5, 1, 1], ...},
      "inference": {"roi_size": [64, 96, 96], "overlap": 0.25},      (optional defaults)
      "training_data": "what the model was trained on",
      "metrics": {"dice_mean": 0.81, ...},
      "intended_use": "research only, not for diagnosis",
      "demo": true,
      "weights": {"file": "weights.safetensors", "sha256": "<64 hex>"}
    }

Weights are a flat state_dict as ``.safetensors`` (preferred: no pickle, so loading runs no
code) or a torch ``.pt``/``.pth`` file (loaded with ``weights_only=True``).

Loading verifies, in order, and stops at the first problem with a :class:`BundleError`
that names the bundle, the file or the ``bundle.json`` field and what was expected: the
JSON and its required fields and types; the architecture parameters; the weights file's
presence and SHA-256 (against ``bundle.json`` and, when the settings pin one,
``models.segmentation_sha256``: a weights file replaced together with the hash beside it
is refused); the weights' keys and shapes against the architecture. A bundle
that loads is therefore exactly the network that was saved. Unknown top-level fields are
kept (``BundleMeta.extra``) so that later writers may add information without breaking
older readers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from radnode import durable
from radnode.models.inference import InferenceSettings
from radnode.models.preprocess import PreprocessError, PreprocessParams
from radnode.models.raseg import RASeg, RASegConfig

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "radnode-bundle"
BUNDLE_FORMAT_VERSION = 1
#: Weight-file suffixes and the loader each selects.
WEIGHT_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

#: Required top-level fields and their JSON types (what the error message says is allowed).
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (str,),
    "architecture": (dict,),
    "preprocessing": (dict,),
    "training_data": (str,),
    "metrics": (dict,),
    "intended_use": (str,),
    "demo": (bool,),
    "weights": (dict,),
}
_TYPE_NAMES = {str: "a string", dict: "an object", bool: "true or false"}


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or does not fit this build."""


@dataclass(frozen=True)
class BundleMeta:
    """The validated content of ``bundle.json``."""

    name: str
    version: str
    architecture: RASegConfig
    preprocessing: PreprocessParams
    training_data: str
    metrics: dict[str, Any]
    intended_use: str
    demo: bool
    weights_file: str
    weights_sha256: str
    inference: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``bundle.json`` mapping."""
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "inference": self.inference,
            "training_data": self.training_data,
            "metrics": self.metrics,
            "intended_use": self.intended_use,
            "demo": self.demo,
            "weights": {"file": self.weights_file, "sha256": self.weights_sha256},
            **self.extra,
        }

    @property
    def checksum(self) -> str:
        """SHA-256 over the whole ``bundle.json`` content (which holds the weights' SHA-256).

        Retrained weights, other preprocessing or inference defaults: another checksum,
        hence another Device UID in every object the bundle contributes to.
        """
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return sha256_hex(text.encode("utf-8"))


@dataclass
class Bundle:
    """A loaded bundle: validated metadata and the network with its weights (eval mode)."""

    path: Path
    meta: BundleMeta
    model: RASeg

    def inference_settings(self, **overrides: Any) -> InferenceSettings:
        """Inference settings from the bundle's ``inference`` defaults plus ``overrides``."""
        try:
            return InferenceSettings.from_dict(self.meta.inference, **overrides)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{self.path}: bundle.json field 'inference': {exc}") from exc


class _Source:
    """Reads files of a bundle, whether a directory or a zip (optionally one folder deep)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if path.is_dir():
            return
        if not path.exists():
            raise BundleError(f"{path}: no such bundle (a directory or .zip holding {BUNDLE_FILE})")
        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path}: a bundle must be a directory or a .zip file")
        self._zip = zipfile.ZipFile(path)
        names = [n for n in self._zip.namelist() if PurePosixPath(n).name == BUNDLE_FILE]
        shallow = [n for n in names if len(PurePosixPath(n).parts) <= 2]
        if len(shallow) != 1:
            raise BundleError(
                f"{path}: expected exactly one {BUNDLE_FILE} at the top of the zip or one folder "
                f"deep, found {shallow or 'none'}"
            )
        self._prefix = str(PurePosixPath(shallow[0]).parent).lstrip(".")

    def where(self, name: str) -> str:
        """How to name ``name`` in an error message."""
        if self._zip is None:
            return str(self.path / name)
        return f"{self.path}!{self._prefix + '/' if self._prefix else ''}{name}"

    def read(self, name: str) -> bytes:
        if self._zip is None:
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"{file}: file missing from bundle")
            return file.read_bytes()
        member = f"{self._prefix}/{name}" if self._prefix else name
        try:
            return self._zip.read(member)
        except KeyError:
            raise BundleError(f"{self.where(name)}: file missing from bundle") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def sha256_hex(data: bytes) -> str:
    """Lower-case hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _field_error(source: _Source, name: str, problem: str) -> BundleError:
    return BundleError(f"{source.where(BUNDLE_FILE)}: field '{name}' {problem}")


def _parse_meta(source: _Source) -> BundleMeta:
    raw = source.read(BUNDLE_FILE)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source.where(BUNDLE_FILE)}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{source.where(BUNDLE_FILE)}: must hold a JSON object")
    fmt = data.get("format", BUNDLE_FORMAT)
    if fmt != BUNDLE_FORMAT:
        raise _field_error(source, "format", f"must be {BUNDLE_FORMAT!r}, got {fmt!r}")
    version = data.get("format_version", BUNDLE_FORMAT_VERSION)
    if version != BUNDLE_FORMAT_VERSION:
        raise _field_error(source, "format_version", f"is {version!r}; this build reads {BUNDLE_FORMAT_VERSION}")
    for key, types in REQUIRED_FIELDS.items():
        if key not in data:
            raise _field_error(source, key, "is missing (required)")
        if not isinstance(data[key], types):
            raise _field_error(source, key, f"must be {_TYPE_NAMES[types[0]]}, got {type(data[key]).__name__}")
    weights = data["weights"]
    for key in ("file", "sha256"):
        if not isinstance(weights.get(key), str):
            raise _field_error(source, f"weights.{key}", "is missing or not a string (required)")
    file = PurePosixPath(weights["file"])
    if file.is_absolute() or ".." in file.parts or len(file.parts) != 1:
        raise _field_error(
            source, "weights.file", f"must be a plain file name inside the bundle, got {weights['file']!r}"
        )
    if file.suffix not in WEIGHT_FORMATS:
        raise _field_error(
            source, "weights.file", f"must end in one of {sorted(WEIGHT_FORMATS)}, got {weights['file']!r}"
        )
    if not _SHA256.match(weights["sha256"]):
        raise _field_error(source, "weights.sha256", "must be 64 lower-case hex digits")
    try:
        architecture = RASegConfig.from_dict(data["architecture"])
    except (TypeError, ValueError) as exc:
        raise _field_error(source, "architecture", f"is invalid: {exc}") from exc
    try:
        preprocessing = PreprocessParams.from_dict(data["preprocessing"])
    except (TypeError, ValueError, PreprocessError) as exc:
        raise _field_error(source, "preprocessing", f"is invalid: {exc}") from exc
    inference = data.get("inference", {})
    if not isinstance(inference, dict):
        raise _field_error(source, "inference", "must be an object")
    known = set(REQUIRED_FIELDS) | {"format", "format_version", "inference"}
    return BundleMeta(
        name=data["name"],
        version=data["version"],
        architecture=architecture,
        preprocessing=preprocessing,
        training_data=data["training_data"],
        metrics=data["metrics"],
        intended_use=data["intended_use"],
        demo=data["demo"],
        weights_file=weights["file"],
        weights_sha256=weights["sha256"],
        inference=inference,
        extra={k: v for k, v in data.items() if k not in known},
    )


def read_bundle_meta(path: str | os.PathLike[str]) -> BundleMeta:
    """Validate and return a bundle's ``bundle.json`` without reading the weights."""
    source = _Source(Path(path))
    try:
        return _parse_meta(source)
    finally:
        source.close()


def _decode_weights(blob: bytes, name: str, where: str) -> dict[str, torch.Tensor]:
    fmt = WEIGHT_FORMATS[PurePosixPath(name).suffix]
    try:
        if fmt == "safetensors":
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoder failure means an unreadable file
        raise BundleError(f"{where}: cannot read {fmt} weights ({exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"{where}: must hold a flat state_dict (parameter name -> tensor)")
    return dict(state)


def _check_state(model: RASeg, state: Mapping[str, torch.Tensor], where: str, config: RASegConfig) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} with other shapes (e.g. {k}: file {got[k]} vs architecture {expected[k]})")
    raise BundleError(
        f"{where}: weights do not match bundle.json field 'architecture' "
        f"(channels {list(config.channels)}, strides {list(config.strides)}, "
        f"convlstm_layers {config.convlstm_layers}, attention {config.attention}): " + "; ".join(parts)
    )


def _read_verified(path: Path, expected_sha256: str | None) -> tuple[BundleMeta, bytes, str]:
    """``bundle.json``, the weights and where they are, once the weights match both the
    JSON's ``weights.sha256`` and the pin (``models.segmentation_sha256``)."""
    source = _Source(path)
    try:
        meta = _parse_meta(source)
        blob = source.read(meta.weights_file)
        where = source.where(meta.weights_file)
    finally:
        source.close()
    actual = sha256_hex(blob)
    if actual != meta.weights_sha256:
        raise BundleError(
            f"{where}: SHA-256 {actual} does not match bundle.json field 'weights.sha256' "
            f"({meta.weights_sha256}); the weights were changed or corrupted"
        )
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise BundleError(
            f"{where}: SHA-256 {actual} is not the pinned {expected_sha256.lower()} "
            "(models.segmentation_sha256); the bundle was replaced"
        )
    return meta, blob, where


def verify_bundle(path: str | os.PathLike[str], expected_sha256: str | None = None) -> BundleMeta:
    """Check ``bundle.json`` and the weights' SHA-256 (and the pin) without building the network."""
    return _read_verified(Path(path), expected_sha256)[0]


def load_bundle(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", expected_sha256: str | None = None
) -> Bundle:
    """Load and verify a bundle (see the module docstring for the checks).

    Parameters
    ----------
    path
        Bundle directory or zip.
    device
        Where to put the model.
    expected_sha256
        Pinned SHA-256 of the weights file (``models.segmentation_sha256``), if any.

    Raises
    ------
    BundleError
        Naming the file or field at fault and what is allowed.
    """
    path = Path(path)
    meta, blob, where = _read_verified(path, expected_sha256)
    state = _decode_weights(blob, meta.weights_file, where)
    model = RASeg(meta.architecture)
    _check_state(model, state, where, meta.architecture)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    log.info("loaded bundle %s %s (demo=%s) from %s", meta.name, meta.version, meta.demo, path)
    return Bundle(path=path, meta=meta, model=model)


def _encode_weights(model: RASeg, fmt: str) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save as save_safetensors

        return save_safetensors(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_bundle(
    model: RASeg,
    path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    training_data: str,
    metrics: Mapping[str, Any],
    intended_use: str,
    demo: bool,
    preprocessing: PreprocessParams | None = None,
    inference: InferenceSettings | Mapping[str, Any] | None = None,
    weights_format: str = "safetensors",
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bundle; a ``path`` ending in ``.zip`` gives a zip, else a directory.

    The bundle is assembled in a temporary folder beside ``path`` and renamed into place,
    so a crash never leaves half a bundle. Returns ``path``.
    """
    path = Path(path)
    if weights_format not in ("safetensors", "torch"):
        raise BundleError(f"weights_format: 'safetensors' or 'torch', got {weights_format!r}")
    if path.exists() and not overwrite:
        raise BundleError(f"{path}: already exists (pass overwrite=True to replace it)")
    reserved = set(REQUIRED_FIELDS) | {"format", "format_version", "inference"}
    clashes = sorted(reserved & set(extra or {}))
    if clashes:
        raise BundleError(f"extra: {clashes} are bundle.json fields with their own arguments")
    weights_file = "weights.safetensors" if weights_format == "safetensors" else "weights.pt"
    blob = _encode_weights(model, weights_format)
    if isinstance(inference, InferenceSettings):
        inference = inference.to_dict()
    meta = BundleMeta(
        name=name,
        version=version,
        architecture=model.config,
        preprocessing=preprocessing or PreprocessParams(),
        training_data=training_data,
        metrics=dict(metrics),
        intended_use=intended_use,
        demo=demo,
        weights_file=weights_file,
        weights_sha256=sha256_hex(blob),
        inference=dict(inference or {}),
        extra={"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **dict(extra or {})},
    )
    document = json.dumps(meta.to_dict(), indent=2).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if path.suffix == ".zip":
            target = staging / path.name
            with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(BUNDLE_FILE, document)
                archive.writestr(weights_file, blob)
        else:
            target = staging / "bundle"
            target.mkdir()
            (target / BUNDLE_FILE).write_bytes(document)
            (target / weights_file).write_bytes(blob)
        if path.exists() and not path.is_dir() and target.is_dir():
            path.unlink()  # a zip bundle replaced by a folder one
        durable.replace_tree(target, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved bundle %s %s to %s", name, version, path)
    return path
