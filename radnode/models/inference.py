"""RA-Seg inference: box, sliding window, post-processing, deep features.

The flow for one CT (:func:`segment_ct`), coarse to fine:

1. preprocess (:mod:`radnode.models.preprocess`): clip/normalise, 1 × 1 × 1.5 mm, lung VOI;
2. first stage (:mod:`radnode.models.candidates`): the tumour box from the classical
   detector, or the whole lung VOI when it finds nothing;
3. the network over the box grown by ``context_mm`` only, with MONAI's
   :func:`~monai.inferers.sliding_window_inference` (configurable overlap, Gaussian
   blending), the box mask as the a2t module's second input, AMP on CUDA; optionally
   averaged over flipped copies (``tta_flips``), and re-run on a larger box while the
   predicted tumour runs out of its box (``box_growth_rounds``: large tumours);
4. post-processing: keep connected components that lie in the tumour search region (the
   lung mask, or with ``search_region="hull"`` the lung mask plus its per-slice convex hull
   on each side, so juxta-mediastinal and hilar tumour is kept while the lung *contours*
   stay anatomical), drop those under ``min_component_mm3`` or with a mean probability under
   ``min_component_confidence``, fill holes;
5. deep features: a forward hook on the second-last decoder stage during one pass over a
   window centred on the tumour, averaged over the tumour voxels (paper §3.3);
6. the mask mapped back onto the CT grid exactly (nearest neighbour).

Each step is a plain function so tests, the benchmark and a training loop can call it
alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from scipy import ndimage

from radnode.models.candidates import (
    Box,
    Candidate,
    DetectorParams,
    box_from_mask,
    detect_candidates,
    mm_to_voxels,
)
from radnode.models.preprocess import PreprocessedCase, PreprocessParams, PreprocessRecord, labels_to_ct, preprocess_ct
from radnode.models.raseg import RASeg

log = logging.getLogger(__name__)

#: Tumour class index in the network's output.
TUMOUR_CLASS = 1
#: Upper bound of the automatic CPU thread count: 3-D convolutions at batch 1 stop scaling
#: well beyond this, and a worker should leave cores to the listener and other jobs.
MAX_AUTO_THREADS = 16

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


class InferenceError(RuntimeError):
    """Inference cannot run as configured (device unavailable, empty input, bad setting)."""


@dataclass(frozen=True)
class InferenceSettings:
    """Tunables of :func:`segment_preprocessed` (a bundle may carry defaults under ``inference``).

    Attributes
    ----------
    roi_size
        Sliding window (z, y, x) in voxels of the 1 × 1 × 1.5 mm grid; clamped to the input.
    overlap
        Fraction by which neighbouring windows overlap (MONAI ``overlap``).
    sw_batch_size
        Windows per forward pass.
    blend_mode
        ``gaussian`` (down-weights window edges) or ``constant``.
    device
        ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    amp
        Mixed precision (float16 autocast) on CUDA; ignored on CPU.
    num_threads
        torch CPU threads; ``None`` = the cores this process may use, at most
        :data:`MAX_AUTO_THREADS`.
    context_mm
        Context added around the tumour box before the sliding window runs.
    threshold
        Tumour probability at or above which a voxel is tumour.
    min_component_mm3
        Connected components smaller than this are dropped.
    min_lung_fraction
        A component is kept only if at least this fraction of it lies in the lung mask.
    fill_holes
        Fill enclosed holes (3-D, then per axial slice).
    deep_features
        Compute the deep-feature vector.
    detector
        Thresholds of the first-stage candidate detector.
    max_candidates
        How many of the detector's best proposals the network examines, each with its
        own box (probabilities combined by maximum). 1 trusts the detector's ranking; more
        lets a network trained on hard negatives reject a vessel bundle that outranks the
        tumour and find second and third tumours, at one network pass per proposal.
    lung_margin_mm
        Keep tumour voxels only within this distance of the search region (``None``: no
        limit); see :func:`postprocess_mask`.
    search_region
        Where tumour is searched for and kept (:func:`tumour_search_region`): ``lung`` (the
        lung mask) or ``hull`` (the lung mask plus, on each side, its per-slice convex hull:
        the hilar and juxta-mediastinal tissue that a lung mask leaves out). The lung
        contours sent are never changed by this.
    detect_in_search_region
        Run the candidate detector in the search region instead of the lung mask.
    box_growth_rounds
        How many times a box may be enlarged to the predicted tumour's extent (plus the
        detector's box margin) and the network re-run, when the tumour predicted from that
        box reaches beyond it by more than ``box_growth_mm`` (0: never).
    box_growth_mm
        How far the prediction must reach beyond its box before the box grows.
    max_box_mm
        No grown box exceeds this edge length (mm) on any axis.
    min_component_confidence
        Drop connected components whose mean tumour probability is below this (``None``:
        keep all): selection by the network's confidence instead of the detector's rank.
    max_components
        Keep only this many components, those with the largest summed probability
        (``None``: all).
    tta_flips
        Axes (0 = z, 1 = y, 2 = x) whose flipped copies are also run and averaged with the
        plain pass (test-time augmentation); each costs one more network pass per box.
    coarse_factor
        When set, a box whose longest edge reaches ``coarse_min_box_mm`` is also run at
        this factor coarser (the region resampled, e.g. 2: 2 × 2 × 3 mm) and the coarse
        probabilities, resampled back, are combined with the fine ones by ``coarse_combine``.
        A large homogeneous mass fills the network's whole field of view at the fine scale,
        where its core has no edge to recognise; at the coarse scale it is tumour-sized.
    coarse_min_box_mm
        Boxes smaller than this on every axis get no coarse pass.
    coarse_combine
        ``max`` (the coarse pass can only add tumour) or ``mean``.
    """

    roi_size: tuple[int, int, int] = (64, 96, 96)
    overlap: float = 0.25
    sw_batch_size: int = 1
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    num_threads: int | None = None
    context_mm: float = 20.0
    threshold: float = 0.5
    min_component_mm3: float = 30.0
    min_lung_fraction: float = 0.1
    fill_holes: bool = True
    deep_features: bool = True
    detector: DetectorParams = field(default_factory=DetectorParams)
    max_candidates: int = 1
    lung_margin_mm: float | None = None
    search_region: Literal["lung", "hull"] = "lung"
    detect_in_search_region: bool = False
    box_growth_rounds: int = 0
    box_growth_mm: float = 3.0
    max_box_mm: float = 160.0
    min_component_confidence: float | None = None
    max_components: int | None = None
    tta_flips: tuple[int, ...] = ()
    coarse_factor: float | None = None
    coarse_min_box_mm: float = 50.0
    coarse_combine: Literal["max", "mean"] = "max"

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi_size", tuple(int(v) for v in self.roi_size))
        object.__setattr__(self, "tta_flips", tuple(int(v) for v in self.tta_flips))
        if self.search_region not in ("lung", "hull"):
            raise InferenceError(f"search_region: lung or hull, got {self.search_region!r}")
        if self.box_growth_rounds < 0 or self.box_growth_mm < 0 or self.max_box_mm <= 0:
            raise InferenceError("box_growth_rounds, box_growth_mm must be >= 0 and max_box_mm > 0, got "
                                 f"{self.box_growth_rounds}, {self.box_growth_mm}, {self.max_box_mm}")
        if self.min_component_confidence is not None and not 0.0 <= self.min_component_confidence < 1.0:
            raise InferenceError(f"min_component_confidence: must be in [0, 1) or None, got {self.min_component_confidence}")
        if self.max_components is not None and self.max_components < 1:
            raise InferenceError(f"max_components: must be >= 1 or None, got {self.max_components}")
        if self.coarse_factor is not None and not self.coarse_factor > 1.0:
            raise InferenceError(f"coarse_factor: must be > 1 or None, got {self.coarse_factor}")
        if self.coarse_combine not in ("max", "mean"):
            raise InferenceError(f"coarse_combine: max or mean, got {self.coarse_combine!r}")
        if any(a not in (0, 1, 2) for a in self.tta_flips) or len(set(self.tta_flips)) != len(self.tta_flips):
            raise InferenceError(f"tta_flips: distinct axes among 0, 1, 2, got {self.tta_flips}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise InferenceError(f"roi_size: three positive voxel counts (z, y, x), got {self.roi_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise InferenceError(f"overlap: must be in [0, 1), got {self.overlap}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InferenceError(f"device: one of auto, cpu, cuda, got {self.device!r}")
        if self.blend_mode not in ("gaussian", "constant"):
            raise InferenceError(f"blend_mode: gaussian or constant, got {self.blend_mode!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InferenceError(f"num_threads: must be >= 1 or None, got {self.num_threads}")
        if self.lung_margin_mm is not None and self.lung_margin_mm < 0:
            raise InferenceError(f"lung_margin_mm: must be >= 0 or None, got {self.lung_margin_mm}")
        if self.max_candidates < 1:
            raise InferenceError(f"max_candidates: must be >= 1, got {self.max_candidates}")
        if not 0.0 < self.threshold < 1.0:
            raise InferenceError(f"threshold: must be in (0, 1), got {self.threshold}")
        if isinstance(self.detector, Mapping):
            object.__setattr__(self, "detector", DetectorParams(**self.detector))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        data = asdict(self)
        data["roi_size"] = list(self.roi_size)
        data["tta_flips"] = list(self.tta_flips)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> InferenceSettings:
        """Build from a mapping (e.g. a bundle's ``inference`` block) plus overrides."""
        known = {f.name for f in fields(cls)}
        values = {**data, **overrides}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InferenceError(f"{unknown[0]}: unknown inference setting (known: {sorted(known)})")
        return cls(**values)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError("models.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise InferenceError(f"device: one of auto, cpu, cuda, got {name!r}")
    return torch.device(name)


def configure_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` or to the usable cores (capped); return it.

    ``os.sched_getaffinity`` counts the cores this process may run on (a container's or a
    systemd ``CPUAffinity=`` limit), unlike ``os.cpu_count``.
    """
    if requested is None:
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        requested = max(1, min(available, MAX_AUTO_THREADS))
    if torch.get_num_threads() != requested:
        torch.set_num_threads(requested)
    return requested


def _prepare(model: RASeg, settings: InferenceSettings) -> torch.device:
    device = resolve_device(settings.device)
    if device.type == "cpu":
        configure_cpu_threads(settings.num_threads)
    model.to(device).eval()
    return device


def _autocast(device: torch.device, settings: InferenceSettings) -> Any:
    if device.type == "cuda" and settings.amp:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def predict_probabilities(
    model: RASeg,
    image: np.ndarray,
    box_mask: np.ndarray,
    settings: InferenceSettings | None = None,
) -> np.ndarray:
    """Tumour probability (float32, same shape) of a (z, y, x) image by sliding window.

    The image and the box mask travel as two channels of one tensor so that MONAI cuts
    both with the same windows; the predictor splits them again for the network.
    """
    settings = settings or InferenceSettings()
    if image.shape != box_mask.shape or image.ndim != 3:
        raise InferenceError(f"image {image.shape} and box mask {box_mask.shape} must be the same 3-D shape")
    device = _prepare(model, settings)
    stacked = torch.from_numpy(np.stack([image, box_mask]).astype(np.float32, copy=False))[None].to(device)
    roi = tuple(min(r, s) for r, s in zip(settings.roi_size, image.shape))

    def predictor(window: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(window[:, :1], window[:, 1:2]).float(), dim=1)

    with torch.inference_mode(), _autocast(device, settings):
        probs = sliding_window_inference(
            stacked, roi, settings.sw_batch_size, predictor,
            overlap=settings.overlap, mode=settings.blend_mode, device=torch.device("cpu"),
        )
    return probs[0, TUMOUR_CLASS].float().numpy()


def postprocess_mask(*args: Any, **kwargs: Any) -> np.ndarray:
    """Clean a binary tumour mask: :func:`postprocess_components` (same arguments), the mask alone."""
    return postprocess_components(*args, **kwargs)[0]


def postprocess_components(
    mask: np.ndarray,
    lung: np.ndarray,
    spacing_zyx: Sequence[float],
    min_component_mm3: float = 30.0,
    min_lung_fraction: float = 0.1,
    fill_holes: bool = True,
    lung_margin_mm: float | None = None,
    probability: np.ndarray | None = None,
    min_component_confidence: float | None = None,
    max_components: int | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Clean a binary tumour mask; also return the summed probability (mL) of every component
    that passed the size, lung and confidence rules, largest first, including those that
    ``max_components`` then dropped (empty without ``probability``).

    The masses show how clear the choice among components was: a runner-up almost as
    probable as the component kept means the network saw two tumour-like structures and
    ``max_components`` picked one (see :mod:`radnode.models.quality`).

    With ``lung_margin_mm`` set, first drops every voxel farther than that from ``lung``
    (the classical lung mask keeps juxtapleural tumours inside, so this cuts a network's
    bleed into the mediastinum and chest wall, at the price of tumour parts outside the
    lung such as hilar nodes). Then keeps 26-connected components with at least
    ``min_lung_fraction`` of their voxels in ``lung`` and at least ``min_component_mm3`` of
    volume, and fills enclosed holes in 3-D and per axial slice (necrotic cores open in
    3-D are still closed in-plane).

    With the network's ``probability`` map, components whose mean probability is below
    ``min_component_confidence`` are dropped, and ``max_components`` keeps only the
    components with the largest summed probability (the network's confidence decides,
    not the detector's ranking of the boxes they came from). ``lung`` is whatever region
    tumour may occupy: the lung mask, or the search region of :func:`tumour_search_region`.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != lung.shape:
        raise InferenceError(f"mask {mask.shape} and lung {lung.shape} must have the same shape")
    if lung_margin_mm is not None and mask.any():
        mask = mask & near_lung(mask, lung, spacing_zyx, lung_margin_mm)
    labels, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    masses: list[float] = []
    if count:
        index = np.arange(1, count + 1)
        sizes = ndimage.sum_labels(np.ones_like(mask, dtype=np.int32), labels, index)
        in_lung = ndimage.sum_labels(lung != 0, labels, index)
        voxel_mm3 = float(np.prod(spacing_zyx))
        keep = (sizes * voxel_mm3 >= min_component_mm3) & (in_lung >= min_lung_fraction * sizes)
        if probability is not None:
            if probability.shape != mask.shape:
                raise InferenceError(f"probability {probability.shape} and mask {mask.shape} must have the same shape")
            mass = ndimage.sum_labels(probability, labels, index)
            if min_component_confidence is not None:
                keep &= mass >= min_component_confidence * sizes
            masses = sorted((float(m) * voxel_mm3 / 1000.0 for m in mass[keep]), reverse=True)
            if max_components is not None and keep.sum() > max_components:
                order = np.argsort(np.where(keep, -mass, np.inf), kind="stable")
                keep[order[max_components:]] = False
        lookup = np.concatenate([[False], keep])
        mask = lookup[labels]
    if fill_holes and mask.any():
        mask = ndimage.binary_fill_holes(mask)
        for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
            mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask, masses


def near_lung(mask: np.ndarray, lung: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of ``lung``, computed only around ``mask``'s bounding box.

    The box is grown by the margin (plus one voxel), so every lung voxel that can be within
    ``margin_mm`` of a mask voxel is inside it and the distances are exact where they matter.
    """
    near = np.zeros(mask.shape, dtype=bool)
    box = box_from_mask(mask, spacing_zyx)
    if box is None:
        return near
    window = box.grow([r + 1 for r in mm_to_voxels(margin_mm, spacing_zyx)], mask.shape).slices
    outside = lung[window] == 0
    if not outside.all():
        near[window] = ndimage.distance_transform_edt(outside, sampling=spacing_zyx) <= margin_mm
    return near


def tumour_search_region(lung: np.ndarray, mode: str = "hull", slices: np.ndarray | None = None) -> np.ndarray:
    """Where tumour may be: the lung mask, or (``hull``) the lung mask plus its per-slice hull per side.

    A GTV touching the mediastinum or growing from the hilum lies in the concave medial
    side of its lung, outside a lung mask that follows the aerated parenchyma. On every
    axial slice the convex hull of each lung covers that bay but not the mediastinum
    between the lungs: the two sides are split at the middle column of the lungs' extent
    (the lungs lie left and right of it in an axial CT), and each half's hull is taken
    alone. Tissue beyond the lungs' cranio-caudal extent (e.g. supraclavicular nodes) is
    not included.

    The hulls are computed at half the in-plane resolution (a quarter of the cost; the
    region grows by at most one voxel), and only on the axial ``slices`` flagged (boolean,
    one per z; ``None``: all), since the post-processing needs them only where a tumour
    was predicted.
    """
    lung = np.asarray(lung) != 0
    if mode == "lung" or not lung.any():
        return lung.copy()
    if mode != "hull":
        raise InferenceError(f"search_region: lung or hull, got {mode!r}")
    from skimage.morphology import convex_hull_image

    columns = np.nonzero(lung.any(axis=(0, 1)))[0]
    middle = (int(columns[0]) + int(columns[-1]) + 1) // 2
    wanted = lung.any(axis=(1, 2)) if slices is None else lung.any(axis=(1, 2)) & np.asarray(slices, dtype=bool)
    region = lung.copy()
    for side in (slice(0, middle), slice(middle, lung.shape[2])):
        half = lung[:, :, side]
        nz, ny, nx = half.shape
        pad_y, pad_x = ny % 2, nx % 2
        coarse = np.pad(half, ((0, 0), (0, pad_y), (0, pad_x))).reshape(nz, (ny + pad_y) // 2, 2, (nx + pad_x) // 2, 2)
        coarse = coarse.any(axis=(2, 4))
        target = region[:, :, side]
        for z in np.nonzero(wanted & half.any(axis=(1, 2)))[0]:
            if coarse[z].sum() >= 3:
                hull = convex_hull_image(coarse[z])
                target[z] |= hull.repeat(2, axis=0).repeat(2, axis=1)[:ny, :nx]
    return region


def predict_box(
    model: RASeg,
    image: np.ndarray,
    box_mask: np.ndarray,
    settings: InferenceSettings | None = None,
) -> np.ndarray:
    """:func:`predict_probabilities`, averaged over the flipped copies of ``settings.tta_flips``.

    Each flip is undone on its output before averaging, so a network that is not
    mirror-symmetric contributes its disagreement as lower probabilities.
    """
    settings = settings or InferenceSettings()
    total = predict_probabilities(model, image, box_mask, settings)
    for axis in settings.tta_flips:
        flipped = predict_probabilities(
            model, np.ascontiguousarray(np.flip(image, axis)), np.ascontiguousarray(np.flip(box_mask, axis)), settings,
        )
        total += np.flip(flipped, axis)
    if settings.tta_flips:
        total /= 1 + len(settings.tta_flips)
    return total


def _resample(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """``array`` resampled to ``shape`` (trilinear for images and probabilities, nearest for masks)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(tensor, size=tuple(int(v) for v in shape), mode=mode, **kwargs)[0, 0].numpy()


def predict_coarse(
    model: RASeg, image: np.ndarray, box_mask: np.ndarray, factor: float, settings: InferenceSettings
) -> np.ndarray:
    """:func:`predict_box` on the region resampled ``factor`` times coarser, brought back to its grid."""
    small = tuple(max(1, int(round(n / factor))) for n in image.shape)
    coarse = predict_box(model, _resample(image, small, "trilinear"), _resample(box_mask, small, "nearest"), settings)
    return np.clip(_resample(coarse, image.shape, "trilinear"), 0.0, 1.0)


def box_extent_mm(box: Box, spacing: Sequence[float]) -> float:
    """The longest edge of ``box`` in mm."""
    return float(max(n * s for n, s in zip(box.shape, spacing)))


def with_coarse(model: RASeg, image: np.ndarray, box_mask: np.ndarray, fine: np.ndarray, extent_mm: float | None,
                settings: InferenceSettings) -> np.ndarray:
    """``fine`` combined with the coarse pass (:func:`predict_coarse`) when ``settings.coarse_factor``
    asks for it and the tumour box's longest edge ``extent_mm`` reaches ``coarse_min_box_mm``.

    The quality assessment's augmented passes go through this too, so that they judge the
    same prediction the contour came from.
    """
    if settings.coarse_factor is None or extent_mm is None or extent_mm < settings.coarse_min_box_mm:
        return fine
    coarse = predict_coarse(model, image, box_mask, settings.coarse_factor, settings)
    return np.maximum(fine, coarse) if settings.coarse_combine == "max" else (fine + coarse) / 2


def _box_in(box: Box | None, region: Box) -> np.ndarray:
    """The a2t input over ``region``: 1 inside ``box`` (everywhere when there is no box)."""
    if box is None:
        return np.ones(region.shape, dtype=np.float32)
    return Box(tuple(a - o for a, o in zip(box.start, region.start)),  # type: ignore[arg-type]
               tuple(b - o for b, o in zip(box.stop, region.start))).mask(region.shape)  # type: ignore[arg-type]


def _grown_box(box: Box, predicted: np.ndarray, offset: Sequence[int], spacing: Sequence[float],
               settings: InferenceSettings, shape: Sequence[int]) -> Box | None:
    """A larger a2t box when the tumour predicted from ``box`` runs out of it, else ``None``.

    ``predicted`` is the thresholded prediction over a region starting at ``offset``; the
    components that overlap the box count (a separate blob in the context is not this
    tumour). The new box is their extent united with the box, plus the detector's box
    margin, at most ``max_box_mm`` per axis (centred on the tumour).
    """
    labels, count = ndimage.label(predicted, structure=_FULL_CONNECTIVITY)
    if not count:
        return None
    local = Box(tuple(max(0, a - o) for a, o in zip(box.start, offset)),  # type: ignore[arg-type]
                tuple(min(n, b - o) for b, o, n in zip(box.stop, offset, predicted.shape)))  # type: ignore[arg-type]
    touching = np.unique(labels[local.slices])
    touching = touching[touching != 0]
    if not touching.size:
        return None
    extent = box_from_mask(np.isin(labels, touching), spacing)
    assert extent is not None
    start = [e + o for e, o in zip(extent.start, offset)]
    stop = [e + o for e, o in zip(extent.stop, offset)]
    reach = mm_to_voxels(settings.box_growth_mm, spacing)
    if not any(box.start[i] - start[i] > reach[i] or stop[i] - box.stop[i] > reach[i] for i in range(3)):
        return None
    margin = mm_to_voxels(settings.detector.box_margin_mm, spacing)
    new_start, new_stop = [], []
    for axis in range(3):
        lo = max(0, min(start[axis], box.start[axis]) - margin[axis])
        hi = min(int(shape[axis]), max(stop[axis], box.stop[axis]) + margin[axis])
        limit = max(1, int(settings.max_box_mm / spacing[axis]))
        if hi - lo > limit:
            centre = (start[axis] + stop[axis]) // 2
            lo = max(0, min(centre - limit // 2, int(shape[axis]) - limit))
            hi = min(int(shape[axis]), lo + limit)
        new_start.append(lo)
        new_stop.append(hi)
    grown = Box(tuple(new_start), tuple(new_stop))  # type: ignore[arg-type]
    return None if grown == box else grown


@contextmanager
def capture_stage(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``module`` (detached) while the context is open."""
    outputs: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        outputs.append(output.detach())

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _centred_window(centre: Sequence[float], size: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    slices = []
    for c, s, n in zip(centre, size, shape):
        s = min(s, n)
        start = int(np.clip(round(c - s / 2), 0, n - s))
        slices.append(slice(start, start + s))
    return tuple(slices)


def deep_feature_vector(
    model: RASeg,
    image: np.ndarray,
    box_mask: np.ndarray,
    tumour: np.ndarray,
    settings: InferenceSettings | None = None,
) -> np.ndarray:
    """Second-last decoder stage features averaged over the tumour (paper §3.3).

    One forward pass over a ``roi_size`` window centred on the tumour, with a forward hook
    on :attr:`RASeg.feature_stage`; the tumour mask is area-averaged to the stage's
    resolution and used as weights, so partially covered coarse voxels count partially.
    A tumour larger than the window contributes its central part.

    Returns
    -------
    numpy.ndarray
        float32 vector of length ``model.config.feature_channels``.
    """
    settings = settings or InferenceSettings()
    if not tumour.any():
        raise InferenceError("deep features need a non-empty tumour mask")
    device = _prepare(model, settings)
    window = _centred_window(np.argwhere(tumour).mean(axis=0), settings.roi_size, image.shape)
    img = torch.from_numpy(np.ascontiguousarray(image[window], dtype=np.float32))[None, None].to(device)
    box = torch.from_numpy(np.ascontiguousarray(box_mask[window], dtype=np.float32))[None, None].to(device)
    weights = torch.from_numpy(np.ascontiguousarray(tumour[window], dtype=np.float32))[None, None]
    with torch.inference_mode(), _autocast(device, settings), capture_stage(model.feature_stage) as seen:
        model(img, box)
    features = seen[-1].float().cpu()[0]  # (C, d, h, w) on the padded grid
    size = tuple(weights.shape[2:])
    pad = [p for s, t in zip(reversed(size), reversed(model.padded_size(size))) for p in (0, t - s)]
    weights = F.adaptive_avg_pool3d(F.pad(weights, pad), features.shape[1:])[0, 0]
    total = weights.sum()
    if total <= 0:
        raise InferenceError("tumour mask vanished at the feature stage's resolution")
    return ((features * weights).sum(dim=(1, 2, 3)) / total).numpy().astype(np.float32)


@dataclass
class GridSegmentation:
    """Result on the preprocessed grid.

    Attributes
    ----------
    mask
        Post-processed tumour mask (bool, preprocessed shape).
    probability
        Tumour probability (maximum over the boxes examined); 0 where the network did
        not run.
    boxes
        The a2t boxes examined, best first (empty: no candidate, the whole lung VOI was
        the box).
    regions
        Where the network ran, one region per box (the whole grid when ``boxes`` is empty).
    candidates
        The detector's candidates, best first (empty when a box was given).
    features
        Deep-feature vector, or ``None`` (empty mask or switched off).
    timings
        Seconds per step.
    search
        The tumour search region the post-processing kept tumour in (see
        :func:`tumour_search_region`; ``None`` when built by older code).
    component_masses
        Summed probability (mL) of each component the post-processing could have kept,
        largest first, including those ``max_components`` dropped
        (:func:`postprocess_components`).
    """

    mask: np.ndarray
    probability: np.ndarray
    boxes: list[Box]
    regions: list[Box]
    candidates: list[Candidate]
    features: np.ndarray | None
    timings: dict[str, float]
    search: np.ndarray | None = field(default=None, repr=False)
    component_masses: list[float] = field(default_factory=list)

    @property
    def box(self) -> Box | None:
        """The first (best) box, or ``None`` when no candidate was found."""
        return self.boxes[0] if self.boxes else None

    @property
    def region(self) -> Box:
        """Bounding box of every region the network ran on."""
        start = tuple(min(r.start[i] for r in self.regions) for i in range(3))
        stop = tuple(max(r.stop[i] for r in self.regions) for i in range(3))
        return Box(start, stop)  # type: ignore[arg-type]


def segment_preprocessed(
    model: RASeg,
    case: PreprocessedCase,
    settings: InferenceSettings | None = None,
    box: Box | None = None,
) -> GridSegmentation:
    """Segment the tumour in a preprocessed case (steps 2-5 of the module docstring).

    Parameters
    ----------
    model
        The network (moved to the chosen device and put in eval mode).
    case
        Output of :func:`radnode.models.preprocess.preprocess_ct`.
    settings
        Inference settings.
    box
        A tumour box on the preprocessed grid; ``None`` runs the candidate detector and
        examines its ``settings.max_candidates`` best proposals.
    """
    settings = settings or InferenceSettings()
    spacing = case.record.spacing_zyx
    shape = case.image.shape
    timings: dict[str, float] = {}
    search: np.ndarray | None = None
    start = time.perf_counter()
    if settings.detect_in_search_region:
        search = tumour_search_region(case.lung, settings.search_region)
    timings["search_region"] = time.perf_counter() - start
    start = time.perf_counter()
    candidates: list[Candidate] = []
    if box is None:
        where = search if search is not None else case.lung
        candidates = detect_candidates(case.record.params.to_hu(case.image), where, spacing, settings.detector)
        boxes = [c.box for c in candidates[: settings.max_candidates]]
    else:
        boxes = [box]
    timings["detect"] = time.perf_counter() - start
    context = mm_to_voxels(settings.context_mm, spacing)
    if not boxes:
        log.info("no tumour candidate found; running on the whole lung VOI %s", shape)

    start = time.perf_counter()
    probability = np.zeros(shape, dtype=np.float32)
    final_boxes: list[Box] = []
    regions: list[Box] = []
    for first in boxes or [None]:
        current = first
        for growth in range(settings.box_growth_rounds + 1):
            region = current.grow(context, shape) if current is not None else Box((0, 0, 0), shape)  # type: ignore[arg-type]
            box_mask = _box_in(current, region)
            local = predict_box(model, case.image[region.slices], box_mask, settings)
            if current is None or growth == settings.box_growth_rounds:
                break
            larger = _grown_box(current, local >= settings.threshold, region.start, spacing, settings, shape)
            if larger is None:
                break
            log.info("tumour runs out of box %s: re-running with %s", current.to_dict(), larger.to_dict())
            current = larger
        extent = None if current is None else box_extent_mm(current, spacing)
        local = with_coarse(model, case.image[region.slices], box_mask, local, extent, settings)
        window = probability[region.slices]
        np.maximum(window, local, out=window)
        regions.append(region)
        if current is not None:
            final_boxes.append(current)
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    predicted = probability >= settings.threshold
    if search is None:
        # Hulls only on the slices a tumour was predicted on, plus the lung margin's reach.
        reach = mm_to_voxels(settings.lung_margin_mm or 0.0, spacing)[0] + 1
        slices = ndimage.maximum_filter1d(predicted.any(axis=(1, 2)), size=2 * reach + 1)
        search = tumour_search_region(case.lung, settings.search_region, slices)
    timings["search_region"] += time.perf_counter() - start
    start = time.perf_counter()
    mask, masses = postprocess_components(
        predicted, search, spacing,
        settings.min_component_mm3, settings.min_lung_fraction, settings.fill_holes, settings.lung_margin_mm,
        probability=probability, min_component_confidence=settings.min_component_confidence,
        max_components=settings.max_components,
    )
    timings["postprocess"] = time.perf_counter() - start

    features = None
    if settings.deep_features and mask.any():
        start = time.perf_counter()
        box_input = np.zeros(shape, dtype=np.float32)
        for b in final_boxes:
            box_input[b.slices] = 1.0
        if not final_boxes:
            box_input[:] = 1.0
        features = deep_feature_vector(model, case.image, box_input, mask, settings)
        timings["features"] = time.perf_counter() - start
    return GridSegmentation(mask, probability, final_boxes, regions, candidates, features, timings, search,
                            component_masses=masses)


@dataclass
class SegmentationResult:
    """Tumour segmentation of one CT.

    Attributes
    ----------
    mask
        uint8 tumour mask (1 = tumour) on the CT grid, numpy (z, y, x) order.
    grid
        The result on the preprocessed grid.
    record
        The preprocessing record (for result.json and re-mapping).
    case
        The network's input (kept for a second look: :mod:`radnode.models.quality`).
    """

    mask: np.ndarray
    grid: GridSegmentation
    record: PreprocessRecord
    case: PreprocessedCase | None = field(default=None, repr=False)

    def mask_image(self) -> sitk.Image:
        """The CT-grid mask as a SimpleITK image with the CT's geometry."""
        image = sitk.GetImageFromArray(self.mask)
        image.SetSpacing(tuple(reversed(self.record.ct_spacing_zyx)))
        image.SetOrigin(self.record.origin_xyz)
        image.SetDirection(self.record.direction)
        return image


def segment_ct(
    model: RASeg,
    ct: sitk.Image,
    lung_mask: np.ndarray | sitk.Image,
    preprocessing: PreprocessParams | None = None,
    settings: InferenceSettings | None = None,
) -> SegmentationResult:
    """Segment the tumour in a CT (HU) given its lung mask; the whole flow of the module docstring."""
    start = time.perf_counter()
    case = preprocess_ct(ct, lung_mask, preprocessing)
    preprocess_s = time.perf_counter() - start
    grid = segment_preprocessed(model, case, settings)
    start = time.perf_counter()
    mask = labels_to_ct(grid.mask.astype(np.uint8), case.record)
    grid.timings = {"preprocess": preprocess_s, **grid.timings, "inverse": time.perf_counter() - start}
    return SegmentationResult(mask=mask, grid=grid, record=case.record, case=case)
