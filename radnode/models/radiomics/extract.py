"""Per-region radiomics with pyradiomics: profiles, fast exact shape, regions in parallel processes.

The engine is pyradiomics (the reference implementation the published three-region
method used); radnode changes two things about *how* it runs, not *what* it computes:

- the 3-D ``shape`` class uses :class:`~radnode.models.radiomics.fast_shape.FastRadiomicsShape`
  (identical values, no quadratic diameter search), so a whole-lung region costs seconds;
- the ``LBP3D`` image type uses :mod:`radnode.models.radiomics.lbp3d`, because
  pyradiomics 3.0.1's own filter cannot import on SciPy >= 1.17 and would silently yield
  nothing.

Regions run in separate processes (``concurrent.futures.ProcessPoolExecutor`` with the
``spawn`` or ``forkserver`` start method, never ``fork``: a forked child of a threaded
parent may inherit locked mutexes); a region much costlier than the rest (the whole lung)
is split by image type into parts run as separate extractions and merged
(:mod:`radnode.models.radiomics.schedule`). Every worker, and the calling process in a
serial run, runs single-threaded (SimpleITK's global thread count 1, BLAS/OpenMP pools 1
via threadpoolctl), and each region's input is rebuilt from the same arrays in both
modes, so a parallel run gives values bit-identical to a serial, unsplit one (tested).

Extraction settings come from versioned profiles shipped in ``params/`` (see
:func:`load_profile` and ``docs/ibsi.md``): pyradiomics parameter files with an extra
top-level ``radnode`` section (name, version, description, ``fast_shape``,
``min_voxels``) that is removed before pyradiomics validates the rest.

Bad input never raises: an empty region, one with fewer voxels than the profile's
``min_voxels``, or one that pyradiomics' mask checks reject (for example nothing left
after resampling or resegmentation) gives ``status == "skipped"`` with a note; an
unexpected error gives ``status == "failed"`` with the error text. Non-finite feature
values (pyradiomics returns NaN where a feature is undefined) are kept as NaN/inf in
:attr:`RegionFeatures.features`, listed in :attr:`RegionFeatures.nonfinite`, noted, and
written as ``null`` by :meth:`RegionFeatures.to_dict`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
import threadpoolctl
import yaml
from radiomics import featureextractor, imageoperations

from radnode.models.radiomics.fast_shape import FastRadiomicsShape
from radnode.models.radiomics.lbp3d import lbp3d_images
from radnode.models.radiomics.schedule import (
    canonical_order,
    plan_parts,
    resampled_voxels,
    unit_costs,
)

logger = logging.getLogger(__name__)

ENGINE_NAME = "pyradiomics"
ENGINE_VERSION = str(radiomics.__version__).lstrip("v")
#: The profiles each region uses unless told otherwise.
DEFAULT_PROFILES: dict[str, str] = {"tumour": "tumour-v1", "ring": "ring-v1", "lung": "lung-v1"}
#: Regions with fewer voxels than this are skipped unless the profile says otherwise.
DEFAULT_MIN_VOXELS = 10
#: Folder of the shipped profiles, inside this package (installed as package data).
_PARAMS = resources.files("radnode.models.radiomics").joinpath("params")
_START_METHODS = ("spawn", "forkserver")


class _DropSumAverageNotice(logging.Filter):
    """Drops pyradiomics' per-call notice that Sum Average = 2 × Joint Average (symmetric GLCM).

    The published feature set keeps Sum Average; pyradiomics then logs this warning once
    per image type and region (about 20 lines per region), which says nothing new.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Sum Average = 2 * Joint Average" not in record.getMessage()


logging.getLogger("radiomics.glcm").addFilter(_DropSumAverageNotice())


# --- profiles ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A versioned extraction profile: pyradiomics parameters plus radnode's metadata.

    Attributes
    ----------
    name, version
        Identity recorded with every result (``"tumour"``, ``1`` → ``"tumour-v1"``).
    description
        Why the profile is what it is (shown in docs and result.json).
    params
        pyradiomics parameters (``setting``, ``imageType``, ``featureClass``).
    fast_shape
        Use :class:`FastRadiomicsShape` for the 3-D shape class (identical values).
    min_voxels
        Regions with fewer voxels (on the CT grid) are skipped with a note.
    """

    name: str
    version: int
    description: str
    params: dict[str, Any]
    fast_shape: bool = True
    min_voxels: int = DEFAULT_MIN_VOXELS

    @property
    def label(self) -> str:
        """``<name>-v<version>``, the profile's identity in results."""
        return f"{self.name}-v{self.version}"


