"""DeLong's AUC variance, confidence interval and paired test (fast algorithm of Sun & Xu).

DeLong, DeLong & Clarke-Pearson (Biometrics 1988) estimate the covariance of the empirical
AUCs (Mann-Whitney statistics) of several scores on the *same* cases from structural
components. Sun & Xu (IEEE Signal Processing Letters 21(11), 2014) compute those
components from mid-ranks in ``O(n log n)`` instead of the ``O(m n)`` pairwise kernel:
for ``m`` positive and ``n`` negative cases and one score,

* ``Tx`` mid-ranks of the positives among the positives, ``Ty`` of the negatives among
  the negatives, ``Tz`` of every case among all ``m + n``;
* ``AUC = (sum_i Tz_i(pos) - m (m + 1) / 2) / (m n)``;
* ``V10_i = (Tz_i - Tx_i) / n`` for each positive and ``V01_j = 1 - (Tz_j - Ty_j) / m``
  for each negative;
* ``S = cov(V10) / m + cov(V01) / n`` (covariance across the ``k`` scores).

Ties count one half, as in the Mann-Whitney statistic. The 95 % interval is the Wald
interval ``AUC ± z sqrt(S)`` clipped to [0, 1]; the paired test of two scores uses
``z = (AUC1 - AUC2) / sqrt(S11 + S22 - 2 S12)`` with a two-sided normal p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Two-sided 95 % normal quantile.
Z_95 = float(stats.norm.ppf(0.975))
#: Paired-test variances below this are treated as zero (identical scores).
_VARIANCE_FLOOR = 1e-15


class DeLongError(ValueError):
    """Labels or scores that DeLong's method cannot use."""


@dataclass(frozen=True)
class AUCInterval:
    """An AUC with its DeLong variance and confidence interval."""

    auc: float
    variance: float
    ci_low: float
    ci_high: float
    level: float
    positives: int
    negatives: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "auc": self.auc, "variance": self.variance, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "level": self.level, "positives": self.positives, "negatives": self.negatives,
        }


@dataclass(frozen=True)
class DeLongTest:
    """Paired DeLong test of two scores on the same cases."""

    auc_a: float
    auc_b: float
    difference: float
    z: float
    p_value: float
    variance_difference: float

    def as_dict(self) -> dict[str, float]:
        return {
            "auc_a": self.auc_a, "auc_b": self.auc_b, "difference": self.difference, "z": self.z,
            "p_value": self.p_value, "variance_difference": self.variance_difference,
        }


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based mid-ranks of a 1-D array (tied values share the mean of their ranks)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1.0  # mean of ranks i+1 .. j
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def _split(labels: Sequence[int] | np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != y.shape[0]:
        raise DeLongError(f"{s.shape[1]} scores for {y.shape[0]} labels")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise DeLongError(f"labels must be 0/1, got values {sorted(values)[:5]}")
    if not np.all(np.isfinite(s)):
        raise DeLongError("scores contain NaN or infinite values")
    pos, neg = s[:, y == 1], s[:, y == 0]
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        raise DeLongError(
            f"DeLong needs both classes: {pos.shape[1]} positive and {neg.shape[1]} negative cases"
        )
    return pos, neg


def delong_covariance(labels: Sequence[int] | np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs ``(k,)`` and their DeLong covariance ``(k, k)`` for ``k`` scores on the same cases.

    Parameters
    ----------
    labels
        0/1 truth, ``(N,)``.
    scores
        ``(N,)`` or ``(k, N)``; larger means more likely positive.
    """
    pos, neg = _split(labels, scores)
    k, m = pos.shape
    n = neg.shape[1]
    tx = np.stack([midranks(r) for r in pos])
    ty = np.stack([midranks(r) for r in neg])
    tz = np.stack([midranks(r) for r in np.concatenate([pos, neg], axis=1)])
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    sy = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, sx / m + sy / n


def auc_confidence_interval(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                            level: float = 0.95) -> AUCInterval:
    """AUC of one score with DeLong variance and a Wald interval clipped to [0, 1]."""
    if not 0.0 < level < 1.0:
        raise DeLongError(f"level must lie in (0, 1), got {level}")
    y = np.asarray(labels).ravel()
    aucs, cov = delong_covariance(y, np.asarray(scores, dtype=np.float64).ravel())
    auc, var = float(aucs[0]), max(float(cov[0, 0]), 0.0)
    half = float(stats.norm.ppf(0.5 + level / 2.0)) * math.sqrt(var)
    return AUCInterval(
        auc=auc, variance=var, ci_low=max(0.0, auc - half), ci_high=min(1.0, auc + half), level=level,
        positives=int((y == 1).sum()), negatives=int((y == 0).sum()),
    )


def delong_test(labels: Sequence[int] | np.ndarray, scores_a: Sequence[float] | np.ndarray,
                scores_b: Sequence[float] | np.ndarray) -> DeLongTest:
    """Two-sided paired DeLong test of ``AUC(a) == AUC(b)`` on the same cases.

    When the difference has zero variance (e.g. the same ranking twice) the test gives
    ``z = 0`` and ``p = 1`` if the AUCs are equal.
    """
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise DeLongError(f"the two models scored different numbers of cases ({a.size} and {b.size})")
    aucs, cov = delong_covariance(labels, np.stack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var <= _VARIANCE_FLOOR:
        z = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        z = diff / math.sqrt(var)
        p = float(2.0 * stats.norm.sf(abs(z)))
    return DeLongTest(auc_a=float(aucs[0]), auc_b=float(aucs[1]), difference=diff, z=z, p_value=p,
                      variance_difference=max(var, 0.0))
