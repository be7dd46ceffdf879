"""RA-Seg inference: sliding window, post-processing, deep features, candidates, whole flow."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from radnode.models.candidates import Box, DetectorParams, box_from_mask, detect_candidates
from radnode.models.inference import (
    MAX_AUTO_THREADS,
    InferenceError,
    InferenceSettings,
    capture_stage,
    configure_cpu_threads,
    deep_feature_vector,
    postprocess_mask,
    predict_probabilities,
    resolve_device,
    segment_ct,
)
from radnode.models.raseg import RASeg, RASegConfig

TINY = RASegConfig(channels=(8, 16, 32, 64))
SPACING_ZYX = (1.5, 1.0, 1.0)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _settings(**overrides) -> InferenceSettings:
    return InferenceSettings(**{"device": "cpu", "num_threads": 1, **overrides})


class PointwiseStub(nn.Module):
    """Tumour logit = 6·image + 2·box − 4 per voxel, recording each window's size.

    Pointwise, so the stitched sliding-window result must equal the formula everywhere;
    a misaligned window or a swapped image/box channel would show.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY
        self.windows: list[tuple[int, ...]] = []

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        self.windows.append(tuple(image.shape[2:]))
        logit = 6 * image + 2 * bbox - 4
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def test_sliding_window_stitches_windows_exactly() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((23, 40, 37), dtype=np.float32)
    box = Box((5, 10, 3), (15, 30, 20)).mask(image.shape)
    stub = PointwiseStub()
    probs = predict_probabilities(stub, image, box, _settings(roi_size=(16, 16, 16), overlap=0.5))
    expected = 1 / (1 + np.exp(-(6 * image + 2 * box - 4)))
    assert probs.shape == image.shape
    assert np.allclose(probs, expected, atol=1e-5)
    assert len(stub.windows) > 8 and set(stub.windows) == {(16, 16, 16)}


def test_sliding_window_with_the_network_on_a_larger_input() -> None:
    model = RASeg(TINY)
    rng = np.random.default_rng(1)
    image = rng.random((20, 44, 41), dtype=np.float32)
    box = Box((4, 10, 10), (12, 30, 30)).mask(image.shape)
    with capture_stage(model.decoders[0]) as seen:
        probs = predict_probabilities(model, image, box, _settings(roi_size=(16, 24, 24), overlap=0.25))
    assert probs.shape == image.shape and probs.dtype == np.float32
    assert np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1
    assert len(seen) > 1 and all(t.shape[2:] == (16, 24, 24) for t in seen)


def test_deep_feature_vector_is_the_stage_mean_over_the_tumour() -> None:
    model = RASeg(TINY).eval()
    rng = np.random.default_rng(2)
    image = rng.random((24, 24, 24), dtype=np.float32)
    box = Box((6, 4, 8), (16, 14, 18)).mask(image.shape)
    tumour = np.zeros(image.shape, bool)
    tumour[8:14, 6:12, 10:16] = True  # even bounds: whole voxels of the half-resolution stage
    settings = _settings(roi_size=(32, 32, 32))
    vector = deep_feature_vector(model, image, box, tumour, settings)
    assert vector.shape == (TINY.feature_channels,) == (model.feature_stage[0].conv.out_channels,)
    with torch.no_grad(), capture_stage(model.feature_stage) as seen:
        model(torch.from_numpy(image)[None, None], torch.from_numpy(box)[None, None])
    stage = seen[0][0]  # (C, 12, 12, 12)
    assert np.allclose(vector, stage[:, 4:7, 3:6, 5:8].mean(dim=(1, 2, 3)).numpy(), atol=1e-5)
    other = np.zeros_like(tumour)
    other[0:4, 0:4, 0:4] = True
    assert not np.allclose(vector, deep_feature_vector(model, image, box, other, settings))
    with pytest.raises(InferenceError, match="non-empty"):
        deep_feature_vector(model, image, box, np.zeros_like(tumour), settings)