def profile_names() -> list[str]:
    """Profiles shipped in the package (file stems, e.g. ``tumour-v1``)."""
    return sorted(p.name[: -len(".yaml")] for p in _PARAMS.iterdir() if p.name.endswith(".yaml"))


def load_profile(profile: str | Path | Profile) -> Profile:
    """A shipped profile by name (``"lung-v1"``), a YAML file path, or a :class:`Profile` as is.

    Raises
    ------
    ValueError
        Unknown profile name, or a file without a valid ``radnode`` section (the message
        names the file and the key).
    """
    if isinstance(profile, Profile):
        return profile
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        name = str(profile)
        resource = _PARAMS.joinpath(f"{name}.yaml")
        if not resource.is_file():
            raise ValueError(f"unknown radiomics profile {name!r}; shipped profiles: {', '.join(profile_names())}")
        text, source = resource.read_text(encoding="utf-8"), f"radnode/models/radiomics/params/{name}.yaml"
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("radnode"), dict):
        # A malformed file is a bad value, not a caller's type error.
        raise ValueError(  # noqa: TRY004
            f"profile {source} needs a top-level 'radnode' mapping (name, version, description)"
        )
    meta = document.pop("radnode")
    for key in ("name", "version", "description"):
        if key not in meta:
            raise ValueError(f"profile {source}: 'radnode.{key}' is missing")
    if not isinstance(meta["version"], int) or meta["version"] < 1:
        raise ValueError(f"profile {source}: 'radnode.version' must be a positive integer, got {meta['version']!r}")
    return Profile(
        name=str(meta["name"]),
        version=int(meta["version"]),
        description=str(meta["description"]).strip(),
        params=document,
        fast_shape=bool(meta.get("fast_shape", True)),
        min_voxels=int(meta.get("min_voxels", DEFAULT_MIN_VOXELS)),
    )


def profile_from_settings(
    settings: Mapping[str, Any],
    *,
    name: str = "custom",
    version: int = 1,
    image_types: Mapping[str, Mapping[str, Any]] | None = None,
    feature_classes: Mapping[str, Sequence[str] | None] | None = None,
    fast_shape: bool = True,
    min_voxels: int = 1,
) -> Profile:
    """A profile from explicit pyradiomics settings (e.g. a baseline's recorded configuration).

    ``image_types`` defaults to the original image only; ``feature_classes`` to every
    3-D class (all non-deprecated features).
    """
    classes = feature_classes if feature_classes is not None else {
        c: None for c in ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
    }
    params = {
        "setting": dict(settings),
        "imageType": {k: dict(v) for k, v in (image_types or {"Original": {}}).items()},
        "featureClass": {k: (list(v) if v is not None else None) for k, v in classes.items()},
    }
    return Profile(name, version, "explicit settings", params, fast_shape=fast_shape, min_voxels=min_voxels)


# --- the extractor -------------------------------------------------------------------------------------


