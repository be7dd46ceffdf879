"""Train a classifier bundle: method A or B, calibration, cross-validated metrics.

Steps: fit the method (its own model selection, :mod:`.method_a` / :mod:`.method_b`);
wrap the chosen pipeline in :class:`~sklearn.calibration.CalibratedClassifierCV` (sigmoid,
stratified folds) unless its last step already gives calibrated probabilities (logistic
regression, LDA); record out-of-fold AUCs of the chosen pipeline (stratified 5-fold).
Those out-of-fold AUCs come from the folds the model was selected on and are therefore
optimistic; a held-out cohort (``radnode evaluate classifier``) gives the honest figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from radnode.models.classifiers import method_a, method_b
from radnode.models.classifiers.bundle import METHODS, ClassifierBundle, ClassifierMeta, NaNFeatureError
from radnode.models.classifiers.endpoints import Endpoint
from radnode.models.classifiers.evaluation import auc_of, class_scores
from radnode.models.classifiers.table import FeatureTable

logger = logging.getLogger(__name__)

#: Final estimators whose predict_proba is calibrated by construction.
NATIVELY_CALIBRATED = (LogisticRegression, LinearDiscriminantAnalysis)
#: Folds of the calibration and of the out-of-fold AUC.
CALIBRATION_FOLDS = 5


@dataclass(frozen=True)
class TrainingOptions:
    """Knobs of :func:`train_classifier` (defaults follow the papers).

    Attributes
    ----------
    random_state
        Seed of every split and model.
    zoo_repeats
        Repeats of method B's 5-fold CV (paper: 10).
    method_a_reducers, method_a_classifiers
        Search space of method A.
    zoo
        Classifiers of method B's zoo.
    """

    random_state: int = 0
    zoo_repeats: int = method_b.ZOO_REPEATS
    method_a_reducers: tuple[str, ...] = method_a.REDUCERS
    method_a_classifiers: tuple[str, ...] = method_a.CLASSIFIERS
    zoo: tuple[str, ...] = method_b.ZOO


def calibrated(estimator: Any, x: np.ndarray, y: np.ndarray, random_state: int = 0) -> tuple[Any, str]:
    """A fitted model with calibrated ``predict_proba`` and a word on how it was calibrated."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    if isinstance(final, NATIVELY_CALIBRATED):
        return clone(estimator).fit(x, y), f"native ({type(final).__name__} probabilities)"
    k = int(min(CALIBRATION_FOLDS, np.bincount(y)[np.bincount(y) > 0].min()))
    cal = CalibratedClassifierCV(clone(estimator), method="sigmoid",
                                 cv=StratifiedKFold(k, shuffle=True, random_state=random_state))
    cal.fit(x, y)
    return cal, f"sigmoid (Platt) via CalibratedClassifierCV, {k}-fold, on {type(final).__name__}"


def out_of_fold_scores(estimator: Any, x: np.ndarray, y: np.ndarray, random_state: int = 0) -> np.ndarray:
    """Out-of-fold class scores ``(n, K)`` of an unfitted estimator (stratified k-fold)."""
    k = int(min(CALIBRATION_FOLDS, np.bincount(y)[np.bincount(y) > 0].min()))
    n_classes = int(y.max()) + 1
    out = np.zeros((len(y), n_classes))
    for train, test in StratifiedKFold(k, shuffle=True, random_state=random_state).split(x, y):
        model = clone(estimator).fit(x[train], y[train])
        scores = class_scores(model, x[test])
        out[np.ix_(test, model.classes_ if hasattr(model, "classes_") else np.arange(scores.shape[1]))] = scores
    return out


def train_classifier(
    table: FeatureTable,
    y: np.ndarray,
    endpoint: Endpoint,
    method: str,
    *,
    training_cohort: dict[str, Any] | None = None,
    demo: bool = False,
    options: TrainingOptions | None = None,
) -> ClassifierBundle:
    """Fit method ``A`` or ``B`` on ``table`` and class indices ``y``; return an unsaved bundle.

    Raises
    ------
    NaNFeatureError
        When a training feature is NaN or infinite (named).
    ValueError
        For an unknown method, labels outside the endpoint's classes, or a single class.
    """
    opts = options or TrainingOptions()
    method = method.upper()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    y = np.asarray(y, dtype=np.int64)
    if y.min() < 0 or y.max() >= len(endpoint.classes):
        raise ValueError(f"labels must be class indices 0..{len(endpoint.classes) - 1} of endpoint {endpoint.name}")
    x = table.values
    bad = ~np.isfinite(x)
    if bad.any():
        raise NaNFeatureError("<training table>", [table.names[j] for j in np.flatnonzero(bad.any(axis=0))],
                              [int(i) for i in np.flatnonzero(bad.any(axis=1))])
    details: dict[str, Any]
    if method == "A":
        res_a = method_a.fit_method_a(x, y, reducers=opts.method_a_reducers, classifiers=opts.method_a_classifiers,
                                      random_state=opts.random_state)
        chosen = res_a.estimator
        cv = {"f1_macro": res_a.cv_f1_macro, "f1_macro_std": res_a.cv_f1_macro_std, "folds": method_a.CV_FOLDS}
        details = {"reducer": res_a.reducer, "classifier": res_a.classifier, "best_params": _plain(res_a.best_params),
                   "candidates_f1_macro": res_a.candidates}
    else:
        res_b = method_b.fit_method_b(x, y, table.names, classifiers=opts.zoo, repeats=opts.zoo_repeats,
                                      random_state=opts.random_state)
        chosen = res_b.estimator
        cv = {"auc": res_b.cv_auc, "auc_std": res_b.cv_auc_std, "folds": method_b.ZOO_FOLDS,
              "repeats": opts.zoo_repeats}
        details = {"classifier": res_b.classifier, "zoo_auc": res_b.zoo, "radscore_features": res_b.radscore_features}
    oof = out_of_fold_scores(chosen, x, y, opts.random_state)
    cv["out_of_fold_auc"] = auc_of(y, oof if oof.shape[1] > 2 else oof[:, 1])
    cv["note"] = "CV figures come from the folds used for model selection (optimistic)"
    model, how = calibrated(chosen, x, y, opts.random_state)
    cohort = dict(training_cohort or {})
    cohort.setdefault("cases", len(y))
    cohort["class_counts"] = {c: int((y == i).sum()) for i, c in enumerate(endpoint.classes)}
    meta = ClassifierMeta(endpoint=endpoint, method=method, features=tuple(table.names), training_cohort=cohort,
                          cv_metrics=cv, calibration=how, demo=demo, details=details)
    logger.info("trained method %s for %s: out-of-fold AUC %.3f", method, endpoint.name, cv["out_of_fold_auc"])
    return ClassifierBundle(meta=meta, model=model)


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in params.items()}
