"""Classifier bundles: save/load, feature checks, NaN, calibration, and the CLI sub-commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from sklearn.datasets import make_classification
from typer.testing import CliRunner

from radnode.cli.classifier_cmd import register_evaluate, register_train
from radnode.models.classifiers.bundle import (
    META_FILE,
    MODEL_FILE,
    ClassifierBundleError,
    FeatureMismatchError,
    NaNFeatureError,
    load_classifier_bundle,
    save_classifier_bundle,
)
from radnode.models.classifiers.endpoints import get_endpoint
from radnode.models.classifiers.table import FeatureTable, write_feature_csv, write_label_csv
from radnode.models.classifiers.training import TrainingOptions, train_classifier

FAST_B = TrainingOptions(zoo=("lr", "nb", "knn"), zoo_repeats=1)


def _table(n: int = 80, seed: int = 0, classes: int = 2) -> tuple[FeatureTable, np.ndarray]:
    x, y = make_classification(n_samples=n, n_features=8, n_informative=3, n_redundant=0, n_classes=classes,
                               n_clusters_per_class=1, class_sep=1.5, random_state=seed)
    names = tuple([f"tumour_f{i}" for i in range(5)] + [f"ring_f{i}" for i in range(3)])
    return FeatureTable(tuple(f"case{i:03d}" for i in range(n)), names, x * 10 + 50), y


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureTable, np.ndarray]:
    table, y = _table()
    bundle = train_classifier(table.rows(np.arange(60)), y[:60], get_endpoint("EGFR"), "B",
                              training_cohort={"description": "synthetic test"}, options=FAST_B)
    path = save_classifier_bundle(bundle, tmp_path_factory.mktemp("bundle") / "egfr-b")
    return path, table.rows(np.arange(60, 80)), y[60:]


def test_round_trip_and_metadata(saved) -> None:
    path, test, _ = saved
    meta = json.loads((path / META_FILE).read_text())
    assert meta["endpoint"]["name"] == "EGFR" and meta["method"] == "B" and meta["demo"] is False
    assert meta["features"] == list(test.names)
    assert {"python", "numpy", "scikit-learn", "joblib"} <= set(meta["package_versions"])
    assert 0.5 < meta["cv_metrics"]["auc"] <= 1.0
    _, y_all = _table()
    assert meta["training_cohort"]["class_counts"] == {"wild-type": int((y_all[:60] == 0).sum()),
                                                       "mutant": int((y_all[:60] == 1).sum())}
    assert meta["training_cohort"]["description"] == "synthetic test"
    bundle = load_classifier_bundle(path)
    proba = bundle.predict_proba(test)
    assert proba.shape == (20, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert ((proba >= 0) & (proba <= 1)).all()
    one = bundle.predict_one(dict(zip(test.names, test.values[0])))
    assert one["mutant"] == pytest.approx(proba[0, 1])


def test_feature_order_does_not_matter_but_names_do(saved) -> None:
    path, test, _ = saved
    bundle = load_classifier_bundle(path)
    reordered = test.select(tuple(reversed(test.names)))
    np.testing.assert_allclose(bundle.predict_proba(reordered), bundle.predict_proba(test))
    missing = test.select(test.names[1:])
    with pytest.raises(FeatureMismatchError, match=r"1 missing: \['tumour_f0'\]") as info:
        bundle.predict_proba(missing)
    assert str(path) in str(info.value)
    extra = FeatureTable(test.case_ids, (*test.names, "ring_new"), np.column_stack([test.values, test.values[:, 0]]))
    with pytest.raises(FeatureMismatchError, match=r"1 extra: \['ring_new'\]"):
        bundle.predict_proba(extra)
    np.testing.assert_allclose(bundle.predict_proba(extra, allow_extra=True), bundle.predict_proba(test))


def test_nan_features_give_a_clear_error(saved) -> None:
    path, test, _ = saved
    bundle = load_classifier_bundle(path)
    values = test.values.copy()
    values[4, 6] = np.nan
    with pytest.raises(NaNFeatureError, match=r"features \['ring_f1'\] in input row\(s\) 4") as info:
        bundle.predict_proba(FeatureTable(test.case_ids, test.names, values))
    assert "does not impute" in str(info.value)
    assert "case004" not in str(info.value)  # identifiers may be patient IDs


def test_nan_in_training_table_is_refused() -> None:
    table, y = _table(n=40)
    values = table.values.copy()
    values[7, 0] = np.inf
    with pytest.raises(NaNFeatureError, match="tumour_f0"):
        train_classifier(FeatureTable(table.case_ids, table.names, values), y, get_endpoint("KRAS"), "A")


def test_damaged_or_incomplete_bundles_are_refused(saved, tmp_path: Path) -> None:
    path, _, _ = saved
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / META_FILE).write_text((path / META_FILE).read_text())
    data = bytearray((path / MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ClassifierBundleError, match="SHA-256"):
        load_classifier_bundle(copy)
    with pytest.raises(ClassifierBundleError, match="classifier.json is missing"):
        load_classifier_bundle(tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    meta["method"] = "C"
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ClassifierBundleError, match="method 'C'"):
        load_classifier_bundle(copy)


def test_uncalibrated_models_are_wrapped(tmp_path: Path) -> None:
    table, y = _table(n=60, seed=3)
    bundle = train_classifier(table, y, get_endpoint("ALK"), "A",
                              options=TrainingOptions(method_a_reducers=("lda",), method_a_classifiers=("svc",)))
    assert bundle.meta.details["classifier"] == "svc"
    assert "CalibratedClassifierCV" in bundle.meta.calibration
    assert type(bundle.model).__name__ == "CalibratedClassifierCV"
    native = train_classifier(table, y, get_endpoint("ALK"), "B", options=TrainingOptions(zoo=("lr",), zoo_repeats=1))
    assert native.meta.calibration.startswith("native")


def test_multiclass_bundle(tmp_path: Path) -> None:
    table, y = _table(n=90, seed=5, classes=3)
    bundle = train_classifier(table, y, get_endpoint("T-stage"), "A",
                              options=TrainingOptions(method_a_reducers=("lda",), method_a_classifiers=("qda",)))
    path = save_classifier_bundle(bundle, tmp_path / "tstage")
    proba = load_classifier_bundle(path).predict_proba(table)
    assert proba.shape == (90, 3)
    assert json.loads((path / META_FILE).read_text())["endpoint"]["classes"] == ["T1", "T2", "T3", "T4"]


# --- CLI ----------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    train_app, evaluate_app = typer.Typer(), typer.Typer()
    register_train(train_app)
    register_evaluate(evaluate_app)
    app.add_typer(train_app, name="train")
    app.add_typer(evaluate_app, name="evaluate")
    return app


def test_cli_train_and_evaluate_with_comparison(tmp_path: Path) -> None:
    table, y = _table(n=90, seed=7)
    egfr = get_endpoint("EGFR")
    train, test = table.rows(np.arange(60)), table.rows(np.arange(60, 90))
    write_feature_csv(train, tmp_path / "train.csv")
    write_label_csv(train.case_ids, egfr.decode(y[:60]), tmp_path / "train_labels.csv", column="EGFR")
    write_feature_csv(test, tmp_path / "test.csv")
    write_label_csv(test.case_ids, y[60:], tmp_path / "test_labels.csv", column="EGFR")
    app, runner = _app(), CliRunner()
    common = ["--features", str(tmp_path / "train.csv"), "--labels", str(tmp_path / "train_labels.csv"),
              "--endpoint", "EGFR"]
    r = runner.invoke(app, ["train", "classifier", *common, "--method", "A", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "classifier", *common, "--method", "B", "--repeats", "1",
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "classifier", "--bundle", str(tmp_path / "a"), "--features",
                            str(tmp_path / "test.csv"), "--labels", str(tmp_path / "test_labels.csv"),
                            "--compare", str(tmp_path / "b"), "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["cases"] == 30 and report["endpoint"] == "EGFR"
    auc = report["metrics"]["auc"]
    assert auc["ci_low"] <= auc["auc"] <= auc["ci_high"] and auc["auc"] > 0.7
    assert 0.0 <= report["comparison"]["delong"]["p_value"] <= 1.0
    assert report["shap"]["computed"] in (True, False)
    with Image.open(tmp_path / "eval" / "roc.png") as img:
        assert img.format == "PNG"


def test_cli_reports_bad_input(tmp_path: Path) -> None:
    table, y = _table(n=40, seed=8)
    write_feature_csv(table, tmp_path / "f.csv")
    write_label_csv(table.case_ids, y, tmp_path / "l.csv")
    app, runner = _app(), CliRunner()
    r = runner.invoke(app, ["train", "classifier", "--features", str(tmp_path / "f.csv"), "--labels",
                            str(tmp_path / "l.csv"), "--endpoint", "BRAF", "--method", "A", "--out",
                            str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown endpoint 'BRAF'" in r.output
    r = runner.invoke(app, ["train", "classifier", "--features", str(tmp_path / "f.csv"), "--labels",
                            str(tmp_path / "l.csv"), "--endpoint", "EGFR", "--method", "A", "--out",
                            str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    fewer = table.select(table.names[:-1])
    write_feature_csv(fewer, tmp_path / "fewer.csv")
    r = runner.invoke(app, ["evaluate", "classifier", "--bundle", str(tmp_path / "a"), "--features",
                            str(tmp_path / "fewer.csv"), "--labels", str(tmp_path / "l.csv"), "--out",
                            str(tmp_path / "e")])
    assert r.exit_code == 1 and "ring_f2" in r.output and "missing" in r.output


class _Trap:
    """Unpickling this touches a file: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _legacy_bundle(saved_path: Path, folder: Path, payload: object, sha256: str | None) -> Path:
    """A bundle in the pre-skops layout (model.joblib holding ``payload``); ``sha256`` is
    written as the JSON's model_sha256 (``None``: the field is left out)."""
    import joblib

    folder.mkdir()
    joblib.dump(payload, folder / "model.joblib")
    meta = json.loads((saved_path / META_FILE).read_text())
    meta["model_file"] = "model.joblib"
    meta.pop("model_sha256")
    if sha256 is not None:
        meta["model_sha256"] = sha256
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_a_bundle_without_a_checksum_is_never_unpickled(saved, tmp_path: Path) -> None:
    path, _, _ = saved
    marker = tmp_path / "code-ran"
    for name, digest in (("none", None), ("empty", "")):
        folder = _legacy_bundle(path, tmp_path / name, _Trap(marker), digest)
        with pytest.raises(ClassifierBundleError, match="model_sha256' is missing.*never loaded"):
            load_classifier_bundle(folder)
    assert not marker.exists()


