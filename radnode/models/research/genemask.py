"""Gene-masking radiogenomics (Smedley, Aberle & Hsu, J Med Imaging 7(4) 2020; ``papers/003``).

Procedure (the paper's Fig. 1, with its Table 2 grid)
------------------------------------------------------
1. Samples of the expression matrix and the feature table are matched on ``sample_id`` and
   split into training and test rows (seeded, ``test_fraction``).
2. Targets: each radiomic feature is binarised by a 2-cluster k-means fitted on the training
   rows (class 1 = the cluster with the higher centre); a feature with more than
   ``max_cluster_fraction`` (90 %) of the training rows in one cluster is dropped. The same
   cluster boundaries binarise the test rows. With a clinical table, histology (ADC / SCC /
   other) and stage are categorical targets.
3. Grid search per radiomic group (shape, first-order, GLCM, ..., LoG, wavelet): one
   multi-label network per grid point predicts all of the group's features; mean AUC over
   the group's features and ``folds`` CV folds picks the group's hyper-parameters.
4. Per-feature networks with the group's best hyper-parameters: CV AUC, then a final model
   on all training rows, scored on the test rows. Baselines (elastic-net LR, SVM, RF,
   gradient boosting) get CV AUCs on the same folds for comparison (``models.csv``).
5. Gene masking: for each gene set, only its genes' standardised expression is kept (the
   others set to zero) and pushed through the final per-target network; AUC and average
   precision on the test rows rank the gene sets per target (``masking.csv``, heat-map).

Gene standardisation is fitted on the training rows of each fit only (see
:mod:`~radnode.models.research.network`); :attr:`GeneMaskResult.fold_log` records what
each CV fit saw, which the no-leakage test checks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold

from radnode.models.research.baselines import BASELINE_FAMILIES, baseline_scores, best_baseline
from radnode.models.research.network import (
    Kind,
    NetParams,
    TrainOptions,
    fit_network,
    grid,
)
from radnode.models.research.tables import GeneSet, ResearchInputError

log = logging.getLogger(__name__)

METHOD_NAME = "radnode-genemask"
METHOD_VERSION = "1"
#: Every output says this: research models are not clinical tools.
DISCLAIMER = "research analysis - not for clinical use"

#: Progress callback: (stage text, done, total).
Progress = Callable[[str, int, int], None]

_GROUP_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|_)wavelet", "wavelet"), (r"(^|_)log-sigma", "log"), (r"(^|_)(squareroot|square|exponential|logarithm|"
                                                                 r"gradient|lbp-[23]d)", "filtered"),
)
_CLASSES = ("shape2D", "shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")


def radiomic_group(name: str) -> str:
    """The paper's grouping of a feature by its pyradiomics name: wavelet, LoG, or the feature class."""
    lower = name.lower()
    for pattern, group in _GROUP_PATTERNS:
        if re.search(pattern, lower):
            return group
    for token in lower.split("_"):
        for cls in _CLASSES:
            if token == cls.lower():
                return cls.lower()
    return "other"


@dataclass(frozen=True)
class GeneMaskOptions:
    """Everything the analysis can be steered by (defaults: the paper's)."""

    folds: int = 10
    seed: int = 0
    test_fraction: float = 0.25
    max_cluster_fraction: float = 0.9
    grid: tuple[NetParams, ...] = field(default_factory=lambda: tuple(grid()))
    training: TrainOptions = field(default_factory=TrainOptions)
    baselines: tuple[str, ...] = BASELINE_FAMILIES
    categorical: tuple[str, ...] = ("histology", "stage")


@dataclass
class Binarised:
    """Binary targets from k-means on the training rows."""

    train: pd.DataFrame
    test: pd.DataFrame
    thresholds: dict[str, float]
    dropped: dict[str, str]


def binarise_features(train: pd.DataFrame, test: pd.DataFrame, max_fraction: float, seed: int) -> Binarised:
    """2-cluster k-means per feature on ``train``; class 1 = higher centre; imbalanced features dropped."""
    tr: dict[str, np.ndarray] = {}
    te: dict[str, np.ndarray] = {}
    thresholds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for col in train.columns:
        values = train[col].to_numpy(dtype=np.float64).reshape(-1, 1)
        if np.ptp(values) == 0:
            dropped[col] = "constant on the training rows"
            continue
        km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(values)
        high = int(np.argmax(km.cluster_centers_.ravel()))
        labels = (km.labels_ == high).astype(int)
        fraction = max(labels.mean(), 1 - labels.mean())
        if fraction > max_fraction:
            dropped[col] = f"{fraction:.0%} of training rows in one cluster (> {max_fraction:.0%})"
            continue
        tr[col] = labels
        te[col] = (km.predict(test[col].to_numpy(dtype=np.float64).reshape(-1, 1)) == high).astype(int)
        thresholds[col] = float(np.mean(km.cluster_centers_))
    return Binarised(pd.DataFrame(tr, index=train.index), pd.DataFrame(te, index=test.index), thresholds, dropped)


