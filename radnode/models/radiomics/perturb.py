"""Image and contour perturbations for radiomic feature robustness (seeded, physical units).

Why these perturbations
-----------------------
A radiomic feature is only worth modelling if it survives the uncertainty of the scan
position and of the contour. Following the image-perturbation approach of Zwanenburg et
al. (Sci Rep 2019, "Assessing robustness of radiomic features by image perturbation"),
each perturbation combines:

* a small in-plane rotation about the mask centroid (axial slices are thick, so CT
  rotations are in-plane) and a translation, applied to image and mask together by
  resampling onto the original grid (image trilinear, mask as a linearly interpolated
  fraction thresholded at 0.5);
* a contour *growth or shrinkage*: the mask is re-thresholded on its signed Euclidean
  distance map computed with the voxel spacing, so ``+1 mm`` dilates by one millimetre
  whatever the voxel size;
* a *noise-based contour randomisation*: a smooth Gaussian random field (white noise
  smoothed with a Gaussian of ``randomise_smooth_mm``, rescaled to unit standard
  deviation and multiplied by ``randomise_mm``) is added to the distance map before
  thresholding, so the boundary moves by a spatially varying, locally coherent amount,
  the way two observers' contours differ.

The global parameters of perturbation ``j`` (angle, shift, growth) are drawn from a
generator seeded with ``(seed, j)`` and are the same for every subject, so perturbation
``j`` is a consistent "rater" for ICC(3,1); the randomisation field is drawn per subject
from ``(seed, j, subject)``. Perturbation 0 is the unperturbed input when
``include_original`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

#: Mask fraction above which a resampled voxel stays in the region.
MASK_THRESHOLD = 0.5
#: HU outside the field of view after a rigid move (air).
OUTSIDE_HU = -1000.0


@dataclass(frozen=True)
class PerturbationSpec:
    """How many perturbations, how strong, and the seed.

    Attributes
    ----------
    count
        Perturbed versions per subject (besides the original when ``include_original``).
    rotation_deg
        Largest in-plane rotation; each perturbation draws uniformly in ``[-r, r]``.
    translation_mm
        Largest shift per axis (x, y, z); uniform in ``[-t, t]``.
    dilation_mm
        Largest contour growth (positive) or shrinkage (negative); uniform in ``[-d, d]``.
    randomise_mm
        Amplitude (standard deviation) of the noise-based contour randomisation; 0 disables it.
    randomise_smooth_mm
        Correlation length (Gaussian sigma) of the randomisation field.
    seed
        Seed of every draw.
    include_original
        Use the unperturbed input as perturbation 0.
    """

    count: int = 10
    rotation_deg: float = 5.0
    translation_mm: float = 1.0
    dilation_mm: float = 1.0
    randomise_mm: float = 1.0
    randomise_smooth_mm: float = 3.0
    seed: int = 0
    include_original: bool = True

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"perturbation count must be at least 1, got {self.count}")
        for name in ("rotation_deg", "translation_mm", "dilation_mm", "randomise_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"perturbation {name} must be >= 0, got {getattr(self, name)}")
        if self.randomise_smooth_mm <= 0:
            raise ValueError(f"randomise_smooth_mm must be > 0, got {self.randomise_smooth_mm}")

    @property
    def raters(self) -> int:
        """Versions per subject: perturbations plus the original when included."""
        return self.count + (1 if self.include_original else 0)


@dataclass(frozen=True)
class Perturbation:
    """The global parameters of one perturbation (shared by all subjects)."""

    index: int
    rotation_deg: float
    translation_mm: tuple[float, float, float]
    dilation_mm: float
    randomise_mm: float

    @property
    def identity(self) -> bool:
        return (self.rotation_deg == 0 and not any(self.translation_mm) and self.dilation_mm == 0
                and self.randomise_mm == 0)

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "rotation_deg": self.rotation_deg, "translation_mm": list(self.translation_mm),
                "dilation_mm": self.dilation_mm, "randomise_mm": self.randomise_mm}


def perturbations(spec: PerturbationSpec) -> list[Perturbation]:
    """The ``spec.raters`` perturbations, perturbation 0 the identity when the original is included."""
    out: list[Perturbation] = []
    if spec.include_original:
        out.append(Perturbation(0, 0.0, (0.0, 0.0, 0.0), 0.0, 0.0))
    for j in range(len(out), spec.raters):
        rng = np.random.default_rng((spec.seed, j))
        angle = float(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
        shift = tuple(float(v) for v in rng.uniform(-spec.translation_mm, spec.translation_mm, size=3))
        growth = float(rng.uniform(-spec.dilation_mm, spec.dilation_mm))
        out.append(Perturbation(j, angle, shift, growth, spec.randomise_mm))  # type: ignore[arg-type]
    return out


def signed_distance_mm(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Signed Euclidean distance (mm) of each voxel centre to the mask surface: negative inside.

    The Euclidean distance transforms give centre-to-centre distances (an outside voxel
    touching the mask is one voxel away, not half a voxel), so half the finest spacing is
    taken off either side: the surface lies midway between an inside and an outside voxel,
    and re-thresholding at ``g`` mm then moves it by ``g`` mm (tested).
    """
    m = np.asarray(mask, dtype=bool)
    half = 0.5 * min(spacing_zyx)
    outside = ndi.distance_transform_edt(~m, sampling=spacing_zyx)
    inside = ndi.distance_transform_edt(m, sampling=spacing_zyx)
    return np.where(m, half - inside, outside - half).astype(np.float64)


