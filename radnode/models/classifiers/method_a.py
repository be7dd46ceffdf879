"""Method A (RA-Seg, ``shared/papers/000``): deep features → LDA or PCA → QDA / DT / RF / SVC.

The RA-Seg study feeds the segmentation network's deep features to a reducer and a
classifier: LDA with the SVD solver or PCA keeping 95 % of the variance; then quadratic
discriminant analysis (defaults), a decision tree (Gini impurity), a random forest (200
trees) or an SVC with a sigmoid kernel, tuned by scikit-learn's ``GridSearchCV`` on the
macro-averaged F1 score (robust to label imbalance) with stratified 5-fold CV.

Here every candidate is one :class:`~sklearn.pipeline.Pipeline` ``scale → reduce →
classify``: z-scoring sits *inside* the pipeline so that it is fitted on the training
folds only, never on the fold it is scored on. The grid covers both reducers and all four
classifiers, so the search picks the pair as well as their hyper-parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import (
    LinearDiscriminantAnalysis,
    QuadraticDiscriminantAnalysis,
)
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from radnode.models.classifiers.table import training_arrays

logger = logging.getLogger(__name__)

#: Share of the variance PCA keeps (paper: 95 %).
PCA_VARIANCE = 0.95
#: Trees of the random forest (paper: 200).
RF_TREES = 200
#: Folds of the stratified CV of the grid search (paper: 5).
CV_FOLDS = 5
#: Scoring of the grid search (paper: macro F1).
SCORING = "f1_macro"

#: Reducer names accepted in ``reducers``.
REDUCERS = ("lda", "pca")
#: Classifier names accepted in ``classifiers``.
CLASSIFIERS = ("qda", "dt", "rf", "svc")


def make_reducer(name: str) -> Any:
    """``lda`` (SVD solver) or ``pca`` (95 % variance)."""
    if name == "lda":
        return LinearDiscriminantAnalysis(solver="svd")
    if name == "pca":
        return PCA(n_components=PCA_VARIANCE, svd_solver="full")
    raise ValueError(f"unknown reducer {name!r}; allowed: {', '.join(REDUCERS)}")


def _classifier_grid(name: str, random_state: int) -> tuple[Any, dict[str, list[Any]]]:
    if name == "qda":
        # Default hyper-parameters as in the paper; a little shrinkage keeps QDA defined
        # when a PCA space has more dimensions than a class has training cases.
        return QuadraticDiscriminantAnalysis(), {"clf__reg_param": [0.0, 0.1]}
    if name == "dt":
        return DecisionTreeClassifier(criterion="gini", random_state=random_state), {"clf__max_depth": [None, 3, 5]}
    if name == "rf":
        return (RandomForestClassifier(n_estimators=RF_TREES, random_state=random_state, n_jobs=1),
                {"clf__max_depth": [None, 5]})
    if name == "svc":
        return SVC(kernel="sigmoid", random_state=random_state), {"clf__C": [0.1, 1.0, 10.0]}
    raise ValueError(f"unknown classifier {name!r}; allowed: {', '.join(CLASSIFIERS)}")


def build_pipeline(reducer: str = "lda", classifier: str = "rf", random_state: int = 0) -> Pipeline:
    """One ``StandardScaler → reducer → classifier`` pipeline (unfitted)."""
    clf, _ = _classifier_grid(classifier, random_state)
    return Pipeline([("scale", StandardScaler()), ("reduce", make_reducer(reducer)), ("clf", clf)])


@dataclass(frozen=True)
class MethodAResult:
    """Outcome of :func:`fit_method_a`.

    Attributes
    ----------
    estimator
        The best pipeline refitted on all training cases.
    reducer, classifier
        Names of the chosen pair.
    best_params
        Hyper-parameters of the best candidate.
    cv_f1_macro, cv_f1_macro_std
        Its mean and standard deviation of macro F1 over the folds.
    candidates
        Mean macro F1 of every (reducer, classifier) pair at its best setting.
    """

    estimator: Pipeline
    reducer: str
    classifier: str
    best_params: dict[str, Any]
    cv_f1_macro: float
    cv_f1_macro_std: float
    candidates: dict[str, float]


def fit_method_a(
    x: np.ndarray,
    y: np.ndarray,
    *,
    reducers: tuple[str, ...] = REDUCERS,
    classifiers: tuple[str, ...] = CLASSIFIERS,
    folds: int = CV_FOLDS,
    random_state: int = 0,
    n_jobs: int | None = 1,
) -> MethodAResult:
    """Grid-search reducer × classifier × hyper-parameters on macro F1 (stratified k-fold).

    Parameters
    ----------
    x, y
        Training features ``(n, p)`` (no NaN) and class indices ``(n,)``.
    reducers, classifiers
        Subsets of :data:`REDUCERS` and :data:`CLASSIFIERS` to search.
    folds
        CV folds; lowered to the smallest class size when a class has fewer cases.
    random_state
        Seed of the fold split and of the tree models.
    n_jobs
        Parallel jobs of the search (``1`` by default: radnode shares its cores).

    Raises
    ------
    ValueError
        On NaN features, a single class, or unknown names.
    """
    x, y, n_classes, k = training_arrays(x, y, folds, "A")
    grid: list[dict[str, list[Any]]] = []
    for r in reducers:
        for c in classifiers:
            clf, params = _classifier_grid(c, random_state)
            grid.append({"reduce": [make_reducer(r)], "clf": [clf], **params})
    base = build_pipeline(reducers[0], classifiers[0], random_state)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=random_state)
    search = GridSearchCV(base, grid, scoring=SCORING, cv=cv, n_jobs=n_jobs, refit=True, error_score=0.0)
    search.fit(x, y)
    best = search.best_estimator_
    res = search.cv_results_
    candidates: dict[str, float] = {}
    for i, params in enumerate(res["params"]):
        key = f"{_name_of(params['reduce'])}+{_name_of(params['clf'])}"
        candidates[key] = max(candidates.get(key, -np.inf), float(res["mean_test_score"][i]))
    i_best = int(search.best_index_)
    result = MethodAResult(
        estimator=best,
        reducer=_name_of(best.named_steps["reduce"]),
        classifier=_name_of(best.named_steps["clf"]),
        best_params={k_: v for k_, v in search.best_params_.items() if k_.startswith("clf__")},
        cv_f1_macro=float(res["mean_test_score"][i_best]),
        cv_f1_macro_std=float(res["std_test_score"][i_best]),
        candidates=candidates,
    )
    logger.info("method A: best %s+%s, CV macro F1 %.3f", result.reducer, result.classifier, result.cv_f1_macro)
    return result


def _name_of(step: Any) -> str:
    names = {
        LinearDiscriminantAnalysis: "lda", PCA: "pca", QuadraticDiscriminantAnalysis: "qda",
        DecisionTreeClassifier: "dt", RandomForestClassifier: "rf", SVC: "svc",
    }
    return names.get(type(step), type(step).__name__)