@dataclass
class Target:
    """One thing the networks predict: a binarised feature (binary) or a clinical class column."""

    name: str
    group: str
    kind: Kind
    y_train: np.ndarray  # binary: (n,) 0/1; categorical: (n,) class index
    y_test: np.ndarray
    classes: tuple[str, ...] = ("0", "1")

    def output_names(self) -> list[str]:
        """Rows of masking.csv this target yields: itself, or one per class."""
        return [self.name] if self.kind == "binary" else [f"{self.name}={c}" for c in self.classes]


@dataclass
class FoldRecord:
    """What one CV fit saw (for the no-leakage check)."""

    purpose: str
    train_rows: np.ndarray
    test_rows: np.ndarray
    standardiser_mean: np.ndarray


@dataclass
class GeneMaskResult:
    """Tables of one run."""

    masking: pd.DataFrame
    models: pd.DataFrame
    dropped: dict[str, str]
    summary: dict[str, Any]
    fold_log: list[FoldRecord] = field(default_factory=list)


def _aucs(kind: Kind, y: np.ndarray, prob: np.ndarray, n_classes: int) -> list[float]:
    """AUC per output column (one per binary target or one-vs-rest per class); NaN where one class only."""
    out = []
    if kind == "binary":
        ys = y.reshape(len(y), -1)
        for j in range(ys.shape[1]):
            out.append(float(roc_auc_score(ys[:, j], prob[:, j])) if len(np.unique(ys[:, j])) == 2 else np.nan)
    else:
        for c in range(n_classes):
            yc = (y == c).astype(int)
            out.append(float(roc_auc_score(yc, prob[:, c])) if len(np.unique(yc)) == 2 else np.nan)
    return out


def _aps(kind: Kind, y: np.ndarray, prob: np.ndarray, n_classes: int) -> list[float]:
    out = []
    if kind == "binary":
        ys = y.reshape(len(y), -1)
        for j in range(ys.shape[1]):
            out.append(float(average_precision_score(ys[:, j], prob[:, j])) if ys[:, j].any() else np.nan)
    else:
        for c in range(n_classes):
            yc = (y == c).astype(int)
            out.append(float(average_precision_score(yc, prob[:, c])) if yc.any() else np.nan)
    return out


class _Runner:
    def __init__(self, x_train: np.ndarray, options: GeneMaskOptions, progress: Progress | None) -> None:
        self.x = x_train
        self.options = options
        self.progress = progress
        self.fold_log: list[FoldRecord] = []

    def folds(self, y: np.ndarray, stratify: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        k, seed = self.options.folds, self.options.seed
        if stratify:
            return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(self.x, y))
        return list(KFold(k, shuffle=True, random_state=seed).split(self.x))

    def cv_auc(self, y: np.ndarray, kind: Kind, params: NetParams, purpose: str, n_classes: int) -> float:
        stratify = kind == "categorical" or y.ndim == 1 or y.shape[1] == 1
        labels = y if y.ndim == 1 else (y[:, 0] if y.shape[1] == 1 else y)
        per_fold = []
        for i, (train, test) in enumerate(self.folds(labels if stratify else y, stratify)):
            net = fit_network(self.x[train], y[train], params, kind, self.options.training, self.options.seed + i)
            self.fold_log.append(FoldRecord(purpose, train, test, net.standardiser.mean))
            aucs = _aucs(kind, y[test], net.predict(self.x[test]), n_classes)
            if np.isfinite(aucs).any():
                per_fold.append(float(np.nanmean(aucs)))
        return float(np.mean(per_fold)) if per_fold else float("nan")


