"""Benchmark: tumour Dice / HD95 on the real CTs of the shared data, recomputed.

Runs the chain's whole tumour path on every real case with a reference
(:data:`radnode.models.training.real_cases.REAL_CASES`): classical lung mask →
preprocessing → candidate detector → network → post-processing → CT grid, and scores the
mask against the clinical reference (:func:`radnode.models.metrics.evaluate_segmentation`).
Nothing is compared with stored numbers: the table is recomputed from weights and cases.

Which weights score which case decides what the figures mean, and the output says it:

* ``--folds WORK`` (**held-out**): the leave-one-out fold weights that
  ``scripts/train_demo_segmentation.py --work WORK`` left in ``WORK/loo-<case>/last.pt``;
  each case is scored by the fold that never saw it. Cases without a fold are listed as
  missing, never filled in from another model.
* ``--bundle PATH`` (default: the shipped demo bundle; **in-sample** for the demo bundle,
  which was fine-tuned on all six cases): the figures show what the chain sends for these
  CTs, not how the model generalises.

Inference settings are the bundle's ``inference`` block (for folds: the shipped demo
bundle's), overridden by ``--set key=value`` (JSON values, e.g. ``--set max_candidates=6
--set search_region='"hull"'``) or by a named ``--variant`` of :data:`VARIANTS`.

Run::

    .venv/bin/python benchmarks/seg_accuracy.py                       # in-sample, shipped settings
    .venv/bin/python benchmarks/seg_accuracy.py --folds build/demo-seg  # held-out
    .venv/bin/python benchmarks/seg_accuracy.py --variant v1.1 --folds build/demo-seg

Prints a Markdown table (the README's), writes JSON with ``--json`` and one small overlay PNG
per case (largest reference slice, reference green, automatic red) with ``--overlays DIR``. Cost: about 10-60 s
of CPU per case and variant (the lung mask and the network dominate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

#: Named inference variants (overrides of the bundle's settings) compared in docs/segmentation.md.
VARIANTS: dict[str, dict[str, Any]] = {
    # The settings shipped with raseg-demo 1.1.0: best three detector boxes, tumour kept
    # within 2 mm of the lung mask.
    "v1.1": {"max_candidates": 3, "lung_margin_mm": 2.0, "search_region": "lung",
             "min_component_confidence": None, "max_components": None, "box_growth_rounds": 0, "tta_flips": []},
    # raseg-demo 1.1.0 with the inference chosen in docs/segmentation.md: the detector's six
    # best boxes, and of the components found the one with the largest summed probability.
    "v1.1-top1": {"max_candidates": 6, "lung_margin_mm": 2.0, "search_region": "lung", "max_components": 1,
                  "min_component_confidence": None, "box_growth_rounds": 0, "tta_flips": []},
    "shipped": {},
}


def _model_for(case_id: str, folds: Path | None, bundle: Any) -> Any:
    """The fold's network for ``case_id`` (held-out), or the bundle's; ``None`` if the fold is missing."""
    if folds is None:
        return bundle.model
    from radnode.models.training.folds import FoldError, load_fold_model

    try:
        return load_fold_model(folds, case_id)
    except FoldError as exc:
        raise SystemExit(str(exc)) from exc


def score_case(model: Any, ct: Any, truth: np.ndarray, settings: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Whole tumour path of the chain on one CT, scored against the reference (and the mask)."""
    from radnode.models.inference import segment_ct
    from radnode.models.lungmask import segment_lungs
    from radnode.models.metrics import evaluate_segmentation

    start = time.perf_counter()
    lung = segment_lungs(ct).lungs
    lung_s = time.perf_counter() - start
    result = segment_ct(model, ct, lung.astype(np.uint8), settings=settings)
    spacing = tuple(reversed(ct.GetSpacing()))
    metrics = evaluate_segmentation(result.mask != 0, truth, spacing)
    return {
        "dice": metrics.dice, "hd95_mm": metrics.hd95_mm, "surface_dice": metrics.surface_dice,
        "volume_pred_ml": metrics.volume_pred_ml, "volume_truth_ml": metrics.volume_truth_ml,
        "tumour_in_lung_mask": float(lung[truth].mean()) if truth.any() else None,
        "lung_mask_s": round(lung_s, 2), "segment_s": round(sum(result.grid.timings.values()), 2),
    }, result.mask != 0


