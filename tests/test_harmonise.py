"""ComBat removes a planted scanner effect and keeps a planted biological effect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from radnode.cli.main import app
from radnode.models.classifiers.harmonise import (
    HarmonisationError,
    combat,
    read_batch_csv,
)
from radnode.models.classifiers.table import (
    FeatureTable,
    read_feature_csv,
    write_feature_csv,
)

BIO_EFFECT = 2.0


def _planted(seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """3 scanners x 40 cases, 30 features; the covariate is unbalanced across scanners."""
    rng = np.random.default_rng(seed)
    n_per, p = 40, 30
    batches = ["A"] * n_per + ["B"] * n_per + ["C"] * n_per
    covariate = np.concatenate([rng.random(n_per) < 0.3, rng.random(n_per) < 0.5, rng.random(n_per) < 0.7]).astype(float)
    base = rng.normal(10.0, 1.0, size=(3 * n_per, p)) + BIO_EFFECT * covariate[:, None]
    shift = {"A": 0.0, "B": 3.0, "C": -2.0}  # additive scanner effect
    scale = {"A": 1.0, "B": 2.5, "C": 0.5}  # multiplicative scanner effect on the residual
    values = base.copy()
    for i, b in enumerate(batches):
        centre = 10.0 + BIO_EFFECT * covariate[i]
        values[i] = centre + (base[i] - centre) * scale[b] + shift[b]
    return values, batches, covariate


def _residual_stats(values: np.ndarray, batches: list[str], covariate: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-batch mean and SD of the covariate-adjusted values (averaged over features), and the covariate slope."""
    design = np.column_stack([np.ones(len(covariate)), covariate])
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    resid = values - design @ coef
    b = np.array(batches)
    means = np.array([resid[b == g].mean(axis=0).mean() for g in "ABC"])
    sds = np.array([resid[b == g].std(axis=0).mean() for g in "ABC"])
    return means, sds, float(coef[1].mean())


@pytest.mark.parametrize("eb", [True, False])
def test_batch_effect_removed_biology_kept(eb: bool) -> None:
    values, batches, covariate = _planted()
    before_means, before_sds, _ = _residual_stats(values, batches, covariate)
    assert np.ptp(before_means) > 4 and before_sds.max() / before_sds.min() > 4  # the plant is there
    adjusted, fit = combat(values, batches, covariate[:, None], eb=eb)
    means, sds, slope = _residual_stats(adjusted, batches, covariate)
    print(f"eb={eb}: batch means {np.round(means, 3)}, sds {np.round(sds, 3)}, covariate effect {slope:.3f}")
    assert np.ptp(means) < 0.1
    assert sds.max() / sds.min() < 1.15
    assert slope == pytest.approx(BIO_EFFECT, abs=0.15)
    assert fit.batches == ("A", "B", "C")
    # Without the covariate, ComBat takes part of the unbalanced biology for scanner effect.
    _, _, lost = _residual_stats(combat(values, batches, None, eb=eb)[0], batches, covariate)
    assert abs(lost - BIO_EFFECT) > abs(slope - BIO_EFFECT)


def test_bad_input_is_named() -> None:
    values, batches, _ = _planted()
    with pytest.raises(HarmonisationError, match="at least two batches"):
        combat(values, ["A"] * len(batches))
    with pytest.raises(HarmonisationError, match="at least 2 cases"):
        combat(values, ["X"] + batches[1:])
    with pytest.raises(HarmonisationError, match="collinear"):
        combat(values, batches, np.array([b == "B" for b in batches], dtype=float)[:, None])
    bad = values.copy()
    bad[3, 4] = np.nan
    with pytest.raises(HarmonisationError, match="finite"):
        combat(bad, batches)


def test_cli_harmonise(tmp_path: Path) -> None:
    values, batches, covariate = _planted(1)
    ids = tuple(f"c{i}" for i in range(len(batches)))
    write_feature_csv(FeatureTable(ids, tuple(f"f{j}" for j in range(values.shape[1])), values), tmp_path / "f.csv")
    with (tmp_path / "b.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "scanner", "kernel", "smoker"])
        for cid, b, c in zip(ids, batches, covariate):
            w.writerow([cid, b, "B30f", "yes" if c else "no"])
    assert read_batch_csv(tmp_path / "b.csv", ids, ["scanner", "kernel"], ["smoker"])[2] == ["smoker=yes"]
    res = CliRunner().invoke(app, ["features", "harmonise", "--features", str(tmp_path / "f.csv"), "--batches",
                                   str(tmp_path / "b.csv"), "--batch-column", "scanner", "--batch-column", "kernel",
                                   "--covariate", "smoker", "--out", str(tmp_path / "h.csv")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert report["batches"] == {"A|B30f": 40, "B|B30f": 40, "C|B30f": 40}
    harmonised = read_feature_csv(tmp_path / "h.csv")
    means, _, slope = _residual_stats(harmonised.values, batches, covariate)
    assert np.ptp(means) < 0.1 and slope == pytest.approx(BIO_EFFECT, abs=0.15)
    missing = CliRunner().invoke(app, ["features", "harmonise", "--features", str(tmp_path / "f.csv"), "--batches",
                                       str(tmp_path / "b.csv"), "--batch-column", "site", "--out", str(tmp_path / "x.csv")])
    assert missing.exit_code == 2 and "site" in missing.output