def _ball(shape: tuple[int, ...], centre_mm: tuple[float, ...], radius_mm: float, spacing=SPACING_ZYX) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    dist2 = sum(((g * s) - c) ** 2 for g, s, c in zip(grids, spacing, centre_mm))
    return dist2 <= radius_mm**2


def test_postprocess_drops_tiny_and_outside_components_and_fills_holes() -> None:
    shape = (30, 60, 60)
    lung = np.zeros(shape, bool)
    lung[:, :, :30] = True  # the left half is lung
    tumour = _ball(shape, (22, 20, 14), 9)
    hollow = tumour & ~_ball(shape, (22, 20, 14), 4)
    tiny = np.zeros(shape, bool)
    tiny[3:5, 50:52, 5:7] = True  # 8 voxels = 12 mm³, in the lung
    outside = _ball(shape, (22, 40, 46), 8)  # mediastinum side, no lung
    cleaned = postprocess_mask(hollow | tiny | outside, lung, SPACING_ZYX, min_component_mm3=30.0)
    assert np.array_equal(cleaned, tumour)
    # The size threshold is what drops the small blob: below 12 mm³ it stays.
    kept = postprocess_mask(hollow | tiny, lung, SPACING_ZYX, min_component_mm3=10.0, fill_holes=False)
    assert np.array_equal(kept, hollow | tiny)


def test_device_and_thread_selection() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="models.device"):
            resolve_device("cuda")
    try:
        assert configure_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        auto = configure_cpu_threads(None)
        assert auto == min(len(os.sched_getaffinity(0)), MAX_AUTO_THREADS) == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    with pytest.raises(InferenceError, match="overlap"):
        InferenceSettings(overlap=1.5)
    with pytest.raises(InferenceError, match="roi_sise"):
        InferenceSettings.from_dict({"roi_sise": [1, 2, 3]})


def _tube(shape, p0, p1, radius_mm, spacing=SPACING_ZYX) -> np.ndarray:
    grids = [g * s for g, s in zip(np.ogrid[tuple(slice(0, n) for n in shape)], spacing)]
    p0, d = np.asarray(p0, float), np.asarray(p1, float) - np.asarray(p0, float)
    t = sum((g - a) * b for g, a, b in zip(grids, p0, d)) / float(d @ d)
    t = np.clip(t, 0, 1)
    return sum((g - a - t * b) ** 2 for g, a, b in zip(grids, p0, d)) <= radius_mm**2


def test_candidate_detector_finds_the_blob_and_ignores_vessels() -> None:
    shape = (50, 90, 90)
    lung = _ball(shape, (37, 45, 45), 44)
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    hu[_tube(shape, (10, 10, 10), (65, 80, 80), 1.5)] = 40  # thin vessel
    hu[_tube(shape, (15, 70, 15), (60, 20, 70), 4.0)] = 40  # thick but long vessel
    tumour = _ball(shape, (40, 30, 58), 7)
    hu[tumour] = 20
    hu[_tube(shape, (40, 30, 58), (40, 5, 80), 1.5) & lung] = 40  # vessel feeding the tumour
    candidates = detect_candidates(hu, lung, SPACING_ZYX, DetectorParams())
    assert len(candidates) == 1
    best = candidates[0]
    truth = box_from_mask(tumour, SPACING_ZYX)
    assert np.allclose(best.centroid_zyx, np.argwhere(tumour).mean(axis=0), atol=1.0)
    assert all(a <= b for a, b in zip(best.box.start, truth.start))
    assert all(a >= b for a, b in zip(best.box.stop, truth.stop))
    assert best.elongation < 1.5 and best.radius_mm > 5