class RadnodeFeatureExtractor(featureextractor.RadiomicsFeatureExtractor):
    """pyradiomics' extractor with the fast exact shape class and radnode's LBP-3D images.

    Parameters
    ----------
    profile
        The profile whose parameters configure pyradiomics.
    """

    def __init__(self, profile: Profile) -> None:
        params = copy.deepcopy(profile.params)
        image_types = params.get("imageType") or {}
        lbp3d = image_types.pop("LBP3D", None)
        super().__init__(params)
        # None when disabled; a dict (possibly empty) of custom settings when enabled.
        self._lbp3d: dict[str, Any] | None = dict(lbp3d or {}) if "LBP3D" in (profile.params.get("imageType") or {}) else None
        self._fast_shape = profile.fast_shape

    def computeShape(self, image: sitk.Image, mask: sitk.Image, boundingBox: Any, **kwargs: Any) -> dict[str, Any]:
        """pyradiomics' ``computeShape`` with the 3-D class swapped for the fast exact one."""
        enabled = self.enabledFeatures
        if not self._fast_shape or "shape" not in enabled or mask.GetDimension() != 3:
            return super().computeShape(image, mask, boundingBox, **kwargs)
        vector: dict[str, Any] = collections.OrderedDict()
        cropped_image, cropped_mask = imageoperations.cropToTumorMask(image, mask, boundingBox)
        shape = FastRadiomicsShape(cropped_image, cropped_mask, **kwargs)
        for feature in enabled["shape"] or []:
            shape.enableFeatureByName(feature)
        for feature_name, value in shape.execute().items():
            vector[f"original_shape_{feature_name}"] = value
        # Anything else (shape2D under force2D) is pyradiomics' own path.
        self.enabledFeatures = {k: v for k, v in enabled.items() if k != "shape"}
        try:
            vector.update(super().computeShape(image, mask, boundingBox, **kwargs))
        finally:
            self.enabledFeatures = enabled
        return vector

    def execute(self, imageFilepath: Any, maskFilepath: Any, label: int | None = None,
                label_channel: int | None = None, voxelBased: bool = False) -> dict[str, Any]:
        """pyradiomics' ``execute``, then the LBP-3D images' features when the profile enables them."""
        features = super().execute(imageFilepath, maskFilepath, label, label_channel, voxelBased)
        if self._lbp3d is not None and not voxelBased:
            features.update(self._lbp3d_features(imageFilepath, maskFilepath, label))
        return features

    def _lbp3d_features(self, image_in: Any, mask_in: Any, label: int | None) -> dict[str, Any]:
        """Features of the LBP-3D images, prepared the way ``execute`` prepares any filtered image.

        Same steps and order as pyradiomics: load (normalise, resample and crop), check the
        mask, resegment and re-check, filter, crop to the bounding box, compute classes.
        """
        settings = self.settings.copy()
        if label is not None:
            settings["label"] = label
        image, mask = self.loadImage(image_in, mask_in, None, **settings)
        bounding_box, corrected = imageoperations.checkMask(image, mask, **settings)
        if corrected is not None:
            mask = corrected
        if settings.get("resegmentRange") is not None:
            mask = imageoperations.resegmentMask(image, mask, **settings)
            bounding_box, _ = imageoperations.checkMask(image, mask, **settings)
        args = settings.copy()
        args.update(self._lbp3d or {})
        out: dict[str, Any] = collections.OrderedDict()
        for filtered, type_name, kwargs in lbp3d_images(image, mask, **args):
            cropped_image, cropped_mask = imageoperations.cropToTumorMask(filtered, mask, bounding_box)
            out.update(self.computeFeatures(cropped_image, cropped_mask, type_name, **kwargs))
        return out


# --- results -------------------------------------------------------------------------------------------


@dataclass
class RegionFeatures:
    """Radiomics of one region.

    Attributes
    ----------
    region
        ``tumour``, ``ring``, ``lung`` (or a caller's name).
    profile
        The profile's label (``tumour-v1``).
    status
        ``done``, ``skipped`` (empty, too small, or rejected by pyradiomics' mask checks)
        or ``failed`` (unexpected error; ``notes`` has it).
    voxels
        Region voxels on the input grid.
    features
        ``<imageType>_<class>_<feature>`` → value (NaN/inf kept; see ``nonfinite``).
    diagnostics
        pyradiomics' ``diagnostics_*`` entries when the profile enables ``additionalInfo``.
    nonfinite
        Names of features whose value is NaN or ±inf.
    seconds
        Wall time of this region's extraction (in its worker; summed over its parts).
    notes
        Human-readable remarks for result.json.
    parts
        Into how many image-type parts the region was split across workers
        (:mod:`radnode.models.radiomics.schedule`); 1 when run whole.
    cpu_seconds
        CPU time of each part (one entry when run whole): the work itself, unlike wall
        time not inflated when other processes share the cores.
    """

    region: str
    profile: str
    status: str
    voxels: int
    features: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, str] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    parts: int = 1
    cpu_seconds: list[float] = field(default_factory=list)

    def to_dict(self, *, include_features: bool = True) -> dict[str, Any]:
        """JSON-ready dict; non-finite values become ``null`` (listed in ``nonfinite``)."""
        out: dict[str, Any] = {
            "region": self.region,
            "profile": self.profile,
            "status": self.status,
            "voxels": self.voxels,
            "feature_count": len(self.features),
            "seconds": round(self.seconds, 3),
            "parts": self.parts,
            "cpu_seconds": [round(c, 3) for c in self.cpu_seconds],
            "nonfinite": list(self.nonfinite),
            "notes": list(self.notes),
        }
        if include_features:
            out["features"] = {k: (v if math.isfinite(v) else None) for k, v in self.features.items()}
        return out


