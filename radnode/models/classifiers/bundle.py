"""Classifier bundles: a directory with a skops model and ``classifier.json``.

Layout::

    BUNDLE/
      classifier.json   # schema, endpoint, method, features (in order), training cohort,
                        # CV metrics, calibration, package versions, demo flag, model file
                        # and its sha256
      model.skops       # fitted scikit-learn estimator whose predict_proba is calibrated

The model is stored with ``skops.io``, which rebuilds an estimator from an allow-list of
types instead of unpickling: loading runs no code from the file. Trusted are skops' defaults
(scikit-learn estimators, numpy), scikit-learn's other classes, and radnode's
:data:`TRUSTED_RADNODE_TYPES`; a file that needs any other type or any function is refused,
naming it.

Loading checks, in order: the schema; that the JSON carries the model file's SHA-256
(required: a bundle without one is refused); the file's digest against it and, when the
settings pin one (``models.classifier_sha256``), against the pin -- so a model file
replaced together with the hash beside it is refused; the types in the file; that the
model takes as many inputs as the JSON lists features. Older bundles hold
``model.joblib`` (a pickle): they load only after both hash checks passed, with a warning
to re-save them (``radnode train classifier`` writes skops).

Prediction checks the input's feature names against the bundle's: a missing feature
always fails and the message lists them; extra features fail too unless
``allow_extra=True`` (they are then ignored). NaN or infinite feature values fail with
a message naming the features and rows concerned: radnode does not impute, because a
silently imputed radiomics feature would give a confident-looking probability for a
tumour the extractor could not measure (a tumour of a few voxels, an empty ring).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import skops.io as sio

from radnode.models.checksums import sha256_file
from radnode.models.classifiers.endpoints import Endpoint, endpoint_from_mapping
from radnode.models.classifiers.table import FeatureTable

logger = logging.getLogger(__name__)

#: Schema identifier written to and required in ``classifier.json``.
SCHEMA = "radnode.classifier-bundle/1"
META_FILE = "classifier.json"
MODEL_FILE = "model.skops"
#: The pickled model file of bundles written before skops (loaded only when hash-verified).
LEGACY_MODEL_FILE = "model.joblib"
#: Model files a bundle may name, and how each is read.
MODEL_FORMATS = {MODEL_FILE: "skops", LEGACY_MODEL_FILE: "joblib"}
#: radnode's own estimator types a skops model file may contain (beyond skops' defaults).
TRUSTED_RADNODE_TYPES: tuple[str, ...] = ("radnode.models.classifiers.method_b.RadScoreTransformer",)
_SHA256_HEX = frozenset("0123456789abcdef")
#: Methods a bundle may declare.
METHODS = ("A", "B")
#: Packages whose versions a bundle records.
RECORDED_PACKAGES = ("radnode", "numpy", "scipy", "scikit-learn", "joblib", "skops")
#: At most this many offending rows are named in a NaN error.
_MAX_ROWS_NAMED = 10


class ClassifierBundleError(ValueError):
    """A bundle that cannot be read or used."""


class FeatureMismatchError(ClassifierBundleError):
    """Input features that do not match the bundle's feature list."""

    def __init__(self, bundle: str, missing: Sequence[str], extra: Sequence[str]) -> None:
        self.missing = list(missing)
        self.extra = list(extra)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {_short(self.missing)}")
        if self.extra:
            parts.append(f"{len(self.extra)} extra: {_short(self.extra)}")
        super().__init__(f"features do not match classifier bundle {bundle} ({'; '.join(parts)})")


class NaNFeatureError(ClassifierBundleError):
    """Feature values that are NaN or infinite."""

    def __init__(self, bundle: str, features: Sequence[str], rows: Sequence[int]) -> None:
        self.features = list(features)
        self.rows = list(rows)
        shown = ", ".join(str(r) for r in self.rows[:_MAX_ROWS_NAMED])
        more = f" and {len(self.rows) - _MAX_ROWS_NAMED} more" if len(self.rows) > _MAX_ROWS_NAMED else ""
        super().__init__(
            f"NaN or infinite feature values for classifier bundle {bundle}: features {_short(self.features)} "
            f"in input row(s) {shown}{more} (0-based); radnode does not impute features, so no probability "
            f"is given for these cases"
        )


