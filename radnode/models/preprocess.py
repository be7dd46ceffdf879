"""RA-Seg preprocessing of a CT series, and its exact inverse for label maps.

The method (``shared/papers/000`` §3.1) clips intensities to [-200, 250] HU, resamples to
1 × 1 × 1.5 mm (x, y, z), and crops to the lungs' volume of interest. It then resizes the
crop to 256³; radnode does not: it keeps the 1 × 1 × 1.5 mm grid and lets sliding-window
inference cover the crop, so no second interpolation stands between the network and the
CT and the inverse mapping stays a pure index map.

Grid convention
---------------
Arrays are numpy order (z, y, x) = SimpleITK index (k, j, i) reversed. The resampled grid
shares the CT's origin and direction; voxel ``n`` along an axis sits at ``n * S`` mm from the
origin (``S`` the target spacing), CT voxel ``m`` at ``m * s``. The grid has
``floor((N - 1) * s / S) + 1`` voxels per axis, so every grid centre lies within the CT's
voxel-centre span and the image is interpolated, never extrapolated.

Both directions for labels are nearest-neighbour index maps, separable per axis because
the grids share origin and direction:

* CT -> network: grid voxel ``n`` takes CT voxel ``round(n * S / s)``;
* network -> CT: CT voxel ``m`` takes grid voxel ``round(m * s / S)``, clamped to the grid
  (so CT voxels past the last grid centre take the edge value, as a nearest neighbour
  should), and 0 outside the crop.

``round`` is ``floor(x + 0.5)``, ITK's nearest-neighbour convention. When the CT is at
least as fine as the target on every axis (the usual case), network -> CT -> network is
the identity on every label map; when the CT is already on the target spacing, CT ->
network -> CT is the identity inside the crop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

#: Intensity window of the method, HU.
HU_WINDOW = (-200.0, 250.0)
#: Target spacing of the method, mm, (z, y, x): 1 × 1 mm in-plane, 1.5 mm between slices.
TARGET_SPACING_ZYX = (1.5, 1.0, 1.0)
#: Margin around the lung mask's bounding box, mm: juxtapleural and hilar tumours reach
#: past the lung surface, and the network wants context around them.
LUNG_MARGIN_MM = 10.0

Interpolation = Literal["linear", "bspline"]
_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


class PreprocessError(ValueError):
    """Preprocessing cannot proceed (empty lung mask, geometry mismatch, bad parameter)."""


@dataclass(frozen=True)
class PreprocessParams:
    """What the preprocessing does; stored in a bundle under ``preprocessing``.

    Attributes
    ----------
    hu_min, hu_max
        Clip window (HU); values are then scaled linearly to [0, 1].
    target_spacing_zyx
        Output spacing in mm, (z, y, x).
    lung_margin_mm
        Margin added on every side of the lung mask's bounding box.
    interpolation
        Image interpolator: ``linear`` (default, fast) or ``bspline`` (the paper's).
    """

    hu_min: float = HU_WINDOW[0]
    hu_max: float = HU_WINDOW[1]
    target_spacing_zyx: tuple[float, float, float] = TARGET_SPACING_ZYX
    lung_margin_mm: float = LUNG_MARGIN_MM
    interpolation: Interpolation = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_spacing_zyx", tuple(float(v) for v in self.target_spacing_zyx))
        if not self.hu_max > self.hu_min:
            raise PreprocessError(f"hu_max ({self.hu_max}) must exceed hu_min ({self.hu_min})")
        if len(self.target_spacing_zyx) != 3 or min(self.target_spacing_zyx) <= 0:
            raise PreprocessError(f"target_spacing_zyx: three positive mm values, got {self.target_spacing_zyx}")
        if self.lung_margin_mm < 0:
            raise PreprocessError(f"lung_margin_mm: must be >= 0, got {self.lung_margin_mm}")
        if self.interpolation not in _INTERPOLATORS:
            raise PreprocessError(f"interpolation: one of {sorted(_INTERPOLATORS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping."""
        data = asdict(self)
        data["target_spacing_zyx"] = list(self.target_spacing_zyx)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessParams:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`PreprocessError` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PreprocessError(f"{unknown[0]}: unknown preprocessing parameter (known: {sorted(known)})")
        return cls(**dict(data))

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        """Clip to the window and scale to [0, 1] (float32)."""
        scaled = (np.clip(hu, self.hu_min, self.hu_max) - self.hu_min) / (self.hu_max - self.hu_min)
        return scaled.astype(np.float32, copy=False)

    def to_hu(self, normalised: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`normalise` inside the window (values outside were clipped)."""
        return (normalised * (self.hu_max - self.hu_min) + self.hu_min).astype(np.float32, copy=False)


@dataclass(frozen=True)
class PreprocessRecord:
    """What was done to one CT, enough to map results back onto its grid exactly.

    All per-axis tuples are (z, y, x); ``origin_xyz`` and ``direction`` are SimpleITK's.
    ``crop_start``/``crop_stop`` are half-open indices into the resampled grid.
    """

    ct_size_zyx: tuple[int, int, int]
    ct_spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...]
    params: PreprocessParams
    resampled_size_zyx: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the preprocessed (cropped) array."""
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing of the preprocessed array, mm."""
        return self.params.target_spacing_zyx

    def grid_image(self, array: np.ndarray) -> sitk.Image:
        """``array`` (preprocessed shape) as a SimpleITK image placed in patient space."""
        if array.shape != self.shape:
            raise PreprocessError(f"array shape {array.shape} != preprocessed shape {self.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(tuple(reversed(self.spacing_zyx)))
        image.SetDirection(self.direction)
        direction = np.asarray(self.direction).reshape(3, 3)
        offset = direction @ (np.asarray(self.crop_start[::-1], float) * np.asarray(self.spacing_zyx[::-1]))
        image.SetOrigin(tuple(np.asarray(self.origin_xyz) + offset))
        return image

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (for result.json and reproducibility)."""
        return {
            "ct_size_zyx": list(self.ct_size_zyx),
            "ct_spacing_zyx": list(self.ct_spacing_zyx),
            "origin_xyz": list(self.origin_xyz),
            "direction": list(self.direction),
            "params": self.params.to_dict(),
            "resampled_size_zyx": list(self.resampled_size_zyx),
            "crop_start": list(self.crop_start),
            "crop_stop": list(self.crop_stop),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(
            ct_size_zyx=tuple(int(v) for v in data["ct_size_zyx"]),  # type: ignore[arg-type]
            ct_spacing_zyx=tuple(float(v) for v in data["ct_spacing_zyx"]),  # type: ignore[arg-type]
            origin_xyz=tuple(float(v) for v in data["origin_xyz"]),  # type: ignore[arg-type]
            direction=tuple(float(v) for v in data["direction"]),
            params=PreprocessParams.from_dict(data["params"]),
            resampled_size_zyx=tuple(int(v) for v in data["resampled_size_zyx"]),  # type: ignore[arg-type]
            crop_start=tuple(int(v) for v in data["crop_start"]),  # type: ignore[arg-type]
            crop_stop=tuple(int(v) for v in data["crop_stop"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class PreprocessedCase:
    """The network's view of one CT.

    Attributes
    ----------
    image
        Normalised intensities in [0, 1], float32, (z, y, x), on the cropped target grid.
    lung
        The lung mask on the same grid (bool).
    record
        How to get back to the CT grid.
    """

    image: np.ndarray
    lung: np.ndarray
    record: PreprocessRecord


def _round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.int64)


def _axis_map(count: int, step_out: float, step_in: float, size_in: int) -> np.ndarray:
    """Index into an input axis (spacing ``step_in``) nearest to each of ``count`` output voxels."""
    return np.clip(_round_half_up(np.arange(count) * (step_out / step_in)), 0, size_in - 1)


def resampled_size(
    ct_size_zyx: Sequence[int], ct_spacing_zyx: Sequence[float], target_zyx: Sequence[float]
) -> tuple[int, int, int]:
    """Voxels per axis of the target grid: every centre inside the CT's voxel-centre span."""
    # The tiny tolerance keeps exact multiples (e.g. 149 * 1.5 / 1.5) from losing a voxel to rounding.
    return tuple(
        int(np.floor((n - 1) * s / t + 1e-9)) + 1 for n, s, t in zip(ct_size_zyx, ct_spacing_zyx, target_zyx)
    )  # type: ignore[return-value]


def _as_array(mask: np.ndarray | sitk.Image, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    if array.shape != shape:
        raise PreprocessError(f"{what}: shape {array.shape} (z, y, x) does not match the CT's {shape}")
    return array


def labels_to_grid(labels: np.ndarray | sitk.Image, record: PreprocessRecord, crop: bool = True) -> np.ndarray:
    """Map a CT-grid label map onto the (cropped) target grid by nearest neighbour."""
    array = _as_array(labels, record.ct_size_zyx, "labels")
    maps = [
        _axis_map(m, t, s, n)
        for m, t, s, n in zip(record.resampled_size_zyx, record.spacing_zyx, record.ct_spacing_zyx, record.ct_size_zyx)
    ]
    if crop:
        maps = [m[a:b] for m, a, b in zip(maps, record.crop_start, record.crop_stop)]
    return array[np.ix_(*maps)]


def labels_to_ct(labels: np.ndarray, record: PreprocessRecord) -> np.ndarray:
    """Map a label map on the preprocessed grid back onto the CT grid (nearest, exact).

    Voxels outside the crop get 0. See the module docstring for the index maps.
    """
    labels = np.asarray(labels)
    if labels.shape != record.shape:
        raise PreprocessError(f"labels: shape {labels.shape} != preprocessed shape {record.shape}")
    full = np.zeros(record.resampled_size_zyx, dtype=labels.dtype)
    full[tuple(slice(a, b) for a, b in zip(record.crop_start, record.crop_stop))] = labels
    maps = [
        _axis_map(n, s, t, m)
        for n, s, t, m in zip(record.ct_size_zyx, record.ct_spacing_zyx, record.spacing_zyx, record.resampled_size_zyx)
    ]
    return full[np.ix_(*maps)]


def labels_to_ct_image(labels: np.ndarray, record: PreprocessRecord) -> sitk.Image:
    """:func:`labels_to_ct` as a SimpleITK image with the CT's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels_to_ct(labels, record)))
    image.SetSpacing(tuple(reversed(record.ct_spacing_zyx)))
    image.SetOrigin(record.origin_xyz)
    image.SetDirection(record.direction)
    return image


def lung_crop(
    lung_on_grid: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Half-open bounding box of ``lung_on_grid`` grown by ``margin_mm``, clipped to the grid."""
    nonzero = np.nonzero(lung_on_grid)
    if not nonzero[0].size:
        raise PreprocessError("lung mask is empty: nothing to crop to (is this a chest CT?)")
    margin = [int(np.ceil(margin_mm / s - 1e-9)) for s in spacing_zyx]
    start = tuple(max(0, int(idx.min()) - m) for idx, m in zip(nonzero, margin))
    stop = tuple(min(n, int(idx.max()) + 1 + m) for idx, m, n in zip(nonzero, margin, lung_on_grid.shape))
    return start, stop


def preprocess_ct(
    ct: sitk.Image,
    lung_mask: np.ndarray | sitk.Image,
    params: PreprocessParams | None = None,
) -> PreprocessedCase:
    """Clip, normalise, resample and crop one CT for RA-Seg.

    Parameters
    ----------
    ct
        The CT in HU (any pixel type), e.g. :attr:`radnode.dicom_io.series.CTSeries.image`.
    lung_mask
        Lung mask on the CT grid, as an image or a (z, y, x) array; non-zero is lung.
        Tumours touching the pleura must already be inside it.
    params
        Preprocessing parameters (default: the method's).

    Returns
    -------
    PreprocessedCase
        The normalised crop, the lung mask on the same grid and the record.
    """
    params = params or PreprocessParams()
    if ct.GetDimension() != 3:
        raise PreprocessError(f"ct: expected a 3-D image, got {ct.GetDimension()}-D")
    ct_size = tuple(reversed(ct.GetSize()))
    ct_spacing = tuple(reversed(ct.GetSpacing()))
    lung = _as_array(lung_mask, ct_size, "lung_mask")
    size = resampled_size(ct_size, ct_spacing, params.target_spacing_zyx)
    record = PreprocessRecord(
        ct_size_zyx=ct_size,  # type: ignore[arg-type]
        ct_spacing_zyx=ct_spacing,  # type: ignore[arg-type]
        origin_xyz=tuple(ct.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(ct.GetDirection()),
        params=params,
        resampled_size_zyx=size,
        crop_start=(0, 0, 0),
        crop_stop=size,
    )
    lung_grid = labels_to_grid(lung, record, crop=False) != 0
    start, stop = lung_crop(lung_grid, params.target_spacing_zyx, params.lung_margin_mm)
    record = replace(record, crop_start=start, crop_stop=stop)

    # Clip before interpolating so that air at -1000 HU cannot ring into the window
    # (B-spline overshoot); the crop is resampled directly, not the whole grid.
    clipped = sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, params.hu_min, params.hu_max)
    reference = record.grid_image(np.zeros(record.shape, dtype=np.uint8))
    resampled = sitk.Resample(
        clipped, reference, sitk.Transform(), _INTERPOLATORS[params.interpolation], params.hu_min, sitk.sitkFloat32
    )
    image = params.normalise(sitk.GetArrayFromImage(resampled))
    log.debug("preprocessed CT %s -> crop %s at %s mm", ct_size, record.shape, params.target_spacing_zyx)
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    return PreprocessedCase(image=image, lung=lung_grid[crop], record=record)
