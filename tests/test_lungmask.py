"""Classical lung mask: real clinical lung contours, tumours kept inside, phantom truth, orientation.

The real cases are NSCLC-Radiomics LUNG1-002 and LUNG1-003 (``../shared/data``): their
planning RTSTRUCTs hold "Lung R"/"Lung L" and the GTVs. The clinical lung contours
*exclude* the GTV and our mask deliberately *includes* it, so the lung that carries
GTV-1 is compared with "Lung ∪ GTV-1". LUNG1-002's "Lung L" repeats identical contours
on some slices, which even-odd rasterisation turns into empty slices (29, 30, 37, 43,
44), so Dice is taken over the slices where the clinical lung is contoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from radnode.dicom_io.rtstruct_read import rasterise_roi
from radnode.dicom_io.series import load_series
from radnode.models.lungmask import (
    LEFT_LUNG,
    RIGHT_LUNG,
    LungMaskParams,
    LungMaskResult,
    segment_lungs,
)
from radnode.models.metrics import dice
from radnode.phantom import SyntheticVolume, synthesize_volume

#: Minimum Dice against the clinical lung (∪ GTV-1 on the tumour side), per lung.
MIN_CLINICAL_DICE = 0.94


@dataclass
class RealCase:
    name: str
    image: sitk.Image
    lung_r: np.ndarray
    lung_l: np.ndarray
    gtvs: dict[str, np.ndarray]
    tumour_side: int
    result: LungMaskResult


def _load_case(root: Path, name: str, gtvs: tuple[str, ...], tumour_side: int) -> RealCase:
    case = root / "nsclc_radiomics" / name
    series = load_series(case / "CT")
    rtstruct = case / "RTSTRUCT" / "1.dcm"
    return RealCase(
        name=name,
        image=series.image,
        lung_r=rasterise_roi(rtstruct, series, "Lung R"),
        lung_l=rasterise_roi(rtstruct, series, "Lung L"),
        gtvs={g: rasterise_roi(rtstruct, series, g) for g in gtvs},
        tumour_side=tumour_side,
        result=segment_lungs(series.image),
    )


@pytest.fixture(scope="module")
def real_cases(shared_data: Path) -> dict[str, RealCase]:
    # GTV-1 of LUNG1-002 (358 mL) lies in the right lung, GTV-1 of LUNG1-003 in the left
    # apex against the spine; LUNG1-003's GTV-2 is a supraclavicular node, outside the lungs.
    return {
        "LUNG1-002": _load_case(shared_data, "LUNG1-002", ("GTV-1",), RIGHT_LUNG),
        "LUNG1-003": _load_case(shared_data, "LUNG1-003", ("GTV-1", "GTV-2"), LEFT_LUNG),
    }


def _contoured_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    slices = truth.any(axis=(1, 2))
    return dice(pred[slices], truth[slices])


def _inside(mask: np.ndarray, region: np.ndarray) -> float:
    return float((mask & region).sum()) / float(mask.sum())


@pytest.mark.parametrize("name", ["LUNG1-002", "LUNG1-003"])
def test_real_case_matches_clinical_lungs(real_cases: dict[str, RealCase], name: str) -> None:
    case = real_cases[name]
    result = case.result
    assert result.labels.dtype == np.uint8
    assert result.labels.shape == sitk.GetArrayViewFromImage(case.image).shape
    assert set(np.unique(result.labels)) == {0, RIGHT_LUNG, LEFT_LUNG}
    assert result.trachea_found
    gtv1 = case.gtvs["GTV-1"]
    truth = {
        RIGHT_LUNG: case.lung_r | (gtv1 if case.tumour_side == RIGHT_LUNG else False),
        LEFT_LUNG: case.lung_l | (gtv1 if case.tumour_side == LEFT_LUNG else False),
    }
    for label, reference in truth.items():
        score = _contoured_dice(result.labels == label, reference)
        assert score >= MIN_CLINICAL_DICE, f"{name} label {label}: Dice {score:.4f}"
    # Volumes reported match the labels.
    voxel_ml = float(np.prod(result.spacing)) / 1000.0
    assert result.right_volume_ml == pytest.approx((result.labels == RIGHT_LUNG).sum() * voxel_ml)


def test_large_tumour_not_carved_out(real_cases: dict[str, RealCase]) -> None:
    """LUNG1-002's 358 mL GTV touches chest wall and mediastinum: it stays in the lung."""
    case = real_cases["LUNG1-002"]
    gtv = case.gtvs["GTV-1"]
    # The clinical lung contour holds only about 16 % of it: thresholding alone would not.
    assert _inside(gtv, case.lung_r) < 0.3
    assert _inside(gtv, case.result.right) >= 0.9
    assert _inside(gtv, case.result.voi) >= 0.98
    assert case.result.mirror_fill_ml > 50.0


def test_apical_tumour_kept_and_node_left_out(real_cases: dict[str, RealCase]) -> None:
    case = real_cases["LUNG1-003"]
    assert _inside(case.gtvs["GTV-1"], case.lung_l) < 0.5
    assert _inside(case.gtvs["GTV-1"], case.result.left) >= 0.8
    assert _inside(case.gtvs["GTV-1"], case.result.voi) >= 0.98
    # GTV-2 is a supraclavicular lymph node: not lung, and the mask must not grow into it.
    assert _inside(case.gtvs["GTV-2"], case.result.lungs) < 0.05


