"""radnode's ComBat agrees with neuroCombat to 1e-6 (stored reference and a live run), a saved
fit harmonises new cases like neuroCombat's from-training path, and the PCA plot shows the
batch separation going away."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from typer.testing import CliRunner

from radnode.cli.main import app
from radnode.models.classifiers.harmonise import HarmonisationError, apply_combat, combat, load_fit, save_fit
from radnode.models.classifiers.table import FeatureTable, read_feature_csv, write_feature_csv

REFERENCE = Path(__file__).parent / "data" / "combat_reference.npz"
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


def _covariates(ref: dict[str, np.ndarray]) -> np.ndarray:
    return np.column_stack([ref["sex"], ref["age"]]).astype(float)  # sex=1 indicator (level 0 dropped), age


def test_matches_stored_neurocombat_reference(ref: dict[str, np.ndarray]) -> None:
    batches = [str(b) for b in ref["batches"]]
    with_cov, _ = combat(ref["values"], batches, _covariates(ref))
    plain, fit = combat(ref["values"], batches)
    no_eb, _ = combat(ref["values"], batches, eb=False)
    assert np.abs(with_cov - ref["neurocombat_with_covariates"]).max() < TOLERANCE
    assert np.abs(plain - ref["neurocombat_plain"]).max() < TOLERANCE
    assert np.abs(no_eb - ref["neurocombat_no_eb"]).max() < TOLERANCE
    applied = apply_combat(ref["new_values"], [str(b) for b in ref["new_batches"]], None, fit)
    assert np.abs(applied - ref["neurocombat_from_training"]).max() < TOLERANCE
    assert np.abs(plain - ref["values"]).max() > 0.5  # the harmonisation did change the data


def test_matches_live_neurocombat_on_other_data() -> None:
    rng = np.random.default_rng(7)
    batches = np.array(["k1"] * 20 + ["k2"] * 15 + ["k3"] * 18 + ["k4"] * 12)
    values = rng.normal(3, 1, (len(batches), 9)) * np.where(batches == "k2", 2.0, 1.0)[:, None]
    values += np.select([batches == "k3", batches == "k4"], [1.2, -0.7], 0.0)[:, None]
    smoker = rng.integers(0, 2, len(batches))
    covars = pd.DataFrame({"batch": batches, "smoker": smoker.astype(str)})
    expected = neuroCombat(values.T.copy(), covars, "batch", categorical_cols=["smoker"])["data"].T
    ours, _ = combat(values, list(batches), smoker[:, None].astype(float))
    assert np.abs(ours - expected).max() < TOLERANCE


def test_saved_fit_round_trips_and_refuses_unknown_batches(ref: dict[str, np.ndarray], tmp_path: Path) -> None:
    batches = [str(b) for b in ref["batches"]]
    adjusted, fit = combat(ref["values"], batches, _covariates(ref))
    save_fit(fit, tmp_path / "fit.json", [f"f{j}" for j in range(6)], ["sex=1", "age"], ["scanner"])
    loaded, names = load_fit(tmp_path / "fit.json")
    assert names["covariates"] == ["sex=1", "age"]
    again = apply_combat(ref["values"], batches, _covariates(ref), loaded)  # the fitted cases reproduce exactly
    assert np.abs(again - adjusted).max() < 1e-9
    with pytest.raises(HarmonisationError, match="scannerZ"):
        apply_combat(ref["values"][:2], ["scannerA", "scannerZ"], _covariates(ref)[:2], loaded)


def _write(tmp: Path, name: str, values: np.ndarray, batches: np.ndarray, prefix: str) -> tuple[Path, Path]:
    ids = tuple(f"{prefix}{i}" for i in range(len(batches)))
    feats = tmp / f"{name}.csv"
    write_feature_csv(FeatureTable(ids, tuple(f"f{j}" for j in range(values.shape[1])), values), feats)
    bfile = tmp / f"{name}_batches.csv"
    with bfile.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner"])
        w.writerows(zip(ids, batches))
    return feats, bfile


def test_cli_fit_then_apply_to_new_cases_with_pca(ref: dict[str, np.ndarray], tmp_path: Path) -> None:
    feats, bfile = _write(tmp_path, "train", ref["values"], ref["batches"], "t")
    res = CliRunner().invoke(app, ["features", "harmonise", "--features", str(feats), "--batches", str(bfile),
                                   "--batch-column", "scanner", "--out", str(tmp_path / "train_h.csv"),
                                   "--save-fit", str(tmp_path / "fit.json"), "--pca-png", str(tmp_path / "pca.png")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["batch_silhouette"]["before"] > report["batch_silhouette"]["after"] + 0.1
    assert (tmp_path / "pca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trained = read_feature_csv(tmp_path / "train_h.csv").values
    assert np.abs(trained - ref["neurocombat_plain"]).max() < TOLERANCE
    new_feats, new_b = _write(tmp_path, "new", ref["new_values"], ref["new_batches"], "n")
    res = CliRunner().invoke(app, ["features", "harmonise", "--features", str(new_feats), "--batches", str(new_b),
                                   "--batch-column", "scanner", "--out", str(tmp_path / "new_h.csv"),
                                   "--apply-fit", str(tmp_path / "fit.json")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["mode"] == "applied saved fit"
    applied = read_feature_csv(tmp_path / "new_h.csv").values
    assert np.abs(applied - ref["neurocombat_from_training"]).max() < TOLERANCE
