"""Radiomic survival analysis: Cox proportional hazards, C-index with bootstrap intervals,
Kaplan-Meier risk groups and the log-rank test (lifelines).

Procedure
---------
1. Samples of the feature table and the clinical table (``time``, ``event``) are matched on
   ``sample_id`` and split into training and test rows (seeded, stratified by event).
2. Features are z-scored with the training rows' mean and SD.
3. Selection on the training rows: the named features (``select``), or univariate Cox
   screening: up to ``max_features`` features with Wald p < ``alpha``, most significant
   first (the single best one if none passes, flagged in the output).
4. A multivariable Cox model (``penalizer``: lifelines' ridge term) on the selected features
   and the named covariates gives hazard ratios per SD; its linear predictor is the
   signature score.
5. C-index of the score on training and test rows, each with a percentile bootstrap 95 %
   interval; cross-validated C-index on the training rows with selection redone in each fold
   (so it carries no selection optimism).
6. Risk groups split at the training median of the score (``risk_quantile``); Kaplan-Meier
   curves and the log-rank test per split.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from radnode.models.research.tables import ResearchInputError

log = logging.getLogger(__name__)

METHOD_NAME = "radnode-survival"
METHOD_VERSION = "1"
DISCLAIMER = "research analysis - not for clinical use"


@dataclass(frozen=True)
class SurvivalOptions:
    """Settings of one analysis."""

    seed: int = 0
    test_fraction: float = 0.3
    folds: int = 5
    max_features: int = 3
    alpha: float = 0.05
    penalizer: float = 0.01
    bootstraps: int = 1000
    select: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    #: Training quantile of the score that splits the risk groups (issue: the median; the
    #: glioblastoma study of ``papers/002`` used the 75th percentile).
    risk_quantile: float = 0.5


@dataclass
class SurvivalResult:
    """``summary`` is survival.json; the frames feed the Kaplan-Meier plot."""

    summary: dict[str, Any]
    train: pd.DataFrame  # time, event, score, group
    test: pd.DataFrame
    km: dict[str, Any] = field(default_factory=dict)


def _cindex(time: np.ndarray, event: np.ndarray, score: np.ndarray) -> float:
    from lifelines.utils import concordance_index

    return float(concordance_index(time, -score, event))


def bootstrap_cindex(time: np.ndarray, event: np.ndarray, score: np.ndarray, n: int,
                     rng: np.random.Generator) -> list[float]:
    """Percentile 95 % interval of the C-index over ``n`` bootstrap resamples (resamples without an event skipped)."""
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(time), len(time))
        if event[idx].sum() == 0:
            continue
        values.append(_cindex(time[idx], event[idx], score[idx]))
    if not values:
        return [float("nan"), float("nan")]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _fit_cox(frame: pd.DataFrame, columns: Sequence[str], penalizer: float):  # noqa: ANN202
    from lifelines import CoxPHFitter

    cph = CoxPHFitter(penalizer=penalizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph.fit(frame[[*columns, "time", "event"]], duration_col="time", event_col="event")
    return cph


def select_features(frame: pd.DataFrame, candidates: Sequence[str], options: SurvivalOptions) -> tuple[list[str], bool]:
    """Univariate Cox screening on ``frame``: (selected, whether any passed ``alpha``)."""
    pvalues: list[tuple[float, str]] = []
    for name in candidates:
        try:
            cph = _fit_cox(frame, [name], options.penalizer)
            pvalues.append((float(cph.summary.loc[name, "p"]), name))
        except Exception as exc:  # noqa: BLE001 - a feature lifelines cannot fit is skipped, not fatal
            log.debug("univariate Cox of %s failed: %s", name, exc)
    if not pvalues:
        raise ResearchInputError("no feature could be fitted by a univariate Cox model")
    pvalues.sort()
    passed = [n for p, n in pvalues if p < options.alpha][: options.max_features]
    return (passed, True) if passed else ([pvalues[0][1]], False)


def _score(cph: Any, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    return np.asarray(cph.predict_log_partial_hazard(frame[list(columns)]), dtype=np.float64).ravel()


def run_survival(features: pd.DataFrame, clinical: pd.DataFrame, options: SurvivalOptions,
                 paths: dict[str, str] | None = None) -> SurvivalResult:
    """Run the analysis on tables indexed by the same ``sample_id`` s (rows in the same order)."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    paths = paths or {}
    feat_path, clin_path = paths.get("features", "features"), paths.get("clinical", "clinical")
    missing = [c for c in options.select if c not in features.columns]
    if missing:
        raise ResearchInputError(f"{feat_path}: selected feature column(s) {missing} not found")
    for col in options.covariates:
        if col not in clinical.columns:
            raise ResearchInputError(f"{clin_path}: covariate column {col!r} not found")
    data = features.copy()
    data["time"] = clinical["time"].to_numpy(dtype=np.float64)
    data["event"] = clinical["event"].to_numpy(dtype=int)
    for col in options.covariates:
        values = pd.to_numeric(clinical[col], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise ResearchInputError(f"{clin_path}: row for sample {clinical.index[row]!r}, column {col!r}: expected "
                                     f"a number, got {clinical[col].iloc[row]!r}")
        data[f"covariate:{col}"] = values.to_numpy(dtype=np.float64)
    events = int(data["event"].sum())
    n = len(data)
    if events < 2 or n - events < 2:
        raise ResearchInputError(f"{clin_path}: column 'event': {events} event(s) among {n} matched samples; expected "
                                 "at least 2 events and 2 censored")
    rng = np.random.default_rng(options.seed)
    # split stratified by event: the same share of events in both parts
    ev_idx, ce_idx = np.flatnonzero(data["event"] == 1), np.flatnonzero(data["event"] == 0)
    test_idx = np.concatenate([rng.permutation(ev_idx)[: max(1, int(round(options.test_fraction * len(ev_idx))))],
                               rng.permutation(ce_idx)[: int(round(options.test_fraction * len(ce_idx)))]])
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    train, test = data[~is_test].copy(), data[is_test].copy()
    train_events = int(train["event"].sum())
    if train_events < options.folds:
        raise ResearchInputError(f"{clin_path}: column 'event': {train_events} event(s) in the training rows, fewer "
                                 f"than the {options.folds} CV folds; expected at least one event per fold "
                                 "(use --folds or a larger cohort)")
    feature_cols = list(features.columns)
    mean, sd = train[feature_cols].mean(), train[feature_cols].std(ddof=0).replace(0, 1.0)
    train[feature_cols] = (train[feature_cols] - mean) / sd
    test[feature_cols] = (test[feature_cols] - mean) / sd
    cov_cols = [f"covariate:{c}" for c in options.covariates]

    def choose(frame: pd.DataFrame) -> tuple[list[str], bool]:
        if options.select:
            return list(options.select), True
        return select_features(frame, feature_cols, options)

    selected, passed = choose(train)
    columns = [*selected, *cov_cols]
    cph = _fit_cox(train, columns, options.penalizer)
    train["score"], test["score"] = _score(cph, train, columns), _score(cph, test, columns)

    # cross-validated C-index on the training rows (selection and z-scoring redone per fold)
    cv_values = []
    raw_train = data[~is_test]
    skf = StratifiedKFold(options.folds, shuffle=True, random_state=options.seed)
    for fit_rows, val_rows in skf.split(raw_train, raw_train["event"]):
        f_tr, f_va = raw_train.iloc[fit_rows].copy(), raw_train.iloc[val_rows].copy()
        m, s = f_tr[feature_cols].mean(), f_tr[feature_cols].std(ddof=0).replace(0, 1.0)
        f_tr[feature_cols] = (f_tr[feature_cols] - m) / s
        f_va[feature_cols] = (f_va[feature_cols] - m) / s
        sel, _ = choose(f_tr)
        fold_model = _fit_cox(f_tr, [*sel, *cov_cols], options.penalizer)
        if f_va["event"].sum() > 0:
            cv_values.append(_cindex(f_va["time"].to_numpy(), f_va["event"].to_numpy(),
                                     _score(fold_model, f_va, [*sel, *cov_cols])))

    threshold = float(np.quantile(train["score"], options.risk_quantile))
    summary: dict[str, Any] = {
        "method": METHOD_NAME, "version": METHOD_VERSION, "note": DISCLAIMER, "seed": options.seed,
        "n_train": len(train), "n_test": len(test), "events_train": train_events,
        "events_test": int(test["event"].sum()), "model": "Cox proportional hazards (lifelines "
        f"{__import__('lifelines').__version__}, penalizer {options.penalizer})",
    }
    for part, frame in (("train", train), ("test", test)):
        t, e, sc = frame["time"].to_numpy(), frame["event"].to_numpy(), frame["score"].to_numpy()
        summary[f"c_index_{part}"] = _cindex(t, e, sc)
        summary[f"c_index_{part}_ci"] = bootstrap_cindex(t, e, sc, options.bootstraps, rng)
        frame["group"] = np.where(sc > threshold, "high risk", "low risk")
        high = frame["group"] == "high risk"
        if high.any() and (~high).any():
            lr = logrank_test(t[high], t[~high], e[high], e[~high])
            summary["logrank_p" if part == "test" else "logrank_p_train"] = float(lr.p_value)
        else:
            summary["logrank_p" if part == "test" else "logrank_p_train"] = None
    summary["c_index_cv"] = float(np.mean(cv_values)) if cv_values else None
    summary["c_index_cv_folds"] = cv_values
    summary["folds"] = options.folds
    summary["bootstraps"] = options.bootstraps
    summary["risk_threshold"] = threshold
    summary["risk_quantile"] = options.risk_quantile
    summary["selection"] = ("named" if options.select else
                            f"univariate Cox, p < {options.alpha}, at most {options.max_features}"
                            + ("" if passed else "; none passed, the best feature kept"))
    table = cph.summary
    summary["selected_features"] = selected
    summary["covariates"] = list(options.covariates)
    summary["hazard_ratios"] = {
        name.removeprefix("covariate:"): {"hazard_ratio_per_sd" if not name.startswith("covariate:") else "hazard_ratio":
                                          float(table.loc[name, "exp(coef)"]),
                                          "ci95": [float(table.loc[name, "exp(coef) lower 95%"]),
                                                   float(table.loc[name, "exp(coef) upper 95%"])],
                                          "p": float(table.loc[name, "p"])}
        for name in columns}
    km: dict[str, Any] = {}
    for part, frame in (("train", train), ("test", test)):
        km[part] = {}
        for group in ("low risk", "high risk"):
            rows = frame[frame["group"] == group]
            if len(rows):
                kmf = KaplanMeierFitter().fit(rows["time"], rows["event"], label=f"{group} (n={len(rows)})")
                km[part][group] = kmf
    return SurvivalResult(summary, train[["time", "event", "score", "group"]], test[["time", "event", "score", "group"]],
                          km)
