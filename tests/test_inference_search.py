"""Inference for juxta-mediastinal, large and multiple tumours: search region, growing boxes,
selection by confidence, flip TTA. Stub networks make the expected masks exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from radnode.models.candidates import Box, box_from_mask
from radnode.models.inference import (
    InferenceError,
    InferenceSettings,
    postprocess_components,
    postprocess_mask,
    predict_coarse,
    predict_box,
    predict_probabilities,
    segment_preprocessed,
    tumour_search_region,
)
from radnode.models.preprocess import PreprocessedCase, PreprocessParams, PreprocessRecord
from radnode.models.raseg import RASegConfig

SPACING = (1.5, 1.0, 1.0)
TINY = RASegConfig(channels=(8, 16, 32, 64))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _settings(**overrides) -> InferenceSettings:
    return InferenceSettings(**{"device": "cpu", "num_threads": 1, "deep_features": False,
                                "roi_size": (16, 48, 48), "min_component_mm3": 0.0, **overrides})


def _case(image: np.ndarray, lung: np.ndarray) -> PreprocessedCase:
    params = PreprocessParams()
    record = PreprocessRecord(
        ct_size_zyx=image.shape, ct_spacing_zyx=SPACING, origin_xyz=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), params=params,
        resampled_size_zyx=image.shape, crop_start=(0, 0, 0), crop_stop=image.shape,
    )
    return PreprocessedCase(image=image.astype(np.float32), lung=lung, record=record)


def _disc(shape_yx, centre, radius) -> np.ndarray:
    yy, xx = np.ogrid[: shape_yx[0], : shape_yx[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _chest(nz: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Two round lungs around a mediastinum; the right one (low x) has a medial bay.

    Returns (lung, bay): ``bay`` (rows 31-49, columns 40-50) lies in the right lung's
    concavity, inside the chord between its horns (x ≈ 51) and outside the lung mask: where
    a hilar or juxta-mediastinal tumour sits.
    """
    ny, nx = 80, 120
    plane = _disc((ny, nx), (40, 30), 24) | _disc((ny, nx), (40, 90), 24)
    plane[30:51, 40:62] = False  # the bay, open towards the mediastinum
    bay = np.zeros((ny, nx), dtype=bool)
    bay[31:50, 40:51] = True
    return np.repeat(plane[None], nz, axis=0), np.repeat(bay[None], nz, axis=0)


