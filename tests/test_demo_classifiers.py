"""The DEMO classifiers recover the phantom's planted mutation; shuffled labels do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit

from radnode.models.classifiers.bundle import META_FILE, load_classifier_bundle, save_classifier_bundle
from radnode.models.classifiers.demo_cohort import (
    AIR_HU,
    CROP_SIZE,
    DemoCohort,
    build_demo_cohort,
    case_features,
    largest_slice_crop,
)
from radnode.models.classifiers.endpoints import DEMO_ENDPOINT
from radnode.models.classifiers.training import TrainingOptions, train_classifier

#: Smaller search spaces than the committed script, to keep the test short.
FAST = {
    "A": TrainingOptions(method_a_classifiers=("qda", "svc", "dt")),
    "B": TrainingOptions(zoo=("lr", "lda", "nb", "knn"), zoo_repeats=2),
}
SPLITS = 3


@pytest.fixture(scope="module")
def cohort() -> DemoCohort:
    return build_demo_cohort(64, matrix=128, slices=24, mutation_effect=1.0)


def _held_out_aucs(cohort: DemoCohort, labels: np.ndarray, method: str) -> list[float]:
    splitter = StratifiedShuffleSplit(n_splits=SPLITS, test_size=0.3, random_state=11)
    aucs = []
    for train, test in splitter.split(cohort.table.values, labels):
        bundle = train_classifier(cohort.table.rows(train), labels[train], DEMO_ENDPOINT, method, demo=True,
                                  options=FAST[method])
        proba = bundle.predict_proba(cohort.table.rows(test))[:, 1]
        aucs.append(roc_auc_score(labels[test], proba))
    return aucs


def test_cohort_is_balanced_and_labelled(cohort: DemoCohort) -> None:
    assert len(cohort.labels) == 64 and cohort.labels.sum() == 32
    assert np.isfinite(cohort.table.values).all()
    assert any(n.startswith("tumour_") for n in cohort.table.names)
    assert any(n.startswith("ring_") for n in cohort.table.names)
    assert "DEMO" in cohort.description["note"]


@pytest.mark.parametrize("method", ["A", "B"])
def test_training_recovers_the_planted_signal(cohort: DemoCohort, method: str) -> None:
    aucs = _held_out_aucs(cohort, cohort.labels, method)
    print(f"method {method} held-out AUCs: {np.round(aucs, 3).tolist()}")
    assert np.mean(aucs) >= 0.8


def test_shuffled_labels_stay_near_chance(cohort: DemoCohort) -> None:
    rng = np.random.default_rng(2024)
    means = []
    for _ in range(4):
        shuffled = rng.permutation(cohort.labels)
        means.append(np.mean(_held_out_aucs(cohort, shuffled, "B")))
    print(f"shuffled-label held-out AUC means: {np.round(means, 3).tolist()}")
    assert 0.35 <= np.mean(means) <= 0.65


def test_demo_bundle_is_flagged(cohort: DemoCohort, tmp_path: Path) -> None:
    bundle = train_classifier(cohort.table, cohort.labels, DEMO_ENDPOINT, "B", demo=True,
                              training_cohort=cohort.description, options=FAST["B"])
    path = save_classifier_bundle(bundle, tmp_path / "demo")
    meta = json.loads((path / META_FILE).read_text())
    assert meta["demo"] is True and "DEMO" in meta["training_cohort"]["note"]
    assert load_classifier_bundle(path).demo


def test_crop_and_features_of_one_phantom() -> None:
    from radnode.phantom import synthesize_volume

    vol = synthesize_volume(77, slices=24, tumors=1, matrix=128, mutation=1)
    tumour = vol.tumors > 0
    crop = largest_slice_crop(vol.hu, tumour)
    assert crop.shape == (CROP_SIZE, CROP_SIZE)
    z = int(np.argmax(tumour.sum(axis=(1, 2))))
    cy, cx = (round(c) for c in ndimage.center_of_mass(tumour[z]))
    assert crop[CROP_SIZE // 2, CROP_SIZE // 2] == vol.hu[z, cy, cx]
    assert crop[CROP_SIZE // 2 - 3, CROP_SIZE // 2 + 5] == vol.hu[z, cy - 3, cx + 5]
    assert (crop == AIR_HU).any()  # a 160-pixel crop of a 128-pixel grid is padded with air
    spacing = tuple(float(s) for s in reversed(vol.geometry.spacing_xyz))
    feats = case_features(vol.hu, tumour, vol.lungs > 0, spacing)
    assert feats["tumour_volume_ml"] == pytest.approx(tumour.sum() * np.prod(spacing) / 1000.0)
    assert feats["tumour_hu_mean"] == pytest.approx(vol.hu[tumour].mean())
    assert feats["ring_volume_ml"] > 0 and 0 < feats["tumour_sphericity"] <= 1.05
    with pytest.raises(ValueError, match="empty"):
        case_features(vol.hu, np.zeros_like(tumour), vol.lungs > 0, spacing)
