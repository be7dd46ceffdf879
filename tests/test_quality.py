"""The reference-free contour quality score: signals, test-time augmentation, calibration."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from radnode.models.bundle import read_bundle_meta
from radnode.models.candidates import Box
from radnode.models.inference import GridSegmentation, InferenceSettings, postprocess_mask
from radnode.models.preprocess import PreprocessedCase, PreprocessParams, PreprocessRecord
from radnode.models.quality import (
    CALIBRATION_FILE,
    COMPETING_DETECTION,
    COMPETITOR_RATIO,
    DEFAULT_THRESHOLD,
    UNCERTAIN_TEXT,
    WEIGHTS,
    QualityCalibration,
    QualityError,
    TTAParams,
    assess_contour,
    calibration_for,
    competitor_ratio,
    contour_signals,
    judge,
    tta_agreement,
)
from radnode.models.tumour import DEMO_BUNDLE_PATH
from radnode.phantom import synthesize_volume

SPACING = (1.5, 1.0, 1.0)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU, lungs, tumour) of a small synthetic chest with one solid tumour."""
    volume = synthesize_volume(5, slices=40, tumors=1, matrix=128, tumor_types=["solid"],
                               tumor_diameter_mm=(25.0, 30.0))
    return volume.hu, volume.lungs != 0, volume.tumors != 0


def smooth_probability(mask: np.ndarray, peak: float) -> np.ndarray:
    """A probability map that is ``peak`` well inside ``mask`` and falls off across its border."""
    return (ndimage.gaussian_filter(mask.astype(np.float32), 1.0) * peak).astype(np.float32)