def test_a_legacy_pickled_bundle_loads_only_with_its_checksum(saved, tmp_path: Path) -> None:
    import hashlib

    path, test, _ = saved
    model = load_classifier_bundle(path).model
    folder = _legacy_bundle(path, tmp_path / "legacy", model, None)
    meta = json.loads((folder / META_FILE).read_text())
    meta["model_sha256"] = hashlib.sha256((folder / "model.joblib").read_bytes()).hexdigest()
    (folder / META_FILE).write_text(json.dumps(meta))
    assert np.allclose(load_classifier_bundle(folder).predict_proba(test), load_classifier_bundle(path).predict_proba(test))


def test_models_are_stored_as_skops_and_untrusted_types_are_refused(saved, tmp_path: Path) -> None:
    """A skops file is rebuilt from an allow-list: a function like os.system is refused
    (named) even when the JSON's hash matches, and nothing from the file runs."""
    import hashlib
    import os

    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    path, test, _ = saved
    meta = json.loads((path / META_FILE).read_text())
    assert meta["model_file"] == MODEL_FILE == "model.skops" and "skops" in meta["package_versions"]
    evil = tmp_path / "evil"
    evil.mkdir()
    sio.dump(Pipeline([("f", FunctionTransformer(os.system))]), evil / MODEL_FILE)
    meta["model_sha256"] = hashlib.sha256((evil / MODEL_FILE).read_bytes()).hexdigest()
    (evil / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ClassifierBundleError, match=r"types radnode does not trust: \['posix.system'\]"):
        load_classifier_bundle(evil)