def _targets(binary: Binarised, clin_train: pd.DataFrame | None, clin_test: pd.DataFrame | None,
             options: GeneMaskOptions, clinical_path: str) -> list[Target]:
    targets = [Target(c, radiomic_group(c), "binary", binary.train[c].to_numpy(), binary.test[c].to_numpy())
               for c in binary.train.columns]
    if clin_train is None or clin_test is None:
        return targets
    present = [c for c in options.categorical if c in clin_train.columns]
    if not present:
        raise ResearchInputError(f"{clinical_path}: none of the columns {list(options.categorical)} found; expected "
                                 f"sample_id and histology and/or stage (the table has {list(clin_train.columns)})")
    for col in present:
        for part in (clin_train, clin_test):
            empty = [s for s, v in zip(part.index, part[col].astype(str)) if not v.strip()]
            if empty:
                raise ResearchInputError(f"{clinical_path}: column {col!r} is empty for {len(empty)} sample(s) "
                                         f"(first: {empty[0]!r}); expected a class for every sample")
        classes = tuple(sorted(set(clin_train[col].astype(str))))
        if len(classes) < 2:
            raise ResearchInputError(f"{clinical_path}: column {col!r} has one class ({classes[0]!r}) in the training "
                                     "rows; expected at least two")
        unknown = sorted(set(clin_test[col].astype(str)) - set(classes))
        if unknown:
            raise ResearchInputError(f"{clinical_path}: column {col!r}: class(es) {unknown} occur only in the test "
                                     f"rows; expected one of {list(classes)}")
        index = {c: i for i, c in enumerate(classes)}
        targets.append(Target(col, col, "categorical", clin_train[col].astype(str).map(index).to_numpy(),
                              clin_test[col].astype(str).map(index).to_numpy(), classes))
    return targets


def _check_folds(targets: Sequence[Target], folds: int, features_path: str, clinical_path: str) -> None:
    for t in targets:
        counts = np.bincount(t.y_train, minlength=len(t.classes))
        if counts.min() < folds:
            where = clinical_path if t.kind == "categorical" else features_path
            smallest = t.classes[int(np.argmin(counts))] if t.kind == "categorical" else str(int(np.argmin(counts)))
            raise ResearchInputError(
                f"{where}: column {t.name!r}: class {smallest!r} has {int(counts.min())} training sample(s), fewer "
                f"than the {folds} CV folds; expected at least one per fold (use --folds {max(2, int(counts.min()))} "
                "or a larger cohort)")


