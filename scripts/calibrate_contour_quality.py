"""Calibrate the reference-free contour quality score (radnode.models.quality) of a tumour model.

Usage::

    .venv/bin/python scripts/calibrate_contour_quality.py --data ../shared/data --crops 600 \\
        --work build/quality --write radnode/models/quality_calibration.json

What it does, seeded and in one command:

1. **Unseen real nodules.** ``--crops`` LIDC-IDRI nodule crops of
   ``lidc_nodule_crops/`` drawn with a fixed seed, leaving out the patients the model
   was trained on (LIDC-IDRI-0001, -0003, and the crop patients its bundle's ``training``
   block lists). Each crop goes through the network path
   on the preprocessed grid (the bundle's preprocessing and inference settings; the whole
   crop is the lung region and the a2t box, as a crop has no chest to find the lungs in),
   then through :func:`radnode.models.quality.assess_contour`; Dice against the crop's
   mask on the crop's grid.
2. **The six real CTs** with a tumour reference (``--real``;
   :data:`radnode.models.training.real_cases.REAL_CASES`) through the chain's whole tumour
   path (:func:`radnode.models.tumour.bundle_tumour`: classical lung mask, detector,
   network, post-processing, quality), Dice against the clinical reference on the CT grid.
   The bundle was trained on them, so by default their contours are in-sample; with
   ``--folds WORK`` each is scored instead by the leave-one-out fold of
   ``scripts/train_demo_segmentation.py --work WORK`` that never saw it (the bundle's
   settings, the fold's network): unseen planning CTs, which is what the threshold must
   work on.
3. **Calibration** (:func:`summarise`): good = Dice ≥ 0.7. The AUC of the score for "good"
   (DeLong 95 % interval) over all cases, and over the crops alone; the threshold is the
   score that maximises Youden's J (sensitivity + specificity − 1 for finding the bad
   contours), with its sensitivity and specificity; then the sensitivity and specificity of
   the chain's whole verdict, which also flags a competing detection whatever the score;
   its share (``competitor_ratio``) is fitted after the threshold (:func:`competitor_gate`).
   Every case's signals and Dice are
   written with the entry, so ``tests/test_quality.py`` recomputes the scores, the AUC and
   the threshold from them with this module's functions.

``--write`` replaces the entry of this model (name + version) in the calibration file and
keeps the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from radnode.models.quality import (
    WEIGHTS,
    QualityCalibration,
    QualitySignals,
    judge,
)

log = logging.getLogger("calibrate_contour_quality")

#: Dice at or above which a contour counts as good.
GOOD_DICE = 0.7
#: Patients of the LIDC crops that are in the demo model's training set (the lidc_slabs cases).
TRAINING_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")
SEED = 20261205


# --------------------------------------------------------------------------- the calibration itself


def score_of(row: dict[str, Any]) -> float:
    """The combined score of one case's stored signals (the same function the chain uses)."""
    signals = QualitySignals(**{**row["signals"], "tta_dice": tuple(row["signals"]["tta_dice"])})
    quality = judge(signals, QualityCalibration(threshold=0.0, calibrated=False), row.get("probability_threshold", 0.5))
    assert quality.score is not None
    return quality.score