def test_a_good_contour_scores_above_a_corrupted_one(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _hu, lungs, tumour = phantom
    spacing = (2.5, 1.0, 1.0)
    good = contour_signals(tumour, smooth_probability(tumour, 0.98), lungs, spacing, tta_dice=[0.93, 0.9])
    # Corrupted the way a wrong GTV looks: bleeding out of the lung, scattered islands,
    # a hesitant network, and augmentations that disagree.
    rng = np.random.default_rng(1)
    corrupted = ndimage.binary_dilation(tumour, iterations=6) | ((rng.random(tumour.shape) > 0.9995) & ~lungs)
    probability = np.where(corrupted, rng.uniform(0.45, 0.7, tumour.shape), 0.0).astype(np.float32)
    bad = contour_signals(corrupted, probability, lungs, spacing, tta_dice=[0.35, 0.2])
    assert bad.components > good.components == 1
    assert bad.outside_lung_fraction > good.outside_lung_fraction
    assert bad.probability_mean < good.probability_mean

    calibration = QualityCalibration(threshold=0.6, calibrated=True)
    verdict_good, verdict_bad = judge(good, calibration), judge(bad, calibration)
    assert verdict_good.score is not None and verdict_bad.score is not None
    assert verdict_good.score > 0.8 > 0.6 > verdict_bad.score
    assert not verdict_good.uncertain and verdict_good.reasons == []
    assert verdict_bad.uncertain and "tta_agreement" in verdict_bad.reasons
    payload = verdict_bad.to_dict()
    assert payload["flag"] == UNCERTAIN_TEXT and payload["uncertain"] is True
    assert json.loads(json.dumps(payload))["signals"]["components"] == bad.components


def test_each_signal_moves_the_score_by_its_weight(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _hu, lungs, tumour = phantom
    base = contour_signals(tumour, smooth_probability(tumour, 0.98), lungs, (2.5, 1.0, 1.0), tta_dice=[1.0])
    calibration = QualityCalibration(threshold=0.5, calibrated=True)
    before = judge(base, calibration)
    worse = judge(replace(base, tta_dice=(0.0,)), calibration)
    assert before.score - worse.score == pytest.approx(WEIGHTS["tta_agreement"], abs=1e-6)
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


def test_a_competing_detection_flags_a_contour_whatever_its_score(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _hu, lungs, tumour = phantom
    assert competitor_ratio([14.3, 13.2, 11.9], max_components=1) == pytest.approx(13.2 / 14.3)
    assert competitor_ratio([14.3, 13.2, 1.0], max_components=2) == pytest.approx(1.0 / 13.2)
    assert competitor_ratio([14.3], max_components=1) is None  # nothing was chosen between
    assert competitor_ratio([14.3, 13.2], max_components=None) is None  # both kept
    calibration = QualityCalibration(threshold=0.6, calibrated=True)
    clear = contour_signals(tumour, smooth_probability(tumour, 0.98), lungs, (2.5, 1.0, 1.0), [0.95],
                            competitor=competitor_ratio([250.0, 57.0], 1))
    assert not judge(clear, calibration).uncertain
    rival = replace(clear, competitor_ratio=competitor_ratio([14.3, 13.2], 1))
    verdict = judge(rival, calibration)
    assert verdict.score == judge(clear, calibration).score > 0.6  # the score is not what flags it
    assert verdict.uncertain and verdict.reasons[0] == COMPETING_DETECTION
    assert verdict.to_dict()["signals"]["competitor_ratio"] == pytest.approx(13.2 / 14.3, abs=1e-4)
    just_below = replace(clear, competitor_ratio=COMPETITOR_RATIO - 0.01)
    assert not judge(just_below, calibration).uncertain
    # A model's calibration sets its own share.
    assert judge(just_below, replace(calibration, competitor_ratio=0.3)).uncertain


def test_no_contour_is_not_flagged_and_empty_signals_are_refused(phantom: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _hu, lungs, tumour = phantom
    verdict = judge(None, QualityCalibration(threshold=0.6, calibrated=True))
    assert verdict.score is None and not verdict.uncertain and verdict.reasons == ["no tumour contour"]
    with pytest.raises(QualityError, match="non-empty"):
        contour_signals(np.zeros_like(tumour), np.zeros(tumour.shape, np.float32), lungs, SPACING)


# --- test-time augmentation through the real inference functions -------------------------


class ThresholdNet(torch.nn.Module):
    """A stand-in network that is certain: tumour where the image is bright (flip/shift invariant)."""

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        logit = (image - 0.5) * 40.0
        return torch.cat([-logit, logit], dim=1)


class NoisyNet(torch.nn.Module):
    """A stand-in network that guesses: its answer depends on where the window falls."""

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        z, y, x = image.shape[2:]
        grid = torch.meshgrid(torch.arange(z), torch.arange(y), torch.arange(x), indexing="ij")
        pattern = torch.sin(grid[0] * 1.7 + grid[1] * 2.3 + grid[2] * 0.9)[None, None] * 3.0
        logit = (image - 0.5) * 2.0 + pattern
        return torch.cat([-logit, logit], dim=1)


def _case_and_grid(model: torch.nn.Module, settings: InferenceSettings) -> tuple[PreprocessedCase, GridSegmentation]:
    from radnode.models.inference import predict_probabilities

    shape = (24, 48, 48)
    zz, yy, xx = np.indices(shape)
    ball = ((zz - 12) * 1.5) ** 2 + (yy - 22) ** 2 + (xx - 27) ** 2 <= 9**2
    image = np.where(ball, 0.9, 0.2).astype(np.float32)
    lung = np.ones(shape, dtype=bool)
    record = PreprocessRecord(shape, SPACING, (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), PreprocessParams(),
                              shape, (0, 0, 0), shape)
    case = PreprocessedCase(image, lung, record)
    box = Box((4, 8, 8), (20, 40, 44))
    probability = predict_probabilities(model, image, box.mask(shape), settings)
    mask = postprocess_mask(probability >= 0.5, lung, SPACING)
    grid = GridSegmentation(mask, probability, [box], [box], [], None, {})
    return case, grid


def test_tta_agreement_separates_a_stable_network_from_a_guessing_one() -> None:
    settings = InferenceSettings(roi_size=(16, 32, 32), device="cpu", num_threads=1, deep_features=False)
    params = TTAParams(flip_axes=(2,), shift_vox=(3, 5, 5))
    case, grid = _case_and_grid(ThresholdNet(), settings)
    stable = tta_agreement(ThresholdNet(), case, grid, settings, params)
    assert len(stable) == 2 and min(stable) > 0.97
    case, grid = _case_and_grid(NoisyNet(), settings)
    assert grid.mask.any()
    guessing = tta_agreement(NoisyNet(), case, grid, settings, params)
    assert len(guessing) == 2 and max(guessing) < 0.9 * min(stable)

    verdict = assess_contour(NoisyNet(), case, grid, settings, QualityCalibration(0.6, True), params)
    assert verdict.signals is not None and verdict.signals.tta_dice == tuple(guessing)
    assert verdict.seconds > 0


def test_tta_judges_a_large_tumour_with_the_coarse_pass_it_was_found_with(monkeypatch: pytest.MonkeyPatch) -> None:
    from radnode.models import inference

    calls: list[tuple[int, ...]] = []
    real = inference.predict_coarse

    def counted(model, image, box_mask, factor, settings):  # type: ignore[no-untyped-def]
        calls.append(image.shape)
        return real(model, image, box_mask, factor, settings)

    monkeypatch.setattr(inference, "predict_coarse", counted)
    base = dict(roi_size=(16, 32, 32), device="cpu", num_threads=1, deep_features=False, coarse_factor=2.0)
    # The ball is 18 mm wide: with the 5 mm box margin on each side its box is 28 mm.
    large = InferenceSettings(**base, coarse_min_box_mm=25.0)
    case, grid = _case_and_grid(ThresholdNet(), large)
    agreement = tta_agreement(ThresholdNet(), case, grid, large, TTAParams(flip_axes=(2,), shift_vox=(3, 5, 5)))
    assert len(calls) == 2 and agreement == pytest.approx([1.0, 1.0], abs=0.05)  # the flip and the shift
    calls.clear()
    small = InferenceSettings(**base, coarse_min_box_mm=30.0)
    tta_agreement(ThresholdNet(), case, grid, small, TTAParams(flip_axes=(2,)))
    assert calls == []


# --- calibration ----------------------------------------------------------------------------


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "calibrate_contour_quality.py"
    spec = importlib.util.spec_from_file_location("calibrate_contour_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_calibration_is_what_the_script_computes_from_its_cases() -> None:
    meta = read_bundle_meta(DEMO_BUNDLE_PATH)
    entries = json.loads(CALIBRATION_FILE.read_text())["calibrations"]
    (entry,) = [e for e in entries if (e["model_name"], e["model_version"]) == (meta.name, meta.version)]
    assert entry["weights"] == WEIGHTS, "the score's weights changed: rerun scripts/calibrate_contour_quality.py"
    summary = _script().summarise(entry["rows"])
    for key in ("threshold", "auc", "auc_ci95", "n", "n_good", "n_bad", "sensitivity_bad", "specificity_good",
                "auc_lidc_crops", "auc_per_part", "competitor_ratio", "competing_detection_flags",
                "verdict_sensitivity_bad", "verdict_specificity_good"):
        assert summary[key] == entry[key], key
    assert entry["n"] == len(entry["rows"]) and entry["n_good"] + entry["n_bad"] == entry["n"]
    sets = {r["set"] for r in entry["rows"]}
    assert "lidc_crop" in sets and len(sets & {"real_ct_in_training", "real_ct_held_out"}) == 1, sets
    # No crop of a patient in the model's training set.
    seen = _script().training_patients(meta)
    assert {"LIDC-IDRI-0001", "LIDC-IDRI-0003"} <= set(seen)
    assert not [r for r in entry["rows"] if r["set"] == "lidc_crop" and r["case"].split("_")[0] in seen]
    # The chain uses this entry for the shipped model.
    found = calibration_for(meta.name, meta.version, DEMO_BUNDLE_PATH)
    assert found.calibrated and found.threshold == entry["threshold"] and found.auc == entry["auc"]
    assert found.competitor_ratio == entry["competitor_ratio"]


def test_calibration_crops_leave_out_every_patient_the_model_was_trained_on(shared_data: Path) -> None:
    script = _script()
    trained_on = {"LIDC-IDRI-0004", "LIDC-IDRI-0005"}
    meta = SimpleNamespace(extra={"training": {"crop_patients": sorted(trained_on)}})
    seen = script.training_patients(meta)
    assert set(seen) == trained_on | {"LIDC-IDRI-0001", "LIDC-IDRI-0003"}
    every = {p.name.split("_")[0] for p in script.crop_files(shared_data, 10_000)}
    assert trained_on <= every, "the test needs crops of these patients in the shared data"
    drawn = {p.name.split("_")[0] for p in script.crop_files(shared_data, 10_000, seen=seen)}
    assert drawn and not drawn & set(seen)
    assert script.training_patients(SimpleNamespace(extra={})) == ("LIDC-IDRI-0001", "LIDC-IDRI-0003")


def test_the_competitor_gate_is_the_middle_of_the_best_plateau() -> None:
    gate = _script().competitor_gate
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.5])
    good = np.array([True, True, False, False, True, False])
    ratios = np.array([0.0, 0.2, 0.4, 0.46, 0.05, 0.0])  # the bad ones above every good one
    found = gate(scores, ratios, good, threshold=0.7)
    assert 0.2 < found <= 0.4 and found == pytest.approx(0.3)  # between the plateau's ends (0.3 and 0.43 midpoints)
    assert not ((ratios >= found) & good).any() and ((ratios >= found) | (scores < 0.7))[~good].all()
    # When a competitor never separates, the gate sits above every ratio: it never fires.
    assert gate(scores, np.array([0.0, 0.9, 0.0, 0.0, 0.0, 0.0]), good, threshold=0.7) > 0.9


def test_youden_threshold_flags_the_bad_contours() -> None:
    script = _script()
    scores = np.array([0.2, 0.3, 0.4, 0.7, 0.8, 0.9])
    good = np.array([False, False, False, True, True, True])
    threshold, sensitivity, specificity = script.youden_threshold(scores, good)
    assert 0.4 < threshold < 0.7 and sensitivity == specificity == 1.0
    threshold, sensitivity, specificity = script.youden_threshold(np.array([0.2, 0.6, 0.5, 0.9]),
                                                                  np.array([False, False, True, True]))
    assert (scores < threshold).sum() >= 1 and 0.0 < sensitivity <= 1.0 and 0.0 < specificity <= 1.0


def test_calibration_lookup_prefers_the_bundle_and_falls_back_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "quality_calibration.json").write_text(json.dumps(
        {"calibrations": [{"model_name": "mine", "model_version": "2", "threshold": 0.42, "auc": 0.8, "n": 30}]}
    ))
    own = calibration_for("mine", "2", tmp_path)
    assert own.calibrated and own.threshold == 0.42 and own.source == "quality_calibration.json"
    other = calibration_for("mine", "3", tmp_path)
    assert not other.calibrated and other.threshold == DEFAULT_THRESHOLD
    assert "not calibrated" in judge(None, other).notes[0]
    (tmp_path / "quality_calibration.json").write_text("{not json")
    with pytest.raises(QualityError, match="quality_calibration.json"):
        calibration_for("mine", "2", tmp_path)


def test_the_augmented_region_is_one_window_around_the_largest_component() -> None:
    from radnode.models.quality import _assessed_region, _largest_component_box

    settings = InferenceSettings(roi_size=(16, 32, 32), device="cpu")
    mask = np.zeros((60, 120, 120), dtype=bool)
    mask[10:50, 20:100, 30:110] = True  # larger than one window on every axis
    mask[55:58, 5:8, 5:8] = True  # a far island
    region = _assessed_region(_largest_component_box(mask, SPACING), mask.shape, SPACING, settings, TTAParams())
    assert region.shape == (16, 32, 32)
    centre = [(a + b) / 2 for a, b in zip(region.start, region.stop)]
    assert centre == pytest.approx([30, 60, 70], abs=1)
    small = np.zeros_like(mask)
    small[20:24, 50:56, 50:56] = True
    region = _assessed_region(_largest_component_box(small, SPACING), small.shape, SPACING, settings,
                              TTAParams(margin_mm=3.0))
    assert region.start == (18, 47, 47) and region.stop == (26, 59, 59)  # the box + 3 mm, under the cap
