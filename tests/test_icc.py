"""ICC(3,1): the Shrout & Fleiss (1979) example, a loop-free implementation checked against a per-feature fit."""

from __future__ import annotations

import numpy as np
import pytest

from radnode.models.radiomics.icc import icc_3_1

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges. Their ICC(3,1) is 0.71 (0.715).
SHROUT_FLEISS = np.array([
    [9, 2, 5, 8],
    [6, 1, 3, 2],
    [8, 4, 6, 8],
    [7, 1, 2, 6],
    [10, 5, 6, 9],
    [6, 2, 4, 7],
], dtype=float)


def _icc_by_regression(y: np.ndarray) -> float:
    """ICC(3,1) of one n x k table from the residuals of an explicit two-way additive model fit."""
    n, k = y.shape
    subj = np.repeat(np.eye(n), k, axis=0)
    rater = np.tile(np.eye(k), (n, 1))[:, 1:]
    design = np.hstack([subj, rater])
    target = y.reshape(-1)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ coef
    ms_error = residual @ residual / ((n - 1) * (k - 1))
    ms_subjects = k * np.var(y.mean(axis=1), ddof=1)
    return float((ms_subjects - ms_error) / (ms_subjects + (k - 1) * ms_error))


def test_shrout_fleiss_example() -> None:
    result = icc_3_1(SHROUT_FLEISS)
    assert result.icc[0] == pytest.approx(0.715, abs=0.0005)
    # Their Table 3 mean squares: between targets 11.24, residual 1.02.
    assert result.ms_subjects[0] == pytest.approx(11.24, abs=0.005)
    assert result.ms_error[0] == pytest.approx(1.02, abs=0.005)
    assert result.ci_low[0] < result.icc[0] < result.ci_high[0]
    assert (result.n_subjects, result.n_raters) == (6, 4)


def test_vectorised_equals_per_feature_fit() -> None:
    rng = np.random.default_rng(3)
    data = rng.normal(size=(9, 5, 6)) + rng.normal(size=(9, 1, 6)) * np.arange(6)
    result = icc_3_1(data)
    for j in range(6):
        assert result.icc[j] == pytest.approx(_icc_by_regression(data[:, :, j]), abs=1e-10)


def test_noise_only_feature_is_low_and_stable_feature_is_high() -> None:
    rng = np.random.default_rng(7)
    n, k = 30, 8
    subject_level = rng.normal(0.0, 10.0, size=(n, 1))
    stable = subject_level + rng.normal(0.0, 1.0, size=(n, k))  # perturbations barely move it
    noise = rng.normal(0.0, 10.0, size=(n, k))  # nothing about the subject survives
    rater_offset = stable + np.linspace(-20, 20, k)  # a constant shift per rater does not hurt consistency
    result = icc_3_1(np.stack([stable, noise, rater_offset], axis=2))
    assert result.icc[0] > 0.9
    assert result.icc[1] < 0.2
    assert result.icc[2] == pytest.approx(result.icc[0], abs=1e-9)


def test_undefined_and_bad_input() -> None:
    constant = np.ones((5, 3))
    with_nan = np.arange(15.0).reshape(5, 3)
    with_nan[2, 1] = np.nan
    result = icc_3_1(np.stack([constant, with_nan], axis=2))
    assert np.isnan(result.icc).all()
    with pytest.raises(ValueError, match="at least 2 subjects"):
        icc_3_1(np.ones((1, 4)))