def _short(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def package_versions() -> dict[str, str]:
    """Versions of the packages a pickled model depends on, plus Python's."""
    out = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


@dataclass(frozen=True)
class ClassifierMeta:
    """The content of ``classifier.json``."""

    endpoint: Endpoint
    method: str
    features: tuple[str, ...]
    training_cohort: dict[str, Any]
    cv_metrics: dict[str, Any]
    calibration: str
    demo: bool
    package_versions: dict[str, str] = field(default_factory=package_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    model_sha256: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    model_file: str = MODEL_FILE

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "demo": self.demo,
            "endpoint": self.endpoint.as_dict(),
            "method": self.method,
            "features": list(self.features),
            "training_cohort": self.training_cohort,
            "cv_metrics": self.cv_metrics,
            "calibration": self.calibration,
            "package_versions": self.package_versions,
            "created": self.created,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "details": self.details,
        }


@dataclass
class ClassifierBundle:
    """A loaded (or freshly trained) bundle."""

    meta: ClassifierMeta
    model: Any
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path else f"<{self.meta.endpoint.name} method {self.meta.method}>"

    @property
    def endpoint(self) -> Endpoint:
        return self.meta.endpoint

    @property
    def demo(self) -> bool:
        return self.meta.demo

    def check_features(self, names: Sequence[str], *, allow_extra: bool = False) -> None:
        """Raise :class:`FeatureMismatchError` unless ``names`` provides the bundle's features."""
        given = set(names)
        missing = [n for n in self.meta.features if n not in given]
        wanted = set(self.meta.features)
        extra = [n for n in names if n not in wanted] if not allow_extra else []
        if missing or extra:
            raise FeatureMismatchError(self.name, missing, extra)

    def matrix(self, table: FeatureTable, *, allow_extra: bool = False) -> np.ndarray:
        """The input matrix in the bundle's feature order, checked for names and NaN."""
        self.check_features(table.names, allow_extra=allow_extra)
        x = table.select(self.meta.features).values
        bad = ~np.isfinite(x)
        if bad.any():
            feats = [self.meta.features[j] for j in np.flatnonzero(bad.any(axis=0))]
            rows = [int(i) for i in np.flatnonzero(bad.any(axis=1))]
            raise NaNFeatureError(self.name, feats, rows)
        return x

    def predict_proba(self, table: FeatureTable, *, allow_extra: bool = False) -> np.ndarray:
        """Calibrated class probabilities ``(n, K)``, columns in ``endpoint.classes`` order."""
        return np.asarray(self.model.predict_proba(self.matrix(table, allow_extra=allow_extra)), dtype=np.float64)

    def predict_one(self, features: dict[str, float], *, allow_extra: bool = True) -> dict[str, float]:
        """Probabilities of one case given as ``{feature: value}`` (the chain's form)."""
        names = tuple(features)
        table = FeatureTable(("case",), names, np.array([[float(features[n]) for n in names]]))
        proba = self.predict_proba(table, allow_extra=allow_extra)[0]
        return {c: float(p) for c, p in zip(self.endpoint.classes, proba)}


def bundle_checksum(bundle: ClassifierBundle) -> str:
    """SHA-256 over ``classifier.json``'s content with the model file's own SHA-256 in it.

    Any change of the model file or of the metadata (features, endpoint, threshold ...)
    gives another checksum; the SR derives the classifier's Device UID from it.
    """
    data = bundle.meta.to_dict()
    if not data["model_sha256"] and bundle.path is not None:
        data["model_sha256"] = sha256_file(Path(bundle.path) / MODEL_FILE)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decision_threshold(meta: ClassifierMeta, default: float) -> float:
    """Probability threshold of the positive class: ``details.threshold`` when the bundle has one."""
    value = meta.details.get("threshold", default)
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ClassifierBundleError(f"classifier.json details.threshold {value!r} is not a number") from None
    if not 0.0 < threshold < 1.0:
        raise ClassifierBundleError(f"classifier.json details.threshold {threshold} is not in (0, 1)")
    return threshold


def save_classifier_bundle(bundle: ClassifierBundle, out_dir: str | os.PathLike[str], *,
                           overwrite: bool = False) -> Path:
    """Write ``bundle`` to ``out_dir`` (created; must be empty unless ``overwrite``)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"classifier bundle folder {out} is not empty (use overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    sio.dump(bundle.model, model_path, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    unknown = _untrusted_types(model_path)
    if unknown:
        model_path.unlink()
        raise ClassifierBundleError(f"the model holds types a bundle may not load: {unknown}; add radnode's own "
                                    "estimators to TRUSTED_RADNODE_TYPES")
    meta = ClassifierMeta(**{**bundle.meta.__dict__, "model_sha256": sha256_file(model_path), "model_file": MODEL_FILE})
    (out / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    bundle.meta, bundle.path = meta, out
    logger.info("classifier bundle written: %s (endpoint %s, method %s%s)", out, meta.endpoint.name,
                meta.method, ", DEMO" if meta.demo else "")
    return out


def read_classifier_meta(path: str | os.PathLike[str]) -> ClassifierMeta:
    """Parse and check ``classifier.json`` of a bundle folder (no model loaded)."""
    folder = Path(path)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ClassifierBundleError(f"{folder} is not a classifier bundle: {META_FILE} is missing")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClassifierBundleError(f"{meta_path}: not valid JSON ({exc})") from None
    if data.get("schema") != SCHEMA:
        raise ClassifierBundleError(f"{meta_path}: schema {data.get('schema')!r} is not {SCHEMA!r}")
    for key in ("endpoint", "method", "features", "demo"):
        if key not in data:
            raise ClassifierBundleError(f"{meta_path}: required field {key!r} is missing")
    if data["method"] not in METHODS:
        raise ClassifierBundleError(f"{meta_path}: method {data['method']!r} is not one of {METHODS}")
    features = data["features"]
    if not isinstance(features, list) or not features or len(set(features)) != len(features):
        raise ClassifierBundleError(f"{meta_path}: 'features' must be a non-empty list of distinct names")
    if not isinstance(data["demo"], bool):
        raise ClassifierBundleError(f"{meta_path}: 'demo' must be true or false")
    model_file = data.get("model_file", LEGACY_MODEL_FILE)
    if model_file not in MODEL_FORMATS:
        raise ClassifierBundleError(f"{meta_path}: 'model_file' {model_file!r} is not one of {sorted(MODEL_FORMATS)}")
    digest = data.get("model_sha256")
    if not _is_sha256(digest):
        raise ClassifierBundleError(f"{meta_path}: 'model_sha256' is missing or not 64 lower-case hex digits; "
                                    "a model that cannot be verified is never loaded")
    return ClassifierMeta(
        endpoint=endpoint_from_mapping(data["endpoint"]),
        method=data["method"],
        features=tuple(str(f) for f in features),
        training_cohort=dict(data.get("training_cohort") or {}),
        cv_metrics=dict(data.get("cv_metrics") or {}),
        calibration=str(data.get("calibration", "unknown")),
        demo=data["demo"],
        package_versions=dict(data.get("package_versions") or {}),
        created=str(data.get("created", "")),
        model_sha256=str(digest),
        details=dict(data.get("details") or {}),
        model_file=model_file,
    )


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256_HEX


def _trusted_type(name: str) -> bool:
    """radnode's own estimators, and scikit-learn *classes* (its internals such as
    ``_SigmoidCalibration`` or ``StratifiedKFold`` that skops does not list by default).

    A class is rebuilt from its stored attributes without running code from the file; a
    function (``os.system``, or any scikit-learn function) is never trusted.
    """
    if name in TRUSTED_RADNODE_TYPES:
        return True
    module_name, _, attr = name.rpartition(".")
    if not module_name.startswith("sklearn.") or not attr:
        return False
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return False
    return inspect.isclass(obj) and obj.__module__.startswith("sklearn.")


def _untrusted_types(model_path: Path) -> list[str]:
    """Types in a skops file that neither skops' defaults nor radnode trust."""
    return sorted(t for t in sio.get_untrusted_types(file=model_path) if not _trusted_type(t))


