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
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from radnode.models.classifiers.bundle import save_classifier_bundle
from radnode.models.classifiers.demo_cohort import DEMO_NOTE, build_demo_cohort
from radnode.models.classifiers.endpoints import get_endpoint
from radnode.models.classifiers.evaluation import evaluate_bundle
from radnode.models.classifiers.table import write_feature_csv, write_label_csv
from radnode.models.classifiers.training import TrainingOptions, train_classifier


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
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
