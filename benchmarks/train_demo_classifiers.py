"""Train radnode's DEMO classifiers (methods A and B) on the synthetic phantom cohort.

Usage::

    python benchmarks/train_demo_classifiers.py --out build/demo_classifiers [--cases 80]

Builds the demo cohort (:mod:`radnode.models.classifiers.demo_cohort`: phantoms whose
planted mutation label changes tumour texture and shape), splits it into a training and
a held-out part (stratified, seeded), trains one bundle per method on the training part
with the papers' settings, evaluates both on the held-out part (AUC with DeLong CI, the
paired DeLong test between them, ROC PNGs), and writes::

    OUT/features_train.csv, labels_train.csv, features_test.csv, labels_test.csv
    OUT/demo-A/ and OUT/demo-B/          classifier bundles (demo: true)
    OUT/evaluation-A/, OUT/evaluation-B/ evaluation.json + roc.png
    OUT/summary.json                     held-out AUCs, DeLong p, timings

Every bundle is flagged ``demo`` and its training cohort says that it is synthetic.

The shipped demo bundle (the chain's default ``models.classifier_bundles``)::

    python benchmarks/train_demo_classifiers.py --radiomics --ship [--cases 128]

builds the cohort with the chain's own radiomics instead
(:mod:`radnode.models.classifiers.demo_training`: pyradiomics with the shipped tumour-v1
and ring-v1 profiles, original image), trains a method-B bundle for EGFR on the training
part, evaluates it on the held-out part and, with ``--ship``, writes it to
``radnode/models/classifiers/demo/egfr-demo/`` together with its training table
(``training_features.csv``, ``training_labels.csv``) and ``evaluation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# Run as a script, this folder would be sys.path[0] and its radiomics.py would shadow pyradiomics.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _HERE]

import numpy as np
from sklearn.model_selection import train_test_split

from radnode import durable
from radnode.models.classifiers.bundle import save_classifier_bundle
from radnode.models.classifiers.demo_cohort import DEMO_NOTE, build_demo_cohort
from radnode.models.classifiers.endpoints import get_endpoint
from radnode.models.classifiers.evaluation import evaluate_bundle
from radnode.models.classifiers.table import write_feature_csv, write_label_csv
from radnode.models.classifiers.training import TrainingOptions, train_classifier


def radiomics_main(args: argparse.Namespace) -> dict[str, object]:
    """Build, train, evaluate (and ship) the chain-feature demo bundle."""
    import shutil

    from radnode.models.classifiers.demo_training import (
        DEMO_BUNDLE_DIR,
        build_radiomics_cohort,
        train_demo_bundle,
    )

    t0 = time.perf_counter()
    cohort = build_radiomics_cohort(args.cases, mutation_effect=args.effect)
    t_cohort = time.perf_counter() - t0
    endpoint = get_endpoint("EGFR")
    idx = np.arange(len(cohort.labels))
    train_idx, test_idx = train_test_split(idx, test_size=args.test_fraction, stratify=cohort.labels,
                                           random_state=args.seed)
    train, test = cohort.table.rows(np.sort(train_idx)), cohort.table.rows(np.sort(test_idx))
    y_train, y_test = cohort.labels[np.sort(train_idx)], cohort.labels[np.sort(test_idx)]
    description = {**cohort.description, "split": "train", "train_cases": len(train_idx),
                   "held_out_cases": len(test_idx), "split_seed": args.seed}
    t1 = time.perf_counter()
    bundle = train_demo_bundle(train, y_train, description)
    t_train = time.perf_counter() - t1
    out: Path = DEMO_BUNDLE_DIR if args.ship else args.out
    if out is None:
        raise SystemExit("--out or --ship is required")
    scratch = out.parent / f".{out.name}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    save_classifier_bundle(bundle, scratch)
    report = evaluate_bundle(bundle, test, y_test, scratch / "evaluation")
    write_feature_csv(train, scratch / "training_features.csv")
    write_label_csv(train.case_ids, endpoint.decode(y_train), scratch / "training_labels.csv", column=endpoint.name)
    write_feature_csv(test, scratch / "held_out_features.csv")
    write_label_csv(test.case_ids, endpoint.decode(y_test), scratch / "held_out_labels.csv", column=endpoint.name)
    for extra in (scratch / "evaluation" / "roc.png",):
        extra.unlink(missing_ok=True)
    summary = {
        "note": DEMO_NOTE,
        "endpoint": endpoint.name,
        "features": len(bundle.meta.features),
        "held_out_auc": report["metrics"]["auc"],
        "cv_metrics": bundle.meta.cv_metrics,
        "chosen": bundle.meta.details.get("classifier"),
        "timings": {"cohort_s": round(t_cohort, 1), "train_s": round(t_train, 1)},
    }
    (scratch / "evaluation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if out.exists() and not args.overwrite and not args.ship:
        raise SystemExit(f"{out} exists (use --overwrite)")
    durable.replace_tree(scratch, out)
    print(json.dumps({"bundle": str(out), "held_out_auc": summary["held_out_auc"], "timings": summary["timings"],
                      "chosen": summary["chosen"]}, default=str))
    return summary


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (created)")
    parser.add_argument("--radiomics", action="store_true",
                        help="chain features (pyradiomics tumour-v1/ring-v1) and one method-B EGFR bundle")
    parser.add_argument("--ship", action="store_true",
                        help="with --radiomics: write the bundle into the package (radnode/.../demo/egfr-demo)")
    parser.add_argument("--cases", type=int, default=80, help="phantoms in the cohort")
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--effect", type=float, default=1.0, help="mutation effect strength 0..1")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--endpoint", default="EGFR", help="endpoint the demo bundles are filed under")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.radiomics:
        return radiomics_main(args)
    if args.out is None:
        parser.error("--out is required")

    t0 = time.perf_counter()
    cohort = build_demo_cohort(args.cases, matrix=args.matrix, slices=args.slices, mutation_effect=args.effect)
    t_cohort = time.perf_counter() - t0
    endpoint = get_endpoint(args.endpoint)
    idx = np.arange(len(cohort.labels))
    train_idx, test_idx = train_test_split(idx, test_size=args.test_fraction, stratify=cohort.labels,
                                           random_state=args.seed)
    train, test = cohort.table.rows(train_idx), cohort.table.rows(test_idx)
    y_train, y_test = cohort.labels[train_idx], cohort.labels[test_idx]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, tab, y in (("train", train, y_train), ("test", test, y_test)):
        write_feature_csv(tab, out / f"features_{name}.csv")
        write_label_csv(tab.case_ids, endpoint.decode(y), out / f"labels_{name}.csv", column=endpoint.name)

    description = {**cohort.description, "split": "train", "train_cases": len(train_idx),
                   "held_out_cases": len(test_idx), "split_seed": args.seed}
    bundles = {}
    timings = {"cohort_s": round(t_cohort, 2)}
    for method in ("A", "B"):
        t1 = time.perf_counter()
        bundle = train_classifier(train, y_train, endpoint, method, training_cohort=description, demo=True,
                                  options=TrainingOptions(random_state=args.seed))
        bundle.meta.details["note"] = DEMO_NOTE
        save_classifier_bundle(bundle, out / f"demo-{method}", overwrite=args.overwrite)
        bundles[method] = bundle
        timings[f"train_{method}_s"] = round(time.perf_counter() - t1, 2)
    rep_a = evaluate_bundle(bundles["A"], test, y_test, out / "evaluation-A", compare=bundles["B"])
    rep_b = evaluate_bundle(bundles["B"], test, y_test, out / "evaluation-B")
    summary = {
        "note": DEMO_NOTE,
        "endpoint": endpoint.name,
        "cohort": cohort.description,
        "held_out_auc": {"A": rep_a["metrics"]["auc"], "B": rep_b["metrics"]["auc"]},
        "cv_metrics": {m: b.meta.cv_metrics for m, b in bundles.items()},
        "chosen": {m: b.meta.details.get("classifier") for m, b in bundles.items()},
        "delong_A_vs_B": rep_a["comparison"]["delong"],
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps({"held_out_auc": {m: round(v["auc"], 3) for m, v in summary["held_out_auc"].items()},
                      "delong_p": round(summary["delong_A_vs_B"]["p_value"], 3), "timings": timings}))
    return summary


if __name__ == "__main__":
    main()
