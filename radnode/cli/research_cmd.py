"""``radnode research``: cohort analyses on radnode's feature database.

* ``research export``: the feature database in the ``FEAT.csv`` shape (CSV or Parquet);
* ``research genemask``: gene-masking radiogenomics (transcriptome → radiomic classes);
* ``research survival``: Cox model, bootstrap C-index, Kaplan-Meier risk groups;
* ``research synth``: a synthetic cohort with planted answers, in the same file shapes.

Bad input ends with one message naming the file, row/column and what was expected, exit
code 2, and nothing written to ``--out`` (outputs are staged and moved in at the end).
See ``docs/research.md``. Models are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated

import typer

from radnode import durable
from radnode.cli.context import EXIT_USAGE, err_console, fail, get_settings

research_app = typer.Typer(name="research", help="Research analyses: feature export, gene masking, survival.",
                           no_args_is_help=True)

OutDir = Annotated[Path, typer.Option("--out", help="Output folder (written only when the analysis succeeds).",
                                      file_okay=False)]
Seed = Annotated[int, typer.Option("--seed", help="Seed of splits, folds, networks and bootstraps.")]


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} {text!r}: expected comma-separated numbers", code=EXIT_USAGE)
        raise


def _require(*modules: str) -> None:
    """Exit 2 with the install command when an optional library of the ``research`` extra is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"this command needs {', '.join(missing)}: pip install 'radnode[research]'", code=EXIT_USAGE)


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in text.split(",") if v.strip())


@research_app.command("export")
def export_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="FILE.csv or FILE.parquet to write.", dir_okay=False)],
    date_from: Annotated[str | None, typer.Option("--from", help="First study date (YYYY-MM-DD).")] = None,
    date_to: Annotated[str | None, typer.Option("--to", help="Last study date (YYYY-MM-DD).")] = None,
    region: Annotated[list[str] | None, typer.Option("--region", help="tumour, ring or lung (repeat; default all).")] = None,
    pipeline_version: Annotated[str | None, typer.Option("--pipeline-version", help="Only this pipeline version.")] = None,
    sample_id: Annotated[str, typer.Option("--sample-id", help="What sample_id is: patient (PatientID), study "
                                                               "(StudyInstanceUID) or series.")] = "patient",
    clinical: Annotated[Path | None, typer.Option(
        "--clinical", help="Cohort CSV of clinical labels (first column sample_id, patient_id or "
        "study_instance_uid); its matching rows are written to <out>_clinical.csv.", dir_okay=False)] = None,
    db: Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL (default: storage.feature_db_url, "
                                                        "or <data_dir>/features.sqlite).")] = None,
    drop_incomplete: Annotated[bool, typer.Option(
        "--drop-incomplete", help="Leave out feature columns with a missing value (non-finite in result.json, or a "
        "region missing for some sample), so the analyses can read the file.")] = False,
) -> None:
    """Write the feature database as FEAT.csv (sample_id, <region>_<feature>..., UID and version columns)."""
    from radnode.models.research.featuredb import database_url, export_table, join_clinical, open_db
    from radnode.models.research.tables import ResearchInputError

    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        fail(f"--out {out}: expected a .csv or .parquet file name", code=EXIT_USAGE)
    if suffix == ".parquet":
        _require("pyarrow")
    if db is None:
        settings = get_settings(ctx)
        db = database_url(settings.storage.data_dir, settings.storage.feature_db_url)
    try:
        table = export_table(open_db(db), date_from=date_from, date_to=date_to, regions=tuple(region or ()),
                             pipeline_version=pipeline_version, sample_key=sample_id)
        clin = join_clinical(table, clinical, sample_id) if clinical is not None else None
    except ResearchInputError as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    if table.empty:
        fail(f"{db}: no feature rows match the filters", code=EXIT_USAGE)
    dropped = 0
    if drop_incomplete:
        from radnode.models.research.tables import METADATA_COLUMNS

        incomplete = [c for c in table.columns[1:] if c not in METADATA_COLUMNS and table[c].isna().any()]
        table = table.drop(columns=incomplete)
        dropped = len(incomplete)
    with durable.replacing(out) as tmp:
        if suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    summary = {"out": str(out), "samples": len(table), "columns": table.shape[1], "dropped_incomplete": dropped}
    if clin is not None:
        clin_path = out.with_name(f"{out.stem}_clinical.csv")
        clin.to_csv(clin_path, index=False)
        summary.update({"clinical": str(clin_path), "clinical_matched": len(clin)})
    typer.echo(json.dumps(summary))


