"""Comparison classifiers of the gene-masking paper: elastic-net logistic regression (SAGA),
SVM, random forest and gradient-boosted trees, each a small grid scored by CV AUC.

Every candidate is a scikit-learn ``Pipeline(StandardScaler, model)``, so the gene
standardisation is refitted inside each training fold, as for the networks. The grids are
small by default (the paper's had 100-400 models per family); ``BASELINE_GRIDS`` is the one
place to widen them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

#: family → list of (label, estimator factory).
BASELINE_GRIDS: dict[str, list[tuple[str, Callable[[int], Any]]]] = {
    "lr": [(f"elastic-net l1_ratio={r}", lambda s, r=r: LogisticRegression(
        solver="saga", l1_ratio=r, C=1.0, max_iter=3000, random_state=s)) for r in (0.1, 0.5, 0.9)],
    "svm": [(f"svm {k} C={c}", lambda s, k=k, c=c: SVC(kernel=k, C=c, random_state=s))
            for k in ("linear", "rbf") for c in (0.1, 1.0, 10.0)],
    "rf": [(f"rf 200 trees {crit} max_features={mf}", lambda s, crit=crit, mf=mf: RandomForestClassifier(
        n_estimators=200, criterion=crit, max_features=mf, random_state=s, n_jobs=1))
        for crit in ("gini", "entropy") for mf in ("sqrt", "log2")],
    "gb": [(f"gb 100 trees depth={d} lr=0.1", lambda s, d=d: GradientBoostingClassifier(
        n_estimators=100, max_depth=d, learning_rate=0.1, random_state=s)) for d in (1, 3)],
}
BASELINE_FAMILIES: tuple[str, ...] = tuple(BASELINE_GRIDS)


def _score(model: Any, x: np.ndarray) -> np.ndarray:
    if hasattr(model, "decision_function"):
        return np.asarray(model.decision_function(x))
    return np.asarray(model.predict_proba(x))[:, 1]


def best_baseline(family: str, x: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                  seed: int) -> tuple[str, float, Any]:
    """The grid point of ``family`` with the best mean CV AUC: (label, cv AUC, pipeline refitted on all ``x``)."""
    if family not in BASELINE_GRIDS:
        raise ValueError(f"unknown baseline {family!r}; known: {', '.join(BASELINE_FAMILIES)}")
    best: tuple[str, float, Any] | None = None
    for label, factory in BASELINE_GRIDS[family]:
        template = Pipeline([("scale", StandardScaler()), ("model", factory(seed))])
        aucs = []
        for train, test in folds:
            if len(np.unique(y[test])) < 2 or len(np.unique(y[train])) < 2:
                continue
            model = clone(template).fit(x[train], y[train])
            aucs.append(roc_auc_score(y[test], _score(model, x[test])))
        auc = float(np.mean(aucs)) if aucs else float("nan")
        if best is None or (np.isfinite(auc) and not auc <= best[1]):
            best = (label, auc, template)
    assert best is not None
    final = clone(best[2]).fit(x, y)
    return best[0], best[1], final


def baseline_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """Scores of a fitted baseline for AUC/AP (decision function or probability)."""
    return _score(model, x)
