"""Bootstrap mRMR + RF-RFE selection: informative features win; the scaler never sees held-out rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from radnode.cli.main import app
from radnode.models.classifiers.selection import (
    SelectionError,
    SelectionOptions,
    bootstrap_selection,
    mrmr,
    select_features,
    stratified_bootstrap,
)
from radnode.models.classifiers.table import (
    FeatureTable,
    write_feature_csv,
    write_label_csv,
)

INFORMATIVE = ("tumour_signal_a", "tumour_signal_b", "ring_signal_c")


def _synthetic(n: int = 120, noise: int = 50, seed: int = 0) -> tuple[FeatureTable, np.ndarray]:
    """3 informative features (shifted by the label, different scales) + ``noise`` pure-noise ones."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    informative = np.column_stack([
        100.0 + 15.0 * (y + rng.normal(0, 0.8, n)),
        -3.0 + 0.2 * (-y + rng.normal(0, 0.8, n)),
        5e3 + 800.0 * (y + rng.normal(0, 0.8, n)),
    ])
    junk = rng.normal(0, 1, (n, noise)) * rng.uniform(0.1, 1000, noise)
    values = np.hstack([junk[:, :20], informative, junk[:, 20:]])
    names = tuple([f"noise_{i:02d}" for i in range(20)] + list(INFORMATIVE) + [f"noise_{i:02d}" for i in range(20, noise)])
    order = rng.permutation(len(names))
    table = FeatureTable(tuple(f"c{i:03d}" for i in range(n)), tuple(names[i] for i in order), values[:, order])
    return table, y


FAST = SelectionOptions(bootstraps=12, mrmr_features=8, rfe_features=3, trees=40, threshold=0.5)


@pytest.mark.parametrize("relevance", ["mi", "f"])
def test_informative_features_have_the_highest_frequency(relevance: str) -> None:
    table, y = _synthetic()
    result = select_features(table, y, SelectionOptions(**{**FAST.__dict__, "relevance": relevance}))
    freq = dict(zip(result.names, result.frequency))
    top3 = sorted(freq, key=lambda n: -freq[n])[:3]
    print(relevance, {n: round(freq[n], 2) for n in INFORMATIVE}, "best noise",
          max(v for n, v in freq.items() if n not in INFORMATIVE))
    assert set(top3) == set(INFORMATIVE)
    assert set(result.selected) == set(INFORMATIVE)
    assert min(freq[n] for n in INFORMATIVE) > max(v for n, v in freq.items() if n not in INFORMATIVE)
    assert np.mean(result.oob_auc) > 0.8


def test_scaler_is_fitted_on_training_rows_only() -> None:
    table, y = _synthetic(seed=1)
    x = table.values.copy()
    in_bag = stratified_bootstrap(y, np.random.default_rng(5))
    held_out = np.setdiff1d(np.arange(len(y)), in_bag)
    assert held_out.size > 10
    first = bootstrap_selection(x, y, in_bag, FAST, seed=3)
    # The scaler's mean and scale are those of the in-bag rows (duplicates counted) ...
    np.testing.assert_allclose(first.scaler.mean_, x[in_bag].mean(axis=0))
    np.testing.assert_allclose(first.scaler.scale_, x[in_bag].std(axis=0))
    # ... and poisoning every held-out row changes neither the scaler nor the selection.
    poisoned = x.copy()
    poisoned[held_out] = np.random.default_rng(9).normal(0, 1e6, (held_out.size, x.shape[1]))
    second = bootstrap_selection(poisoned, y, in_bag, FAST, seed=3)
    np.testing.assert_array_equal(first.scaler.mean_, second.scaler.mean_)
    np.testing.assert_array_equal(first.scaler.scale_, second.scaler.scale_)
    assert first.mrmr == second.mrmr and first.selected == second.selected
    # Whereas poisoning one training row does move the scaler.
    leaked = x.copy()
    leaked[in_bag[0]] += 1e6
    assert not np.allclose(bootstrap_selection(leaked, y, in_bag, FAST, seed=3).scaler.mean_, first.scaler.mean_)


def test_mrmr_prefers_relevant_and_avoids_redundant_copies() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 60)
    a = y + rng.normal(0, 0.5, 120)
    copy_of_a = a + rng.normal(0, 0.01, 120)
    b = y + rng.normal(0, 0.7, 120)  # weaker but independent information
    x = np.column_stack([a, copy_of_a, b, rng.normal(size=(120, 5))])
    chosen = mrmr((x - x.mean(0)) / x.std(0), y, 2, relevance="f")
    assert chosen[0] in (0, 1) and chosen[1] == 2


def test_icc_filter_and_bad_input() -> None:
    table, y = _synthetic(n=40)
    icc = {n: (0.9 if n != INFORMATIVE[0] else 0.3) for n in table.names if n != "noise_00"}
    result = select_features(table, y, SelectionOptions(bootstraps=2, mrmr_features=4, rfe_features=2, trees=10),
                             icc=icc, icc_threshold=0.75)
    assert INFORMATIVE[0] not in result.names and "ICC 0.300" in result.dropped[INFORMATIVE[0]]
    assert result.dropped["noise_00"] == "not in the ICC table"
    with pytest.raises(SelectionError, match="two classes"):
        select_features(table, np.zeros(40, dtype=int), FAST)
    with pytest.raises(SelectionError, match="no feature left"):
        select_features(table, y, FAST, icc={}, icc_threshold=0.75)
    with pytest.raises(SelectionError, match="cannot exceed"):
        SelectionOptions(mrmr_features=3, rfe_features=5)


def test_cli_select_writes_stability_and_selection(tmp_path: Path) -> None:
    table, y = _synthetic()
    write_feature_csv(table, tmp_path / "features.csv")
    write_label_csv(table.case_ids, ["mutant" if v else "wild-type" for v in y], tmp_path / "labels.csv", column="EGFR")
    out = tmp_path / "sel"
    res = CliRunner().invoke(app, ["features", "select", "--features", str(tmp_path / "features.csv"), "--labels",
                                   str(tmp_path / "labels.csv"), "--endpoint", "EGFR", "--out", str(out),
                                   "--bootstraps", "8", "--mrmr", "6", "--rfe", "3", "--trees", "30",
                                   "--relevance", "f"])
    assert res.exit_code == 0, res.output
    with (out / "stability.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["feature"] for r in rows[:3]} == set(INFORMATIVE)
    assert set((out / "selected_features.txt").read_text().split()) == set(INFORMATIVE)
    assert json.loads((out / "summary.json").read_text())["options"]["bootstraps"] == 8
    assert (out / "features_selected.csv").read_text().splitlines()[0].count(",") == 3
    # A label column that is not there is a clear usage error.
    bad = CliRunner().invoke(app, ["features", "select", "--features", str(tmp_path / "features.csv"), "--labels",
                                   str(tmp_path / "labels.csv"), "--endpoint", "KRAS", "--out", str(out)])
    assert bad.exit_code == 2 and "KRAS" in bad.output