@research_app.command("genemask")
def genemask_cmd(
    expression: Annotated[Path, typer.Option("--expression", help="EXPR.csv|tsv|parquet: sample_id, one column "
                                                                  "per gene (HGNC symbol).", dir_okay=False)],
    features: Annotated[Path, typer.Option("--features", help="FEAT.csv: sample_id, one column per radiomic "
                                                              "feature (research export writes it).", dir_okay=False)],
    gene_sets: Annotated[Path, typer.Option("--gene-sets", help="MSigDB GMT file (Hallmark, GO, ...).",
                                            dir_okay=False)],
    out: OutDir,
    seed: Seed = 0,
    folds: Annotated[int, typer.Option("--folds", help="CV folds of the grid search (paper: 10).")] = 10,
    clinical: Annotated[Path | None, typer.Option(
        "--clinical", help="CSV with sample_id and histology and/or stage columns: multi-class targets.",
        dir_okay=False)] = None,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.05, max=0.8,
                                                 help="Share of samples held out as the test set.")] = 0.25,
    max_genes: Annotated[int, typer.Option("--max-genes", min=1, help="Largest gene set used (paper: 500).")] = 500,
    first_layers: Annotated[str, typer.Option("--first-layers", help="First hidden layer widths to search.")] =
    "2000,4000,6000",
    layers: Annotated[str, typer.Option("--layers", help="Hidden layer counts to search.")] = "3,4",
    activations: Annotated[str, typer.Option("--activations", help="relu and/or sigmoid.")] = "relu,sigmoid",
    dropouts: Annotated[str, typer.Option("--dropouts", help="Dropout rates to search.")] = "0.4,0.6",
    optimizers: Annotated[str, typer.Option("--optimizers", help="nadam and/or adadelta.")] = "nadam,adadelta",
    max_epochs: Annotated[int, typer.Option("--max-epochs", min=1, help="Epoch cap (paper: 500).")] = 500,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Early-stopping patience (paper: 200).")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Mini-batch size (paper: 10).")] = 10,
    baselines: Annotated[str, typer.Option("--baselines", help="Comparison models: lr,svm,rf,gb or none.")] =
    "lr,svm,rf,gb",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Gene sets shown in the heat-map.")] = 20,
) -> None:
    """Gene-masking radiogenomics: networks from gene expression to radiomic classes, masked per gene set."""
    _require("matplotlib")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from radnode.models.research.baselines import BASELINE_FAMILIES
    from radnode.models.research.genemask import GeneMaskOptions, run_genemask
    from radnode.models.research.network import TrainOptions, grid
    from radnode.models.research.plots import masking_heatmap
    from radnode.models.research.tables import (
        ResearchInputError,
        match_samples,
        read_clinical,
        read_gmt,
        read_matrix,
        restrict_gene_sets,
        staged_output,
    )

    chosen = () if baselines.strip().lower() == "none" else _words(baselines)
    unknown = [b for b in chosen if b not in BASELINE_FAMILIES]
    if unknown:
        fail(f"--baselines: unknown {unknown}; expected some of {', '.join(BASELINE_FAMILIES)} or none", code=EXIT_USAGE)
    try:
        points = grid([int(v) for v in _floats(first_layers, "--first-layers")],
                      [int(v) for v in _floats(layers, "--layers")], _words(activations),
                      _floats(dropouts, "--dropouts"), _words(optimizers))
    except ValueError as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    options = GeneMaskOptions(folds=folds, seed=seed, test_fraction=test_fraction, grid=tuple(points),
                              training=TrainOptions(max_epochs=max_epochs, patience=patience, batch_size=batch_size,
                                                    threads=threads),
                              baselines=chosen)
    paths = {"expression": str(expression), "features": str(features), "clinical": str(clinical or "")}
    try:
        expr = read_matrix(expression, "expression")
        feats = read_matrix(features, "features")
        sets = restrict_gene_sets(read_gmt(gene_sets, max_genes=max_genes), list(expr.columns), gene_sets, expression)
        ids = match_samples(expr, feats, expression, features)
        clin = None
        if clinical is not None:
            clin_all = read_clinical(clinical, required=())
            ids = [s for s in ids if s in set(clin_all.index)]
            if not ids:
                raise ResearchInputError(f"{clinical}: no sample_id in common with {expression} and {features}")
            clin = clin_all.loc[ids]
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            task = bar.add_task("gene masking", total=1)

            def progress(text: str, done: int, total: int) -> None:
                bar.update(task, description=text[:70], completed=done, total=max(total, 1))

            result = run_genemask(expr.loc[ids], feats.loc[ids], sets, options, clinical=clin, progress=progress,
                                  paths=paths)
        with staged_output(out) as tmp:
            result.masking.to_csv(tmp / "masking.csv", index=False, float_format="%.4f")
            result.models.to_csv(tmp / "models.csv", index=False, float_format="%.4f")
            masking_heatmap(result.masking, tmp / "masking_heatmap.png", top=top,
                            title=f"{result.summary['method']} {result.summary['version']} "
                                  f"({result.summary['note']}): test AUC per gene set")
            (tmp / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n",
                                              encoding="utf-8")
    except ResearchInputError as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    top_rows = result.masking[result.masking["rank"] == 1][["target", "gene_set", "auc"]]
    typer.echo(json.dumps({"out": str(out), "samples": result.summary["samples"], "targets": len(result.models),
                           "gene_sets": len(sets), "top_gene_set": {r.target: [r.gene_set, round(float(r.auc), 3)]
                                                                    for r in top_rows.itertuples()}}))


