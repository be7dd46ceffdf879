"""The shipped DEMO EGFR classifier: phantom cohort → the chain's radiomics → method-B bundle.

Why a second demo cohort
------------------------
:mod:`.demo_cohort` describes tumours with its own numpy features, whose names the chain
never produces. The bundle the chain runs by default (``models.classifier_bundles``) must
read the chain's own columns, ``<region>_<pyradiomics feature>``
(:func:`radnode.models.mutation.flat_features`), computed with the chain's profiles
(``tumour-v1``, ``ring-v1``). This module computes exactly those:

* the CT is the phantom written as a DICOM series and read back with the chain's reader
  (:func:`radnode.dicom_io.series.load_series`: same pixel type and geometry, including
  the slice spacing the reader derives from the slice positions);
* the lungs come from :func:`radnode.models.lungmask.segment_lungs` (the chain's lung stage),
  the tumour is the phantom's true tumour, and the regions from
  :func:`radnode.models.regions.build_regions` with the chain's default 3 mm ring;
* features come from :func:`radnode.models.radiomics.extract_regions` with the shipped
  profiles restricted to the image types the bundle uses (:data:`DEMO_IMAGE_TYPES`, the
  original image). pyradiomics computes each image type independently from the same
  preprocessed image and mask, so the restricted run gives the very numbers of the full
  profile for those features (tested for equality) at a fraction of the cost.

The classifier is method B (:mod:`.method_b`): tumour and ring RadScores (L1-logistic) and
the classical zoo without its tree ensembles and MLP (keeps the bundle small, < 100 kB).
Everything is labelled DEMO: a planted synthetic label on synthetic images says nothing
about any patient's EGFR status.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radnode.models.classifiers.bundle import ClassifierBundle
from radnode.models.classifiers.demo_cohort import (
    DEMO_DIAMETER_MM,
    DEMO_NOTE,
    DemoCohort,
)
from radnode.models.classifiers.endpoints import get_endpoint
from radnode.models.classifiers.table import FeatureTable
from radnode.models.classifiers.training import TrainingOptions, train_classifier
from radnode.models.mutation import flat_features
from radnode.models.radiomics.extract import (
    ENGINE_VERSION,
    Profile,
    extract_regions,
    load_profile,
)

logger = logging.getLogger(__name__)

#: Where the shipped demo bundle lives (package data).
DEMO_BUNDLE_DIR = Path(__file__).resolve().parent / "demo" / "egfr-demo"
#: Endpoint the demo bundle is filed under.
DEMO_ENDPOINT_NAME = "EGFR"
#: The chain's default profiles of the regions the bundle reads.
DEMO_PROFILES: dict[str, str] = {"tumour": "tumour-v1", "ring": "ring-v1"}
#: pyradiomics image types whose features the bundle uses.
DEMO_IMAGE_TYPES: tuple[str, ...] = ("Original",)
#: Ring width of the chain's default settings (``radiomics.ring_width_mm``).
DEMO_RING_WIDTH_MM = 3.0
#: Phantom options of the cohort (a 128 x 128 x 24 grid keeps a case near one second).
DEMO_PHANTOM: dict[str, Any] = {"matrix": 128, "slices": 24, "mutation_effect": 1.0,
                                "tumor_diameter_mm": DEMO_DIAMETER_MM}
#: First seed of the training cohort (tests draw held-out phantoms far from it).
TRAINING_FIRST_SEED = 20_000
#: Zoo of the shipped bundle: the small, linear-ish members.
DEMO_ZOO: tuple[str, ...] = ("lr", "lda", "nb", "svm", "knn")


def restricted_profile(profile: str | Path | Profile, image_types: Sequence[str] = DEMO_IMAGE_TYPES) -> Profile:
    """``profile`` with only ``image_types`` enabled (same settings, classes and label).

    Raises
    ------
    ValueError
        When the profile does not enable one of ``image_types``.
    """
    base = load_profile(profile)
    params = copy.deepcopy(base.params)
    enabled = params.get("imageType") or {}
    missing = [t for t in image_types if t not in enabled]
    if missing:
        raise ValueError(f"profile {base.label} does not enable image type(s) {missing}; it has {list(enabled)}")
    params["imageType"] = {t: enabled[t] for t in image_types}
    return Profile(base.name, base.version, base.description, params, base.fast_shape, base.min_voxels)


def case_features(image: Any, tumour: np.ndarray, lungs: np.ndarray, *,
                  profiles: Mapping[str, str] = DEMO_PROFILES,
                  image_types: Sequence[str] | None = DEMO_IMAGE_TYPES,
                  ring_width_mm: float = DEMO_RING_WIDTH_MM) -> dict[str, float]:
    """The chain's flat features (``<region>_<feature>``) of tumour and ring of one CT.

    ``image`` is a SimpleITK CT, ``tumour`` and ``lungs`` boolean ``(z, y, x)`` masks on it.
    ``image_types=None`` uses the full profiles.
    """
    from radnode.models.regions import build_regions

    spacing_zyx = tuple(float(s) for s in reversed(image.GetSpacing()))
    regions = build_regions(tumour, lungs, spacing_zyx, ring_width_mm=ring_width_mm)
    chosen = {r: (restricted_profile(p, image_types) if image_types else load_profile(p)) for r, p in profiles.items()}
    masks = {"tumour": regions.tumour, "ring": regions.ring}
    result = extract_regions(image, {r: masks[r] for r in chosen}, chosen, parallel=False)
    return flat_features({name: r.features for name, r in result.regions.items() if r.status == "done"})


def phantom_case(seed: int, label: int, **options: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """One phantom as the chain sees it: CT read back from DICOM, true tumour, lungs from the lung stage.

    The series is written as DICOM and read with the chain's reader
    (:func:`radnode.dicom_io.series.load_series`) because the reader derives the slice
    spacing from the slice positions (``2.5000000000000013`` mm rather than ``2.5``), and
    pyradiomics' resampled grid, hence the texture features, follow that spacing.
    """
    from radnode.dicom_io.series import load_series
    from radnode.models.lungmask import segment_lungs
    from radnode.phantom.generate import generate_phantom

    with tempfile.TemporaryDirectory(prefix="radnode-demo-") as scratch:
        written = generate_phantom(Path(scratch), seed, tumors=1, mutation=label, **{**DEMO_PHANTOM, **options})
        image = load_series(written.ct_dir, strict=False).image
    lungs = segment_lungs(image).lungs > 0
    return image, written.volume.tumors > 0, lungs


def build_radiomics_cohort(n_cases: int, *, first_seed: int = TRAINING_FIRST_SEED,
                           image_types: Sequence[str] | None = DEMO_IMAGE_TYPES,
                           **options: Any) -> DemoCohort:
    """``n_cases`` phantoms (alternating labels) with the chain's tumour and ring radiomics.

    A seed whose tumour does not fit the grid, or whose features are not all finite, is
    skipped (the next seed is used). Columns are the features every case has.
    """
    if n_cases < 4:
        raise ValueError(f"a demo cohort needs at least 4 cases, got {n_cases}")
    rows: list[dict[str, float]] = []
    ids: list[str] = []
    labels: list[int] = []
    seed = first_seed
    skipped = 0
    while len(rows) < n_cases:
        label = len(rows) % 2
        try:
            image, tumour, lungs = phantom_case(seed, label, **options)
        except RuntimeError as exc:
            logger.info("demo seed %d skipped: %s", seed, exc)
            seed, skipped = seed + 1, skipped + 1
            continue
        feats = case_features(image, tumour, lungs, image_types=image_types)
        if not feats or not any(k.startswith("ring_") for k in feats) or \
                not all(math.isfinite(v) for v in feats.values()):
            seed, skipped = seed + 1, skipped + 1
            continue
        rows.append(feats)
        ids.append(f"demo-{seed}")
        labels.append(label)
        seed += 1
        if len(rows) % 10 == 0:
            logger.info("demo cohort: %d/%d cases", len(rows), n_cases)
    names = tuple(n for n in rows[0] if all(n in r for r in rows))
    table = FeatureTable(tuple(ids), names, np.array([[r[n] for n in names] for r in rows]))
    description = {
        "kind": "synthetic phantom cohort (DEMO)",
        "note": DEMO_NOTE,
        "synthetic": True,
        "cases": n_cases,
        "positives": int(sum(labels)),
        "seeds": [first_seed, seed - 1],
        "skipped_seeds": skipped,
        "generator": "radnode.phantom.synthesize_volume",
        "phantom": {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**DEMO_PHANTOM, **options}.items()},
        "label": "planted phantom mutation label filed under EGFR (not a real EGFR status)",
        "segmentation": "phantom truth tumour; lungs from radnode.models.lungmask (the chain's lung stage)",
    }
    return DemoCohort(table, np.array(labels, dtype=np.int64), None, description)


def radiomics_details(image_types: Sequence[str] = DEMO_IMAGE_TYPES) -> dict[str, Any]:
    """How the bundle's features must be computed (recorded in ``classifier.json`` details)."""
    return {"profiles": dict(DEMO_PROFILES), "image_types": list(image_types), "engine": "pyradiomics",
            "engine_version": ENGINE_VERSION, "ring_width_mm": DEMO_RING_WIDTH_MM}


def train_demo_bundle(table: FeatureTable, labels: np.ndarray, training_cohort: Mapping[str, Any], *,
                      options: TrainingOptions | None = None) -> ClassifierBundle:
    """Method-B bundle for the demo endpoint, flagged ``demo`` with its provenance."""
    opts = options or TrainingOptions(zoo=DEMO_ZOO)
    bundle = train_classifier(table, labels, get_endpoint(DEMO_ENDPOINT_NAME), "B",
                              training_cohort=dict(training_cohort), demo=True, options=opts)
    bundle.meta.details["note"] = DEMO_NOTE
    bundle.meta.details["radiomics"] = radiomics_details()
    return bundle
