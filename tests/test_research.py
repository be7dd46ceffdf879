"""``radnode research``: feature database and export, gene masking, survival.

Each analysis runs on a small synthetic cohort with planted answers (gene set → feature,
programme → histology, feature → hazard) and on a shuffled control that must stay at
chance. Grids and epochs are cut down by the commands' own options so the module runs in
about a minute on two cores; the defaults are the paper's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from radnode.cli.main import app
from radnode.config import Settings
from radnode.models.research.baselines import BASELINE_FAMILIES, best_baseline
from radnode.models.research.featuredb import open_db, record_result
from radnode.models.research.genemask import GeneMaskOptions, binarise_features, radiomic_group, run_genemask
from radnode.models.research.network import TrainOptions, grid
from radnode.models.research.survival import SurvivalOptions, run_survival
from radnode.models.research.synthetic import (
    HISTOLOGY_SET,
    NULL_FEATURES,
    PLANTED_FEATURES,
    SURVIVAL_FEATURE,
    make_cohort,
    set_name,
    write_cohort,
)
from radnode.models.research.tables import (
    ResearchInputError,
    read_gmt,
    read_matrix,
    restrict_gene_sets,
    staged_output,
)
from radnode.pipeline.jobs import JobSpec, JobState
from radnode.pipeline.service import PipelineService

PNG = b"\x89PNG\r\n\x1a\n"
#: Small network grid and training loop: seconds per fit on a busy 2-core machine.
FAST = ["--folds", "3", "--first-layers", "64", "--layers", "3", "--activations", "relu", "--dropouts", "0.4",
        "--optimizers", "nadam", "--max-epochs", "30", "--patience", "5", "--batch-size", "32", "--threads", "1"]
FAST_OPTIONS = GeneMaskOptions(folds=3, seed=0, grid=tuple(grid([64], [3], ["relu"], [0.4], ["nadam"])),
                               training=TrainOptions(max_epochs=30, patience=5, batch_size=32, threads=1), baselines=())


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cohort")
    paths = write_cohort(make_cohort(samples=140, seed=1), out)
    clinical = pd.read_csv(paths["clinical"])
    clinical[["sample_id", "histology"]].to_csv(out / "histology.csv", index=False)
    paths["histology"] = out / "histology.csv"
    return paths


# --- gene masking ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genemask_run(cohort: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gm") / "result"
    code, output = _run("research", "genemask", "--expression", str(cohort["expression"]), "--features",
                        str(cohort["features"]), "--gene-sets", str(cohort["gene_sets"]), "--clinical",
                        str(cohort["histology"]), "--out", str(out), "--seed", "0", "--baselines", "lr", *FAST)
    assert code == 0, output
    return out


def test_genemask_ranks_the_planted_gene_sets_first(genemask_run: Path) -> None:
    masking = pd.read_csv(genemask_run / "masking.csv")
    assert {"gene_set", "target", "auc", "average_precision", "rank"} <= set(masking.columns)
    for feature, k in PLANTED_FEATURES.items():
        rows = masking[masking["target"] == feature].sort_values("rank")
        assert rows.iloc[0]["gene_set"] == set_name(k), rows.head(3)
        assert rows.iloc[0]["auc"] > 0.85 and rows.iloc[1]["auc"] < rows.iloc[0]["auc"] - 0.2
        assert rows.iloc[0]["average_precision"] > 0.8
    for cls in ("ADC", "SCC"):
        rows = masking[masking["target"] == f"histology={cls}"].sort_values("rank")
        assert rows.iloc[0]["gene_set"] == set_name(HISTOLOGY_SET), rows.head(3)
    for feature in NULL_FEATURES:  # kept by the 90 % rule, predicted by no gene set
        rows = masking[masking["target"] == feature]
        assert len(rows) and rows["auc"].max() < 0.8


def test_genemask_models_table_heatmap_and_provenance(genemask_run: Path) -> None:
    models = pd.read_csv(genemask_run / "models.csv").set_index("target")
    assert {"nn_first_layer", "nn_layers", "nn_activation", "nn_dropout", "nn_optimizer", "cv_auc", "group_cv_auc",
            "test_auc", "lr_cv_auc", "best_cv_model"} <= set(models.columns)
    for feature in PLANTED_FEATURES:
        assert models.loc[feature, "cv_auc"] > 0.8 and models.loc[feature, "test_auc"] > 0.8
        assert models.loc[feature, "lr_cv_auc"] > 0.7
    assert models.loc["histology", "kind"] == "categorical" and models.loc["histology", "classes"] == "ADC|SCC|other"
    assert (genemask_run / "masking_heatmap.png").read_bytes()[:8] == PNG
    summary = json.loads((genemask_run / "summary.json").read_text())
    assert summary["method"] == "radnode-genemask" and summary["version"] and "not for clinical use" in summary["note"]
    assert set(summary["best_params_per_group"]) == {"glcm", "shape", "firstorder", "histology"}


@pytest.fixture(scope="module")
def shuffled_run(cohort: dict[str, Path]) -> tuple[object, pd.DataFrame]:
    expr = read_matrix(cohort["expression"], "expression")
    feats = read_matrix(cohort["features"], "features")[list(PLANTED_FEATURES)]
    shuffled = pd.DataFrame(feats.to_numpy()[np.random.default_rng(3).permutation(len(feats))],
                            index=feats.index, columns=feats.columns)
    sets = restrict_gene_sets(read_gmt(cohort["gene_sets"]), list(expr.columns), cohort["gene_sets"],
                              cohort["expression"])
    return run_genemask(expr, shuffled, sets, FAST_OPTIONS), expr


def test_shuffled_control_stays_at_chance(shuffled_run: tuple[object, pd.DataFrame]) -> None:
    result, _ = shuffled_run
    masking = result.masking  # type: ignore[attr-defined]
    firsts = 0
    for feature, k in PLANTED_FEATURES.items():
        planted = masking[(masking["target"] == feature) & (masking["gene_set"] == set_name(k))].iloc[0]
        assert planted["auc"] < 0.75
        firsts += int(planted["rank"] == 1)
    assert firsts <= 1
    assert (result.models["test_auc"] < 0.75).all()  # type: ignore[attr-defined]


def test_gene_standardisation_is_fitted_on_training_folds_only(shuffled_run: tuple[object, pd.DataFrame]) -> None:
    """Would fail if the standardiser saw the held-out fold (or the test rows)."""
    result, expr = shuffled_run
    test_ids = set(result.summary["test_samples"])  # type: ignore[attr-defined]
    x_train = expr.loc[[s for s in expr.index if s not in test_ids]].to_numpy()
    assert len(result.fold_log) >= 2 * 3  # type: ignore[attr-defined]
    for record in result.fold_log:  # type: ignore[attr-defined]
        assert np.allclose(record.standardiser_mean, x_train[record.train_rows].mean(axis=0), atol=1e-10)
        assert not np.allclose(record.standardiser_mean, x_train.mean(axis=0), atol=1e-4)
        assert not set(record.train_rows) & set(record.test_rows)


def test_kmeans_boundaries_come_from_training_rows_and_imbalanced_features_drop() -> None:
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"bimodal": np.r_[rng.normal(0, 0.5, 30), rng.normal(10, 0.5, 30)],
                          "lopsided": np.r_[rng.normal(0, 0.1, 57), [50.0, 51.0, 52.0]]})
    test = pd.DataFrame({"bimodal": [4.0, 6.0, 30.0, -30.0], "lopsided": [0.0, 0.0, 0.0, 0.0]})
    binary = binarise_features(train, test, 0.9, seed=0)
    assert "lopsided" in binary.dropped and list(binary.train.columns) == ["bimodal"]
    assert binary.test["bimodal"].tolist() == [0, 1, 1, 0]  # midpoint ≈ 5 of the training clusters
    assert 4.0 < binary.thresholds["bimodal"] < 6.0


def test_radiomic_groups_follow_pyradiomics_names() -> None:
    assert radiomic_group("tumour_original_glcm_Contrast") == "glcm"
    assert radiomic_group("ring_wavelet-HHH_glszm_ZoneEntropy") == "wavelet"
    assert radiomic_group("tumour_log-sigma-1-0-mm-3D_firstorder_Mean") == "log"
    assert radiomic_group("tumour_original_shape_Sphericity") == "shape"


@pytest.mark.parametrize("family", BASELINE_FAMILIES)
def test_each_baseline_learns_a_planted_feature(family: str, cohort: dict[str, Path]) -> None:
    expr = read_matrix(cohort["expression"], "expression").to_numpy()
    feature = read_matrix(cohort["features"], "features")["tumour_original_glcm_Contrast"].to_numpy()
    y = (feature > np.median(feature)).astype(int)
    folds = list(StratifiedKFold(2, shuffle=True, random_state=0).split(expr, y))
    label, auc, model = best_baseline(family, expr, y, folds, seed=0)
    assert auc > 0.75, (label, auc)
    assert model.named_steps["scale"].mean_.shape == (expr.shape[1],)


# --- survival -------------------------------------------------------------------------------------


def test_survival_recovers_the_planted_hazard(cohort: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "surv"
    code, output = _run("research", "survival", "--features", str(cohort["features"]), "--clinical",
                        str(cohort["clinical"]), "--out", str(out), "--seed", "2", "--bootstraps", "200")
    assert code == 0, output
    s = json.loads((out / "survival.json").read_text())
    for key in ("c_index_train", "c_index_test", "c_index_test_ci", "c_index_train_ci", "logrank_p",
                "selected_features", "hazard_ratios", "c_index_cv"):
        assert key in s
    assert s["selected_features"][0] == SURVIVAL_FEATURE
    hr = s["hazard_ratios"][SURVIVAL_FEATURE]
    assert hr["ci95"][0] < math.exp(0.9) * 1.6 and hr["ci95"][1] > math.exp(0.9) / 1.6 and hr["hazard_ratio_per_sd"] > 1.5
    low, high = s["c_index_test_ci"]
    assert 0.5 < low < s["c_index_test"] < high and s["c_index_test"] > 0.65
    assert s["logrank_p"] < 0.01
    assert (out / "km.png").read_bytes()[:8] == PNG
    assert "not for clinical use" in s["note"] and s["method"] == "radnode-survival"


def test_survival_shuffled_control_is_at_chance(cohort: dict[str, Path]) -> None:
    feats = read_matrix(cohort["features"], "features")
    clin = pd.read_csv(cohort["clinical"], index_col="sample_id")
    shuffled = clin.iloc[np.random.default_rng(4).permutation(len(clin))]
    shuffled.index = clin.index
    result = run_survival(feats, shuffled[["time", "event"]], SurvivalOptions(seed=2, bootstraps=200))
    low, high = result.summary["c_index_test_ci"]
    assert low < 0.5 < high or abs(result.summary["c_index_test"] - 0.5) < 0.1
    assert result.summary["logrank_p"] > 0.01


# --- bad input ------------------------------------------------------------------------------------


def _bad_inputs(cohort: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    expr = pd.read_csv(cohort["expression"])
    feats = pd.read_csv(cohort["features"])
    expr.rename(columns={"sample_id": "patient"}).to_csv(tmp / "no_id.csv", index=False)
    broken = feats.astype(object)
    broken.loc[3, "tumour_original_glcm_Contrast"] = "abc"
    broken.to_csv(tmp / "text_cell.csv", index=False)
    feats.assign(sample_id="X" + feats["sample_id"]).to_csv(tmp / "other_ids.csv", index=False)
    (tmp / "foreign.gmt").write_text("HALLMARK_HYPOXIA\thttp://x\tVEGFA\tHIF1A\tLDHA\n", encoding="utf-8")
    clin = pd.read_csv(cohort["clinical"])
    clin["event"] = 0
    clin.loc[:3, "event"] = 1
    clin.to_csv(tmp / "few_events.csv", index=False)
    clin[["sample_id", "time", "age"]].to_csv(tmp / "no_classes.csv", index=False)
    common = ["--gene-sets", str(cohort["gene_sets"]), *FAST, "--baselines", "none"]
    return {
        "missing sample_id": (["research", "genemask", "--expression", str(tmp / "no_id.csv"), "--features",
                               str(cohort["features"]), *common], ["no_id.csv", "column 1", "sample_id", "patient"]),
        "non-numeric cell": (["research", "genemask", "--expression", str(cohort["expression"]), "--features",
                              str(tmp / "text_cell.csv"), *common],
                             ["text_cell.csv", "row 5", "tumour_original_glcm_Contrast", "expected a number", "abc"]),
        "no overlap": (["research", "genemask", "--expression", str(cohort["expression"]), "--features",
                        str(tmp / "other_ids.csv"), *common], ["other_ids.csv", "no sample_id in both"]),
        "gmt without matrix genes": (["research", "genemask", "--expression", str(cohort["expression"]), "--features",
                                      str(cohort["features"]), "--gene-sets", str(tmp / "foreign.gmt"), *FAST],
                                     ["foreign.gmt", "no gene", "HGNC"]),
        "clinical without histology or stage": (["research", "genemask", "--expression", str(cohort["expression"]),
                                                 "--features", str(cohort["features"]), "--clinical",
                                                 str(tmp / "no_classes.csv"), *common],
                                                ["no_classes.csv", "histology", "stage", "expected"]),
        "fewer events than folds": (["research", "survival", "--features", str(cohort["features"]), "--clinical",
                                     str(tmp / "few_events.csv"), "--folds", "5"],
                                    ["few_events.csv", "'event'", "fewer than the 5 CV folds"]),
    }


@pytest.mark.parametrize("case", ["missing sample_id", "non-numeric cell", "no overlap", "gmt without matrix genes",
                                  "clinical without histology or stage", "fewer events than folds"])
def test_bad_input_is_named_with_exit_2_and_nothing_written(case: str, cohort: dict[str, Path],
                                                            tmp_path: Path) -> None:
    args, expected = _bad_inputs(cohort, tmp_path)[case]
    out = tmp_path / "out"
    code, output = _run(*args, "--out", str(out))
    assert code == 2, output
    text = " ".join(output.split())
    for part in expected:
        assert part in text, (part, text)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_staged_output_leaves_an_existing_folder_untouched_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "masking.csv").write_text("old\n")
    with pytest.raises(ResearchInputError):
        with staged_output(out) as tmp:
            (tmp / "masking.csv").write_text("half\n")
            raise ResearchInputError("stop")
    assert (out / "masking.csv").read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_output(out) as tmp:
        (tmp / "masking.csv").write_text("new\n")
    assert (out / "masking.csv").read_text() == "new\n"


# --- feature database -----------------------------------------------------------------------------


def _series(folder: Path, patient: str, study_date: str) -> tuple[str, str]:
    folder.mkdir(parents=True)
    ds = Dataset()
    ds.PatientID, ds.StudyDate, ds.Modality = patient, study_date, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(folder / "1.dcm", enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _result(study: str, series: str, mean: float, created: str) -> dict[str, object]:
    """Shaped like the chain's result.json (``ChainResult.to_dict``)."""
    return {"radnode_version": "0.1.0", "pipeline_version": "1", "created": created, "status": "done",
            "input": {"study_instance_uid": study, "series_instance_uid": series},
            "models": {"tumour": {"method": "raseg", "version": "1.1.0", "demo": True}},
            "radiomics": {"engine": {"name": "pyradiomics", "version": "3.0.1"}, "regions": {
                "tumour": {"status": "done", "profile": "tumour-v1",
                           "features": {"original_firstorder_Mean": mean, "original_shape_Sphericity": 0.8}},
                "ring": {"status": "done", "profile": "ring-v1", "features": {"original_firstorder_Mean": mean - 50,
                                                                              "original_glcm_Contrast": None}},
                "lung": {"status": "failed", "profile": "lung-v1", "features": {}}}}}


