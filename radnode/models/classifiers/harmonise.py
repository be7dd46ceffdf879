"""ComBat harmonisation of radiomic features across scanner / reconstruction-kernel groups.

Why our own implementation
--------------------------
The maintained Python ports (``neuroCombat``, ``inmoose.pycombat``) need pandas, which
radnode does not otherwise use, so a compact, tested numpy version of the parametric
empirical-Bayes ComBat of Johnson, Li & Rabinovic (Biostatistics 2007), as used for
radiomics by Orlhac et al. (J Nucl Med 2018), lives here.

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

Fitting uses every case given: harmonising a whole table before a cross-validated
analysis lets the held-out cases inform the batch estimates (no labels are involved,
but strictly it is transductive); harmonise the training cohort alone when that matters.
Each batch needs at least two cases; a feature with no variance is returned unchanged.
"""

from __future__ import annotations

import csv
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
        change = max(float(np.max(np.abs(new_gamma - gamma) / np.maximum(np.abs(gamma), 1e-12))),
                     float(np.max(np.abs(new_delta2 - delta2) / np.maximum(delta2, 1e-12))))
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
