"""A synthetic DEMO cohort for the demo classifiers: phantoms with a planted mutation label.

Each case is one :func:`radnode.phantom.synthesize_volume` phantom with one tumour and a
known binary label (``mutation`` 0 or 1, alternating so the classes are balanced). A
mutant tumour is more heterogeneous (texture std × (1 + e)), more lobulated and more
spiculated (:mod:`radnode.phantom.lesions`), so features of texture and shape carry the
label; size, position and tumour type do not.

Features are simple and computed from the truth masks with numpy/scipy so that the
cohort does not depend on the radiomics extractor:

* tumour (``tumour_*``): HU mean, std, 10/25/50/75/90th percentiles, IQR, skewness,
  excess kurtosis, mean gradient magnitude and mean local (3 × 3 × 3) standard deviation
  (texture), volume, surface area, surface-to-volume ratio, sphericity and longest
  diameter (:func:`radnode.models.regions.region_statistics`);
* peritumoral ring (``ring_*``, 3 mm, restricted to lung): HU mean, std, 10/50/90th
  percentiles, volume;
* a 160 × 160 HU crop centred on the tumour at its largest axial slice (for the deep
  branch; padded with air where the crop leaves the grid).

Everything here is labelled DEMO: a synthetic label on synthetic images says nothing
about any real mutation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from radnode.models.classifiers.table import FeatureTable
from radnode.models.regions import peritumoral_ring, region_statistics

logger = logging.getLogger(__name__)

#: Defaults of the demo cohort (a build of about 30 s on one core).
DEFAULT_CASES = 64
DEFAULT_MATRIX = 128
DEFAULT_SLICES = 24
DEFAULT_EFFECT = 0.6
#: Tumour diameter range (mm) of the demo phantoms: large enough to have a texture.
DEMO_DIAMETER_MM = (14.0, 35.0)
#: Side of the deep-branch crop (pixels).
CROP_SIZE = 160
#: HU of the padding outside the grid (air).
AIR_HU = -1000.0
#: Text attached to everything derived from this cohort.
DEMO_NOTE = ("DEMO: synthetic phantom cohort with a planted mutation label; not trained on patients, "
             "not for clinical use")


@dataclass(frozen=True)
class DemoCohort:
    """The cohort.

    Attributes
    ----------
    table
        Features, case ids ``demo-<seed>``.
    labels
        Planted labels (0 wild type, 1 mutant).
    crops
        ``(N, 160, 160)`` float32 HU crops at the largest tumour slice (or ``None``).
    description
        Parameters of the cohort (for a bundle's ``training_cohort``).
    """

    table: FeatureTable
    labels: np.ndarray
    crops: np.ndarray | None
    description: dict[str, Any]


def _moments(values: np.ndarray) -> dict[str, float]:
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return {
        "hu_mean": float(values.mean()), "hu_std": float(values.std()),
        "hu_p10": float(p10), "hu_p25": float(p25), "hu_p50": float(p50), "hu_p75": float(p75),
        "hu_p90": float(p90), "hu_iqr": float(p75 - p25),
        "hu_skewness": float(stats.skew(values)) if values.size > 2 else 0.0,
        "hu_kurtosis": float(stats.kurtosis(values)) if values.size > 3 else 0.0,
    }


def case_features(hu: np.ndarray, tumour: np.ndarray, lung: np.ndarray,
                  spacing_zyx: tuple[float, float, float], ring_width_mm: float = 3.0) -> dict[str, float]:
    """Tumour and ring features of one case (see the module docstring).

    Raises
    ------
    ValueError
        When the tumour mask is empty.
    """
    t = np.asarray(tumour, dtype=bool)
    if not t.any():
        raise ValueError("the tumour mask is empty: no features can be computed")
    img = np.asarray(hu, dtype=np.float64)
    vals = img[t]
    out = {f"tumour_{k}": v for k, v in _moments(vals).items()}
    box = ndi.find_objects(t.astype(np.uint8))[0]
    pad = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in box)
    sub, sub_mask = img[pad], t[pad]
    grad = np.sqrt(sum(ndi.sobel(sub, axis=a) ** 2 for a in range(3)) / np.square(spacing_zyx).sum())
    mean = ndi.uniform_filter(sub, 3)
    local_sd = np.sqrt(np.maximum(ndi.uniform_filter(sub * sub, 3) - mean * mean, 0.0))
    out["tumour_gradient_mean"] = float(grad[sub_mask].mean())
    out["tumour_local_std_mean"] = float(local_sd[sub_mask].mean())
    st = region_statistics(t, img, spacing_zyx, "tumour")
    volume_mm3 = st.volume_ml * 1000.0
    out.update({
        "tumour_volume_ml": st.volume_ml,
        "tumour_surface_mm2": float(st.surface_area_mm2 or 0.0),
        "tumour_surface_to_volume": float((st.surface_area_mm2 or 0.0) / volume_mm3) if volume_mm3 else math.nan,
        "tumour_sphericity": float(st.sphericity) if st.sphericity is not None else math.nan,
        "tumour_max_diameter_mm": float(st.max_diameter_mm or 0.0),
    })
    ring = peritumoral_ring(t, spacing_zyx, ring_width_mm, lung)
    if ring.any():
        rv = img[ring]
        p10, p50, p90 = np.percentile(rv, [10, 50, 90])
        out.update({"ring_hu_mean": float(rv.mean()), "ring_hu_std": float(rv.std()), "ring_hu_p10": float(p10),
                    "ring_hu_p50": float(p50), "ring_hu_p90": float(p90)})
    else:
        out.update({k: math.nan for k in ("ring_hu_mean", "ring_hu_std", "ring_hu_p10", "ring_hu_p50", "ring_hu_p90")})
    out["ring_volume_ml"] = float(ring.sum() * np.prod(spacing_zyx) / 1000.0)
    return out


def largest_slice_crop(hu: np.ndarray, tumour: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """``size × size`` HU crop centred on the tumour centroid of its largest axial slice."""
    t = np.asarray(tumour, dtype=bool)
    if not t.any():
        raise ValueError("the tumour mask is empty: no crop")
    z = int(np.argmax(t.sum(axis=(1, 2))))
    cy, cx = (round(c) for c in ndi.center_of_mass(t[z]))
    half = size // 2
    padded = np.pad(np.asarray(hu[z], dtype=np.float32), half, constant_values=AIR_HU)
    return padded[cy : cy + size, cx : cx + size].copy()


def build_demo_cohort(
    n_cases: int = DEFAULT_CASES,
    *,
    matrix: int = DEFAULT_MATRIX,
    slices: int = DEFAULT_SLICES,
    mutation_effect: float = DEFAULT_EFFECT,
    first_seed: int = 1000,
    with_crops: bool = False,
) -> DemoCohort:
    """Build the cohort: ``n_cases`` phantoms with alternating labels and distinct seeds.

    A phantom whose tumour cannot be placed on the small grid is skipped (the next seed
    is used), so the cohort always has ``n_cases`` cases.
    """
    from radnode.phantom import synthesize_volume

    if n_cases < 4:
        raise ValueError(f"a demo cohort needs at least 4 cases, got {n_cases}")
    rows: list[dict[str, float]] = []
    ids: list[str] = []
    labels: list[int] = []
    crops: list[np.ndarray] = []
    seed = first_seed
    while len(rows) < n_cases:
        label = len(rows) % 2
        try:
            vol = synthesize_volume(seed, slices=slices, tumors=1, matrix=matrix, mutation=label,
                                    mutation_effect=mutation_effect, tumor_diameter_mm=DEMO_DIAMETER_MM)
        except RuntimeError as exc:
            logger.info("demo seed %d skipped: %s", seed, exc)
            seed += 1
            continue
        tumour = vol.tumors > 0
        spacing = tuple(float(s) for s in reversed(vol.geometry.spacing_xyz))
        feats = case_features(vol.hu, tumour, vol.lungs > 0, spacing)
        if not all(math.isfinite(v) for v in feats.values()):
            seed += 1
            continue
        rows.append(feats)
        ids.append(f"demo-{seed}")
        labels.append(vol.mutation)
        if with_crops:
            crops.append(largest_slice_crop(vol.hu, tumour))
        seed += 1
    names = tuple(rows[0])
    table = FeatureTable(tuple(ids), names, np.array([[r[n] for n in names] for r in rows]))
    description = {
        "kind": "synthetic phantom cohort (DEMO)",
        "note": DEMO_NOTE,
        "cases": n_cases,
        "positives": int(sum(labels)),
        "matrix": matrix,
        "slices": slices,
        "mutation_effect": mutation_effect,
        "tumour_diameter_mm": list(DEMO_DIAMETER_MM),
        "seeds": [first_seed, seed - 1],
        "generator": "radnode.phantom.synthesize_volume",
    }
    return DemoCohort(table, np.array(labels, dtype=np.int64),
                      np.stack(crops) if with_crops else None, description)
