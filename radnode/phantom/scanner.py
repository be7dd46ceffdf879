"""What the scanner adds to the anatomy: in-plane blur and correlated quantum noise.

Blur: the in-plane point spread function of a standard reconstruction kernel, a
Gaussian of :data:`PSF_SIGMA_MM` (about 1 mm FWHM). It is applied to the anatomy before
tumours are inserted, so tumour truth stays voxel-exact.

Noise: filtered back-projection turns white quantum noise into noise with a band-pass
noise power spectrum (low at zero frequency, peaking at mid frequencies, cut by the
kernel's apodisation). The noise is drawn directly in the 2-D Fourier domain of each
slice, shaped by the transfer function of a difference of two Gaussians (that band-pass
shape), and transformed back with one inverse FFT per volume. Slices are reconstructed
independently, so noise is uncorrelated along z. Its
standard deviation scales like ``1 / sqrt(voxel volume)`` (more photons per voxel) from
:data:`REFERENCE_NOISE_HU` at 0.703 x 0.703 x 2.5 mm, typical of a standard-dose chest
CT, and is lower in the air around the patient, where the rays are less attenuated.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from radnode.phantom.geometry import VolumeGeometry

#: Sigma of the in-plane point spread function (mm).
PSF_SIGMA_MM = 0.45
#: Noise standard deviation (HU) in the patient at the reference voxel size.
REFERENCE_NOISE_HU = 18.0
#: Reference voxel volume (mm^3): 0.703125 x 0.703125 x 2.5 mm.
REFERENCE_VOXEL_MM3 = 0.703125 * 0.703125 * 2.5
#: Noise outside the patient relative to inside.
AIR_NOISE_RATIO = 0.6
#: Sigmas (mm) of the two Gaussians whose difference shapes the noise power spectrum.
NOISE_SIGMAS_MM = (0.5, 1.5)
#: Weight of the wide Gaussian (how much low-frequency noise is removed).
NOISE_LOW_CUT = 0.5


def default_noise_hu(geometry: VolumeGeometry) -> float:
    """Noise std in the patient for this grid's voxel size."""
    return REFERENCE_NOISE_HU * float(np.sqrt(REFERENCE_VOXEL_MM3 / geometry.voxel_volume_mm3))


def blur_in_plane(hu: np.ndarray, geometry: VolumeGeometry, sigma_mm: float = PSF_SIGMA_MM) -> np.ndarray:
    """Return ``hu`` blurred by the in-plane PSF (slices are not mixed)."""
    sx, sy, _ = geometry.spacing_xyz
    return ndimage.gaussian_filter(hu, (0.0, sigma_mm / sy, sigma_mm / sx), mode="nearest")


def add_noise(
    hu: np.ndarray, body: np.ndarray, geometry: VolumeGeometry, rng: np.random.Generator, sigma_hu: float
) -> None:
    """Add correlated CT noise of std ``sigma_hu`` in the body (in place, float32 ``hu``).

    Parameters
    ----------
    hu
        Image (float32, changed in place).
    body
        bool mask of the patient; outside it the noise is :data:`AIR_NOISE_RATIO` times
        lower.
    geometry
        Grid (pixel spacing sets the noise texture's grain).
    rng
        Random source.
    sigma_hu
        Noise standard deviation inside the patient (0 for a noise-free image).
    """
    if sigma_hu <= 0:
        return
    sx, sy, _ = geometry.spacing_xyz
    nz, ny, nx = hu.shape
    # White complex noise on the half spectrum of each slice (rfft layout).
    spectrum = rng.standard_normal((nz, ny, nx // 2 + 1, 2), dtype=np.float32).view(np.complex64)[..., 0]
    f2 = (np.fft.fftfreq(ny, d=sy)[:, None] ** 2 + np.fft.rfftfreq(nx, d=sx)[None, :] ** 2).astype(np.float32)
    narrow, wide = NOISE_SIGMAS_MM
    shape = np.exp(-2.0 * np.pi**2 * narrow**2 * f2) - NOISE_LOW_CUT * np.exp(-2.0 * np.pi**2 * wide**2 * f2)
    spectrum *= shape.astype(np.float32)
    noise = sfft.irfft2(spectrum, s=(ny, nx), workers=-1).astype(np.float32, copy=False)
    del spectrum
    sample = noise[:, ::3, ::3]
    std = float(sample.std())
    if std > 0:
        noise *= np.float32(sigma_hu / std)
    noise[~body] *= np.float32(AIR_NOISE_RATIO)
    hu += noise
