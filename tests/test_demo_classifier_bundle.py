"""The shipped DEMO EGFR bundle: consistent, fed by the chain's own features, and it separates fresh phantoms."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from radnode.config import Settings
from radnode.models.classifiers.bundle import (
    META_FILE,
    MODEL_FILE,
    load_classifier_bundle,
)
from radnode.models.classifiers.demo_training import (
    DEMO_BUNDLE_DIR,
    DEMO_IMAGE_TYPES,
    DEMO_PHANTOM,
    DEMO_PROFILES,
    case_features,
    phantom_case,
    restricted_profile,
    train_demo_bundle,
)
from radnode.models.classifiers.endpoints import get_endpoint
from radnode.models.classifiers.table import (
    join_labels,
    read_feature_csv,
    read_label_csv,
)
from radnode.models.classifiers.training import TrainingOptions
from radnode.models.mutation import flat_features, predict_endpoints
from radnode.models.radiomics import extract_regions

#: Fresh phantoms for the held-out check: seeds far from the training cohort's.
HELD_OUT_SEEDS = range(90_000, 90_016)


def _meta() -> dict:
    return json.loads((DEMO_BUNDLE_DIR / META_FILE).read_text(encoding="utf-8"))


def test_default_settings_run_the_shipped_demo_bundle() -> None:
    settings = Settings()
    assert settings.models.classifier_bundles == {"EGFR": DEMO_BUNDLE_DIR}
    bundle = load_classifier_bundle(settings.models.classifier_bundles["EGFR"])
    meta = _meta()
    assert bundle.demo is True and meta["demo"] is True
    assert meta["training_cohort"]["synthetic"] is True and "DEMO" in meta["training_cohort"]["note"]
    assert bundle.endpoint.name == "EGFR" and meta["method"] == "B"
    digest = hashlib.sha256((DEMO_BUNDLE_DIR / MODEL_FILE).read_bytes()).hexdigest()
    assert meta["model_sha256"] == digest
    assert sum(p.stat().st_size for p in DEMO_BUNDLE_DIR.rglob("*") if p.is_file()) < 2_000_000
    # The feature list is the committed training table's columns, all from the chain's
    # tumour and ring original-image features, and the recorded profiles are the chain's.
    with (DEMO_BUNDLE_DIR / "training_features.csv").open() as fh:
        header = next(csv.reader(fh))
    assert list(bundle.meta.features) == header[1:]
    assert len(set(bundle.meta.features)) == len(bundle.meta.features)
    prefixes = tuple(f"{region}_{t.lower()}_" for region in DEMO_PROFILES for t in DEMO_IMAGE_TYPES)
    assert all(f.startswith(prefixes) for f in bundle.meta.features)
    recorded = meta["details"]["radiomics"]
    assert recorded["profiles"] == {r: settings.radiomics.profiles[r] for r in ("tumour", "ring")}
    assert recorded["ring_width_mm"] == settings.radiomics.ring_width_mm
    assert bundle.model.n_features_in_ == len(bundle.meta.features)


def test_restricted_profile_gives_the_full_profiles_values() -> None:
    image, tumour, lungs = phantom_case(90_100, 1)
    subset = case_features(image, tumour, lungs)
    full = case_features(image, tumour, lungs, image_types=None)
    assert len(full) > 10 * len(subset)
    needed = load_classifier_bundle(DEMO_BUNDLE_DIR).meta.features
    assert all(subset[name] == full[name] for name in needed)  # bit-identical, not approximately
    with pytest.raises(ValueError, match="does not enable"):
        restricted_profile("tumour-v1", ("NoSuchImageType",))


def _chain_features(seed: int, label: int, tmp_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Features of a fresh phantom through the chain's stages (DICOM in), and through the training path."""
    from radnode.models.tumour import TumourSegmentation
    from radnode.phantom.generate import generate_phantom
    from radnode.pipeline import chain

    settings = Settings()
    written = generate_phantom(tmp_path / str(seed), seed, tumors=1, mutation=label, **DEMO_PHANTOM)
    series = chain.load_and_check(written.ct_dir, settings)
    lungs = chain.find_lungs(series)
    truth = TumourSegmentation(mask=written.volume.tumors > 0, method="truth", version="1", demo=True)
    regions = chain.make_regions(series, lungs, truth, settings)
    profiles = {r: restricted_profile(settings.radiomics.profiles[r]) for r in ("tumour", "ring")}
    radiomics = extract_regions(series.image, {"tumour": regions.tumour, "ring": regions.ring}, profiles,
                                parallel=False)
    chain_feats = flat_features({n: r.features for n, r in radiomics.regions.items() if r.status == "done"})
    image, tumour, lung_mask = phantom_case(seed, label)
    return chain_feats, case_features(image, tumour, lung_mask)