class BoxThresholdStub(nn.Module):
    """Tumour = bright voxels inside the box (logit 30·(image − 0.8) there, −10 outside)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        logit = 30 * (image - 0.8) * bbox - 10 * (1 - bbox)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


class ReachStub(nn.Module):
    """Like an attention network that sees only a little past its box: bright voxels within
    ``reach`` voxels of the box (in-plane) are tumour, nothing farther."""

    def __init__(self, reach: int = 4) -> None:
        super().__init__()
        self.config = TINY
        self.reach = reach

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        k = 2 * self.reach + 1
        near = torch.nn.functional.max_pool3d(bbox, (1, k, k), stride=1, padding=(0, self.reach, self.reach))
        logit = torch.where(near > 0, 30 * (image - 0.8), torch.full_like(image, -10.0))
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


# --------------------------------------------------------------------------- search region
def test_search_region_covers_the_medial_bay_but_not_the_mediastinum() -> None:
    lung, bay = _chest()
    region = tumour_search_region(lung, "hull")
    assert (region & lung).sum() == lung.sum()
    assert region[bay].all(), "the hilar bay must be searchable"
    mediastinum = np.zeros_like(lung)
    mediastinum[:, 30:50, 55:63] = True  # between the two lungs' hulls
    assert not (region & mediastinum).any()
    assert np.array_equal(tumour_search_region(lung, "lung"), lung)
    # Only the flagged slices get hulls.
    some = np.zeros(lung.shape[0], dtype=bool)
    some[3] = True
    partial = tumour_search_region(lung, "hull", some)
    assert partial[3][bay[3]].all() and not partial[5][bay[5]].any()


def test_juxta_mediastinal_tumour_part_is_kept_with_the_hull_and_cut_with_the_lung() -> None:
    lung, bay = _chest()
    image = np.zeros(lung.shape, dtype=np.float32)
    tumour = np.zeros_like(lung)
    tumour[2:10] = _disc((80, 120), (40, 42), 6)  # partly in the lung, mostly in the bay
    image[tumour] = 1.0
    outside = tumour & ~lung
    assert outside.sum() > 0.3 * tumour.sum()
    box = Box((0, 25, 25), (12, 56, 62))
    kept = {}
    for mode in ("lung", "hull"):
        seg = segment_preprocessed(BoxThresholdStub(), _case(image, lung),
                                   _settings(search_region=mode, lung_margin_mm=2.0), box=box)
        kept[mode] = seg.mask
        assert seg.search is not None
    assert kept["hull"][tumour].all() and not (kept["hull"] & ~tumour).any()
    # With the lung mask as the region only the 2 mm margin of the bay survives.
    near = ndimage.distance_transform_edt(~lung, sampling=SPACING) <= 2.0
    assert np.array_equal(kept["lung"], tumour & near) and kept["lung"][outside].mean() < 0.5


def test_detection_in_the_search_region_finds_a_tumour_outside_the_lung_mask() -> None:
    lung, bay = _chest(nz=16)
    params = PreprocessParams()
    hu = np.where(lung, -850.0, 40.0)
    hu[bay] = -120.0  # fat in the bay
    tumour = np.zeros_like(lung)
    tumour[3:13] = _disc((80, 120), (40, 45), 4)  # entirely in the bay, outside the lung mask
    decoy = np.zeros_like(lung)
    decoy[5:11] = _disc((80, 120), (40, 90), 4)  # smaller soft-tissue blob in the left lung
    hu[tumour | decoy] = 40.0
    image = params.normalise(hu).astype(np.float32)
    image[tumour] = 1.0  # what the stub network calls tumour
    found = {}
    for inside in (False, True):
        seg = segment_preprocessed(
            BoxThresholdStub(), _case(image, lung),
            _settings(search_region="hull", detect_in_search_region=inside, max_candidates=1),
        )
        found[inside] = (seg.mask & tumour).sum() / tumour.sum()
    assert found[True] > 0.9 and found[False] < 0.1


# --------------------------------------------------------------------------- growing boxes
def test_a_large_tumour_beyond_its_first_box_is_segmented_by_growing_the_box() -> None:
    shape = (12, 96, 120)
    lung = np.ones(shape, dtype=bool)
    image = np.zeros(shape, dtype=np.float32)
    tumour = np.zeros(shape, dtype=bool)
    tumour[2:10, 30:60, 10:110] = True  # 100 mm long
    image[tumour] = 1.0
    first = Box((0, 25, 8), (12, 65, 40))  # covers its first 30 mm only
    settings = _settings(context_mm=10.0, max_box_mm=160.0)
    stub = ReachStub(reach=4)
    plain = segment_preprocessed(stub, _case(image, lung), settings, box=first)
    grown = segment_preprocessed(stub, _case(image, lung), settings.__class__(**{**settings.to_dict(), "box_growth_rounds": 8}), box=first)
    assert plain.mask[tumour].mean() < 0.4
    assert grown.mask[tumour].all() and not (grown.mask & ~tumour).any()
    assert grown.boxes[0].stop[2] >= 110 and grown.boxes[0] != first
    # A tumour inside its box does not grow it.
    inner = np.zeros(shape, dtype=np.float32)
    inner[4:8, 35:50, 15:30] = 1.0
    same = segment_preprocessed(stub, _case(inner, lung), replace_settings(settings, box_growth_rounds=3), box=first)
    assert same.boxes == [first]


def test_box_growth_is_bounded_by_max_box_mm() -> None:
    shape = (12, 96, 200)
    lung = np.ones(shape, dtype=bool)
    image = np.zeros(shape, dtype=np.float32)
    image[2:10, 30:60, 5:195] = 1.0
    first = Box((0, 25, 5), (12, 65, 40))
    seg = segment_preprocessed(ReachStub(4), _case(image, lung),
                               _settings(context_mm=10.0, box_growth_rounds=20, max_box_mm=80.0), box=first)
    assert max(b - a for a, b in zip(seg.boxes[0].start, seg.boxes[0].stop)) <= 80


def replace_settings(settings: InferenceSettings, **overrides) -> InferenceSettings:
    return InferenceSettings.from_dict(settings.to_dict(), **overrides)


# --------------------------------------------------------------------------- confidence
def test_low_confidence_components_are_dropped_and_the_strongest_kept() -> None:
    shape = (10, 40, 60)
    lung = np.ones(shape, dtype=bool)
    probability = np.zeros(shape, dtype=np.float32)
    probability[2:8, 5:15, 5:15] = 0.95  # confident tumour, 600 voxels
    probability[2:8, 25:35, 40:55] = 0.6  # doubtful blob, 900 voxels (larger!)
    probability[2:6, 25:30, 5:10] = 0.9  # small confident blob, 100 voxels
    mask = probability >= 0.5
    args = (mask, lung, SPACING, 0.0, 0.1, False, None)
    assert np.array_equal(postprocess_mask(*args), mask)
    kept = postprocess_mask(*args, probability=probability, min_component_confidence=0.7)
    assert np.array_equal(kept, mask & (probability > 0.7))
    top, masses = postprocess_components(*args, probability=probability, max_components=1)
    assert np.array_equal(top, probability == 0.95)  # mass 570 beats 540 and 90
    # Every eligible component's summed probability (mL at 1.5 mm³ a voxel), the dropped ones too.
    assert masses == pytest.approx([v * 1.5 / 1000 for v in (570.0, 540.0, 90.0)], rel=1e-5)
    _kept, confident = postprocess_components(*args, probability=probability, min_component_confidence=0.7)
    assert confident == pytest.approx([v * 1.5 / 1000 for v in (570.0, 90.0)], rel=1e-5)
    assert postprocess_components(*args)[1] == []
    with pytest.raises(InferenceError, match="probability"):
        postprocess_mask(*args, probability=probability[:5], min_component_confidence=0.7)


class ConfidenceStub(nn.Module):
    """Probability = the image value inside the box (a network as sure as the image says)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        p = (image * bbox).clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_confidence_selection_in_the_whole_flow_drops_a_doubtful_box() -> None:
    lung, _bay = _chest(nz=14)
    params = PreprocessParams()
    hu = np.where(lung, -850.0, 40.0)
    image = params.normalise(hu).astype(np.float32)
    sure = np.zeros_like(lung)
    sure[3:11] = _disc((80, 120), (40, 22), 7)
    doubt = np.zeros_like(lung)
    doubt[3:11] = _disc((80, 120), (40, 98), 9)  # larger: the detector ranks it first
    image[sure] = 0.97
    image[doubt] = 0.62
    case = _case(image, lung)
    both = segment_preprocessed(ConfidenceStub(), case, _settings(max_candidates=2))
    assert both.mask[sure].all() and both.mask[doubt].all()
    assert both.candidates[0].volume_mm3 > both.candidates[1].volume_mm3
    chosen = segment_preprocessed(ConfidenceStub(), case, _settings(max_candidates=2, min_component_confidence=0.8))
    assert chosen.mask[sure].all() and not chosen.mask[doubt].any()