@dataclass
class RadiomicsResult:
    """Radiomics of all regions of one series, with provenance and timings.

    Attributes
    ----------
    regions
        Region name → :class:`RegionFeatures`, in the caller's order.
    engine
        ``{"name": "pyradiomics", "version": "3.0.1", "fast_shape": ..., "lbp3d": ...}``.
    mode
        ``parallel`` or ``serial``.
    workers
        Worker processes used (1 in a serial run).
    start_method
        Process start method of a parallel run (``spawn`` / ``forkserver``), else ``None``.
    wall_seconds
        Wall time of the whole call, process start-up included.
    """

    regions: dict[str, RegionFeatures]
    engine: dict[str, Any]
    mode: str
    workers: int
    start_method: str | None
    wall_seconds: float

    @property
    def profiles(self) -> dict[str, str]:
        """Region → profile label."""
        return {name: r.profile for name, r in self.regions.items()}

    def to_dict(self, *, include_features: bool = True) -> dict[str, Any]:
        """JSON-ready dict for result.json."""
        return {
            "engine": dict(self.engine),
            "mode": self.mode,
            "workers": self.workers,
            "start_method": self.start_method,
            "wall_seconds": round(self.wall_seconds, 3),
            "regions": {k: v.to_dict(include_features=include_features) for k, v in self.regions.items()},
        }


def engine_info(fast_shape: bool = True) -> dict[str, Any]:
    """Engine provenance recorded with every result (and in the SR by the chain)."""
    return {
        "name": ENGINE_NAME,
        "version": ENGINE_VERSION,
        "fast_shape": "radnode exact convex-hull diameters" if fast_shape else "pyradiomics",
        "lbp3d": "radnode port of pyradiomics getLBP3DImage",
    }


# --- inputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A CT image as plain arrays (picklable); rebuilt identically in every process."""

    array: np.ndarray
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]

    def image(self) -> sitk.Image:
        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(self.spacing_xyz)
        img.SetOrigin(self.origin_xyz)
        img.SetDirection(self.direction)
        return img

    def mask(self, region: np.ndarray) -> sitk.Image:
        msk = sitk.GetImageFromArray(region.astype(np.uint8))
        msk.SetSpacing(self.spacing_xyz)
        msk.SetOrigin(self.origin_xyz)
        msk.SetDirection(self.direction)
        return msk