def test_fresh_phantoms_through_the_chain_are_separated(tmp_path: Path) -> None:
    seeds = _meta()["training_cohort"]["seeds"]
    assert not any(seeds[0] <= s <= seeds[1] for s in HELD_OUT_SEEDS)
    bundles = Settings().models.classifier_bundles
    labels, probabilities = [], []
    for i, seed in enumerate(HELD_OUT_SEEDS):
        label = i % 2
        try:
            feats, training_path = _chain_features(seed, label, tmp_path)
        except RuntimeError:  # the tumour did not fit this small grid
            continue
        if i < 2:
            assert feats == training_path  # the bundle was trained on exactly the chain's numbers
        result = predict_endpoints(bundles, feats)
        assert not result.errors, result.errors
        (prediction,) = result.predictions
        assert prediction.demo is True and prediction.endpoint == "EGFR"
        labels.append(label)
        probabilities.append(prediction.probability)
    auc = roc_auc_score(labels, probabilities)
    print(f"shipped demo bundle on {len(labels)} fresh phantoms: AUC {auc:.3f}")
    assert len(labels) >= 12 and min(labels.count(0), labels.count(1)) >= 5
    assert auc >= 0.8


def _committed(name: str):
    table = read_feature_csv(DEMO_BUNDLE_DIR / f"{name}_features.csv")
    sub, texts = join_labels(table, read_label_csv(DEMO_BUNDLE_DIR / f"{name}_labels.csv", "EGFR"))
    return sub, get_endpoint("EGFR").encode(texts)


FAST = TrainingOptions(zoo=("lr",), zoo_repeats=1)


def test_same_training_code_recovers_signal_and_shuffled_labels_stay_near_chance() -> None:
    train, y_train = _committed("training")
    test, y_test = _committed("held_out")
    real = train_demo_bundle(train, y_train, {"note": "test"}, options=FAST)
    real_auc = roc_auc_score(y_test, real.predict_proba(test)[:, 1])
    rng = np.random.default_rng(2024)
    shuffled = []
    for _ in range(5):
        bundle = train_demo_bundle(train, rng.permutation(y_train), {"note": "shuffled"}, options=FAST)
        shuffled.append(roc_auc_score(y_test, bundle.predict_proba(test)[:, 1]))
    print(f"held-out AUC real labels {real_auc:.3f}; shuffled {np.round(shuffled, 3).tolist()}")
    assert real_auc >= 0.8
    assert 0.35 <= float(np.mean(shuffled)) <= 0.65


def test_mismatching_or_nan_features_end_as_clear_errors() -> None:
    bundle = load_classifier_bundle(DEMO_BUNDLE_DIR)
    test, _ = _committed("held_out")
    row = dict(zip(test.names, test.values[0]))
    dropped = bundle.meta.features[5]
    missing = predict_endpoints({"EGFR": DEMO_BUNDLE_DIR}, {k: v for k, v in row.items() if k != dropped})
    assert not missing.predictions
    assert "FeatureMismatchError" in missing.errors["EGFR"] and dropped in missing.errors["EGFR"]
    nan_row = {**row, bundle.meta.features[0]: math.nan}
    nan = predict_endpoints({"EGFR": DEMO_BUNDLE_DIR}, nan_row)
    assert "NaNFeatureError" in nan.errors["EGFR"] and bundle.meta.features[0] in nan.errors["EGFR"]
    ok = predict_endpoints({"EGFR": DEMO_BUNDLE_DIR}, row)
    assert 0.0 <= ok.predictions[0].probability <= 1.0 and ok.to_dict()["predictions"][0]["demo"] is True