class BoxThresholdStub(nn.Module):
    """Stands in for a trained network: tumour = dense voxels inside the box."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        logit = 30 * (image - 0.3) * bbox - 10 * (1 - bbox)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def test_segment_ct_maps_the_tumour_back_onto_the_ct_grid() -> None:
    # A CT at 0.8 x 0.8 x 2 mm (x, y, z): body, lungs, vessels and one 8 mm tumour.
    shape, spacing = (40, 96, 96), (2.0, 0.8, 0.8)
    lung = _ball(shape, (40, 38, 38), 36, spacing)
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    hu[_tube(shape, (5, 10, 10), (75, 70, 70), 1.2, spacing) & lung] = 40
    tumour = _ball(shape, (44, 30, 46), 8, spacing)
    hu[tumour] = 25
    ct = sitk.GetImageFromArray(hu.astype(np.int16))
    ct.SetSpacing(spacing[::-1])
    ct.SetOrigin((-40.0, -30.0, 100.0))
    result = segment_ct(BoxThresholdStub(), ct, lung, settings=_settings(deep_features=False, roi_size=(32, 48, 48)))
    dice = 2 * (result.mask.astype(bool) & tumour).sum() / (result.mask.astype(bool).sum() + tumour.sum())
    assert result.mask.shape == shape and dice > 0.9
    assert result.grid.box is not None and result.grid.candidates
    assert {"preprocess", "detect", "network", "postprocess", "inverse"} <= set(result.grid.timings)
    image = result.mask_image()
    assert image.GetSpacing() == ct.GetSpacing() and image.GetOrigin() == ct.GetOrigin()


def test_several_candidates_find_a_second_tumour_that_one_box_misses() -> None:
    # Two tumours of different size: the detector ranks the larger first; with one box
    # only it is segmented, with two boxes both are (probabilities combined by maximum).
    shape, spacing = (40, 96, 96), (2.0, 0.8, 0.8)
    lung = _ball(shape, (40, 38, 38), 36, spacing)
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    big, small = _ball(shape, (44, 24, 24), 9, spacing), _ball(shape, (36, 52, 52), 6, spacing)
    hu[big | small] = 25
    ct = sitk.GetImageFromArray(hu.astype(np.int16))
    ct.SetSpacing(spacing[::-1])
    found = {}
    for count in (1, 2):
        settings = _settings(deep_features=False, roi_size=(32, 48, 48), max_candidates=count, context_mm=8.0)
        result = segment_ct(BoxThresholdStub(), ct, lung, settings=settings)
        mask = result.mask.astype(bool)
        found[count] = (mask[big].mean(), mask[small].mean(), len(result.grid.boxes), len(result.grid.regions))
    assert found[1][0] > 0.8 and found[1][1] < 0.05 and found[1][2:] == (1, 1)
    assert found[2][0] > 0.8 and found[2][1] > 0.8 and found[2][2:] == (2, 2)


def test_max_candidates_must_be_positive() -> None:
    with pytest.raises(InferenceError, match="max_candidates"):
        _settings(max_candidates=0)


@pytest.mark.parametrize("margin", [0.0, 2.0, 4.5])
def test_lung_margin_cuts_the_bleed_outside_the_lung_exactly(margin: float) -> None:
    from scipy import ndimage

    shape = (30, 60, 60)
    lung = np.zeros(shape, dtype=bool)
    lung[:, :, :30] = True  # lung on the left half, mediastinum on the right
    blob = _ball(shape, (22, 30, 30), 12)  # straddles the boundary
    kept = postprocess_mask(blob, lung, SPACING_ZYX, min_component_mm3=0, fill_holes=False, lung_margin_mm=margin)
    # Brute force on the whole grid: the distance of every voxel to the lung.
    distance = ndimage.distance_transform_edt(~lung, sampling=SPACING_ZYX)
    assert np.array_equal(kept, blob & (distance <= margin))
    assert kept.sum() < blob.sum()
    unlimited = postprocess_mask(blob, lung, SPACING_ZYX, min_component_mm3=0, fill_holes=False)
    assert np.array_equal(unlimited, blob)
