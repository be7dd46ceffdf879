"""ComBat harmonisation of radiomic features across scanner / reconstruction-kernel groups.

Why our own implementation
--------------------------
A compact numpy version of the parametric empirical-Bayes ComBat of Johnson, Li &
Rabinovic (Biostatistics 2007), as used for radiomics by Orlhac et al. (J Nucl Med 2018),
that can also save a fit and apply it to new cases (the maintained ports only harmonise
the table they are given). ``tests/test_harmonise_reference.py`` checks it against
``neuroCombat`` (live and through a stored reference fixture) to 1e-6; the
empirical-Bayes loop therefore stops by sva's own rule.

Model
-----
For feature ``g``, case ``j`` of batch ``i``:
``y_ijg = α_g + X_ij β_g + γ_ig + δ_ig ε_ijg`` with ``ε ~ N(0, σ_g²)``: an additive
(``γ``) and a multiplicative (``δ``) batch effect on top of the biological covariates
``X`` (e.g. the endpoint, age, stage), whose effect ``β`` must survive.

1. Least squares on the design ``[batch indicators | covariates]`` gives ``β`` and the
   batch intercepts; ``α_g`` is their case-weighted mean, ``σ_g²`` the residual variance.
2. Standardise: ``z = (y - α - Xβ) / σ``.
3. Per batch, ``γ̂`` is the mean and ``δ̂²`` the variance of ``z``; empirical-Bayes priors
   (normal for ``γ``, inverse gamma for ``δ²``, moments across features) shrink them to
   ``γ*``, ``δ*²`` by the iteration of the paper's equations (``eb=False`` keeps the raw
   estimates: plain location/scale adjustment).
4. ``y* = σ (z - γ*) / δ* + α + Xβ``.

:func:`apply_combat` harmonises new cases with a saved fit (:func:`save_fit` /
:func:`load_fit`): their batches must be among the fitted ones.

Fitting uses every case given: harmonising a whole table before a cross-validated
analysis lets the held-out cases inform the batch estimates (no labels are involved,
but strictly it is transductive); harmonise the training cohort alone when that matters.
Each batch needs at least two cases; a feature with no variance is returned unchanged.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Convergence tolerance (relative change) and iteration cap of the empirical-Bayes loop.
EB_TOLERANCE = 1e-4
EB_MAX_ITER = 1000


class HarmonisationError(ValueError):
    """Input ComBat cannot work with (the message says what)."""


@dataclass(frozen=True)
class ComBatFit:
    """Estimates of one ComBat fit.

    Attributes
    ----------
    batches
        Batch names in the order of the rows of ``gamma``/``delta2``.
    gamma, delta2
        ``(B, p)`` adjusted additive and multiplicative batch effects (standardised scale).
    gamma_hat, delta2_hat
        ``(B, p)`` the raw per-batch estimates before shrinkage.
    alpha, sigma
        ``(p,)`` grand mean and pooled standard deviation.
    beta
        ``(q, p)`` covariate effects (``q`` covariate columns).
    """

    batches: tuple[str, ...]
    gamma: np.ndarray
    delta2: np.ndarray
    gamma_hat: np.ndarray
    delta2_hat: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    beta: np.ndarray


def _inverse_gamma_prior(delta2_hat: np.ndarray) -> tuple[float, float]:
    """Method-of-moments ``(a, b)`` of the inverse-gamma prior of one batch's variances."""
    m = float(delta2_hat.mean())
    s2 = float(delta2_hat.var(ddof=1)) if delta2_hat.size > 1 else 0.0
    if s2 <= 0:
        return 1e6, m * 1e6  # every feature agrees: a very tight prior at the common value
    return (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2


def _shrink(z: np.ndarray, gamma_hat: np.ndarray, delta2_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes posterior ``γ*``, ``δ*²`` of one batch (Johnson et al. 2007, eqs. 2.3-2.4)."""
    n = z.shape[0]
    gamma_bar = float(gamma_hat.mean())
    tau2 = float(gamma_hat.var(ddof=1)) if gamma_hat.size > 1 else 0.0
    a, b = _inverse_gamma_prior(delta2_hat)
    gamma, delta2 = gamma_hat.copy(), delta2_hat.copy()
    for _ in range(EB_MAX_ITER):
        if tau2 > 0:
            new_gamma = (n * tau2 * gamma_hat + delta2 * gamma_bar) / (n * tau2 + delta2)
        else:
            new_gamma = np.full_like(gamma_hat, gamma_bar)
        ss = ((z - new_gamma) ** 2).sum(axis=0)
        new_delta2 = (b + 0.5 * ss) / (n / 2.0 + a - 1.0)
        # sva's (and neuroCombat's) rule, signed denominator included, so results agree with them
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max(float(np.nanmax(np.abs(new_gamma - gamma) / gamma)),
                         float(np.nanmax(np.abs(new_delta2 - delta2) / delta2)))
        gamma, delta2 = new_gamma, new_delta2
        if change < EB_TOLERANCE:
            break
    return gamma, delta2


def combat(
    values: np.ndarray,
    batches: Sequence[str],
    covariates: np.ndarray | None = None,
    *,
    eb: bool = True,
) -> tuple[np.ndarray, ComBatFit]:
    """Harmonise ``values`` (cases × features) across ``batches``, keeping the covariates' effects.

    Parameters
    ----------
    values
        ``(n, p)`` finite feature values.
    batches
        Batch (scanner/kernel group) of each case.
    covariates
        ``(n, q)`` numeric covariates whose effect is preserved (categorical ones one-hot
        coded by the caller, one level left out), or ``None``.
    eb
        Empirical-Bayes shrinkage of the batch effects (ComBat proper); ``False`` uses
        the raw per-batch estimates.

    Raises
    ------
    HarmonisationError
        Non-finite values, fewer than two batches, a batch with fewer than two cases, or
        covariates collinear with the batches.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2:
        raise HarmonisationError(f"values must be cases x features, got shape {y.shape}")
    n, p = y.shape
    labels = [str(b) for b in batches]
    if len(labels) != n:
        raise HarmonisationError(f"{len(labels)} batch labels for {n} cases")
    if not np.isfinite(y).all():
        bad = np.flatnonzero(~np.isfinite(y).all(axis=0))
        raise HarmonisationError(f"ComBat needs finite values; feature column(s) {bad[:10].tolist()} have NaN/inf")
    names = tuple(sorted(set(labels)))
    if len(names) < 2:
        raise HarmonisationError(f"ComBat needs at least two batches, got {list(names)}")
    index = np.array([names.index(b) for b in labels])
    sizes = np.bincount(index, minlength=len(names))
    if sizes.min() < 2:
        small = [names[i] for i in np.flatnonzero(sizes < 2)]
        raise HarmonisationError(f"every batch needs at least 2 cases; batch(es) {small} have fewer")
    batch_design = np.eye(len(names))[index]
    cov = np.zeros((n, 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(n, -1)
    design = np.hstack([batch_design, cov])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise HarmonisationError("the covariates are collinear with the batches (or each other): their effect "
                                 "cannot be told from the batch effect")
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    alpha = (sizes / n) @ coef[: len(names)]
    beta = coef[len(names):]
    residual = y - design @ coef
    sigma = np.sqrt((residual**2).mean(axis=0))
    varying = sigma > 1e-12 * np.maximum(np.abs(alpha), 1.0)
    safe_sigma = np.where(varying, sigma, 1.0)
    stand_mean = alpha + cov @ beta
    z = (y - stand_mean) / safe_sigma
    gamma_hat = np.zeros((len(names), p))
    delta2_hat = np.ones((len(names), p))
    gamma = np.zeros((len(names), p))
    delta2 = np.ones((len(names), p))
    for b in range(len(names)):
        zb = z[index == b]
        gamma_hat[b] = zb.mean(axis=0)
        delta2_hat[b] = np.maximum(zb.var(axis=0, ddof=1), 1e-12)
        gamma[b], delta2[b] = gamma_hat[b], delta2_hat[b]
        if eb and varying.any():
            gamma[b, varying], delta2[b, varying] = _shrink(zb[:, varying], gamma_hat[b, varying],
                                                            delta2_hat[b, varying])
    adjusted = (z - gamma[index]) / np.sqrt(delta2[index]) * safe_sigma + stand_mean
    adjusted[:, ~varying] = y[:, ~varying]
    logger.info("ComBat: %d cases, %d features, %d batches (%s)%s", n, p, len(names),
                ", ".join(f"{b}: {s}" for b, s in zip(names, sizes)), ", empirical Bayes" if eb else "")
    return adjusted, ComBatFit(names, gamma, delta2, gamma_hat, delta2_hat, alpha, sigma, beta)


def read_batch_csv(path: str | os.PathLike[str], case_ids: Sequence[str], batch_columns: Sequence[str],
                   covariate_columns: Sequence[str] = ()) -> tuple[list[str], np.ndarray | None, list[str]]:
    """Batch labels and covariates of ``case_ids`` from a CSV with ``case_id`` and the named columns.

    Several batch columns are combined (``scanner|kernel``). A numeric covariate is used as
    is; a text one is one-hot coded with its first (sorted) level left out.

    Returns
    -------
    batches, covariates, covariate_names
        One batch label per case, ``(n, q)`` covariates (``None`` without any) and their names.

    Raises
    ------
    HarmonisationError
        Missing column, a case without a row or with an empty cell (named).
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        wanted = ["case_id", *batch_columns, *covariate_columns]
        missing = [c for c in wanted if c not in fields]
        if missing:
            raise HarmonisationError(f"{p}: column(s) {missing} not found; the table has {fields}")
        rows = {(r.get("case_id") or "").strip(): {(k or "").strip(): (v or "").strip() for k, v in r.items()}
                for r in reader}
    absent = [c for c in case_ids if c not in rows]
    if absent:
        raise HarmonisationError(f"{p}: no row for case(s) {absent[:10]}{' ...' if len(absent) > 10 else ''}")
    batches: list[str] = []
    for cid in case_ids:
        cells = [rows[cid][c] for c in batch_columns]
        if not all(cells):
            raise HarmonisationError(f"{p}: case {cid} has an empty batch cell ({', '.join(batch_columns)})")
        batches.append("|".join(cells))
    columns: list[np.ndarray] = []
    names: list[str] = []
    for col in covariate_columns:
        texts = [rows[cid][col] for cid in case_ids]
        if not all(texts):
            raise HarmonisationError(f"{p}: covariate {col!r} is empty for some case")
        try:
            columns.append(np.array([float(t) for t in texts]))
            names.append(col)
        except ValueError:
            levels = sorted(set(texts))
            for level in levels[1:]:
                columns.append(np.array([1.0 if t == level else 0.0 for t in texts]))
                names.append(f"{col}={level}")
    covariates = np.column_stack(columns) if columns else None
    return batches, covariates, names


def apply_combat(values: np.ndarray, batches: Sequence[str], covariates: np.ndarray | None, fit: ComBatFit) -> np.ndarray:
    """Harmonise new cases with the estimates of an earlier :func:`combat` fit (no refitting).

    This is what keeps a test cohort out of the batch estimates: fit on the training cases,
    apply to the others.

    Raises
    ------
    HarmonisationError
        A batch the fit has not seen, or a feature/covariate count that differs from the fit's.
    """
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != fit.alpha.shape[0]:
        raise HarmonisationError(f"the fit has {fit.alpha.shape[0]} features, the new values have shape {y.shape}")
    labels = [str(b) for b in batches]
    if len(labels) != y.shape[0]:
        raise HarmonisationError(f"{len(labels)} batch labels for {y.shape[0]} cases")
    unknown = sorted(set(labels) - set(fit.batches))
    if unknown:
        raise HarmonisationError(f"batch(es) {unknown} were not in the fit (fitted: {list(fit.batches)})")
    if not np.isfinite(y).all():
        raise HarmonisationError("ComBat needs finite values; the new cases have NaN/inf")
    q = fit.beta.shape[0]
    cov = np.zeros((y.shape[0], 0)) if covariates is None else np.asarray(covariates, dtype=np.float64).reshape(y.shape[0], -1)
    if cov.shape[1] != q:
        raise HarmonisationError(f"the fit has {q} covariate column(s), the new cases {cov.shape[1]}")
    index = np.array([fit.batches.index(b) for b in labels])
    varying = fit.sigma > 1e-12 * np.maximum(np.abs(fit.alpha), 1.0)
    safe_sigma = np.where(varying, fit.sigma, 1.0)
    stand_mean = fit.alpha + cov @ fit.beta
    z = (y - stand_mean) / safe_sigma
    adjusted = (z - fit.gamma[index]) / np.sqrt(fit.delta2[index]) * safe_sigma + stand_mean
    adjusted[:, ~varying] = y[:, ~varying]
    return adjusted


def save_fit(fit: ComBatFit, path: str | os.PathLike[str], feature_names: Sequence[str],
             covariate_names: Sequence[str], batch_columns: Sequence[str]) -> None:
    """Write ``fit`` as JSON with the names it needs to be applied to another table."""
    payload = {
        "method": "ComBat (parametric empirical Bayes, Johnson et al. 2007)",
        "batch_columns": list(batch_columns),
        "features": list(feature_names),
        "covariates": list(covariate_names),
        "batches": list(fit.batches),
        **{k: np.asarray(getattr(fit, k)).tolist()
           for k in ("gamma", "delta2", "gamma_hat", "delta2_hat", "alpha", "sigma", "beta")},
    }
    Path(path).write_text(json.dumps(payload) + "\n", encoding="utf-8")


def load_fit(path: str | os.PathLike[str]) -> tuple[ComBatFit, dict[str, list[str]]]:
    """Read a fit written by :func:`save_fit`; also returns its ``features``, ``covariates``, ``batch_columns``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        q = len(data["covariates"])
        fit = ComBatFit(
            tuple(data["batches"]),
            *(np.asarray(data[k], dtype=np.float64) for k in ("gamma", "delta2", "gamma_hat", "delta2_hat", "alpha",
                                                                "sigma")),
            np.asarray(data["beta"], dtype=np.float64).reshape(q, len(data["alpha"])),
        )
        names = {k: [str(v) for v in data[k]] for k in ("features", "covariates", "batch_columns")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HarmonisationError(f"{p}: not a ComBat fit written by 'features harmonise --save-fit' ({exc})") from exc
    return fit, names


def covariates_for_fit(path: str | os.PathLike[str], case_ids: Sequence[str], batch_columns: Sequence[str],
                       covariate_names: Sequence[str]) -> tuple[list[str], np.ndarray | None]:
    """Batch labels and the covariate matrix of new cases in a saved fit's column order.

    A ``col=level`` name is the indicator of that level (a level missing from the new cases
    is all zeros, which :func:`read_batch_csv`'s own coding could not tell from the dropped
    reference level); any other name is the numeric column.
    """
    columns = sorted({n.split("=", 1)[0] for n in covariate_names})
    batches, _, _ = read_batch_csv(path, case_ids, batch_columns, [])
    rows = _rows_by_case(Path(path), columns)
    matrix: list[np.ndarray] = []
    for name in covariate_names:
        col, _, level = name.partition("=")
        texts = [rows[cid][col] for cid in case_ids]
        if level:
            matrix.append(np.array([1.0 if t == level else 0.0 for t in texts]))
            continue
        try:
            matrix.append(np.array([float(t) for t in texts]))
        except ValueError as exc:
            raise HarmonisationError(f"{path}: covariate {col!r} must be numeric, as in the fit ({exc})") from exc
    return batches, (np.column_stack(matrix) if matrix else None)


def _rows_by_case(p: Path, columns: Sequence[str]) -> dict[str, dict[str, str]]:
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in fields]
        if missing:
            raise HarmonisationError(f"{p}: column(s) {missing} of the fit not found; the table has {fields}")
        return {(r.get("case_id") or "").strip(): {(k or "").strip(): (v or "").strip() for k, v in r.items()}
                for r in reader}