def save_overlay(path: Path, ct: Any, truth: np.ndarray, pred: np.ndarray, title: str, margin_mm: float = 40.0) -> Path:
    """A small PNG: the axial slice with the largest reference area, cropped around the
    reference (plus ``margin_mm``), reference green, automatic contour red."""
    import SimpleITK as sitk

    from radnode.models.evaluation import largest_slice, overlay_image

    hu = sitk.GetArrayViewFromImage(ct)
    z = largest_slice(truth, pred)
    rows, cols = np.nonzero(truth[z] | pred[z]) if (truth[z] | pred[z]).any() else (np.array([0]), np.array([0]))
    sy, sx = ct.GetSpacing()[1], ct.GetSpacing()[0]
    my, mx = int(margin_mm / sy), int(margin_mm / sx)
    window = (slice(max(0, rows.min() - my), rows.max() + my + 1), slice(max(0, cols.min() - mx), cols.max() + mx + 1))
    image = overlay_image(np.asarray(hu[z])[window], truth[z][window], pred[z][window], title)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def table(scores: dict[str, dict[str, Any]], label: str) -> str:
    """The README's Markdown table of ``scores`` (missing cases say so)."""
    from radnode.models.training.real_cases import REAL_CASES, REFERENCES

    lines = [f"| case ({label}) | reference | Dice | HD95 (mm) | volume predicted / reference (mL) |",
             "|---|---|---|---|---|"]
    for case_id in REAL_CASES:
        s = scores.get(case_id)
        if s is None:
            lines.append(f"| {case_id} | {REFERENCES[case_id]} | not measured | | |")
            continue
        lines.append(f"| {case_id} | {REFERENCES[case_id]} | {s['dice']:.2f} | {s['hd95_mm']:.1f} | "
                     f"{s['volume_pred_ml']:.1f} / {s['volume_truth_ml']:.1f} |")
    dices = [s["dice"] for s in scores.values()]
    hd95 = [s["hd95_mm"] for s in scores.values() if np.isfinite(s["hd95_mm"])]
    if dices:
        lines.append(f"| **mean** (median) of {len(dices)} | | **{np.mean(dices):.2f}** ({np.median(dices):.2f}) | "
                     f"median {np.median(hd95) if hd95 else float('nan'):.1f} | |")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=json`` pairs -> a mapping (a bare word that is not JSON is a string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--bundle", default="demo", help="bundle path or 'demo' (in-sample for the demo bundle)")
    parser.add_argument("--folds", type=Path, help="work folder of the leave-one-out folds (held-out figures)")
    parser.add_argument("--variant", choices=list(VARIANTS), default="shipped")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="inference setting overrides")
    parser.add_argument("--cases", nargs="*", help="only these case ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the scores here")
    parser.add_argument("--overlays", type=Path, help="write one small overlay PNG per case here")
    args = parser.parse_args(argv)

    import torch

    from radnode.models.bundle import load_bundle
    from radnode.models.training.real_cases import REAL_CASES
    from radnode.models.tumour import resolve_bundle

    torch.set_num_threads(args.threads)
    bundle_path = resolve_bundle(args.bundle)
    if bundle_path is None:
        raise SystemExit("--bundle none: nothing to evaluate")
    bundle = load_bundle(bundle_path)
    overrides = {**VARIANTS[args.variant], **parse_overrides(args.set)}
    settings = bundle.inference_settings(device="cpu", num_threads=args.threads, deep_features=False)
    settings = replace(settings, **{k: v for k, v in overrides.items()})
    settings = type(settings).from_dict(settings.to_dict())  # validates the overrides
    label = "held-out, leave-one-out folds" if args.folds else (
        "in-sample: the demo bundle was trained on this case" if bundle.meta.demo and args.bundle == "demo"
        else f"bundle {bundle.meta.name} {bundle.meta.version}")
    scores: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for case_id, load in REAL_CASES.items():
        if args.cases and case_id not in args.cases:
            continue
        model = _model_for(case_id, args.folds, bundle)
        if model is None:
            missing.append(case_id)
            continue
        ct, truth = load(args.data)
        scores[case_id], pred = score_case(model, ct, truth, settings)
        if args.overlays:
            title = f"{case_id} {args.variant} ({'held-out' if args.folds else 'in-sample'}) Dice {scores[case_id]['dice']:.2f}"
            save_overlay(args.overlays / f"{case_id}-{args.variant}.png", ct, truth, pred, title)
        print(f"{case_id}: Dice {scores[case_id]['dice']:.3f}, HD95 {scores[case_id]['hd95_mm']:.1f} mm "
              f"({scores[case_id]['segment_s']:.1f} s)", file=sys.stderr, flush=True)
    print(f"weights: {'folds in ' + str(args.folds) if args.folds else str(bundle_path)}; "
          f"inference: variant {args.variant} {json.dumps(overrides)}")
    if missing:
        print(f"no fold for: {', '.join(missing)} (not measured)")
    print(table(scores, label))
    if args.json:
        args.json.write_text(json.dumps({"label": label, "variant": args.variant, "overrides": overrides,
                                         "settings": settings.to_dict(), "scores": scores, "missing": missing},
                                        indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
