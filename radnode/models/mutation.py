"""Mutation-status inference in the chain: configured classifier bundles per endpoint.

Each bundle runs on its own; a bundle that cannot run on this case (missing features,
NaN features, a broken file) is reported with its reason and the other endpoints still
run, because the SEG and RTSTRUCT of the job must never depend on them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from radnode.models.classifiers.bundle import (
    ClassifierBundleError,
    bundle_checksum,
    decision_threshold,
    load_classifier_bundle,
)

#: Threshold of the positive class when a bundle names none (as in its evaluation report).
DEFAULT_THRESHOLD = 0.5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointPrediction:
    """Probability of the positive (last) class of one endpoint, with its provenance."""

    endpoint: str
    probability: float
    classifier_name: str
    classifier_version: str
    training_cohort: str
    demo: bool
    checksum: str = ""
    threshold: float = DEFAULT_THRESHOLD
    negative_class: str = "negative"
    positive_class: str = "positive"


@dataclass
class MutationResult:
    """Predictions that ran, and the reason for every endpoint that did not."""

    predictions: list[EndpointPrediction] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"predictions": [vars(p) for p in self.predictions], "errors": dict(self.errors)}


def flat_features(per_region: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{region: {feature: v}}`` → ``{"<region>_<feature>": v}``, the classifiers' column names."""
    return {f"{region}_{name}": value for region, values in per_region.items() for name, value in values.items()}


def deep_feature_columns(vector: list[float]) -> dict[str, float]:
    """The tumour network's deep-feature vector as columns ``deep_000``, ``deep_001``, ...

    Method A bundles are trained on these names (a features CSV with the same columns).
    """
    return {f"deep_{i:03d}": float(v) for i, v in enumerate(vector)}


def predict_endpoints(
    bundles: Mapping[str, Path], features: Mapping[str, float], pins: Mapping[str, str] | None = None
) -> MutationResult:
    """Run every configured bundle on one case's features (``pins``: endpoint -> pinned SHA-256)."""
    result = MutationResult()
    for endpoint, path in bundles.items():
        try:
            bundle = load_classifier_bundle(path, (pins or {}).get(endpoint))
            probabilities = bundle.predict_one(dict(features))
            threshold = decision_threshold(bundle.meta, DEFAULT_THRESHOLD)
            checksum = bundle_checksum(bundle)
        except (ClassifierBundleError, OSError, ValueError) as exc:
            result.errors[endpoint] = f"{type(exc).__name__}: {exc}"
            log.warning("classifier for %s not applied: %s", endpoint, exc)
            continue
        meta = bundle.meta
        positive = meta.endpoint.classes[-1]
        probability = float(probabilities[positive])
        if not math.isfinite(probability):
            result.errors[endpoint] = "classifier returned a non-finite probability"
            continue
        result.predictions.append(
            EndpointPrediction(
                endpoint=meta.endpoint.name,
                probability=probability,
                classifier_name=f"radnode-{meta.endpoint.name}-method-{meta.method}",
                classifier_version=meta.model_sha256[:12] or "unversioned",
                training_cohort=json.dumps(meta.training_cohort, sort_keys=True)[:1024],
                demo=meta.demo,
                checksum=checksum,
                threshold=threshold,
                negative_class=meta.endpoint.classes[0],
                positive_class=positive,
            )
        )
    return result
