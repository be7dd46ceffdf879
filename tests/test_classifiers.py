"""Endpoints, method A and B pipelines, the Deep-RadScore module and evaluation outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import make_classification
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.preprocessing import StandardScaler

from radnode.models.classifiers import method_a, method_b
from radnode.models.classifiers.deep_branch import (
    DeepRadScoreNet,
    predict_deep_radscore,
    train_deep_radscore,
)
from radnode.models.classifiers.endpoints import (
    ENDPOINTS,
    EndpointError,
    endpoint_from_mapping,
    get_endpoint,
)
from radnode.models.classifiers.evaluation import (
    ROC_COLOURS,
    binary_metrics,
    multiclass_metrics,
    shap_available,
    shap_summary,
    write_roc_png,
)


def _data(n: int = 80, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, y = make_classification(n_samples=n, n_features=10, n_informative=3, n_redundant=0, n_classes=classes,
                               n_clusters_per_class=1, class_sep=1.5, random_state=seed)
    names = [f"tumour_f{i}" for i in range(6)] + [f"ring_f{i}" for i in range(4)]
    return x * 50 + 100, y, names  # unscaled, like radiomics features


# --- endpoints ---------------------------------------------------------------------------------------


def test_builtin_endpoints_cover_the_issue_list() -> None:
    for name in ("EGFR", "KRAS", "ALK", "TP53", "PIK3CA", "ROS1", "PD-L1", "LVI", "PI", "T-stage"):
        assert get_endpoint(name).name in ENDPOINTS
    assert get_endpoint("pdl1").name == "PD-L1"
    assert get_endpoint("t_stage").name == "T-stage"
    with pytest.raises(EndpointError, match="allowed: EGFR"):
        get_endpoint("BRAF")


def test_binary_label_encoding() -> None:
    egfr = get_endpoint("EGFR")
    assert egfr.binary and egfr.positive_class == "mutant"
    assert egfr.encode(["0", "1", "Mutant", " wild-type ", "WT", "mut", 1.0]).tolist() == [0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(EndpointError, match="EGFR: label 'maybe'"):
        egfr.encode(["maybe"])


def test_t_stage_is_multiclass_with_subcategories() -> None:
    t = get_endpoint("T-stage")
    assert not t.binary and len(t.classes) == 4
    assert t.encode(["T1a", "t2b", "3", "T4", "T1mi"]).tolist() == [0, 1, 2, 3, 0]
    assert t.decode([3, 0]) == ["T4", "T1"]


def test_endpoint_from_configuration() -> None:
    e = endpoint_from_mapping({"name": "STK11", "classes": ["wild-type", "mutant"]})
    assert e.encode(["mutant", "0"]).tolist() == [1, 0]
    g = endpoint_from_mapping({"name": "grade", "classes": ["G1", "G2", "G3"], "spellings": [["1"], ["2"], ["3"]]})
    assert g.encode(["2", "g3"]).tolist() == [1, 2]
    with pytest.raises(EndpointError, match="needs 'classes'"):
        endpoint_from_mapping({"name": "x"})
    with pytest.raises(EndpointError, match="names both"):
        endpoint_from_mapping({"name": "x", "classes": ["a", "b"], "spellings": [["1"], ["1"]]})


# --- method A ----------------------------------------------------------------------------------------


def test_method_a_fits_and_predicts() -> None:
    x, y, _ = _data()
    res = method_a.fit_method_a(x[:60], y[:60], classifiers=("qda", "dt", "svc"))
    assert res.reducer in method_a.REDUCERS and res.classifier in ("qda", "dt", "svc")
    assert set(res.candidates) == {f"{r}+{c}" for r in ("lda", "pca") for c in ("qda", "dt", "svc")}
    steps = [name for name, _ in res.estimator.steps]
    assert steps == ["scale", "reduce", "clf"]  # z-scoring inside the pipeline: fitted per fold
    assert isinstance(res.estimator.named_steps["scale"], StandardScaler)
    pred = res.estimator.predict(x[60:])
    assert (pred == y[60:]).mean() > 0.7


def test_method_a_paper_settings() -> None:
    assert method_a.make_reducer("lda").solver == "svd"
    assert method_a.make_reducer("pca").n_components == 0.95
    assert method_a.build_pipeline("pca", "rf").named_steps["clf"].n_estimators == 200
    assert method_a.build_pipeline("lda", "svc").named_steps["clf"].kernel == "sigmoid"
    assert method_a.build_pipeline("lda", "dt").named_steps["clf"].criterion == "gini"


def test_method_a_multiclass_t_stage() -> None:
    x, y, _ = _data(n=90, classes=3, seed=2)
    res = method_a.fit_method_a(x, y, reducers=("lda",), classifiers=("qda",))
    proba = res.estimator.predict_proba(x)
    assert proba.shape == (90, 3)
    assert res.estimator.named_steps["reduce"].transform(StandardScaler().fit_transform(x)).shape[1] == 2


def test_method_a_rejects_nan_and_single_class() -> None:
    x, y, _ = _data(n=30)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        method_a.fit_method_a(bad, y)
    with pytest.raises(ValueError, match="two classes"):
        method_a.fit_method_a(x, np.zeros(30, dtype=int))


# --- method B ----------------------------------------------------------------------------------------


def test_radscore_selects_informative_features_per_region() -> None:
    rng = np.random.default_rng(3)
    n = 120
    y = (rng.random(n) < 0.5).astype(int)
    x = rng.standard_normal((n, 8)) * 30
    x[:, 1] += 40 * y  # informative tumour feature
    x[:, 6] -= 40 * y  # informative ring feature
    names = ["tumour_a", "tumour_b", "tumour_c", "tumour_d", "ring_a", "ring_b", "ring_c", "other"]
    groups = method_b.group_columns(names)
    assert groups == {"tumour": [0, 1, 2, 3], "ring": [4, 5, 6], "deep": []}
    rs = method_b.RadScoreTransformer(groups["tumour"], groups["ring"], C=0.1).fit(x, y)
    scores = rs.transform(x)
    assert scores.shape == (n, 2)
    sel = rs.selected_features(names)
    assert "tumour_b" in sel["tumour"] and sel["tumour"]["tumour_b"] > 0
    assert "ring_c" in sel["ring"] and sel["ring"]["ring_c"] < 0
    # Each RadScore is the linear combination of its region's z-scored features.
    assert roc_auc_score(y, scores[:, 0]) > 0.8 and roc_auc_score(y, scores[:, 1]) > 0.8


def test_method_b_zoo_fits_and_predicts() -> None:
    x, y, names = _data()
    res = method_b.fit_method_b(x[:60], y[:60], names, classifiers=("lr", "nb", "knn", "lda"), repeats=1)
    assert set(res.zoo) == {"lr", "nb", "knn", "lda"}
    assert res.classifier == max(res.zoo, key=res.zoo.get)
    assert 0.5 < res.cv_auc <= 1.0
    proba = res.estimator.predict_proba(x[60:])
    assert roc_auc_score(y[60:], proba[:, 1]) > 0.7


def test_method_b_full_zoo_names() -> None:
    assert method_b.ZOO == ("svm", "knn", "rf", "nb", "lr", "mlp", "lda")
    for name in method_b.ZOO:
        method_b.make_zoo_classifier(name)
    with pytest.raises(ValueError, match="allowed: svm"):
        method_b.make_zoo_classifier("xgb")


def test_method_b_multiclass() -> None:
    x, y, names = _data(n=90, classes=3, seed=4)
    res = method_b.fit_method_b(x, y, names, classifiers=("lr", "lda"), repeats=1)
    assert res.estimator.predict_proba(x).shape == (90, 3)
    # Multinomial RadScores: one per class and region.
    assert res.estimator.named_steps["radscore"].transform(x).shape == (90, 6)


def test_method_b_needs_region_columns() -> None:
    x, y, _ = _data(n=40)
    with pytest.raises(ValueError, match="tumour_"):
        method_b.fit_method_b(x, y, [f"f{i}" for i in range(10)], classifiers=("lr",), repeats=1)


# --- deep branch ---------------------------------------------------------------------------------------


def test_deep_radscore_shapes_and_fusion() -> None:
    torch.manual_seed(0)
    net = DeepRadScoreNet(n_classes=3, n_radscores=2, hidden=16).eval()
    crops = torch.rand(2, 1, 64, 64)
    assert net.deep_features(crops).shape == (2, 16)
    radscores = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    out = net(crops, radscores)
    assert out.shape == (2, 3)
    shifted = net(crops, radscores + torch.tensor([[3.0, -2.0], [3.0, -2.0]]))
    assert not torch.allclose(out, shifted)  # the RadScores reach the output
    r = radscores.clone().requires_grad_(True)
    net(crops, r).sum().backward()
    assert r.grad is not None and r.grad.abs().sum() > 0
    # The backbone is MONAI's DenseNet121 (2-D) with its head replaced.
    assert net.backbone.__class__.__name__ == "DenseNet121"
    assert sum(1 for _ in net.backbone.features.denseblock3.children()) == 24
    with pytest.raises(ValueError, match="radscores must be"):
        net(crops, None)
    with pytest.raises(ValueError, match="at least 32"):
        net(torch.rand(2, 1, 16, 16), radscores)


def test_deep_radscore_training_loop_on_tiny_crops() -> None:
    rng = np.random.default_rng(0)
    crops = rng.normal(-300, 200, size=(6, 32, 32)).astype(np.float32)
    radscores = rng.standard_normal((6, 2)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    net = DeepRadScoreNet(n_classes=2, n_radscores=2, hidden=8)
    hist = train_deep_radscore(net, crops, radscores, labels, epochs=2, batch_size=3, seed=1)
    assert len(hist.losses) == 2 and all(np.isfinite(hist.losses))
    proba = predict_deep_radscore(net, crops, radscores)
    assert proba.shape == (6, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


# --- evaluation ------------------------------------------------------------------------------------------


def test_binary_metrics_agree_with_confusion_matrix() -> None:
    rng = np.random.default_rng(8)
    y = (rng.random(60) < 0.4).astype(int)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 60), 0, 1)
    m = binary_metrics(y, p, threshold=0.5)
    tn, fp, fn, tp = confusion_matrix(y, p >= 0.5).ravel()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["auc"]["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["auc"]["ci_low"] < m["auc"]["auc"] < m["auc"]["ci_high"]
    assert len(m["calibration"]["observed"]) == len(m["calibration"]["predicted"]) > 1


def test_multiclass_metrics() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 90)
    proba = rng.dirichlet([1, 1, 1], 90)
    proba[np.arange(90), y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    m = multiclass_metrics(y, proba, ["T1", "T2", "T3"])
    assert m["auc_macro_ovr"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr"))
    assert set(m["auc_per_class"]) == {"T1", "T2", "T3"}


def test_roc_png_is_drawn(tmp_path) -> None:
    path = write_roc_png(tmp_path / "roc.png", [("model", np.array([0, 0, 0.5, 1]), np.array([0, 0.7, 0.9, 1]))])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 300
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    assert (pixels == np.array(ROC_COLOURS[0])).all(axis=1).sum() > 100


def test_shap_summary_is_optional() -> None:
    from sklearn.ensemble import RandomForestClassifier

    x, y, names = _data(n=40)
    rf = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    out = shap_summary(rf, x, names)
    if shap_available():
        assert out["computed"] and set(out["mean_abs_shap"]) == set(names)
    else:
        assert not out["computed"] and "not installed" in out["note"]