# --------------------------------------------------------------------------- TTA
class AsymmetricStub(nn.Module):
    """A network that is not mirror-symmetric: the logit follows x (and the image)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        x = torch.linspace(-2, 2, image.shape[-1]).view(1, 1, 1, 1, -1)
        logit = 3 * image + x * bbox
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def test_flip_tta_is_the_mean_of_the_unflipped_passes() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((8, 24, 24), dtype=np.float32)
    box = np.ones_like(image)
    stub = AsymmetricStub()
    plain = predict_probabilities(stub, image, box, _settings(roi_size=(8, 24, 24)))
    flipped = np.flip(predict_probabilities(stub, np.ascontiguousarray(image[:, :, ::-1]), box,
                                            _settings(roi_size=(8, 24, 24))), 2)
    tta = predict_box(stub, image, box, _settings(roi_size=(8, 24, 24), tta_flips=(2,)))
    assert np.allclose(tta, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(tta, plain, atol=1e-3)
    assert np.array_equal(predict_box(stub, image, box, _settings(roi_size=(8, 24, 24))), plain)


# --------------------------------------------------------------------------- coarse pass
class EdgeStub(nn.Module):
    """A network with a short reach: tumour only where a bright voxel has a dark one within
    4 voxels, so the core of a mass wider than that stays unseen (as in a large homogeneous GTV)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = TINY

    def forward(self, image: torch.Tensor, bbox: torch.Tensor) -> torch.Tensor:
        near_dark = torch.nn.functional.max_pool3d((image < 0.5).float(), 9, stride=1, padding=4)
        logit = torch.where((image >= 0.5) & (near_dark > 0) & (bbox > 0), 6.0, -6.0)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def _mass(nz: int = 24, size: int = 96, radius: int = 16) -> tuple[np.ndarray, np.ndarray, Box]:
    image = np.zeros((nz, size, size), dtype=np.float32)
    mass = np.zeros(image.shape, dtype=bool)
    mass[4:nz - 4] = _disc((size, size), (size // 2, size // 2), radius)
    image[mass] = 1.0
    return image, mass, box_from_mask(mass, SPACING)


def test_the_coarse_pass_finds_the_core_of_a_mass_wider_than_the_network_sees() -> None:
    image, mass, box = _mass()
    case = _case(image, np.ones(image.shape, dtype=bool))
    centre = (12, 48, 48)
    plain = _settings(context_mm=10.0, coarse_min_box_mm=0.0)
    fine = segment_preprocessed(EdgeStub(), case, plain, box=box)
    core = ndimage.binary_erosion(mass, np.ones((3, 3, 3)), iterations=5)  # beyond the reach of 4
    assert fine.probability[centre] < 0.01 and fine.probability[core].max() < 0.01  # a rim only
    coarse = segment_preprocessed(EdgeStub(), case, replace_settings(plain, coarse_factor=4.0), box=box)
    assert coarse.probability[centre] > 0.5 and (coarse.probability[core] >= 0.5).mean() > 0.8
    assert np.all(coarse.probability >= fine.probability - 1e-6)  # max: the coarse pass only adds
    assert (coarse.mask & ~ndimage.binary_dilation(mass, iterations=3)).sum() == 0  # and stays on the mass
    averaged = segment_preprocessed(EdgeStub(), case, replace_settings(plain, coarse_factor=4.0, coarse_combine="mean"),
                                    box=box)
    # mean: where the fine pass saw nothing, half the coarse probability; never above the maximum
    assert averaged.probability[centre] == pytest.approx(coarse.probability[centre] / 2, abs=0.01)
    assert np.all(averaged.probability <= coarse.probability + 1e-6)
    # A box below coarse_min_box_mm (the mass is 32 mm wide) gets no coarse pass.
    small = segment_preprocessed(EdgeStub(), case, replace_settings(plain, coarse_factor=4.0, coarse_min_box_mm=40.0),
                                 box=box)
    assert np.array_equal(small.probability, fine.probability)


def test_the_coarse_pass_returns_a_blob_where_it_was() -> None:
    image = np.zeros((20, 60, 70), dtype=np.float32)
    blob = np.zeros(image.shape, dtype=bool)
    blob[4:12, 8:28, 40:62] = True  # off-centre, not a multiple of the factor
    image[blob] = 0.95
    back = predict_coarse(ConfidenceStub(), image, np.ones_like(image), 2.0, _settings(roi_size=(16, 48, 48)))
    assert back.shape == image.shape
    found = back >= 0.5
    assert 2 * (found & blob).sum() / (found.sum() + blob.sum()) > 0.9


def test_new_settings_are_validated_and_round_trip() -> None:
    for bad in ({"search_region": "chest"}, {"tta_flips": (3,)}, {"tta_flips": (2, 2)},
                {"min_component_confidence": 1.0}, {"max_components": 0}, {"box_growth_rounds": -1},
                {"coarse_factor": 1.0}, {"coarse_combine": "min"}):
        with pytest.raises(InferenceError):
            _settings(**bad)
    settings = _settings(search_region="hull", tta_flips=(2,), box_growth_rounds=1, min_component_confidence=0.7,
                         coarse_factor=2.0, coarse_combine="mean")
    again = InferenceSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert again == settings


# --------------------------------------------------------------------------- a real CT
def test_on_a_real_ct_the_nodule_is_kept_and_the_doubtful_components_dropped(shared_data: Path) -> None:
    # LIDC-IDRI-0003 with the shipped demo weights (a training case: this checks the
    # mechanism on real anatomy, not accuracy). The detector's runner-up boxes bring
    # vessel/pleura components along with the nodule; keeping the component with the
    # largest summed probability keeps the nodule and drops them.
    from scipy import ndimage as ndi

    from radnode.models.bundle import load_bundle
    from radnode.models.inference import segment_ct
    from radnode.models.lungmask import segment_lungs
    from radnode.models.metrics import dice
    from radnode.models.training.real_cases import REAL_CASES
    from radnode.models.tumour import DEMO_BUNDLE_PATH

    ct, truth = REAL_CASES["LIDC-IDRI-0003"](shared_data)
    lung = segment_lungs(ct).lungs.astype(np.uint8)
    bundle = load_bundle(DEMO_BUNDLE_PATH)
    base = bundle.inference_settings(device="cpu", num_threads=1, deep_features=False)
    every = segment_ct(bundle.model, ct, lung, settings=replace_settings(base, max_candidates=6, max_components=None))
    best = segment_ct(bundle.model, ct, lung, settings=replace_settings(base, max_candidates=6, max_components=1))
    labels, count = ndi.label(every.mask, np.ones((3, 3, 3)))
    strays = [i for i in range(1, count + 1) if not truth[labels == i].any()]
    assert strays, "the runner-up boxes should have produced components away from the nodule"
    assert ndi.label(best.mask, np.ones((3, 3, 3)))[1] == 1
    assert dice(best.mask != 0, truth) > dice(every.mask != 0, truth)
    assert dice(best.mask != 0, truth) > 0.6