def sensitivity_specificity(flagged: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    """Share of the bad contours flagged, and share of the good ones not flagged (0 when a class is empty)."""
    sens = float(flagged[~good].mean()) if (~good).any() else 0.0
    spec = float((~flagged[good]).mean()) if good.any() else 0.0
    return sens, spec


def youden_threshold(scores: np.ndarray, good: np.ndarray) -> tuple[float, float, float]:
    """The threshold (flag below it) maximising sensitivity + specificity for bad contours.

    Candidate thresholds lie midway between consecutive distinct scores; ties go to the
    higher threshold (more contours flagged: a missed bad GTV costs more than a review).
    Returns (threshold, sensitivity for bad, specificity = good ones not flagged).
    """
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    best = (-1.0, 0.0, 0.0, 0.0)
    for t in candidates:
        sens, spec = sensitivity_specificity(scores < t, good)
        j = sens + spec - 1.0
        if j >= best[0] - 1e-12:
            best = (j, float(t), sens, spec)
    return round(best[1], 4), round(best[2], 4), round(best[3], 4)


def competitor_gate(scores: np.ndarray, ratios: np.ndarray, good: np.ndarray, threshold: float) -> float:
    """The competing-detection share that, on top of the score threshold, best finds the bad contours.

    ``ratios`` are the contours' competitor ratios (0 where nothing was chosen between).
    Candidate gates lie midway between consecutive distinct ratios (plus one above them
    all: the gate that never fires); each is scored by Youden's J of the whole verdict
    (score below ``threshold`` or ratio at or above the gate). Among the gates with the
    best J, the middle one is taken: the widest margin on both sides, since a handful of
    good contours with a competitor bound the plateau from below.
    """
    values = np.unique(np.concatenate([ratios, [0.0]]))
    candidates = np.concatenate([(values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])  # survives rounding
    candidates = candidates[candidates > 0]
    js = []
    for gate in candidates:
        js.append(sum(sensitivity_specificity((scores < threshold) | (ratios >= gate), good)) - 1.0)
    best = candidates[np.isclose(js, max(js), atol=1e-12)]
    return round(float(best[(len(best) - 1) // 2]), 4)


def _auc(scores: np.ndarray, good: np.ndarray) -> dict[str, Any] | None:
    from radnode.models.classifiers.delong import auc_confidence_interval

    if good.all() or (~good).all():
        return None
    ci = auc_confidence_interval(good.astype(int), scores)
    return {"auc": round(ci.auc, 4), "ci95": [round(ci.ci_low, 4), round(ci.ci_high, 4)],
            "good": ci.positives, "bad": ci.negatives}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """AUC (all cases, crops only, and per signal) and the Youden threshold of the scores."""
    scores = np.array([score_of(r) for r in rows])
    good = np.array([r["dice"] >= GOOD_DICE for r in rows])
    threshold, sensitivity, specificity = youden_threshold(scores, good)
    crops = np.array([r["set"] == "lidc_crop" for r in rows])
    overall = _auc(scores, good)
    # The verdict also flags a competing detection, whatever the score: its share is fitted
    # once the threshold is fixed.
    ratios = np.array([r["signals"].get("competitor_ratio") or 0.0 for r in rows])
    gate = competitor_gate(scores, ratios, good, threshold)
    competing = ratios >= gate
    verdict_sens, verdict_spec = sensitivity_specificity((scores < threshold) | competing, good)
    parts: dict[str, Any] = {}
    for name in WEIGHTS:
        values = np.array([judge(QualitySignals(**{**r["signals"], "tta_dice": tuple(r["signals"]["tta_dice"])}),
                                 QualityCalibration(0.0, False)).parts[name] for r in rows])
        found = _auc(values, good)
        parts[name] = None if found is None else found["auc"]
    return {
        "threshold": threshold,
        "auc": None if overall is None else overall["auc"],
        "auc_ci95": None if overall is None else overall["ci95"],
        "n": len(rows),
        "n_good": int(good.sum()),
        "n_bad": int((~good).sum()),
        "sensitivity_bad": sensitivity,
        "specificity_good": specificity,
        "auc_lidc_crops": (_auc(scores[crops], good[crops]) or {}).get("auc"),
        "competitor_ratio": gate,
        "competing_detection_flags": {"good": int((competing & good).sum()), "bad": int((competing & ~good).sum()),
                                      "bad_only_by_it": int((competing & ~good & (scores >= threshold)).sum())},
        "verdict_sensitivity_bad": round(verdict_sens, 4) if (~good).any() else None,
        "verdict_specificity_good": round(verdict_spec, 4) if good.any() else None,
        "auc_per_part": parts,
        "good_dice": GOOD_DICE,
    }


# --------------------------------------------------------------------------- cases


def training_patients(meta: Any) -> tuple[str, ...]:
    """LIDC patients the model has seen: the slab cases, and the crop patients its bundle lists."""
    crops = (meta.extra.get("training") or {}).get("crop_patients") or []
    return tuple(sorted({*TRAINING_PATIENTS, *crops}))


def crop_files(data: Path, count: int, seed: int = SEED, seen: tuple[str, ...] = TRAINING_PATIENTS) -> list[Path]:
    """The first ``count`` crops of a seeded shuffle of the patients outside the model's training set.

    ``seen`` are the patients to leave out (:func:`training_patients`). A larger ``count``
    draws a superset, so a longer run extends a shorter one.
    """
    images = sorted((data / "lidc_nodule_crops" / "image").glob("*.nii.gz"))
    unseen = [p for p in images if not p.name.startswith(tuple(f"{patient}_" for patient in seen))]
    order = np.random.default_rng(seed).permutation(len(unseen))
    return [unseen[i] for i in sorted(order[:count])]


def crop_row(bundle: Any, image_path: Path) -> dict[str, Any]:
    """Network + quality on one nodule crop; Dice on the crop's grid."""
    import SimpleITK as sitk

    from radnode.models.candidates import Box
    from radnode.models.inference import segment_preprocessed
    from radnode.models.metrics import dice
    from radnode.models.preprocess import labels_to_ct, preprocess_ct
    from radnode.models.quality import assess_contour, calibration_for

    ct = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path.parent.parent / "mask" / image_path.name))) != 0
    settings = bundle.inference_settings(device="cpu", deep_features=False)
    case = preprocess_ct(ct, np.ones(truth.shape, dtype=np.uint8), bundle.meta.preprocessing)
    start = time.perf_counter()
    grid = segment_preprocessed(bundle.model, case, settings, box=Box((0, 0, 0), case.image.shape))
    network = time.perf_counter() - start
    quality = assess_contour(bundle.model, case, grid, settings, calibration_for(bundle.meta.name, bundle.meta.version))
    predicted = labels_to_ct(grid.mask.astype(np.uint8), case.record) != 0
    return _row("lidc_crop", image_path.name.removesuffix(".nii.gz"), dice(predicted, truth), quality,
                settings.threshold, network)


def real_row(bundle: Any, case_id: str, load: Any, kind: str) -> dict[str, Any]:
    """The chain's whole tumour path on one real CT with ``bundle`` (its settings, calibration
    and network: the shipped one, or a held-out fold's); Dice on the CT grid."""
    from radnode.models.lungmask import segment_lungs
    from radnode.models.metrics import dice
    from radnode.models.tumour import bundle_tumour

    ct, truth = load()
    lung = segment_lungs(ct).lungs
    result = bundle_tumour(ct, lung, bundle, "cpu")
    assert result.quality is not None
    network = sum(v for k, v in result.timings.items() if k != "quality")
    return _row(kind, case_id, dice(result.mask, truth), result.quality, 0.5, network)


def real_cases(bundle: Any, folds: Path | None, data: Path, only: list[str] | None) -> list[tuple[str, str, Any]]:
    """The real CTs to score: ``(set, case, run)``. With ``folds``, each case is scored by the
    leave-one-out fold that never saw it (set ``real_ct_held_out``; a case without a fold is
    left out and logged); without, by the bundle itself (``real_ct_in_training``)."""
    from dataclasses import replace

    from radnode.models.training.folds import load_fold_model
    from radnode.models.training.real_cases import REAL_CASES

    todo: list[tuple[str, str, Any]] = []
    for case_id, load in REAL_CASES.items():
        if only is not None and case_id not in only:
            continue
        if folds is None:
            todo.append(("real_ct_in_training", case_id,
                         lambda c=case_id, f=load: real_row(bundle, c, lambda: f(data), "real_ct_in_training")))
            continue
        fold = load_fold_model(folds, case_id)
        if fold is None:
            log.warning("%s: no leave-one-out fold in %s, not scored", case_id, folds)
            continue
        held_out = replace(bundle, model=fold)
        todo.append(("real_ct_held_out", case_id,
                     lambda c=case_id, f=load, b=held_out: real_row(b, c, lambda: f(data), "real_ct_held_out")))
    return todo


def _row(kind: str, case_id: str, dice_value: float, quality: Any, probability_threshold: float,
         network_s: float) -> dict[str, Any]:
    signals = None if quality.signals is None else {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(quality.signals).items()
    }
    # signals None: no contour, nothing to score (a missed tumour is a detection failure, not a contour)
    return {
        "set": kind, "case": case_id, "dice": round(float(dice_value), 4), "signals": signals,
        "probability_threshold": probability_threshold, "network_s": round(network_s, 3),
        "quality_s": round(quality.seconds, 3),
    }


# --------------------------------------------------------------------------- main


def write_entry(path: Path, entry: dict[str, Any]) -> None:
    """Replace this model's entry in the calibration file, keeping the others."""
    data = json.loads(path.read_text()) if path.is_file() else {"format": "radnode-quality-calibration", "calibrations": []}
    data["calibrations"] = [
        e for e in data["calibrations"]
        if (e.get("model_name"), e.get("model_version")) != (entry["model_name"], entry["model_version"])
    ] + [entry]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the bundled demo)")
    parser.add_argument("--crops", type=int, default=600, help="LIDC crops to draw (unseen patients)")
    parser.add_argument("--real", nargs="*", default=None, help="real CT case ids (default: all six)")
    parser.add_argument("--work", type=Path, default=Path("build/quality"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", type=Path, default=None, help="calibration JSON to update")
    parser.add_argument("--folds", type=Path, default=None,
                        help="work folder of the training script's leave-one-out folds: score each real CT "
                             "with the fold that held it out (unseen contours) instead of the bundle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from radnode.models.bundle import load_bundle
    from radnode.models.tumour import DEMO_BUNDLE_PATH

    torch.set_num_threads(args.threads)
    bundle_path = args.bundle or DEMO_BUNDLE_PATH
    bundle = load_bundle(bundle_path, device="cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    rows_path = args.work / f"rows-{bundle.meta.name}-{bundle.meta.version}.jsonl"
    done = {}
    if rows_path.is_file():
        for line in rows_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["set"], row["case"])] = row
    seen = training_patients(bundle.meta)
    todo: list[tuple[str, str, Any]] = [("lidc_crop", p.name.removesuffix(".nii.gz"), lambda p=p: crop_row(bundle, p))
                                        for p in crop_files(args.data, args.crops, seen=seen)]
    if args.real is None or args.real:
        todo += real_cases(bundle, args.folds, args.data, args.real)
    with rows_path.open("a") as out:
        for kind, case_id, run in todo:
            if (kind, case_id) in done:
                continue
            row = run()
            done[(kind, case_id)] = row
            out.write(json.dumps(row) + "\n")
            out.flush()
            log.info("%s %s: dice %.3f, quality %.2f s", kind, case_id, row["dice"], row["quality_s"])
    wanted = {(k, c) for k, c, _ in todo}
    rows = [r for key, r in done.items() if key in wanted]
    scored = [r for r in rows if r["signals"] is not None]
    summary = summarise(scored)
    entry = {
        "model_name": bundle.meta.name,
        "model_version": bundle.meta.version,
        "date": date.today().isoformat(),
        **summary,
        "weights": dict(WEIGHTS),
        "cases": (f"{sum(r['set'] == 'lidc_crop' for r in scored)} LIDC-IDRI nodule crops of patients not in the "
                  f"model's training set (seed {SEED}, of {args.crops} drawn; network on the crop, Dice on the crop "
                  f"grid) + {sum(r['set'] != 'lidc_crop' for r in scored)} real CTs (whole chain path, "
                  + ("each scored by the leave-one-out fold that held it out" if args.folds else
                     "in-sample: the model was trained on them")
                  + "); cases without any contour are not scored"),
        "unscored_no_contour": sorted(r["case"] for r in rows if r["signals"] is None),
        "script": "scripts/calibrate_contour_quality.py",
        "rows": [{k: r[k] for k in ("set", "case", "dice", "signals", "probability_threshold")} for r in scored],
    }
    log.info("calibration: %s", {k: v for k, v in entry.items() if k != "rows"})
    if args.write:
        write_entry(args.write, entry)
    return entry


if __name__ == "__main__":
    main()
    sys.exit(0)
