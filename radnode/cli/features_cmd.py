"""``radnode features``: research commands on radiomic features (robustness, selection, harmonisation).

* ``features robustness``: perturbed image + mask → radnode's extractor → ICC(3,1) per feature;
* ``features select``: z-score (training rows only) → mRMR → random-forest RFE in bootstraps,
  with each feature's selection frequency;
* ``features harmonise``: ComBat across scanner/kernel groups, keeping covariate effects.

See ``docs/features.md``. The models are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from radnode.cli.classifier_cmd import FeaturesCsv, LabelsCsv, load_labelled_features
from radnode.cli.context import EXIT_USAGE, fail


features_app = typer.Typer(name="features", help="Research commands on radiomic features.", no_args_is_help=True)


@features_app.command("robustness")
def robustness_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (icc.csv, robust_features.txt, ...).")],
    cases: Annotated[Path | None, typer.Option(
        "--cases", help="CSV with case_id, image, mask[, roi] (paths relative to the CSV).", exists=True,
        dir_okay=False)] = None,
    image: Annotated[list[Path] | None, typer.Option(
        "--image", help="CT: DICOM folder or NIfTI/NRRD file (repeat, one per subject, with --mask).")] = None,
    mask: Annotated[list[Path] | None, typer.Option(
        "--mask", help="Mask: label image on the CT grid, or RTSTRUCT file with --roi (repeat).")] = None,
    roi: Annotated[list[str] | None, typer.Option(
        "--roi", help="RTSTRUCT ROI name (once for all subjects, or once per subject).")] = None,
    profile: Annotated[str, typer.Option("--profile", help="Shipped radiomics profile or YAML file.")] = "tumour-v1",
    region: Annotated[str, typer.Option(
        "--region", help="Prefix of the feature names ('tumour' gives tumour_original_...); '' for none.")] = "tumour",
    perturbations: Annotated[int, typer.Option("--perturbations", min=1, help="Perturbed versions per subject.")] = 10,
    rotation_deg: Annotated[float, typer.Option("--rotation-deg", min=0, help="Largest in-plane rotation.")] = 5.0,
    translation_mm: Annotated[float, typer.Option("--translation-mm", min=0, help="Largest shift per axis.")] = 1.0,
    dilation_mm: Annotated[float, typer.Option("--dilation-mm", min=0,
                                               help="Largest contour growth/shrinkage.")] = 1.0,
    randomise_mm: Annotated[float, typer.Option("--randomise-mm", min=0,
                                                help="Contour randomisation amplitude (0: off).")] = 1.0,
    randomise_smooth_mm: Annotated[float, typer.Option("--randomise-smooth-mm", min=0.1,
                                                       help="Randomisation correlation length.")] = 3.0,
    no_original: Annotated[bool, typer.Option("--no-original", help="Leave the unperturbed version out.")] = False,
    threshold: Annotated[float, typer.Option("--threshold", help="ICC at or above which a feature is robust.")] = 0.75,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the perturbations.")] = 0,
) -> None:
    """ICC(3,1) of every radiomic feature over subjects x perturbations (rotation, shift, contour)."""
    from radnode.models.radiomics.perturb import PerturbationSpec
    from radnode.models.radiomics.robustness import (
        MIN_SUBJECTS,
        CaseSpec,
        RobustnessInputError,
        assess_robustness,
        load_case,
        read_cases_csv,
        write_outputs,
    )

    specs: list[CaseSpec] = []
    try:
        if cases is not None:
            specs.extend(read_cases_csv(cases))
        images, masks, rois = list(image or []), list(mask or []), list(roi or [])
        if len(images) != len(masks):
            fail(f"--image and --mask must be given the same number of times ({len(images)} vs {len(masks)})",
                 code=EXIT_USAGE)
        if rois and len(rois) not in (1, len(images)):
            fail(f"--roi must be given once or once per --image ({len(images)}), got {len(rois)}", code=EXIT_USAGE)
        for i, (img, msk) in enumerate(zip(images, masks)):
            name = rois[0] if len(rois) == 1 else (rois[i] if rois else None)
            specs.append(CaseSpec(f"case{i + 1}", img, msk, name))
        if len(specs) < MIN_SUBJECTS:
            fail(f"the ICC is computed over subjects x perturbations and needs at least {MIN_SUBJECTS} subjects; "
                 f"got {len(specs)} (give --cases CSV or repeat --image/--mask)", code=EXIT_USAGE)
        spec = PerturbationSpec(count=perturbations, rotation_deg=rotation_deg, translation_mm=translation_mm,
                                dilation_mm=dilation_mm, randomise_mm=randomise_mm,
                                randomise_smooth_mm=randomise_smooth_mm, seed=seed, include_original=not no_original)
        loaded = [load_case(s) for s in specs]
        result = assess_robustness(loaded, profile, spec, region=region,
                                   progress=lambda cid, j, k: typer.echo(f"{cid}: version {j + 1}/{k}", err=True))
    except (RobustnessInputError, OSError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    except ValueError as exc:  # a bad profile or perturbation setting
        fail(str(exc), code=EXIT_USAGE)
        raise
    paths = write_outputs(result, out, threshold)
    summary = result.summary(threshold)
    typer.echo(json.dumps({"subjects": summary["subjects"], "perturbations": summary["perturbations_per_subject"],
                           "features": summary["features"], "robust": summary["robust"],
                           "icc_median": summary["icc_median"], "icc_csv": str(paths["icc"]),
                           "robust_list": str(paths["robust"])}))


@features_app.command("select")
def select_cmd(
    features: FeaturesCsv,
    labels: LabelsCsv,
    endpoint: Annotated[str, typer.Option("--endpoint", help="EGFR, KRAS, ALK, ... (see train classifier).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (stability.csv, selected_features.txt, ...).")],
    bootstraps: Annotated[int, typer.Option("--bootstraps", min=1, help="Stratified bootstrap samples.")] = 500,
    mrmr_features: Annotated[int, typer.Option("--mrmr", min=1, help="mRMR candidates per bootstrap.")] = 20,
    rfe_features: Annotated[int, typer.Option("--rfe", min=1, help="Features RFE keeps per bootstrap.")] = 10,
    threshold: Annotated[float, typer.Option("--threshold", help="Selection frequency for the final list.")] = 0.5,
    relevance: Annotated[str, typer.Option("--relevance", help="mRMR relevance: mi (mutual information) or f "
                                                               "(ANOVA F, faster).")] = "mi",
    trees: Annotated[int, typer.Option("--trees", min=1, help="Trees of the RFE random forest.")] = 100,
    icc: Annotated[Path | None, typer.Option("--icc", help="ICC CSV of 'features robustness' (filter first).",
                                                exists=True, dir_okay=False)] = None,
    icc_threshold: Annotated[float, typer.Option("--icc-threshold", help="ICC below which a feature is dropped.")] = 0.75,
    seed: Annotated[int, typer.Option("--seed", help="Seed of bootstraps and forests.")] = 0,
) -> None:
    """Bootstrap feature selection (z-score on training rows, mRMR, RF-RFE) with stability frequencies."""
    from radnode.models.classifiers.selection import (
        SelectionError,
        SelectionOptions,
        select_features,
    )
    from radnode.models.classifiers.table import write_feature_csv
    from radnode.models.radiomics.robustness import RobustnessInputError, read_icc_csv

    ep, table, y = load_labelled_features(features, labels, endpoint)
    try:
        options = SelectionOptions(bootstraps=bootstraps, mrmr_features=mrmr_features, rfe_features=rfe_features,
                                   threshold=threshold, relevance=relevance, trees=trees,  # type: ignore[arg-type]
                                   random_state=seed)
        icc_values = read_icc_csv(icc) if icc is not None else None
    except (SelectionError, RobustnessInputError, OSError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    try:
        result = select_features(table, y, options, icc=icc_values, icc_threshold=icc_threshold)
    except SelectionError as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    out.mkdir(parents=True, exist_ok=True)
    result.write_stability_csv(out / "stability.csv")
    (out / "selected_features.txt").write_text("".join(f"{n}\n" for n in result.selected), encoding="utf-8")
    if result.selected:
        write_feature_csv(table.select(result.selected), out / "features_selected.csv")
    summary = {"endpoint": ep.name, "cases": len(y), **result.summary()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not result.selected:
        typer.echo(f"warning: no feature reached selection frequency {threshold}; see {out / 'stability.csv'}",
                   err=True)
    typer.echo(json.dumps({"selected": result.selected, "oob_auc_mean": summary["oob_auc_mean"],
                           "stability_csv": str(out / "stability.csv")}))


@features_app.command("harmonise")
def harmonise_cmd(
    features: FeaturesCsv,
    batches: Annotated[Path, typer.Option("--batches", help="CSV with case_id, the batch column(s) and covariates.",
                                          exists=True, dir_okay=False)],
    batch_column: Annotated[list[str], typer.Option(
        "--batch-column", help="Column naming the scanner/kernel group (repeat to combine columns).")],
    out: Annotated[Path, typer.Option("--out", help="Harmonised feature CSV to write.")],
    covariate: Annotated[list[str] | None, typer.Option(
        "--covariate", help="Column whose (biological) effect is preserved (repeat).")] = None,
    no_eb: Annotated[bool, typer.Option("--no-eb", help="Plain location/scale, no empirical-Bayes shrinkage.")] = False,
    save_fit: Annotated[Path | None, typer.Option("--save-fit", help="Write the fitted estimates (JSON) to apply "
                                                                     "to new cases later.", dir_okay=False)] = None,
    apply_fit: Annotated[Path | None, typer.Option("--apply-fit", help="Harmonise with a saved fit instead of "
                                                                       "fitting (new cases, e.g. a test cohort).",
                                                   exists=True, dir_okay=False)] = None,
    pca_png: Annotated[Path | None, typer.Option("--pca-png", help="PCA scatter before/after, coloured by batch.",
                                                 dir_okay=False)] = None,
) -> None:
    """ComBat harmonisation of a feature table by scanner/kernel group (fit, or apply a saved fit)."""
    import numpy as np

    from radnode.models.classifiers.harmonise import (
        HarmonisationError,
        apply_combat,
        combat,
        covariates_for_fit,
        load_fit,
        read_batch_csv,
    )
    from radnode.models.classifiers.harmonise import save_fit as write_fit
    from radnode.models.classifiers.table import (
        FeatureTable,
        FeatureTableError,
        read_feature_csv,
        write_feature_csv,
    )

    try:
        table = read_feature_csv(features)
        if apply_fit is not None:
            fit, names = load_fit(apply_fit)
            if names["features"] != list(table.names):
                absent = [n for n in names["features"] if n not in table.names]
                raise HarmonisationError(f"{features}: the features differ from the fit's ({apply_fit}); "
                                         f"missing: {absent[:5]}" if absent else
                                         f"{features}: expected the fit's feature columns in its order")
            groups, covariates = covariates_for_fit(batches, table.case_ids, batch_column, names["covariates"])
            cov_names = names["covariates"]
            adjusted = apply_combat(table.values, groups, covariates, fit)
        else:
            groups, covariates, cov_names = read_batch_csv(batches, table.case_ids, batch_column, covariate or [])
            adjusted, fit = combat(table.values, groups, covariates, eb=not no_eb)
    except (FeatureTableError, HarmonisationError, OSError) as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    write_feature_csv(FeatureTable(table.case_ids, table.names, adjusted), out)
    if save_fit is not None and apply_fit is None:
        write_fit(fit, save_fit, table.names, cov_names, batch_column)
    summary = {"out": str(out), "cases": len(table.case_ids), "features": len(table.names),
               "batches": {b: int(groups.count(b)) for b in sorted(set(groups))}, "covariates": cov_names,
               "mode": "applied saved fit" if apply_fit is not None else "fitted",
               "mean_abs_additive_effect": {b: float(s) for b, s in zip(fit.batches, np.abs(fit.gamma).mean(axis=1))}}
    if pca_png is not None:
        from radnode.models.research.plots import batch_pca

        summary["batch_silhouette"] = batch_pca(table.values, adjusted, groups, pca_png,
                                                title="ComBat harmonisation: PCA of z-scored features by batch")
        summary["pca_png"] = str(pca_png)
    typer.echo(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add the ``features`` group to ``app``."""
    app.add_typer(features_app, name="features")
