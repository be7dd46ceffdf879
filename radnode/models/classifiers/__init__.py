"""Mutation and staging classifiers on radiomics / deep feature tables.

* :mod:`.endpoints`: the prediction targets as configuration (EGFR ... T-stage);
* :mod:`.table`: feature and label CSV tables (no pandas);
* :mod:`.method_a`: RA-Seg's deep features → LDA/PCA → QDA/DT/RF/SVC grid search;
* :mod:`.method_b`: Deep-RadScore's RadScores and classical zoo (the torch deep branch is
  in :mod:`.deep_branch`, imported only on demand);
* :mod:`.delong`: DeLong AUC variance, CI and paired test (Sun & Xu's fast algorithm);
* :mod:`.evaluation`: AUC with CI, threshold metrics, calibration, ROC PNG, SHAP (optional);
* :mod:`.training` and :mod:`.bundle`: train, calibrate, save and load classifier bundles;
* :mod:`.demo_cohort`: the synthetic DEMO cohort of the default demo classifiers.

Nothing here imports torch unless the deep branch is asked for.
"""

from radnode.models.classifiers.bundle import (
    ClassifierBundle,
    ClassifierBundleError,
    FeatureMismatchError,
    NaNFeatureError,
    load_classifier_bundle,
    save_classifier_bundle,
)
from radnode.models.classifiers.delong import auc_confidence_interval, delong_covariance, delong_test
from radnode.models.classifiers.endpoints import ENDPOINTS, Endpoint, EndpointError, get_endpoint
from radnode.models.classifiers.table import FeatureTable, read_feature_csv, read_label_csv
from radnode.models.classifiers.training import TrainingOptions, train_classifier

__all__ = [
    "ENDPOINTS",
    "ClassifierBundle",
    "ClassifierBundleError",
    "Endpoint",
    "EndpointError",
    "FeatureMismatchError",
    "FeatureTable",
    "NaNFeatureError",
    "TrainingOptions",
    "auc_confidence_interval",
    "delong_covariance",
    "delong_test",
    "get_endpoint",
    "load_classifier_bundle",
    "read_feature_csv",
    "read_label_csv",
    "save_classifier_bundle",
    "train_classifier",
]
