"""Feature selection with stability: z-score → mRMR → random-forest RFE inside bootstraps.

Why bootstraps
--------------
One selection run on a radiomics table (hundreds of correlated features, tens to
hundreds of cases) is mostly chance; what is worth reporting is how often a feature is
chosen when the cohort is resampled (its *stability*, Meinshausen & Bühlmann 2010). Each
bootstrap draws a stratified sample of the cases with replacement (the *in-bag* rows, the
training fold) and leaves the rest out (*out-of-bag*, the held-out rows). Everything
fitted in a bootstrap sees the in-bag rows only:

1. z-scoring (:class:`~sklearn.preprocessing.StandardScaler`) is fitted on the in-bag rows
   and only *applied* to the out-of-bag ones, so no mean or scale of a held-out case
   leaks into the selection (tested);
2. mRMR (Peng, Long & Ding 2005), implemented here: relevance of each feature to the
   label is its mutual information (:func:`sklearn.feature_selection.mutual_info_classif`,
   ``relevance="mi"``) or its ANOVA F statistic (``relevance="f"``, much faster on
   thousands of features); redundancy is the mean absolute Pearson correlation with the
   features already chosen; features are added greedily by the quotient
   relevance / redundancy (the "MIQ"/"FCQ" forms), the first one by relevance alone;
3. recursive feature elimination with a random forest
   (:class:`sklearn.feature_selection.RFE`, impurity importances) down to
   ``rfe_features`` among the mRMR candidates.

The final forest of each bootstrap is scored on its out-of-bag rows (AUC, binary
endpoints) as a sanity check of the selected set. A feature's *frequency* is the share of
bootstraps whose RFE kept it; the selected list is every feature with frequency at or
above ``threshold``, most frequent first.

An optional ICC filter (``radnode features robustness``) is applied before anything else:
features below the ICC threshold, or absent from the ICC table, are dropped and reported.
Columns with a non-finite value in any case are dropped too (radnode does not impute).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import RFE, f_classif, mutual_info_classif
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from radnode.models.classifiers.table import FeatureTable

logger = logging.getLogger(__name__)

#: Defaults (the issue: 500 bootstraps).
DEFAULT_BOOTSTRAPS = 500
DEFAULT_MRMR_FEATURES = 20
DEFAULT_RFE_FEATURES = 10
DEFAULT_FREQUENCY_THRESHOLD = 0.5
DEFAULT_TREES = 100
#: Floor of the redundancy term, so a feature uncorrelated with the chosen ones does not divide by 0.
_MIN_REDUNDANCY = 1e-3


class SelectionError(ValueError):
    """A table or option that selection cannot work with (the message says which)."""


@dataclass(frozen=True)
class SelectionOptions:
    """Knobs of :func:`select_features`.

    Attributes
    ----------
    bootstraps
        Stratified bootstrap samples.
    mrmr_features
        Candidates kept by mRMR in each bootstrap.
    rfe_features
        Features RFE keeps among the candidates.
    threshold
        Frequency at or above which a feature is selected.
    relevance
        ``mi`` (mutual information) or ``f`` (ANOVA F) as mRMR's relevance.
    trees
        Trees of the RFE random forest.
    rfe_step
        Features RFE removes per round.
    random_state
        Seed of bootstraps, MI estimates and forests.
    """

    bootstraps: int = DEFAULT_BOOTSTRAPS
    mrmr_features: int = DEFAULT_MRMR_FEATURES
    rfe_features: int = DEFAULT_RFE_FEATURES
    threshold: float = DEFAULT_FREQUENCY_THRESHOLD
    relevance: Literal["mi", "f"] = "mi"
    trees: int = DEFAULT_TREES
    rfe_step: int = 1
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.bootstraps < 1:
            raise SelectionError(f"bootstraps must be >= 1, got {self.bootstraps}")
        if self.rfe_features < 1 or self.mrmr_features < 1:
            raise SelectionError("mrmr_features and rfe_features must be >= 1")
        if self.rfe_features > self.mrmr_features:
            raise SelectionError(f"rfe_features ({self.rfe_features}) cannot exceed mrmr_features "
                                 f"({self.mrmr_features})")
        if not 0.0 < self.threshold <= 1.0:
            raise SelectionError(f"threshold is a frequency in (0, 1], got {self.threshold}")
        if self.relevance not in ("mi", "f"):
            raise SelectionError(f"relevance must be 'mi' or 'f', got {self.relevance!r}")


@dataclass
class BootstrapOutcome:
    """One bootstrap: the rows it trained on, its fitted scaler and what it chose (column indices)."""

    in_bag: np.ndarray
    scaler: StandardScaler
    mrmr: list[int]
    selected: list[int]
    oob_auc: float | None


def relevance_scores(x: np.ndarray, y: np.ndarray, kind: str, random_state: int = 0) -> np.ndarray:
    """Relevance of each column to ``y``: mutual information or ANOVA F (NaN → 0)."""
    if kind == "mi":
        scores = mutual_info_classif(x, y, discrete_features=False, random_state=random_state)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            scores, _ = f_classif(x, y)
    return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=0.0)


def mrmr(x: np.ndarray, y: np.ndarray, k: int, relevance: str = "mi", random_state: int = 0) -> list[int]:
    """Greedy mRMR: ``k`` column indices by relevance / mean |Pearson r| with those already chosen.

    ``x`` should be z-scored (the correlation does not care, mutual information's k-NN
    estimate does).
    """
    p = x.shape[1]
    k = min(k, p)
    rel = relevance_scores(x, y, relevance, random_state)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.abs(np.corrcoef(x, rowvar=False))
    corr = np.nan_to_num(np.atleast_2d(corr), nan=0.0)
    chosen = [int(np.argmax(rel))]
    redundancy_sum = corr[chosen[0]].copy()
    available = np.ones(p, dtype=bool)
    available[chosen[0]] = False
    while len(chosen) < k:
        score = rel / np.maximum(redundancy_sum / len(chosen), _MIN_REDUNDANCY)
        score[~available] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        available[best] = False
        redundancy_sum += corr[best]
    return chosen


def stratified_bootstrap(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices drawn with replacement within each class (class sizes kept)."""
    parts = [rng.choice(np.flatnonzero(y == c), size=int(np.sum(y == c)), replace=True) for c in np.unique(y)]
    return np.sort(np.concatenate(parts))


