"""Intraclass correlation ICC(3,1) from two-way ANOVA mean squares, for many features at once.

Why ICC(3,1)
------------
A feature's robustness to segmentation and positioning uncertainty is judged on a table
of ``n`` subjects × ``k`` perturbations: each perturbation (a fixed rotation angle, shift
and contour change, applied to every subject) plays the role of a *rater*. The question
is whether the subjects keep their order under every perturbation, not whether a
perturbation shifts all subjects alike, so the consistency form with fixed raters is the
fitting one: Shrout & Fleiss (1979) case 3, single rater, i.e. ICC(3,1) in McGraw & Wong's
notation ICC(C,1), two-way mixed:

.. math::

    ICC(3,1) = \\frac{MS_R - MS_E}{MS_R + (k - 1) MS_E}

with ``MS_R`` the between-subjects mean square (``n - 1`` degrees of freedom) and
``MS_E`` the residual mean square (``(n - 1)(k - 1)`` degrees of freedom) of the two-way
ANOVA without interaction. The 95 % confidence interval is Shrout & Fleiss' F-based one
(their Table 4, case 3): with ``F = MS_R / MS_E``,
``F_L = F / F_{1-α/2}(n-1, (n-1)(k-1))`` and ``F_U = F · F_{1-α/2}((n-1)(k-1), n-1)``,
the bounds are ``(F_L - 1) / (F_L + k - 1)`` and ``(F_U - 1) / (F_U + k - 1)``.

Everything is vectorised over a trailing feature axis, so the ICCs of 2000 radiomic
features cost one pass of numpy. A feature with a non-finite value anywhere, or with no
variance at all (``MS_R + (k - 1) MS_E == 0``), gets NaN: it cannot be called robust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Two-sided level of the confidence interval.
DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class ICCResult:
    """ICC(3,1) per feature with its ANOVA terms.

    Attributes
    ----------
    icc
        ``(p,)`` ICC(3,1); NaN for a feature with a non-finite value or no variance.
    ci_low, ci_high
        ``(p,)`` bounds of the ``1 - alpha`` confidence interval (NaN where ``icc`` is).
    ms_subjects, ms_error
        ``(p,)`` between-subjects and residual mean squares.
    n_subjects, n_raters
        The table's ``n`` and ``k``.
    """

    icc: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    ms_subjects: np.ndarray
    ms_error: np.ndarray
    n_subjects: int
    n_raters: int


def icc_3_1(ratings: np.ndarray, alpha: float = DEFAULT_ALPHA) -> ICCResult:
    """ICC(3,1) (two-way mixed, consistency, single rater) of ``n × k`` or ``n × k × p`` ratings.

    Parameters
    ----------
    ratings
        Subjects along axis 0, raters (perturbations) along axis 1, optionally features
        along axis 2.
    alpha
        Two-sided level of the confidence interval (0.05 gives 95 %).

    Raises
    ------
    ValueError
        Fewer than 2 subjects or 2 raters, or more than 3 dimensions.
    """
    y = np.asarray(ratings, dtype=np.float64)
    if y.ndim == 2:
        y = y[:, :, None]
    if y.ndim != 3:
        raise ValueError(f"ratings must be (subjects, raters[, features]), got shape {y.shape}")
    n, k, _ = y.shape
    if n < 2 or k < 2:
        raise ValueError(f"ICC(3,1) needs at least 2 subjects and 2 raters, got {n} subject(s) and {k} rater(s)")
    finite = np.isfinite(y).all(axis=(0, 1))
    y = np.where(np.isfinite(y), y, 0.0)
    grand = y.mean(axis=(0, 1))
    subject_means = y.mean(axis=1)
    rater_means = y.mean(axis=0)
    ss_total = ((y - grand) ** 2).sum(axis=(0, 1))
    ss_subjects = k * ((subject_means - grand) ** 2).sum(axis=0)
    ss_raters = n * ((rater_means - grand) ** 2).sum(axis=0)
    df_subjects, df_error = n - 1, (n - 1) * (k - 1)
    ss_error = np.maximum(ss_total - ss_subjects - ss_raters, 0.0)
    ms_subjects = ss_subjects / df_subjects
    ms_error = ss_error / df_error
    denominator = ms_subjects + (k - 1) * ms_error
    scale = np.maximum(np.abs(grand), 1.0)
    # A feature constant to rounding is "no variance": its ICC is undefined, not 0 or 1.
    defined = finite & (denominator > 1e-24 * scale**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        icc = np.where(defined, (ms_subjects - ms_error) / np.where(defined, denominator, 1.0), np.nan)
        f_obs = ms_subjects / ms_error
        f_low = f_obs / stats.f.ppf(1 - alpha / 2, df_subjects, df_error)
        f_high = f_obs * stats.f.ppf(1 - alpha / 2, df_error, df_subjects)
        ci_low = np.where(defined, (f_low - 1) / (f_low + k - 1), np.nan)
        ci_high = np.where(defined, (f_high - 1) / (f_high + k - 1), np.nan)
    # No residual at all (every perturbation agrees exactly): perfect consistency.
    exact = defined & (ms_error == 0)
    ci_low = np.where(exact, 1.0, ci_low)
    ci_high = np.where(exact, 1.0, ci_high)
    return ICCResult(
        icc=icc,
        ci_low=ci_low,
        ci_high=ci_high,
        ms_subjects=np.where(finite, ms_subjects, np.nan),
        ms_error=np.where(finite, ms_error, np.nan),
        n_subjects=n,
        n_raters=k,
    )