def smooth_field(shape: tuple[int, ...], spacing_zyx: tuple[float, float, float], sigma_mm: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_mm``."""
    noise = rng.standard_normal(shape)
    field = ndi.gaussian_filter(noise, sigma=[sigma_mm / s for s in spacing_zyx], mode="reflect")
    sd = float(field.std())
    return field / sd if sd > 0 else field


def perturb_mask(mask: np.ndarray, spacing_zyx: tuple[float, float, float], growth_mm: float,
                 randomise_mm: float, smooth_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Grow/shrink by ``growth_mm`` and randomise the boundary by ``randomise_mm`` (see module docstring).

    Only a band around the contour can change, so the distance map is computed on the
    mask's bounding box padded by the largest possible move.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any() or (growth_mm == 0 and randomise_mm == 0):
        return m.copy()
    reach = abs(growth_mm) + 4.0 * randomise_mm + 2.0 * max(spacing_zyx)
    box = ndi.find_objects(m.astype(np.uint8))[0]
    pad = [math.ceil(reach / s) + 1 for s in spacing_zyx]
    window = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, m.shape))
    sub = m[window]
    threshold = np.full(sub.shape, growth_mm, dtype=np.float64)
    if randomise_mm > 0:
        threshold += randomise_mm * smooth_field(sub.shape, spacing_zyx, smooth_mm, rng)
    out = np.zeros_like(m)
    out[window] = signed_distance_mm(sub, spacing_zyx) < threshold
    return out


def _rigid(centre_xyz: tuple[float, float, float], angle_deg: float,
           shift_mm: tuple[float, float, float]) -> sitk.Euler3DTransform:
    """Rotation about the patient z axis through ``centre_xyz``, then a shift (SimpleITK maps output → input)."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre_xyz)
    transform.SetRotation(0.0, 0.0, math.radians(angle_deg))
    # Resampling pulls values from T(x), so move the content by +shift with T = -shift.
    transform.SetTranslation(tuple(-v for v in shift_mm))
    return transform


def perturb_case(image: sitk.Image, mask: np.ndarray, perturbation: Perturbation, spec: PerturbationSpec,
                 subject: int) -> tuple[sitk.Image, np.ndarray]:
    """One perturbed version of a subject's image and mask (mask as ``(z, y, x)`` bool on the image grid)."""
    m = np.asarray(mask, dtype=bool)
    if perturbation.identity:
        return image, m.copy()
    spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
    rng = np.random.default_rng((spec.seed, perturbation.index, subject))
    contour = perturb_mask(m, spacing_zyx, perturbation.dilation_mm, perturbation.randomise_mm,  # type: ignore[arg-type]
                           spec.randomise_smooth_mm, rng)
    if perturbation.rotation_deg == 0 and not any(perturbation.translation_mm):
        return image, contour
    if not m.any():
        return image, contour
    centroid_zyx = ndi.center_of_mass(m)
    centre = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in reversed(centroid_zyx)])
    transform = _rigid(centre, perturbation.rotation_deg, perturbation.translation_mm)
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, OUTSIDE_HU, sitk.sitkFloat32)
    mask_image = sitk.GetImageFromArray(contour.astype(np.float32))
    mask_image.CopyInformation(image)
    fraction = sitk.Resample(mask_image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return moved, sitk.GetArrayFromImage(fraction) >= MASK_THRESHOLD