def bootstrap_selection(x: np.ndarray, y: np.ndarray, in_bag: np.ndarray, options: SelectionOptions,
                        seed: int) -> BootstrapOutcome:
    """One bootstrap: scaler, mRMR and RFE fitted on ``x[in_bag]`` only; AUC on the other rows.

    The rows outside ``in_bag`` are only ever *transformed* with the in-bag scaler, for the
    out-of-bag AUC; changing them changes nothing but that AUC (the leakage test).
    """
    scaler = StandardScaler().fit(x[in_bag])
    train = scaler.transform(x[in_bag])
    y_train = y[in_bag]
    # A bootstrap repeats rows; the k-NN mutual-information estimate would take a repeated
    # row for a perfect neighbour in every feature and call noise informative, so mRMR
    # scores the distinct in-bag rows (the same cases, each once).
    distinct = np.unique(in_bag, return_index=True)[1]
    candidates = mrmr(train[distinct], y_train[distinct], options.mrmr_features, options.relevance, seed)
    forest = RandomForestClassifier(n_estimators=options.trees, random_state=seed, n_jobs=1)
    rfe = RFE(forest, n_features_to_select=min(options.rfe_features, len(candidates)), step=options.rfe_step)
    rfe.fit(train[:, candidates], y_train)
    selected = [candidates[i] for i in np.flatnonzero(rfe.support_)]
    oob = np.setdiff1d(np.arange(len(y)), in_bag)
    auc = None
    if oob.size and len(np.unique(y[oob])) == 2 and len(np.unique(y)) == 2:
        held_out = scaler.transform(x[oob])[:, candidates][:, rfe.support_]
        proba = rfe.estimator_.predict_proba(held_out)[:, 1]
        auc = float(roc_auc_score(y[oob], proba))
    return BootstrapOutcome(in_bag, scaler, candidates, selected, auc)