def run_genemask(expression: pd.DataFrame, features: pd.DataFrame, gene_sets: Sequence[tuple[GeneSet, np.ndarray]],
                 options: GeneMaskOptions, clinical: pd.DataFrame | None = None, progress: Progress | None = None,
                 paths: dict[str, str] | None = None) -> GeneMaskResult:
    """Run the whole analysis on matched tables (rows = the same samples in the same order)."""
    paths = paths or {}
    if options.folds < 2:
        raise ResearchInputError(f"--folds must be at least 2, got {options.folds}")
    ids = list(expression.index)
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(ids))
    n_test = int(round(options.test_fraction * len(ids)))
    if n_test < 2 or len(ids) - n_test < 2 * options.folds:
        raise ResearchInputError(f"{paths.get('features', 'features')}: {len(ids)} matched samples are too few for "
                                 f"a {options.test_fraction:.0%} test split and {options.folds}-fold CV")
    test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])
    x_all = expression.to_numpy(dtype=np.float64)
    x_train, x_test = x_all[train_rows], x_all[test_rows]
    binary = binarise_features(features.iloc[train_rows], features.iloc[test_rows], options.max_cluster_fraction,
                               options.seed)
    clin_train = clinical.iloc[train_rows] if clinical is not None else None
    clin_test = clinical.iloc[test_rows] if clinical is not None else None
    targets = _targets(binary, clin_train, clin_test, options, paths.get("clinical", "clinical"))
    if not targets:
        raise ResearchInputError(f"{paths.get('features', 'features')}: no radiomic feature splits into two clusters "
                                 f"with at most {options.max_cluster_fraction:.0%} in one; nothing to predict")
    _check_folds(targets, options.folds, paths.get("features", "features"), paths.get("clinical", "clinical"))
    runner = _Runner(x_train, options, progress)
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.group, []).append(t)

    # 1. grid search per radiomic group (multi-label) or per categorical target
    best: dict[str, tuple[NetParams, float, list[float]]] = {}
    total = len(groups) * len(options.grid)
    done = 0
    for group, members in groups.items():
        kind = members[0].kind
        y = (np.column_stack([m.y_train for m in members]) if kind == "binary" else members[0].y_train)
        scores = []
        for params in options.grid:
            if progress:
                progress(f"grid search {group}: {params.label()}", done, total)
            scores.append(runner.cv_auc(y, kind, params, f"grid:{group}", len(members[0].classes)))
            done += 1
        finite = [s if np.isfinite(s) else -1.0 for s in scores]
        i = int(np.argmax(finite))
        best[group] = (options.grid[i], scores[i], scores)
    if progress:
        progress("grid search done", total, total)

    # 2. per-target networks with the group's hyper-parameters, baselines, final fit, masking
    model_rows: list[dict[str, Any]] = []
    mask_rows: list[dict[str, Any]] = []
    for j, t in enumerate(targets):
        if progress:
            progress(f"target {t.name}", j, len(targets))
        params, group_auc, _ = best[t.group]
        n_classes = len(t.classes)
        cv = runner.cv_auc(t.y_train, t.kind, params, f"target:{t.name}", n_classes)
        net = fit_network(x_train, t.y_train, params, t.kind, options.training, options.seed)
        prob = net.predict(x_test)
        test_auc, test_ap = _aucs(t.kind, t.y_test, prob, n_classes), _aps(t.kind, t.y_test, prob, n_classes)
        row: dict[str, Any] = {"target": t.name, "group": t.group, "kind": t.kind,
                               "classes": "|".join(t.classes) if t.kind == "categorical" else "",
                               "train_positive": int((t.y_train == 1).sum()) if t.kind == "binary" else "",
                               "model": "neural_network", **{f"nn_{k}": v for k, v in params.as_dict().items()},
                               "group_cv_auc": group_auc, "cv_auc": cv, "epochs": net.epochs,
                               "test_auc": float(np.nanmean(test_auc)) if np.isfinite(test_auc).any() else np.nan,
                               "test_average_precision": float(np.nanmean(test_ap)) if np.isfinite(test_ap).any()
                               else np.nan,
                               "threshold": binary.thresholds.get(t.name, np.nan)}
        best_model, best_cv = "neural_network", cv
        if t.kind == "binary":
            folds = runner.folds(t.y_train, stratify=True)
            for family in options.baselines:
                label, auc, fitted = best_baseline(family, x_train, t.y_train, folds, options.seed)
                row[f"{family}_params"], row[f"{family}_cv_auc"] = label, auc
                scores = baseline_scores(fitted, x_test)
                row[f"{family}_test_auc"] = (float(roc_auc_score(t.y_test, scores))
                                             if len(np.unique(t.y_test)) == 2 else np.nan)
                if np.isfinite(auc) and auc > best_cv:
                    best_model, best_cv = family, auc
        row["best_cv_model"] = best_model
        model_rows.append(row)
        for set_, keep in gene_sets:
            p = net.predict(x_test, keep=keep)
            aucs, aps = _aucs(t.kind, t.y_test, p, n_classes), _aps(t.kind, t.y_test, p, n_classes)
            for out_name, auc, ap in zip(t.output_names(), aucs, aps):
                mask_rows.append({"gene_set": set_.name, "target": out_name, "auc": auc, "average_precision": ap,
                                  "genes_in_set": len(set_.genes), "genes_used": int(keep.size)})
    if progress:
        progress("done", len(targets), len(targets))
    masking = pd.DataFrame(mask_rows)
    masking["rank"] = (masking.groupby("target")["auc"].rank(ascending=False, method="min", na_option="bottom")
                       .astype(int))
    masking = masking.sort_values(["target", "rank", "gene_set"]).reset_index(drop=True)
    overall = (masking.groupby("gene_set")["auc"].mean().sort_values(ascending=False))
    summary = {
        "method": METHOD_NAME, "version": METHOD_VERSION, "note": DISCLAIMER,
        "samples": len(ids), "train": len(train_rows), "test": len(test_rows), "folds": options.folds,
        "seed": options.seed, "genes": expression.shape[1], "gene_sets": len(gene_sets),
        "targets": [t.name for t in targets], "dropped_features": binary.dropped,
        "grid_points": len(options.grid),
        "best_params_per_group": {g: {"params": b[0].as_dict(), "cv_auc": b[1]} for g, b in best.items()},
        "top_gene_sets_mean_auc": [{"gene_set": g, "mean_auc": float(a)} for g, a in overall.head(10).items()],
        "test_samples": [ids[i] for i in test_rows],
    }
    return GeneMaskResult(masking, pd.DataFrame(model_rows), binary.dropped, summary, runner.fold_log)