def test_a_pin_refuses_a_model_replaced_together_with_its_hash(saved, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from radnode.config import Settings
    from radnode.models.mutation import predict_endpoints
    from radnode.models.verify import ModelBundleError, verify_configured_bundles

    path, test, _ = saved
    pin = hashlib.sha256((path / MODEL_FILE).read_bytes()).hexdigest()
    site = tmp_path / "site-egfr"
    shutil.copytree(path, site)
    assert load_classifier_bundle(site, pin).endpoint.name == "EGFR"
    # Replace model and JSON with another self-consistent bundle (another training run).
    table, y = _table(seed=5)
    other = train_classifier(table, y, get_endpoint("EGFR"), "B", options=FAST_B)
    shutil.rmtree(site)
    save_classifier_bundle(other, site)
    load_classifier_bundle(site)  # consistent on its own...
    with pytest.raises(ClassifierBundleError, match="not the pinned.*models.classifier_sha256"):
        load_classifier_bundle(site, pin)
    features = dict(zip(test.names, test.values[0]))
    refused = predict_endpoints({"EGFR": site}, features, {"EGFR": pin})
    assert refused.predictions == [] and "not the pinned" in refused.errors["EGFR"]
    settings = Settings(models={"segmentation_bundle": "none", "classifier_bundles": {"EGFR": str(site)},
                                "classifier_sha256": {"EGFR": pin}})
    with pytest.raises(ModelBundleError, match=f"classifier bundle {site} for EGFR .*not the pinned"):
        verify_configured_bundles(settings.models)
    verify_configured_bundles(Settings(models={"segmentation_bundle": "none", "classifier_bundles": {"EGFR": str(site)}}).models)