def test_feature_database_records_and_exports(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'features.sqlite'}"
    rows = []
    for i, (patient, date) in enumerate([("PAT1", "20240105"), ("PAT2", "20240301")]):
        study, series = _series(tmp_path / f"s{i}", patient, date)
        result = tmp_path / f"result{i}.json"
        result.write_text(json.dumps(_result(study, series, 10.0 * (i + 1), f"2024-06-0{i + 1}T10:00:00+00:00")))
        rows.append(record_result(url, result, tmp_path / f"s{i}", job_id=i + 1))
        rows.append(record_result(url, result, tmp_path / f"s{i}", job_id=i + 1))  # reprocessed: replaced
    assert rows == [2, 2, 2, 2]
    with open_db(url).connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM research_features").scalar() == 4

    code, output = _run("research", "export", "--db", url, "--out", str(tmp_path / "feat.csv"))
    assert code == 0, output
    table = pd.read_csv(tmp_path / "feat.csv")
    assert list(table.columns[:5]) == ["sample_id", "ring_original_firstorder_Mean", "ring_original_glcm_Contrast",
                                       "tumour_original_firstorder_Mean", "tumour_original_shape_Sphericity"]
    assert {"study_instance_uid", "series_instance_uid", "pipeline_version", "segmentation_version",
            "radiomics_engine", "profiles"} <= set(table.columns)
    assert table.set_index("sample_id").loc["PAT2", "tumour_original_firstorder_Mean"] == 20.0
    assert math.isnan(table.set_index("sample_id").loc["PAT1", "ring_original_glcm_Contrast"])
    assert table.loc[0, "segmentation_version"] == "1.1.0"

    code, output = _run("research", "export", "--db", url, "--out", str(tmp_path / "feat.parquet"),
                        "--from", "2024-02-01", "--region", "tumour")
    assert code == 0, output
    recent = pd.read_parquet(tmp_path / "feat.parquet")
    assert recent["sample_id"].tolist() == ["PAT2"]
    assert [c for c in recent.columns if c.endswith("_Mean")] == ["tumour_original_firstorder_Mean"]

    pd.DataFrame({"patient_id": ["PAT2", "PAT9"], "time": [12.5, 3.0], "event": [1, 0]}).to_csv(
        tmp_path / "clin.csv", index=False)
    code, output = _run("research", "export", "--db", url, "--out", str(tmp_path / "joined.csv"), "--clinical",
                        str(tmp_path / "clin.csv"), "--region", "tumour")
    assert code == 0, output
    joined = pd.read_csv(tmp_path / "joined_clinical.csv")
    assert joined.to_dict("list") == {"sample_id": ["PAT2"], "time": [12.5], "event": [1]}
    features = read_matrix(tmp_path / "joined.csv", "features")  # the analyses read the export as FEAT.csv
    assert list(features.columns) == ["tumour_original_firstorder_Mean", "tumour_original_shape_Sphericity"]

    code, output = _run("research", "export", "--db", url, "--out", str(tmp_path / "complete.csv"), "--drop-incomplete")
    assert code == 0 and json.loads(output.strip().splitlines()[-1])["dropped_incomplete"] == 1
    assert "ring_original_glcm_Contrast" not in read_matrix(tmp_path / "complete.csv", "features").columns

    code, output = _run("research", "export", "--db", url, "--out", str(tmp_path / "x.csv"), "--from", "2024-13-01")
    assert code == 2 and "--from" in output


