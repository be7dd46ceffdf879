"""The processing chain end to end on a synthetic chest: stages, phases, objects, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from radnode.config import settings_from_mapping
from radnode.dicom_io.seg_writer import seg_to_masks
from radnode.dicom_io.series import load_series
from radnode.models.bundle import save_bundle
from radnode.models.raseg import RASeg, RASegConfig
from radnode.phantom import generate_phantom
from radnode.pipeline.chain import PIPELINE_VERSION, run_chain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate_phantom(out, seed=11, slices=48, tumors=1, matrix=256, tumor_types=["solid"])
    return out


@pytest.fixture(scope="module")
def chain_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, list[str], bool]]]:
    out = tmp_path_factory.mktemp("out")
    phases: list[tuple[str, list[str], bool]] = []

    def on_phase(name: str, files: dict[str, Path]) -> None:
        # Record which objects each phase handed over, and that they were on disk by then.
        phases.append((name, sorted(files), all(p.is_file() for p in files.values())))

    # The lungs-only path (no tumour model); the bundled demo model has its own tests.
    settings = settings_from_mapping({"models": {"segmentation_bundle": "none"}})
    result = run_chain(phantom / "ct", out, settings, on_phase=on_phase)
    assert result.status == "done", result.error
    return out, phases


def test_contours_are_delivered_before_the_report(chain_run: tuple[Path, list]) -> None:
    _, phases = chain_run
    assert phases == [("contours", ["RTSTRUCT", "SEG"], True), ("report", ["SR"], True)]


def test_lungs_in_the_seg_match_the_phantom_truth(chain_run: tuple[Path, list], phantom: Path) -> None:
    out, _ = chain_run
    series = load_series(phantom / "ct")
    masks = seg_to_masks(out / "SEG.dcm", series)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "lungs.nii.gz")))
    assert dice(masks["Lung right"], truth == 1) > 0.9
    assert dice(masks["Lung left"], truth == 2) > 0.9


def test_result_json_names_stages_models_and_outputs(chain_run: tuple[Path, list], phantom: Path) -> None:
    out, _ = chain_run
    payload = json.loads((out / "result.json").read_text())
    assert payload["pipeline_version"] == PIPELINE_VERSION
    assert [s["name"] for s in payload["stages"]] == [
        "models", "load_and_qc", "lung_mask", "tumour", "regions", "measurements", "write_contours",
        "clinician_contour", "radiomics", "mutations", "write_report", "overlays",
    ]
    # Without a tumour, radiomics runs on the whole lung and says why the others were skipped.
    regions = payload["radiomics"]["regions"]
    assert regions["lung"]["status"] == "done" and regions["lung"]["feature_count"] > 1000
    assert regions["tumour"]["status"] == "skipped" and regions["tumour"]["notes"]
    assert payload["radiomics"]["engine"]["name"] == "pyradiomics"
    assert payload["phases"] == ["contours", "report"]
    assert {payload["outputs"][k] for k in ("SEG", "RTSTRUCT", "SR")} == {"SEG.dcm", "RTSTRUCT.dcm", "SR.dcm"}
    for view in ("axial", "coronal", "sagittal", "grid"):  # overlay previews for the dashboard
        png = out / payload["outputs"][f"overlay_{view}"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", view
    # Without a configured bundle no tumour is invented, and the result says why.
    assert payload["models"]["tumour"]["method"] == "none"
    assert payload["models"]["tumour"]["voxels"] == 0
    assert any("segmentation_bundle" in note for note in payload["models"]["tumour"]["notes"])
    volumes = {r["name"]: r["volume_ml"] for r in payload["regions"]}
    truth = sitk.ReadImage(str(phantom / "truth" / "lungs.nii.gz"))
    voxel_ml = float(np.prod(truth.GetSpacing())) / 1000.0
    truth_ml = float((sitk.GetArrayFromImage(truth) == 1).sum()) * voxel_ml
    assert volumes["Lung right"] == pytest.approx(truth_ml, rel=0.1)
    assert volumes["Tumour"] == 0.0


def test_objects_reference_the_source_study_and_name_the_software(chain_run: tuple[Path, list], phantom: Path) -> None:
    out, _ = chain_run
    source = pydicom.dcmread(next((phantom / "ct").glob("*.dcm")), stop_before_pixels=True)
    for name in ("SEG.dcm", "RTSTRUCT.dcm", "SR.dcm"):
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.Manufacturer == "radnode"
        assert any("radnode" in str(v) for v in ds.SoftwareVersions)


def test_rerun_gives_the_same_uids(chain_run: tuple[Path, list], phantom: Path, tmp_path: Path) -> None:
    out, _ = chain_run
    run_chain(phantom / "ct", tmp_path, settings_from_mapping({"models": {"segmentation_bundle": "none"}}))
    for name in ("SEG.dcm", "RTSTRUCT.dcm", "SR.dcm"):
        first = pydicom.dcmread(out / name, stop_before_pixels=True)
        again = pydicom.dcmread(tmp_path / name, stop_before_pixels=True)
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)


def test_configured_bundle_is_run_and_named_in_every_output(phantom: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = RASegConfig(channels=(4, 8, 16, 32), num_res_units=1)
    bundle = save_bundle(
        RASeg(config),
        tmp_path / "tiny-bundle",
        name="tiny-untrained",
        version="0.0.1-test",
        training_data="none (untrained, wiring test)",
        metrics={},
        intended_use="tests only",
        demo=True,
        inference={"roi_size": [32, 64, 64], "device": "cpu"},
    )
    settings = settings_from_mapping({"models": {"segmentation_bundle": str(bundle), "device": "cpu"}})
    result = run_chain(phantom / "ct", tmp_path / "out", settings)
    assert result.status == "done", result.error
    payload = json.loads((tmp_path / "out" / "result.json").read_text())
    assert payload["models"]["tumour"]["method"] == "tiny-untrained"
    assert payload["models"]["tumour"]["version"] == "0.0.1-test"
    assert payload["models"]["tumour"]["demo"] is True
    sr = pydicom.dcmread(tmp_path / "out" / "SR.dcm")
    assert any("tiny-untrained 0.0.1-test" in str(v) for v in sr.SoftwareVersions)
    text = json.dumps(sr.to_json_dict())
    assert "demo" in text


def test_broken_bundle_fails_the_job_with_a_clear_error(phantom: Path, tmp_path: Path) -> None:
    settings = settings_from_mapping({"models": {"segmentation_bundle": str(tmp_path / "missing.zip")}})
    result = run_chain(phantom / "ct", tmp_path / "out", settings)
    assert result.status == "failed"
    assert "missing.zip" in (result.error or "")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "failed"


# --- phase 2: radiomics, mutation classifiers, SR content --------------------------------


def _truth_tumour_run(phantom: Path, out: Path, settings_data: dict) -> dict:
    """Run the chain's stages with the phantom's true tumour as the segmentation."""
    from radnode.models.tumour import TumourSegmentation
    from radnode.pipeline import chain

    settings = settings_from_mapping(settings_data)
    out.mkdir(parents=True)
    series = chain.load_and_check(phantom / "ct", settings)
    lungs = chain.find_lungs(series)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom / "truth" / "tumor.nii.gz"))) > 0
    tumour = TumourSegmentation(mask=truth, method="truth", version="1", demo=True)
    regions = chain.make_regions(series, lungs, tumour, settings)
    written = chain.writer_regions(lungs, regions)
    stats = chain.measure_regions(series, written)
    radiomics = chain.compute_radiomics(series, regions, settings)
    mutations = chain.predict_mutations(radiomics, settings)
    options = chain.WriterOptions.from_settings(
        settings.output, pipeline_version=PIPELINE_VERSION, sr_features=tuple(settings.radiomics.sr_features)
    )
    algorithm = chain.algorithm_info(tumour)
    _, seg = chain.write_contours(series, written, algorithm, options, out)
    content = chain.measurement_set(stats, chain.radiomics_for_sr(radiomics, written), mutations)
    chain.write_report(series, seg, content, chain.report_algorithm(algorithm, radiomics), options, out)
    return {"radiomics": radiomics, "mutations": mutations, "sr": pydicom.dcmread(out / "SR.dcm")}


def _tiny_classifier(tmp_path: Path, names: list[str]) -> Path:
    from radnode.models.classifiers.bundle import save_classifier_bundle
    from radnode.models.classifiers.endpoints import get_endpoint
    from radnode.models.classifiers.table import FeatureTable
    from radnode.models.classifiers.training import TrainingOptions, train_classifier

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    values = rng.normal(size=(40, len(names))) + y[:, None]
    table = FeatureTable(tuple(f"c{i}" for i in range(40)), tuple(names), values)
    bundle = train_classifier(
        table, y, get_endpoint("EGFR"), "A", training_cohort={"description": "random test data"}, demo=True,
        options=TrainingOptions(method_a_reducers=("pca",), method_a_classifiers=("rf",)),
    )
    path = tmp_path / "egfr"
    save_classifier_bundle(bundle, path)
    return path


def test_phase_two_puts_features_and_predictions_in_the_sr(phantom: Path, tmp_path: Path) -> None:
    good = _tiny_classifier(tmp_path / "good", ["tumour_original_firstorder_Mean", "ring_original_firstorder_Mean"])
    bad = _tiny_classifier(tmp_path / "bad", ["tumour_no_such_feature"])
    run = _truth_tumour_run(
        phantom,
        tmp_path / "out",
        {"radiomics": {"parallel": False}, "models": {"classifier_bundles": {"EGFR": str(good), "KRAS": str(bad)}}},
    )
    radiomics = run["radiomics"]
    assert {r: radiomics.regions[r].status for r in ("tumour", "ring", "lung")} == {
        "tumour": "done", "ring": "done", "lung": "done",
    }
    assert len(radiomics.regions["tumour"].features) > 1000
    # The matching bundle predicted; the mismatching one says which feature is missing.
    (prediction,) = run["mutations"].predictions
    assert prediction.endpoint == "EGFR" and 0.0 <= prediction.probability <= 1.0
    assert "tumour_no_such_feature" in run["mutations"].errors["KRAS"]
    text = json.dumps(run["sr"].to_json_dict())
    assert "EGFR" in text and "demo" in text
    assert "pyradiomics" in " ".join(str(v) for v in run["sr"].SoftwareVersions)
    # The SR carries the configured feature subset for the tumour, with its value.
    mean = radiomics.regions["tumour"].features["original_firstorder_Mean"]
    assert f"{mean:.6g}"[:6] in text or str(round(mean, 6))[:6] in text


def test_a_failing_radiomics_stage_still_delivers_the_sr(phantom: Path, tmp_path: Path) -> None:
    settings = settings_from_mapping({"radiomics": {"profiles": {"lung": str(tmp_path / "missing-profile.yaml")}}})
    phases: list[str] = []
    result = run_chain(phantom / "ct", tmp_path / "out", settings, on_phase=lambda name, files: phases.append(name))
    assert result.status == "done"
    assert phases == ["contours", "report"]
    payload = json.loads((tmp_path / "out" / "result.json").read_text())
    assert "missing-profile.yaml" in payload["radiomics"]["error"]
    assert any(w.startswith("radiomics:") for w in payload["warnings"])
    assert (tmp_path / "out" / "SR.dcm").is_file()
