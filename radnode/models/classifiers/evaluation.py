"""Evaluation of a classifier on labelled cases: AUC with DeLong CI, threshold metrics, calibration, ROC.

What is reported (the statistics of the Deep-RadScore study, ``shared/papers/001``):

* AUC with its 95 % DeLong confidence interval (:mod:`.delong`); for a multi-class
  endpoint the one-vs-rest AUC of every class with its interval, and their mean;
* at the chosen probability threshold (binary): sensitivity, specificity, PPV, NPV,
  accuracy, F1 and the confusion matrix; multi-class: macro F1 and per-class recall of
  the arg-max prediction;
* calibration: observed frequency against mean predicted probability in bins
  (:func:`sklearn.calibration.calibration_curve`) and the Brier score;
* a ROC plot as PNG, drawn with Pillow (radnode does not depend on matplotlib);
* SHAP: mean |SHAP value| per feature for tree models, only when the optional ``shap``
  package is importable; otherwise the report says it was skipped and why.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

from radnode.models.classifiers.delong import auc_confidence_interval, delong_test

logger = logging.getLogger(__name__)

#: Default probability threshold of the positive class.
DEFAULT_THRESHOLD = 0.5
#: Calibration bins (few: evaluation cohorts are small).
CALIBRATION_BINS = 5
#: ROC plot size (pixels) and margin.
ROC_SIZE = 480
ROC_MARGIN = 56
#: Curve colours of the ROC plot (RGB), one per model.
ROC_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def class_scores(estimator: Any, x: np.ndarray) -> np.ndarray:
    """``(n, K)`` class scores: ``predict_proba`` when the model has it, else the decision function.

    A decision function is only a ranking (for AUCs); use a calibrated bundle for
    probabilities.
    """
    if hasattr(estimator, "predict_proba"):
        try:
            return np.asarray(estimator.predict_proba(x), dtype=np.float64)
        except AttributeError:
            pass
    d = np.asarray(estimator.decision_function(x), dtype=np.float64)
    return np.column_stack([-d, d]) if d.ndim == 1 else d


def _safe(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                   bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Metrics of a binary endpoint from positive-class probabilities ``p``."""
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    ci = auc_confidence_interval(y, p)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    prob_true, prob_pred = calibration_curve(y, np.clip(p, 0.0, 1.0), n_bins=bins, strategy="quantile")
    fpr, tpr, _ = roc_curve(y, p)
    return {
        "auc": ci.as_dict(),
        "threshold": threshold,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "accuracy": (tp + tn) / len(y),
        "f1": float(f1_score(y, pred, zero_division=0.0)),
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "brier": float(np.mean((np.clip(p, 0, 1) - y) ** 2)),
        "calibration": {"strategy": "quantile", "bins": bins, "observed": prob_true.tolist(),
                        "predicted": prob_pred.tolist()},
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def multiclass_metrics(y: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """One-vs-rest AUCs with DeLong intervals, their mean, macro F1 and per-class recall."""
    y = np.asarray(y).astype(int).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    per_class: dict[str, Any] = {}
    aucs = []
    for k, name in enumerate(classes):
        yk = (y == k).astype(int)
        if 0 < yk.sum() < len(yk):
            ci = auc_confidence_interval(yk, proba[:, k])
            per_class[name] = ci.as_dict()
            aucs.append(ci.auc)
        else:
            per_class[name] = {"auc": None, "note": "class absent (or the only class) in these cases"}
    pred = proba.argmax(axis=1)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y, pred, labels=labels)
    recall = {c: (_safe(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    return {
        "auc_macro_ovr": float(np.mean(aucs)) if aucs else None,
        "auc_per_class": per_class,
        "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0.0)),
        "accuracy": float((pred == y).mean()),
        "recall_per_class": recall,
        "confusion": cm.tolist(),
    }


def compare_models(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray) -> dict[str, float]:
    """Paired DeLong test of two binary models scored on the same cases."""
    return delong_test(np.asarray(y).astype(int), p_a, p_b).as_dict()


# --- ROC PNG ---------------------------------------------------------------------------------------


def write_roc_png(path: str | os.PathLike[str], curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
                  title: str = "ROC") -> Path:
    """Draw ROC curves ``(label, fpr, tpr)`` with Pillow and save a PNG."""
    from PIL import Image, ImageDraw, ImageFont

    size, m = ROC_SIZE, ROC_MARGIN
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    side = size - 2 * m

    def xy(fx: float, fy: float) -> tuple[float, float]:
        return m + fx * side, size - m - fy * side

    for t in np.linspace(0, 1, 6):
        draw.line([xy(t, 0), xy(t, 1)], fill=(230, 230, 230))
        draw.line([xy(0, t), xy(1, t)], fill=(230, 230, 230))
        draw.text((xy(t, 0)[0] - 8, size - m + 6), f"{t:.1f}", fill="black", font=font)
        draw.text((m - 30, xy(0, t)[1] - 6), f"{t:.1f}", fill="black", font=font)
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(150, 150, 150))
    for i, (label, fpr, tpr) in enumerate(curves):
        colour = ROC_COLOURS[i % len(ROC_COLOURS)]
        pts = [xy(float(a), float(b)) for a, b in zip(fpr, tpr)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=3)
        draw.text((m + side * 0.45, size - m - 18 * (len(curves) - i) - 6), label, fill=colour, font=font)
    draw.text((m, m / 2 - 6), title, fill="black", font=font)
    draw.text((size / 2 - 60, size - m / 2), "1 - specificity", fill="black", font=font)
    draw.text((6, m / 2 + 10), "sensitivity", fill="black", font=font)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    img.save(p, format="PNG")
    return p


# --- SHAP --------------------------------------------------------------------------------------------


def shap_available() -> bool:
    """Whether the optional ``shap`` package can be imported."""
    return importlib.util.find_spec("shap") is not None


def shap_summary(final_model: Any, x_model: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Mean |SHAP| per input of a tree model, or a note saying why there is none.

    ``x_model`` must be the matrix the tree model itself sees (after any pipeline steps
    before it), and ``names`` its column names.
    """
    if not shap_available():
        return {"computed": False, "note": "SHAP summary skipped: the optional 'shap' package is not installed"}
    if not hasattr(final_model, "estimators_") and not hasattr(final_model, "tree_"):
        return {"computed": False, "note": f"SHAP summary is computed for tree models only, not "
                                            f"{type(final_model).__name__}"}
    import shap  # optional dependency

    values = shap.TreeExplainer(final_model).shap_values(x_model)
    arr = np.asarray(values)
    if arr.ndim == 3:  # (classes, n, p) or (n, p, classes): average over classes
        arr = np.abs(arr).mean(axis=0 if arr.shape[0] != len(x_model) else 2)
    importance = np.abs(arr).mean(axis=0)
    order = np.argsort(importance)[::-1]
    return {"computed": True, "mean_abs_shap": {str(names[i]): float(importance[i]) for i in order}}


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (NaN written as null)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return p


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _safe(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def auc_of(y: np.ndarray, scores: np.ndarray) -> float:
    """Plain ROC AUC (binary: positive-class score; multi-class: macro one-vs-rest)."""
    s = np.asarray(scores)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        return float(roc_auc_score(y, s))
    return float(roc_auc_score(y, s, multi_class="ovr", average="macro"))


def evaluate_bundle(
    bundle: Any,
    table: Any,
    y: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    compare: Any | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    allow_extra: bool = False,
) -> dict[str, Any]:
    """Evaluate a :class:`~radnode.models.classifiers.bundle.ClassifierBundle` on labelled cases.

    Writes ``evaluation.json`` and ``roc.png`` to ``out_dir`` and returns the report.
    ``compare`` is a second bundle for the same endpoint, scored on the same cases and
    compared by the paired DeLong test (binary endpoints).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=np.int64)
    endpoint = bundle.endpoint
    proba = bundle.predict_proba(table, allow_extra=allow_extra)
    report: dict[str, Any] = {
        "bundle": str(bundle.path), "endpoint": endpoint.name, "method": bundle.meta.method,
        "demo": bool(bundle.demo), "cases": len(y),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(endpoint.classes)},
    }
    if bundle.demo:
        report["note"] = "DEMO classifier: trained on a synthetic phantom cohort, not for clinical use"
    curves = []
    if endpoint.binary:
        report["metrics"] = binary_metrics(y, proba[:, 1], threshold)
        auc = report["metrics"]["auc"]
        curves.append((f"{bundle.meta.method}: AUC {auc['auc']:.3f} [{auc['ci_low']:.3f}-{auc['ci_high']:.3f}]",
                       np.array(report["metrics"]["roc"]["fpr"]), np.array(report["metrics"]["roc"]["tpr"])))
    else:
        report["metrics"] = multiclass_metrics(y, proba, endpoint.classes)
        for k, cls in enumerate(endpoint.classes):
            yk = (y == k).astype(int)
            if 0 < yk.sum() < len(yk):
                fpr, tpr, _ = roc_curve(yk, proba[:, k])
                curves.append((f"{cls} vs rest", fpr, tpr))
    if compare is not None:
        if compare.endpoint.classes != endpoint.classes:
            raise ValueError(f"cannot compare bundles of different endpoints ({endpoint.name} and "
                             f"{compare.endpoint.name})")
        if not endpoint.binary:
            raise ValueError("the DeLong comparison is implemented for binary endpoints only")
        proba_b = compare.predict_proba(table, allow_extra=True)
        report["comparison"] = {"bundle_b": str(compare.path), "method_b": compare.meta.method,
                                "delong": compare_models(y, proba[:, 1], proba_b[:, 1]),
                                "auc_b": auc_confidence_interval(y, proba_b[:, 1]).as_dict()}
        fpr, tpr, _ = roc_curve(y, proba_b[:, 1])
        curves.append((f"{compare.meta.method} (compare): AUC {report['comparison']['auc_b']['auc']:.3f}", fpr, tpr))
    final = bundle.model
    if hasattr(final, "calibrated_classifiers_"):
        final = final.calibrated_classifiers_[0].estimator
    if hasattr(final, "steps"):
        x_model = bundle.matrix(table, allow_extra=allow_extra)
        for _, step in final.steps[:-1]:
            x_model = step.transform(x_model)
        names = list(bundle.meta.features) if x_model.shape[1] == len(bundle.meta.features) else \
            [f"input_{i}" for i in range(x_model.shape[1])]
        report["shap"] = shap_summary(final.steps[-1][1], x_model, names)
    else:
        report["shap"] = shap_summary(final, bundle.matrix(table, allow_extra=allow_extra), bundle.meta.features)
    title = f"{endpoint.name} ROC{' (DEMO)' if bundle.demo else ''}"
    write_roc_png(out / "roc.png", curves, title)
    report["files"] = {"roc_png": "roc.png", "report": "evaluation.json"}
    write_json(out / "evaluation.json", report)
    return report