def test_right_lung_is_patient_right(real_cases: dict[str, RealCase]) -> None:
    """Label 1 sits at smaller LPS x (patient right), computed through the direction matrix."""
    case = real_cases["LUNG1-003"]
    image = case.image
    centroids = {}
    for label in (RIGHT_LUNG, LEFT_LUNG):
        z, y, x = np.argwhere(case.result.labels == label).mean(axis=0)
        centroids[label] = image.TransformContinuousIndexToPhysicalPoint((x, y, z))[0]
    assert centroids[RIGHT_LUNG] < centroids[LEFT_LUNG]
    assert dice(case.result.right, case.lung_r) > 0.9


# --- phantom ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> SyntheticVolume:
    return synthesize_volume(10, slices=60, tumors=2, matrix=256, tumor_types=("juxtapleural",))


@pytest.fixture(scope="module")
def phantom_result(phantom: SyntheticVolume) -> LungMaskResult:
    return segment_lungs(phantom.image("hu"))


def test_phantom_lungs_match_truth(phantom: SyntheticVolume, phantom_result: LungMaskResult) -> None:
    for label in (RIGHT_LUNG, LEFT_LUNG):
        score = dice(phantom_result.labels == label, phantom.lungs == label)
        assert score >= 0.95, f"label {label}: Dice {score:.4f}"


def test_phantom_juxtapleural_tumours_stay_inside(phantom: SyntheticVolume, phantom_result: LungMaskResult) -> None:
    without_fill = segment_lungs(
        phantom.image("hu"),
        params=LungMaskParams(ball_radius_mm=0, pocket_radius_mm=0, mirror_fill=False),
    )
    big = max(range(1, int(phantom.tumors.max()) + 1), key=lambda i: (phantom.tumors == i).sum())
    tumour = phantom.tumors == big
    assert _inside(tumour, phantom_result.lungs) >= 0.8
    assert _inside(tumour, phantom_result.lungs) > _inside(tumour, without_fill.lungs) + 0.1
    for index in range(1, int(phantom.tumors.max()) + 1):
        assert _inside(phantom.tumors == index, phantom_result.voi) >= 0.99


def test_orientation_follows_direction_matrix(phantom: SyntheticVolume, phantom_result: LungMaskResult) -> None:
    """Store the columns mirrored (direction x = -1): labels must follow the patient."""
    image = phantom.image("hu")
    array = sitk.GetArrayFromImage(image)[:, :, ::-1].copy()
    flipped = sitk.GetImageFromArray(array)
    flipped.SetSpacing(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    flipped.SetDirection(tuple(direction.ravel()))
    last_column = image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0))
    flipped.SetOrigin(last_column)
    result = segment_lungs(flipped)
    back = result.labels[:, :, ::-1]
    assert dice(back == RIGHT_LUNG, phantom_result.right) > 0.99
    assert dice(back == LEFT_LUNG, phantom_result.left) > 0.99


def test_array_input_equals_image_input(phantom: SyntheticVolume, phantom_result: LungMaskResult) -> None:
    image = phantom.image("hu")
    array = sitk.GetArrayFromImage(image)
    result = segment_lungs(array, spacing=image.GetSpacing()[::-1])
    assert np.array_equal(result.labels, phantom_result.labels)
    assert any("identity" in note for note in result.notes)


# --- synthetic chest: touching lungs, no trachea ---------------------------------------------------


def _box_chest(bridge: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A soft-tissue body with two ellipsoidal lungs, optionally joined by an air bridge."""
    shape = (50, 160, 200)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - 80) / 70.0) ** 2 + ((x - 100) / 95.0) ** 2 <= 1.0
    hu[np.broadcast_to(body, shape)] = 40.0
    right = ((z - 25) / 22.0) ** 2 + ((y - 80) / 45.0) ** 2 + ((x - 62) / 30.0) ** 2 <= 1.0
    left = ((z - 25) / 22.0) ** 2 + ((y - 80) / 45.0) ** 2 + ((x - 138) / 30.0) ** 2 <= 1.0
    hu[right | left] = -850.0
    if bridge:
        hu[15:35, 60:64, 90:111] = -850.0  # a 4-pixel-thick junction line between the lungs
    rng = np.random.default_rng(0)
    hu += rng.normal(0, 15, shape).astype(np.float32)
    return hu.astype(np.int16), right, left


def test_touching_lungs_are_split() -> None:
    hu, right, left = _box_chest(bridge=True)
    result = segment_lungs(hu, spacing=(2.5, 1.0, 1.0))
    assert result.split == "erosion"
    assert not result.trachea_found
    assert dice(result.right, right) > 0.95
    assert dice(result.left, left) > 0.95


def test_separate_lungs_need_no_split() -> None:
    hu, right, left = _box_chest(bridge=False)
    result = segment_lungs(hu, spacing=(2.5, 1.0, 1.0))
    assert result.split == "components"
    assert dice(result.right, right) > 0.95


def test_no_lung_gives_empty_labels() -> None:
    hu = np.full((20, 64, 64), 40, dtype=np.int16)
    hu[:, :4, :] = -1000
    result = segment_lungs(hu, spacing=(2.5, 1.0, 1.0))
    assert not result.labels.any()
    assert result.split == "none"


# --- input validation ------------------------------------------------------------------------------


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3-D"):
        segment_lungs(np.zeros((10, 10)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segment_lungs(np.zeros((4, 10, 10)))
    with pytest.raises(ValueError, match="spacing"):
        segment_lungs(np.zeros((4, 10, 10)), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="direction"):
        segment_lungs(np.zeros((4, 10, 10)), spacing=(1, 1, 1), direction=(1, 0, 0))
    with pytest.raises(ValueError, match="ball_radius_mm"):
        LungMaskParams(ball_radius_mm=-1)
    with pytest.raises(ValueError, match="airway_max_hu"):
        LungMaskParams(airway_start_hu=-800, airway_max_hu=-900)