def test_the_service_adds_a_finished_jobs_features(tmp_path: Path) -> None:
    settings = Settings(storage={"data_dir": str(tmp_path / "data")})
    service = PipelineService(settings)
    study, series = _series(tmp_path / "in", "PAT7", "20240420")
    job = service.queue.enqueue(JobSpec(series_uid=series, study_uid=study, input_path=tmp_path / "in",
                                        pipeline_version="1"))
    claimed = service.queue.claim("w", 60)
    assert claimed is not None and claimed.id == job.id
    out = service.pool.out_dir(job)
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps(_result(study, series, 42.0, "2024-04-21T00:00:00+00:00")))
    done = service.queue.complete(job.id, "w", {"status": "done"})
    assert done.state is JobState.DONE
    service._job_finished(done, None)  # type: ignore[arg-type]
    exported = CliRunner().invoke(app, ["research", "export", "--out", str(tmp_path / "f.csv")],
                                  env={"RADNODE_STORAGE__DATA_DIR": str(tmp_path / "data")})
    assert exported.exit_code == 0, exported.output
    table = pd.read_csv(tmp_path / "f.csv")
    assert table["sample_id"].tolist() == ["PAT7"] and table.loc[0, "tumour_original_firstorder_Mean"] == 42.0
    assert table.loc[0, "job_id"] == job.id and table.loc[0, "series_instance_uid"] == series