def _grid(image: sitk.Image | np.ndarray, spacing: Sequence[float] | None) -> _Grid:
    """The CT as a :class:`_Grid`; a numpy ``(z, y, x)`` array needs ``spacing`` ``(z, y, x)`` mm."""
    if isinstance(image, sitk.Image):
        if image.GetDimension() != 3:
            raise ValueError(f"the CT image must be 3-D, got {image.GetDimension()}-D")
        return _Grid(
            sitk.GetArrayFromImage(image),
            tuple(image.GetSpacing()),
            tuple(image.GetOrigin()),
            tuple(image.GetDirection()),
        )
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"the CT array must be 3-D (z, y, x), got shape {array.shape}")
    if spacing is None or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"a numpy CT needs spacing=(z, y, x) in mm (three positive numbers), got {spacing}")
    z, y, x = (float(v) for v in spacing)
    return _Grid(array, (x, y, z), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def _region_mask(mask: np.ndarray | sitk.Image, grid: _Grid, name: str) -> np.ndarray:
    array = sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    if array.shape != grid.array.shape:
        raise ValueError(f"region {name!r} mask shape {array.shape} differs from the CT shape {grid.array.shape}")
    return array.astype(bool)


# --- one region ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    region: str
    grid: _Grid
    mask: np.ndarray
    profile: Profile


def _split(vector: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    features: dict[str, float] = {}
    diagnostics: dict[str, str] = {}
    for key, value in vector.items():
        if key.startswith("diagnostics_"):
            diagnostics[key] = str(value)
        else:
            features[key] = float(value)
    return features, diagnostics


def _run_task(task: _Task) -> RegionFeatures:
    """Extract one region (in a worker, or in-process for a serial run)."""
    start = time.perf_counter()
    cpu_start = time.process_time()
    profile = task.profile
    voxels = int(np.count_nonzero(task.mask))
    result = RegionFeatures(region=task.region, profile=profile.label, status="done", voxels=voxels)
    if voxels < max(1, profile.min_voxels):
        result.status = "skipped"
        result.notes.append(
            f"{task.region} has {voxels} voxel(s); profile {profile.label} needs at least "
            f"{max(1, profile.min_voxels)}: no radiomics for this region"
        )
        return result
    try:
        extractor = RadnodeFeatureExtractor(profile)
        vector = extractor.execute(task.grid.image(), task.grid.mask(task.mask), label=1)
    except ValueError as exc:
        # pyradiomics' mask checks (nothing left after resampling or resegmentation, a
        # single voxel, fewer dimensions than minimumROIDimensions) raise ValueError.
        result.status = "skipped"
        result.notes.append(f"pyradiomics rejected the {task.region} region: {exc}")
        return result
    except Exception as exc:  # a region's failure must not take the other regions down
        logger.exception("radiomics failed for region %s (profile %s)", task.region, profile.label)
        result.status = "failed"
        result.notes.append(f"radiomics failed for {task.region}: {type(exc).__name__}: {exc}")
        return result
    finally:
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = [time.process_time() - cpu_start]
    result.features, result.diagnostics = _split(vector)
    _note_nonfinite(result)
    return result


def _note_nonfinite(result: RegionFeatures) -> None:
    """List and note the features whose value is NaN or inf."""
    result.nonfinite = [k for k, v in result.features.items() if not math.isfinite(v)]
    if result.nonfinite:
        shown = ", ".join(result.nonfinite[:8]) + (" ..." if len(result.nonfinite) > 8 else "")
        result.notes.append(
            f"{len(result.nonfinite)} feature(s) are not finite (NaN or inf: undefined for this region, "
            f"or overflowed) and are reported as null: {shown}"
        )


def _part_profile(profile: Profile, image_types: Sequence[str], with_shape: bool) -> Profile:
    """The profile restricted to some image types (and without shape unless ``with_shape``)."""
    params = copy.deepcopy(profile.params)
    params["imageType"] = {name: params["imageType"][name] for name in image_types}
    if not with_shape:
        params["featureClass"] = {k: v for k, v in params["featureClass"].items() if k not in ("shape", "shape2D")}
    return Profile(profile.name, profile.version, profile.description, params, profile.fast_shape, profile.min_voxels)


def _part_tasks(task: _Task, parts: list[list[str]]) -> list[_Task]:
    """One task per part; the shape class rides with ``Original`` (or the first part)."""
    if len(parts) == 1:
        return [task]
    holder = next((i for i, p in enumerate(parts) if "Original" in p), 0)
    return [_Task(task.region, task.grid, task.mask, _part_profile(task.profile, p, i == holder))
            for i, p in enumerate(parts)]


def _merge(task: _Task, results: list[RegionFeatures]) -> RegionFeatures:
    """A region's parts back into one result, keys in the unsplit order (values untouched)."""
    if len(results) == 1:
        return results[0]
    merged = RegionFeatures(region=task.region, profile=task.profile.label, status="done",
                            voxels=results[0].voxels, parts=len(results))
    for part in results:
        merged.seconds += part.seconds
        merged.cpu_seconds += part.cpu_seconds
        merged.notes += [n for n in part.notes if n not in merged.notes]
        merged.diagnostics.update(part.diagnostics)
        merged.features.update(part.features)
    statuses = {r.status for r in results}
    if statuses != {"done"}:
        merged.status = "failed" if "failed" in statuses else "skipped"
        merged.features = {}
        merged.nonfinite = []
        return merged
    types = list((task.profile.params.get("imageType") or {}).keys())
    merged.features = {k: merged.features[k] for k in canonical_order(merged.features, types)}
    merged.notes = [n for n in merged.notes if "not finite" not in n]
    _note_nonfinite(merged)
    return merged


# --- threads and processes -----------------------------------------------------------------------------

_worker_limits: Any = None


def _init_worker() -> None:
    """Worker start-up: one thread for SimpleITK, BLAS and OpenMP (the pool provides the parallelism)."""
    global _worker_limits
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _worker_limits = threadpoolctl.threadpool_limits(1)
    logging.getLogger("radiomics").setLevel(logging.WARNING)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """The workers' threading for an in-process (serial) run, restored afterwards."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        with threadpoolctl.threadpool_limits(1):
            yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


# --- all regions ---------------------------------------------------------------------------------------


def extract_region(
    image: sitk.Image | np.ndarray,
    mask: np.ndarray | sitk.Image,
    profile: str | Path | Profile,
    *,
    region: str = "region",
    spacing: Sequence[float] | None = None,
) -> RegionFeatures:
    """Radiomics of one region, in this process (single-threaded, like a worker).

    Parameters
    ----------
    image
        The CT: a SimpleITK image, or a numpy ``(z, y, x)`` HU array with ``spacing``.
    mask
        Boolean region on the CT grid (numpy ``(z, y, x)`` or a SimpleITK label image;
        any non-zero value is in the region).
    profile
        Shipped profile name, YAML path, or :class:`Profile`.
    region
        Name recorded in the result.
    spacing
        ``(z, y, x)`` mm, only for a numpy ``image``.
    """
    grid = _grid(image, spacing)
    task = _Task(region, grid, _region_mask(mask, grid, region), load_profile(profile))
    with _single_threaded():
        return _run_task(task)


def extract_regions(
    image: sitk.Image | np.ndarray,
    masks: Mapping[str, np.ndarray | sitk.Image] | Any,
    profiles: Mapping[str, str | Path | Profile] | None = None,
    *,
    spacing: Sequence[float] | None = None,
    parallel: bool = True,
    workers: int | None = None,
    start_method: str | None = None,
) -> RadiomicsResult:
    """Radiomics of several regions of one CT, in parallel processes or serially.

    Parameters
    ----------
    image
        The CT (SimpleITK image, or numpy ``(z, y, x)`` HU with ``spacing``).
    masks
        Region name → boolean mask on the CT grid, or a
        :class:`radnode.models.regions.Regions` (its ``tumour``, ``ring``, ``lung``).
    profiles
        Region name → profile; defaults to :data:`DEFAULT_PROFILES` for the three
        standard regions (a region without a profile is an error naming it).
    spacing
        ``(z, y, x)`` mm, only for a numpy ``image``.
    parallel
        Run the regions in worker processes. A region that would keep one worker busy
        much longer than the others (the whole lung) is split into image-type parts
        (:mod:`radnode.models.radiomics.schedule`) whose features are merged back.
    workers
        Worker processes (default: the CPU count; 1 means a serial run).
    start_method
        ``spawn`` or ``forkserver`` (default: forkserver where available).

    Returns
    -------
    RadiomicsResult
        Per-region features, profile labels, engine name/version and timings. Values
        are identical between ``parallel=True`` and ``parallel=False``.
    """
    start = time.perf_counter()
    region_masks = masks.masks() if hasattr(masks, "masks") else dict(masks)
    chosen = dict(DEFAULT_PROFILES)
    chosen.update(profiles or {})
    grid = _grid(image, spacing)
    tasks: list[_Task] = []
    for name, mask in region_masks.items():
        if name not in chosen:
            raise ValueError(f"no radiomics profile for region {name!r}; pass profiles={{{name!r}: ...}}")
        tasks.append(_Task(name, grid, _region_mask(mask, grid, name), load_profile(chosen[name])))
    fast = all(t.profile.fast_shape for t in tasks)
    method: str | None = None
    budget = max(1, workers or (multiprocessing.cpu_count() or 1))
    if parallel and tasks and budget > 1:
        method = start_method or _default_start_method()
        if method not in _START_METHODS:
            raise ValueError(f"start_method must be one of {_START_METHODS}, got {method!r}")
        costs = {
            t.region: unit_costs(
                t.profile.params,
                resampled_voxels(int(np.count_nonzero(t.mask)), grid.spacing_xyz, t.profile.params.get("setting") or {}),
            )
            for t in tasks
        }
        plan = plan_parts(costs, budget)
        jobs = [(t, part) for t in tasks for part in _part_tasks(t, plan[t.region])]
        # Costliest first (longest-processing-time order), so the pool ends level.
        jobs.sort(key=lambda job: -sum(costs[job[0].region][n] for n in job[1].profile.params.get("imageType", {})))
        n_workers = min(len(jobs), budget)
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            # The fork server imports pyradiomics, SimpleITK and scipy once; workers fork
            # from it with them loaded (about 1 s per worker saved).
            context.set_forkserver_preload([__name__])
        with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [(t.region, pool.submit(_run_task, part)) for t, part in jobs]
            by_region: dict[str, list[RegionFeatures]] = {t.region: [] for t in tasks}
            for region, future in futures:
                by_region[region].append(future.result())
        done = {t.region: _merge(t, by_region[t.region]) for t in tasks}
        mode = "parallel"
    else:
        n_workers = 1
        with _single_threaded():
            done = {t.region: _run_task(t) for t in tasks}
        mode = "serial"
    return RadiomicsResult(
        regions={t.region: done[t.region] for t in tasks},
        engine=engine_info(fast),
        mode=mode,
        workers=n_workers,
        start_method=method,
        wall_seconds=time.perf_counter() - start,
    )
