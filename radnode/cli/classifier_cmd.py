"""``radnode train classifier`` and ``radnode evaluate classifier``.

The ``train`` and ``evaluate`` command groups are created elsewhere; this module only adds
the ``classifier`` sub-command to each through :func:`register_train` and
:func:`register_evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from radnode.cli.context import EXIT_FAILED, EXIT_USAGE, fail

if TYPE_CHECKING:  # the models are imported inside the commands, so --help stays fast
    import numpy as np

    from radnode.models.classifiers.endpoints import Endpoint
    from radnode.models.classifiers.table import FeatureTable


#: ``--features``: the feature table every classifier and selection command reads.
FeaturesCsv = Annotated[Path, typer.Option("--features", help="Feature CSV (first column case_id).",
                                           exists=True, dir_okay=False)]
#: ``--labels``: the label table joined to it by case_id.
LabelsCsv = Annotated[Path, typer.Option("--labels", help="Label CSV (case_id and an endpoint column).",
                                         exists=True, dir_okay=False)]


def load_labelled_features(features: Path, labels: Path, endpoint_name: str) -> tuple[Endpoint, FeatureTable, np.ndarray]:
    """Endpoint, labelled feature rows and class indices, or exit 2 with the reason."""
    from radnode.models.classifiers.endpoints import EndpointError, get_endpoint
    from radnode.models.classifiers.table import FeatureTableError, join_labels, read_feature_csv, read_label_csv

    try:
        endpoint = get_endpoint(endpoint_name)
        table = read_feature_csv(features)
        texts = read_label_csv(labels, endpoint.name)
        sub, label_texts = join_labels(table, texts)
        y = endpoint.encode(label_texts)
    except (EndpointError, FeatureTableError, OSError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    return endpoint, sub, y


def register_train(train_app: typer.Typer) -> None:
    """Add ``classifier`` to the ``train`` group."""

    @train_app.command("classifier")
    def train_classifier_cmd(
        features: FeaturesCsv,
        labels: LabelsCsv,
        endpoint: Annotated[str, typer.Option("--endpoint", help="EGFR, KRAS, ALK, TP53, PIK3CA, ROS1, PD-L1, "
                                                                 "LVI, PI or T-stage.")],
        method: Annotated[str, typer.Option("--method", help="A (RA-Seg: LDA/PCA + QDA/DT/RF/SVC) or "
                                                             "B (Deep-RadScore: RadScores + classical zoo).")],
        out: Annotated[Path, typer.Option("--out", help="Bundle folder to create.")],
        cohort: Annotated[str, typer.Option("--cohort", help="Free-text description of the training cohort.")] = "",
        demo: Annotated[bool, typer.Option("--demo", help="Mark the bundle as a demo classifier.")] = False,
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Repeats of method B's 5-fold CV.")] = 10,
        seed: Annotated[int, typer.Option("--seed", help="Seed of splits and models.")] = 0,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a bundle already in --out.")] = False,
    ) -> None:
        """Train a classifier bundle for one endpoint from a feature table and labels."""
        from radnode.models.classifiers.bundle import ClassifierBundleError, save_classifier_bundle
        from radnode.models.classifiers.training import TrainingOptions, train_classifier

        if method.upper() not in ("A", "B"):
            fail(f"--method must be A or B, got {method!r}", code=EXIT_USAGE)
        ep, table, y = load_labelled_features(features, labels, endpoint)
        cohort_doc = {"description": cohort or f"from {features.name}", "features_file": features.name,
                      "labels_file": labels.name}
        try:
            bundle = train_classifier(table, y, ep, method, training_cohort=cohort_doc, demo=demo,
                                      options=TrainingOptions(random_state=seed, zoo_repeats=repeats))
            path = save_classifier_bundle(bundle, out, overwrite=overwrite)
        except (ClassifierBundleError, ValueError, FileExistsError) as exc:
            fail(str(exc), code=EXIT_FAILED)
            raise
        typer.echo(json.dumps({"bundle": str(path), "endpoint": ep.name, "method": bundle.meta.method,
                               "cv_metrics": bundle.meta.cv_metrics, "demo": demo}, default=str))


def register_evaluate(evaluate_app: typer.Typer) -> None:
    """Add ``classifier`` to the ``evaluate`` group."""

    @evaluate_app.command("classifier")
    def evaluate_classifier_cmd(
        bundle: Annotated[Path, typer.Option("--bundle", help="Classifier bundle folder.", exists=True,
                                             file_okay=False)],
        features: FeaturesCsv,
        labels: LabelsCsv,
        out: Annotated[Path, typer.Option("--out", help="Folder for evaluation.json and roc.png.")],
        compare: Annotated[Path | None, typer.Option("--compare", help="Second bundle: paired DeLong test.",
                                                     exists=True, file_okay=False)] = None,
        threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0,
                                                 help="Probability threshold (binary).")] = 0.5,
        allow_extra: Annotated[bool, typer.Option("--allow-extra-features",
                                                  help="Ignore feature columns the bundle does not use.")] = False,
    ) -> None:
        """Evaluate a bundle: AUC (DeLong 95 % CI), sensitivity/specificity/F1, calibration, ROC PNG."""
        from radnode.models.classifiers.bundle import ClassifierBundleError, load_classifier_bundle
        from radnode.models.classifiers.evaluation import evaluate_bundle

        try:
            model = load_classifier_bundle(bundle)
            other = load_classifier_bundle(compare) if compare else None
        except ClassifierBundleError as exc:
            fail(str(exc), code=EXIT_USAGE)
            raise
        _, table, y = load_labelled_features(features, labels, model.endpoint.name)
        try:
            report = evaluate_bundle(model, table, y, out, compare=other, threshold=threshold,
                                     allow_extra=allow_extra)
        except (ClassifierBundleError, ValueError) as exc:
            fail(str(exc), code=EXIT_FAILED)
            raise
        summary = {"out": str(out), "demo": report["demo"], "cases": report["cases"]}
        metrics = report["metrics"]
        summary["auc"] = metrics["auc"] if "auc" in metrics else metrics.get("auc_macro_ovr")
        if "comparison" in report:
            summary["delong_p"] = report["comparison"]["delong"]["p_value"]
        typer.echo(json.dumps(summary, default=str))


def register(app: typer.Typer) -> None:
    """Add ``train classifier`` and ``evaluate classifier`` to the existing command groups."""
    from radnode.cli.evaluate_cmd import evaluate_app
    from radnode.cli.train_cmd import train_app

    register_train(train_app)
    register_evaluate(evaluate_app)