def verify_classifier_bundle(path: str | os.PathLike[str], expected_sha256: str | None = None) -> ClassifierMeta:
    """The bundle's metadata once its model file matches ``classifier.json`` and the pin.

    Reads only the JSON and hashes the model file (nothing is deserialised), so the chain
    can check every configured bundle before it starts a job.

    Raises
    ------
    ClassifierBundleError
        Naming the bundle folder and what is wrong.
    """
    folder = Path(path)
    meta = read_classifier_meta(folder)
    model_path = folder / meta.model_file
    if not model_path.is_file():
        raise ClassifierBundleError(f"{folder}: {meta.model_file} is missing")
    digest = sha256_file(model_path)
    if digest != meta.model_sha256:
        raise ClassifierBundleError(f"{model_path}: SHA-256 {digest[:12]}… differs from classifier.json "
                                    f"({meta.model_sha256[:12]}…); the model file was changed or damaged")
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ClassifierBundleError(f"{model_path}: SHA-256 {digest[:12]}… is not the pinned {expected_sha256[:12]}… "
                                    "(models.classifier_sha256); the bundle was replaced")
    return meta


def load_classifier_bundle(path: str | os.PathLike[str], expected_sha256: str | None = None) -> ClassifierBundle:
    """Load a bundle folder: JSON checks, model hash (and pin), trusted types, input count.

    Raises
    ------
    ClassifierBundleError
        Naming the bundle folder and what is wrong.
    """
    folder = Path(path)
    meta = verify_classifier_bundle(folder, expected_sha256)
    model_path = folder / meta.model_file
    if MODEL_FORMATS[meta.model_file] == "skops":
        unknown = _untrusted_types(model_path)
        if unknown:
            raise ClassifierBundleError(f"{model_path}: the model needs types radnode does not trust: {unknown}")
        model = sio.load(model_path, trusted=sorted(sio.get_untrusted_types(file=model_path)))
    else:
        logger.warning("classifier bundle %s holds a pickled model (%s), loaded because its SHA-256 matches; "
                       "re-save it as skops", folder, meta.model_file)
        model = joblib.load(model_path)
    if not hasattr(model, "predict_proba"):
        raise ClassifierBundleError(f"{model_path}: the model has no predict_proba")
    n_in = getattr(model, "n_features_in_", None)
    if n_in is not None and int(n_in) != len(meta.features):
        raise ClassifierBundleError(f"{folder}: the model takes {n_in} features but classifier.json lists "
                                    f"{len(meta.features)}")
    ours = package_versions()
    for pkg in ("scikit-learn", "numpy"):
        if meta.package_versions.get(pkg) not in (None, ours.get(pkg)):
            logger.warning("classifier bundle %s was saved with %s %s, running %s", folder, pkg,
                           meta.package_versions.get(pkg), ours.get(pkg))
    return ClassifierBundle(meta=meta, model=model, path=folder)
