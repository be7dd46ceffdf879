"""DeLong AUC variance, CI and paired test (radnode.models.classifiers.delong)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from radnode.models.classifiers.delong import (
    DeLongError,
    auc_confidence_interval,
    delong_covariance,
    delong_test,
    midranks,
)


def _pairwise_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong 1988 from the O(m n) kernel psi(x, y) = 1 / 0.5 / 0 (independent reference)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    psi = (pos[:, :, None] > neg[:, None, :]).astype(float) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    aucs = psi.mean(axis=(1, 2))
    v10 = psi.mean(axis=2)  # (k, m)
    v01 = psi.mean(axis=1)  # (k, n)
    return aucs, np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def _data(seed: int, n: int = 120, shift: float = 1.0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = rng.standard_normal(n) + shift * y
    if ties:
        s = np.round(s, 0)
    return y, s


def test_midranks_match_scipy_average_ranks() -> None:
    x = np.random.default_rng(1).integers(0, 6, 50).astype(float)
    np.testing.assert_allclose(midranks(x), rankdata(x, method="average"))


@pytest.mark.parametrize("ties", [False, True])
def test_fast_algorithm_equals_pairwise_definition(ties: bool) -> None:
    y, s1 = _data(2, ties=ties)
    _, s2 = _data(3, ties=ties)
    scores = np.stack([s1, s2 + 0.5 * y])
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = _pairwise_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, s1))


def test_delong_ci_matches_bootstrap() -> None:
    y, s = _data(4, n=300, shift=1.0)
    ci = auc_confidence_interval(y, s)
    rng = np.random.default_rng(5)
    boot = []
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for _ in range(1500):  # stratified bootstrap: the class sizes DeLong conditions on
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boot.append(roc_auc_score(y[idx], s[idx]))
    boot_sd = float(np.std(boot))
    assert np.sqrt(ci.variance) == pytest.approx(boot_sd, rel=0.15)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert ci.ci_low == pytest.approx(lo, abs=0.03)
    assert ci.ci_high == pytest.approx(hi, abs=0.03)
    assert ci.ci_low < ci.auc < ci.ci_high


def test_paired_test_separates_different_models_and_not_identical_ones() -> None:
    rng = np.random.default_rng(6)
    n = 200
    y = (rng.random(n) < 0.5).astype(int)
    good = y * 2.0 + rng.standard_normal(n)
    poor = y * 0.2 + rng.standard_normal(n)
    different = delong_test(y, good, poor)
    assert different.p_value < 0.001
    assert different.difference > 0
    same = delong_test(y, good, good.copy())
    assert same.p_value == pytest.approx(1.0)
    # A monotone transform has the same ranks, hence the same AUC: no difference either.
    monotone = delong_test(y, good, np.exp(good))
    assert monotone.p_value == pytest.approx(1.0)


def test_paired_variance_matches_bootstrap_of_difference() -> None:
    rng = np.random.default_rng(7)
    n = 250
    y = (rng.random(n) < 0.5).astype(int)
    a = y * 1.2 + rng.standard_normal(n)
    b = y * 0.9 + 0.6 * a + rng.standard_normal(n)  # correlated with a, as two models on one cohort
    test = delong_test(y, a, b)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(1000):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert np.sqrt(test.variance_difference) == pytest.approx(np.std(diffs), rel=0.2)


def test_bad_input_is_named() -> None:
    with pytest.raises(DeLongError, match="both classes"):
        auc_confidence_interval([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DeLongError, match="0/1"):
        auc_confidence_interval([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DeLongError, match="NaN"):
        auc_confidence_interval([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(DeLongError, match="different numbers"):
        delong_test([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2])
