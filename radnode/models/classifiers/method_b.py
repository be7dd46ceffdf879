"""Method B (Deep-RadScore, ``shared/papers/001``): RadScores, the classical zoo, the deep branch.

RadScore
    A linear combination of selected features, ``RadScore = sum_i c_i f_i`` (paper, Step 3),
    one for the tumour and one for the peritumoral ring. Here the selection and the
    weights come from an L1-penalised logistic regression on z-scored features (the
    LASSO-logistic habit of radiomics): zero coefficients drop a feature, the others are
    its weight. :class:`RadScoreTransformer` fits both inside a pipeline, so in cross-
    validation the z-scoring and the selection see the training folds only.
Classical zoo
    SVM, KNN, random forest, naive Bayes, logistic regression, MLP and LDA on the
    RadScores (plus any deep-feature columns), each scored by the mean AUC of a 5-fold
    × 10-repeat stratified CV (paper, Appendix E6); the best is kept.
Deep branch
    :class:`DeepRadScoreNet`: MONAI's DenseNet121 (2-D) on a 160 × 160 crop at the
    largest tumour slice, two Xavier-initialised FC layers replacing the 1000-way head;
    the two RadScores are concatenated to the penultimate layer's output, so the last
    FC layer sees deep features and RadScores together (paper, Step 2 "fused by the
    penultimate FC layer"). :func:`train_deep_radscore` is a small training loop.

Columns are assigned to a region by name prefix: ``tumour_``/``tumor_`` (tumour),
``ring_``/``peritumoral_`` (ring), ``deep_`` (deep features, passed through).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sklearn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from radnode.models.classifiers.table import training_arrays

logger = logging.getLogger(__name__)

#: Name prefixes of tumour, ring and deep-feature columns.
TUMOUR_PREFIXES = ("tumour_", "tumor_")
RING_PREFIXES = ("ring_", "peritumoral_")
DEEP_PREFIXES = ("deep_",)
#: Inverse L1 strength of the RadScore logistic regressions.
RADSCORE_C = 0.5
#: CV of the zoo (paper: 5-fold, 10 repeats).
ZOO_FOLDS = 5
ZOO_REPEATS = 10
#: Classifiers of the zoo.
ZOO = ("svm", "knn", "rf", "nb", "lr", "mlp", "lda")
#: Side of the deep branch's input crop (paper: 160 × 160).
CROP_SIZE = 160


def l1_logistic(C: float = RADSCORE_C, random_state: int = 0) -> LogisticRegression:
    """L1-penalised logistic regression (saga), spelled for old and new scikit-learn.

    scikit-learn 1.8 deprecated ``penalty`` in favour of ``l1_ratio`` (1.0 = pure L1);
    older releases ignore ``l1_ratio`` unless ``penalty="elasticnet"``.
    """
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=5000, random_state=random_state)
    return LogisticRegression(penalty="l1", C=C, solver="saga", max_iter=5000, random_state=random_state)


def group_columns(names: Sequence[str]) -> dict[str, list[int]]:
    """Column indices of the tumour, ring and deep groups (by prefix, case-insensitive)."""
    groups: dict[str, list[int]] = {"tumour": [], "ring": [], "deep": []}
    for i, n in enumerate(names):
        low = n.lower()
        if low.startswith(TUMOUR_PREFIXES):
            groups["tumour"].append(i)
        elif low.startswith(RING_PREFIXES):
            groups["ring"].append(i)
        elif low.startswith(DEEP_PREFIXES):
            groups["deep"].append(i)
    return groups


class RadScoreTransformer(TransformerMixin, BaseEstimator):
    """Tumour and ring RadScores (L1-logistic linear combinations), plus deep columns.

    Parameters
    ----------
    tumour_columns, ring_columns, deep_columns
        Column indices of each group; a group with no column gives no output.
    C
        Inverse L1 strength (smaller: fewer features selected).
    random_state
        Seed of the solver.

    Output columns: one RadScore per group (the decision function; for ``K > 2`` classes
    one per class), then the deep columns unchanged.
    """

    def __init__(self, tumour_columns: Sequence[int] = (), ring_columns: Sequence[int] = (),
                 deep_columns: Sequence[int] = (), C: float = RADSCORE_C, random_state: int = 0) -> None:
        self.tumour_columns = tumour_columns
        self.ring_columns = ring_columns
        self.deep_columns = deep_columns
        self.C = C
        self.random_state = random_state

    def _groups(self) -> list[tuple[str, list[int]]]:
        return [(g, list(c)) for g, c in (("tumour", self.tumour_columns), ("ring", self.ring_columns)) if len(c)]

    def fit(self, x: np.ndarray, y: np.ndarray) -> RadScoreTransformer:
        x = np.asarray(x, dtype=np.float64)
        if not self._groups() and not len(self.deep_columns):
            raise ValueError("RadScore needs tumour_* or ring_* feature columns (or deep_* columns); none given")
        self.models_: dict[str, Pipeline] = {}
        for name, cols in self._groups():
            model = Pipeline([
                ("scale", StandardScaler()),
                ("l1", l1_logistic(self.C, self.random_state)),
            ])
            model.fit(x[:, cols], y)
            self.models_[name] = model
        self.n_features_in_ = x.shape[1]
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        parts = []
        for name, cols in self._groups():
            score = self.models_[name].decision_function(x[:, cols])
            parts.append(score.reshape(len(x), -1))
        if len(self.deep_columns):
            parts.append(x[:, list(self.deep_columns)])
        return np.concatenate(parts, axis=1)

    def selected_features(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """Non-zero RadScore coefficients (on z-scored features) per group, by feature name."""
        out: dict[str, dict[str, float]] = {}
        for name, cols in self._groups():
            coef = self.models_[name].named_steps["l1"].coef_
            weights = np.abs(coef).max(axis=0) * np.sign(coef[-1]) if coef.shape[0] > 1 else coef[0]
            out[name] = {names[c]: float(w) for c, w in zip(cols, weights) if w != 0}
        return out


def make_zoo_classifier(name: str, random_state: int = 0) -> Any:
    """One member of the zoo.

    The SVM has no ``predict_proba`` (its Platt scaling is deprecated in scikit-learn); AUCs
    use its decision function and a bundle calibrates it with ``CalibratedClassifierCV``.
    """
    makers = {
        "svm": lambda: SVC(kernel="rbf", random_state=random_state),
        "knn": lambda: KNeighborsClassifier(n_neighbors=7),
        "rf": lambda: RandomForestClassifier(n_estimators=200, random_state=random_state, n_jobs=1),
        "nb": lambda: GaussianNB(),
        "lr": lambda: LogisticRegression(max_iter=2000),
        "mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=random_state),
        "lda": lambda: LinearDiscriminantAnalysis(),
    }
    if name not in makers:
        raise ValueError(f"unknown zoo classifier {name!r}; allowed: {', '.join(ZOO)}")
    return makers[name]()


def build_pipeline(names: Sequence[str], classifier: str = "lr", random_state: int = 0,
                   C: float = RADSCORE_C) -> Pipeline:
    """``RadScores → z-score → zoo classifier`` for a table with these column names."""
    groups = group_columns(names)
    return Pipeline([
        ("radscore", RadScoreTransformer(groups["tumour"], groups["ring"], groups["deep"], C=C,
                                         random_state=random_state)),
        ("scale", StandardScaler()),
        ("clf", make_zoo_classifier(classifier, random_state)),
    ])


@dataclass(frozen=True)
class MethodBResult:
    """Outcome of :func:`fit_method_b`.

    Attributes
    ----------
    estimator
        The best pipeline refitted on all training cases.
    classifier
        Name of the chosen zoo member.
    cv_auc, cv_auc_std
        Its mean and standard deviation of AUC over the repeated folds.
    zoo
        Mean CV AUC of every zoo member.
    radscore_features
        The selected features and their weights per region in the refitted model.
    """

    estimator: Pipeline
    classifier: str
    cv_auc: float
    cv_auc_std: float
    zoo: dict[str, float]
    radscore_features: dict[str, dict[str, float]] = field(default_factory=dict)


def fit_method_b(
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    *,
    classifiers: Sequence[str] = ZOO,
    folds: int = ZOO_FOLDS,
    repeats: int = ZOO_REPEATS,
    random_state: int = 0,
    n_jobs: int | None = 1,
) -> MethodBResult:
    """Score the zoo by repeated stratified CV AUC and refit the best on all cases.

    The AUC is the binary ROC AUC, or the macro one-vs-rest AUC for multi-class endpoints.

    Raises
    ------
    ValueError
        On NaN features, fewer than two classes, or no tumour/ring/deep columns.
    """
    x, y, n_classes, k = training_arrays(x, y, folds, "B")
    scoring = "roc_auc" if n_classes == 2 else "roc_auc_ovr"
    cv = RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=random_state)
    zoo: dict[str, tuple[float, float]] = {}
    for name in classifiers:
        pipe = build_pipeline(names, name, random_state)
        scores = cross_val_score(pipe, x, y, scoring=scoring, cv=cv, n_jobs=n_jobs, error_score=np.nan)
        zoo[name] = (float(np.nanmean(scores)), float(np.nanstd(scores)))
        logger.debug("method B zoo %s: CV AUC %.3f", name, zoo[name][0])
    best = max(zoo, key=lambda n: (np.nan_to_num(zoo[n][0], nan=-1.0), -list(classifiers).index(n)))
    final = build_pipeline(names, best, random_state)
    final.fit(x, y)
    result = MethodBResult(
        estimator=final,
        classifier=best,
        cv_auc=zoo[best][0],
        cv_auc_std=zoo[best][1],
        zoo={n: v[0] for n, v in zoo.items()},
        radscore_features=final.named_steps["radscore"].selected_features(list(names)),
    )
    logger.info("method B: best %s, CV AUC %.3f", best, result.cv_auc)
    return result


# --- deep branch ------------------------------------------------------------------------------------


def build_deep_radscore_net(n_classes: int = 2, n_radscores: int = 2, hidden: int = 128,
                            dropout: float = 0.2) -> Any:
    """A :class:`~radnode.models.classifiers.deep_branch.DeepRadScoreNet`.

    The torch module lives in :mod:`radnode.models.classifiers.deep_branch`, imported
    only here, so that loading a tabular bundle or the CLI does not import torch.
    """
    from radnode.models.classifiers.deep_branch import DeepRadScoreNet

    return DeepRadScoreNet(n_classes, n_radscores, hidden, dropout)