@dataclass
class SelectionResult:
    """Stability of every feature and the final selection.

    Attributes
    ----------
    names
        Features that entered selection (after the ICC and finiteness filters).
    frequency
        Share of bootstraps whose RFE kept each feature.
    mrmr_frequency
        Share of bootstraps whose mRMR step proposed it.
    selected
        Features with ``frequency >= threshold``, most frequent first.
    dropped
        Features left out before selection, with the reason.
    oob_auc
        Out-of-bag AUC of each bootstrap's final forest (binary endpoints).
    options
        The options used.
    """

    names: list[str]
    frequency: np.ndarray
    mrmr_frequency: np.ndarray
    selected: list[str]
    dropped: dict[str, str]
    oob_auc: list[float]
    options: SelectionOptions
    bootstraps: list[BootstrapOutcome] = field(default_factory=list, repr=False)

    def write_stability_csv(self, path: str | os.PathLike[str]) -> Path:
        """``feature, frequency, mrmr_frequency, selected`` (most frequent first), then dropped features."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        order = np.lexsort((-self.mrmr_frequency, -self.frequency))
        chosen = set(self.selected)
        with p.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["feature", "frequency", "mrmr_frequency", "selected", "note"])
            for i in order:
                name = self.names[i]
                writer.writerow([name, f"{self.frequency[i]:.6g}", f"{self.mrmr_frequency[i]:.6g}",
                                 "yes" if name in chosen else "no", ""])
            for name, reason in self.dropped.items():
                writer.writerow([name, "", "", "no", reason])
        return p

    def summary(self) -> dict[str, Any]:
        aucs = np.array(self.oob_auc)
        return {
            "features_in": len(self.names) + len(self.dropped),
            "features_considered": len(self.names),
            "dropped": len(self.dropped),
            "selected": list(self.selected),
            "options": {k: getattr(self.options, k) for k in self.options.__dataclass_fields__},
            "oob_auc_mean": float(aucs.mean()) if aucs.size else None,
            "oob_auc_std": float(aucs.std()) if aucs.size else None,
            "bootstraps_with_auc": int(aucs.size),
        }


def icc_filter(names: list[str], icc: Mapping[str, float], threshold: float) -> tuple[list[str], dict[str, str]]:
    """Features with ICC at or above ``threshold``; the others with the reason."""
    keep: list[str] = []
    dropped: dict[str, str] = {}
    for name in names:
        value = icc.get(name)
        if value is None:
            dropped[name] = "not in the ICC table"
        elif not math.isfinite(value) or value < threshold:
            dropped[name] = f"ICC {value:.3f} < {threshold}" if math.isfinite(value) else "ICC undefined"
        else:
            keep.append(name)
    return keep, dropped


def select_features(
    table: FeatureTable,
    y: np.ndarray,
    options: SelectionOptions | None = None,
    *,
    icc: Mapping[str, float] | None = None,
    icc_threshold: float = 0.75,
    keep_bootstraps: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SelectionResult:
    """Bootstrap mRMR + RF-RFE selection with stability frequencies (see the module docstring).

    Raises
    ------
    SelectionError
        Fewer than two classes, a class with fewer than 2 cases, or no feature left after
        the ICC and finiteness filters.
    """
    options = options or SelectionOptions()
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2:
        raise SelectionError(f"selection needs at least two classes, got class counts {counts.tolist()}")
    if present.min() < 2:
        raise SelectionError(f"every class needs at least 2 cases, got class counts {counts.tolist()}")
    names = list(table.names)
    dropped: dict[str, str] = {}
    if icc is not None:
        names, dropped = icc_filter(names, icc, icc_threshold)
    sub = table.select(names) if names else table
    finite = np.isfinite(sub.values).all(axis=0) if names else np.zeros(0, dtype=bool)
    for name, ok in zip(list(names), finite):
        if not ok:
            dropped[name] = "non-finite value in some case"
    names = [n for n, ok in zip(names, finite) if ok]
    if not names:
        raise SelectionError("no feature left for selection after the ICC and finiteness filters "
                             f"({len(dropped)} dropped)")
    x = table.select(names).values
    rng = np.random.default_rng(options.random_state)
    selected_count = np.zeros(len(names))
    mrmr_count = np.zeros(len(names))
    outcomes: list[BootstrapOutcome] = []
    aucs: list[float] = []
    for b in range(options.bootstraps):
        in_bag = stratified_bootstrap(y, rng)
        outcome = bootstrap_selection(x, y, in_bag, options, seed=options.random_state + b)
        selected_count[outcome.selected] += 1
        mrmr_count[outcome.mrmr] += 1
        if outcome.oob_auc is not None:
            aucs.append(outcome.oob_auc)
        if keep_bootstraps:
            outcomes.append(outcome)
        if progress is not None:
            progress(b + 1, options.bootstraps)
    frequency = selected_count / options.bootstraps
    order = np.argsort(-frequency, kind="stable")
    selected = [names[i] for i in order if frequency[i] >= options.threshold]
    logger.info("selection: %d features, %d bootstraps, %d selected at frequency >= %.2f", len(names),
                options.bootstraps, len(selected), options.threshold)
    return SelectionResult(names, frequency, mrmr_count / options.bootstraps, selected, dropped, aucs, options,
                           outcomes)