@research_app.command("survival")
def survival_cmd(
    features: Annotated[Path, typer.Option("--features", help="FEAT.csv: sample_id, radiomic features.",
                                           dir_okay=False)],
    clinical: Annotated[Path, typer.Option("--clinical", help="CLIN.csv: sample_id,time,event (+ covariates).",
                                           dir_okay=False)],
    out: OutDir,
    seed: Seed = 0,
    folds: Annotated[int, typer.Option("--folds", min=2, help="CV folds of the training C-index.")] = 5,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.05, max=0.8)] = 0.3,
    select: Annotated[list[str] | None, typer.Option("--select", help="Use these features (repeat) instead of "
                                                                      "univariate screening.")] = None,
    max_features: Annotated[int, typer.Option("--max-features", min=1, help="Most features screening keeps.")] = 3,
    covariate: Annotated[list[str] | None, typer.Option("--covariate", help="Numeric CLIN.csv column added to the "
                                                                            "model (repeat).")] = None,
    bootstraps: Annotated[int, typer.Option("--bootstraps", min=10, help="Bootstrap resamples of the CI.")] = 1000,
    penalizer: Annotated[float, typer.Option("--penalizer", min=0, help="lifelines ridge penalizer.")] = 0.01,
    risk_quantile: Annotated[float, typer.Option("--risk-quantile", min=0.05, max=0.95,
                                                 help="Training quantile of the score splitting the risk groups.")]
    = 0.5,
) -> None:
    """Cox model on radiomic features: C-index (bootstrap 95 % CI), Kaplan-Meier risk groups, log-rank test."""
    _require("lifelines", "matplotlib")
    from radnode.models.research.plots import km_plot
    from radnode.models.research.survival import SurvivalOptions, run_survival
    from radnode.models.research.tables import (
        ResearchInputError,
        match_samples,
        read_clinical,
        read_matrix,
        staged_output,
    )

    options = SurvivalOptions(seed=seed, folds=folds, test_fraction=test_fraction, max_features=max_features,
                              bootstraps=bootstraps, penalizer=penalizer, select=tuple(select or ()),
                              covariates=tuple(covariate or ()), risk_quantile=risk_quantile)
    try:
        feats = read_matrix(features, "features")
        clin = read_clinical(clinical)
        ids = match_samples(feats, clin, features, clinical)
        with err_console.status("fitting Cox models and bootstrapping the C-index"):
            result = run_survival(feats.loc[ids], clin.loc[ids], options,
                                  paths={"features": str(features), "clinical": str(clinical)})
        with staged_output(out) as tmp:
            (tmp / "survival.json").write_text(json.dumps(result.summary, indent=2) + "\n", encoding="utf-8")
            km_plot(result.km, result.summary, tmp / "km.png")
            groups = [frame.assign(split=part) for part, frame in (("train", result.train), ("test", result.test))]
            import pandas as pd

            pd.concat(groups).to_csv(tmp / "risk_scores.csv", index_label="sample_id", float_format="%.6g")
    except ResearchInputError as exc:
        fail(str(exc), code=EXIT_USAGE)
        raise
    s = result.summary
    typer.echo(json.dumps({"out": str(out), "c_index_train": round(s["c_index_train"], 3),
                           "c_index_test": round(s["c_index_test"], 3),
                           "c_index_test_ci": [round(v, 3) for v in s["c_index_test_ci"]],
                           "logrank_p": s["logrank_p"], "selected_features": s["selected_features"]}))


@research_app.command("synth")
def synth_cmd(
    out: OutDir,
    samples: Annotated[int, typer.Option("--samples", min=20, help="Patients.")] = 160,
    seed: Seed = 0,
    signal: Annotated[float, typer.Option("--signal", min=0, help="Strength of the planted gene→feature "
                                                                  "effects (0: none).")] = 1.0,
) -> None:
    """Write a synthetic cohort (expression.csv, features.csv, clinical.csv, gene_sets.gmt, truth.json)."""
    from radnode.models.research.synthetic import make_cohort, write_cohort

    paths = write_cohort(make_cohort(samples=samples, seed=seed, signal=signal), out)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


def register(app: typer.Typer) -> None:
    """Add the ``research`` group to ``app``."""
    app.add_typer(research_app, name="research")
