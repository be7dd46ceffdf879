"""``radnode evaluate seg``: metrics CSV, overlay PNGs, NIfTI / DICOM SEG / RTSTRUCT inputs, CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import typer
from PIL import Image
from typer.testing import CliRunner

from radnode.cli import evaluate_cmd
from radnode.dicom_io.regions import AlgorithmInfo, Region
from radnode.dicom_io.rtstruct_read import rasterise_roi
from radnode.dicom_io.rtstruct_writer import build_rtstruct
from radnode.dicom_io.seg_writer import build_seg
from radnode.dicom_io.series import CTSeries, load_series
from radnode.models.evaluation import (
    PRED_COLOUR,
    TRUTH_COLOUR,
    EvaluationError,
    evaluate_cases,
)
from radnode.models.metrics import evaluate_segmentation

SPACING_ZYX = (2.0, 0.75, 0.625)  # exact in float32 (NIfTI stores float32 spacings)
ALGORITHM = AlgorithmInfo(name="radnode-test", version="0.0.1")


def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii_mm: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s / r) ** 2 for g, c, s, r in zip(grid, centre, SPACING_ZYX, radii_mm)) <= 1.0


def _write(mask: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    sitk.WriteImage(image, str(path))


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def _colour_pixels(png: Path, colour: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB"))
    return int(np.all(pixels == colour, axis=-1).sum())


@pytest.fixture()
def nifti_cases(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    shape = (20, 64, 72)
    cases = {
        "shifted": (_ellipsoid(shape, (10, 33, 38), (8, 9, 7)), _ellipsoid(shape, (10, 30, 36), (8, 10, 8))),
        "smaller": (_ellipsoid(shape, (9, 30, 30), (5, 5, 5)), _ellipsoid(shape, (9, 30, 30), (8, 8, 8))),
        "missed": (np.zeros(shape, bool), _ellipsoid(shape, (10, 40, 40), (6, 6, 6))),
    }
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    pred_dir.mkdir()
    truth_dir.mkdir()
    for name, (pred, truth) in cases.items():
        _write(pred, pred_dir / f"{name}.nii.gz")
        _write(truth, truth_dir / f"{name}.nii.gz")
    (pred_dir / "notes.txt").write_text("not an image")
    return pred_dir, truth_dir, cases


def test_csv_equals_the_metrics_of_each_case(tmp_path: Path, nifti_cases) -> None:
    pred_dir, truth_dir, cases = nifti_cases
    out = tmp_path / "out"
    results = evaluate_cases(pred_dir, truth_dir, out, tolerance_mm=1.5)
    rows = _rows(out / "metrics.csv")
    assert set(rows) == set(cases) == {r.case_id for r in results}
    for name, (pred, truth) in cases.items():
        expected = evaluate_segmentation(pred, truth, SPACING_ZYX, tolerance_mm=1.5).as_dict()
        for key, value in expected.items():
            if isinstance(value, float):
                got = float(rows[name][key])
                assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-9), (name, key)
    assert float(rows["missed"]["dice"]) == 0.0 and math.isnan(float(rows["missed"]["hd95_mm"]))
    assert 0.5 < float(rows["shifted"]["dice"]) < 1.0


def test_overlay_pngs_show_both_outlines(tmp_path: Path, nifti_cases) -> None:
    pred_dir, truth_dir, _cases = nifti_cases
    out = tmp_path / "out"
    evaluate_cases(pred_dir, truth_dir, out)
    for name in ("shifted", "smaller"):
        png = out / f"{name}.png"
        image = Image.open(png)
        assert image.size[0] >= 384 and image.size[1] >= 384
        assert _colour_pixels(png, TRUTH_COLOUR) > 50
        assert _colour_pixels(png, PRED_COLOUR) > 50
    assert _colour_pixels(out / "missed.png", TRUTH_COLOUR) > 50
    assert _colour_pixels(out / "missed.png", PRED_COLOUR) == 0
    summary = np.asarray(Image.open(out / "summary.png").convert("RGB"))
    assert summary.shape[0] > 60 and len(np.unique(summary.reshape(-1, 3), axis=0)) > 3


def test_overlay_is_drawn_on_the_largest_reference_slice(tmp_path: Path) -> None:
    shape = (12, 40, 40)
    truth = np.zeros(shape, bool)
    truth[3, 10:14, 10:14] = True
    truth[8, 5:35, 5:35] = True  # the largest slice
    pred = np.zeros(shape, bool)
    pred[3, 20:30, 20:30] = True  # only on the small slice: no red on slice 8
    _write(pred, tmp_path / "p.nii.gz")
    _write(truth, tmp_path / "t.nii.gz")
    evaluate_cases(tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", tmp_path / "out")
    png = tmp_path / "out" / "p.png"
    assert _colour_pixels(png, TRUTH_COLOUR) > 30 * 4 * 10 and _colour_pixels(png, PRED_COLOUR) == 0


@pytest.fixture(scope="module")
def ibsi(shared_data: Path) -> tuple[Path, Path, CTSeries, np.ndarray]:
    root = shared_data / "ibsi_ct_phantom"
    series = load_series(root / "dicom" / "image")
    rtstruct = root / "dicom" / "mask" / "DCM_RS_00060.dcm"
    return root / "dicom" / "image", rtstruct, series, rasterise_roi(rtstruct, series, "GTV-1")


def test_dicom_seg_prediction_against_real_rtstruct(tmp_path: Path, ibsi) -> None:
    ct_dir, rtstruct, series, gtv = ibsi
    pred = np.zeros_like(gtv)
    pred[:, 3:, 2:] = gtv[:, :-3, :-2]  # the reference moved by 3 rows and 2 columns
    seg = build_seg(series, [Region.of_kind("tumour", pred)], ALGORITHM)
    seg_file = tmp_path / "pred.dcm"
    seg.save_as(seg_file)
    out = tmp_path / "out"
    results = evaluate_cases(seg_file, rtstruct, out, ct=ct_dir, truth_roi="GTV-1")
    spacing = tuple(reversed(series.image.GetSpacing()))
    expected = evaluate_segmentation(pred, gtv, spacing)
    assert len(results) == 1 and results[0].case_id == series.series_instance_uid
    row = next(iter(_rows(out / "metrics.csv").values()))
    assert float(row["dice"]) == pytest.approx(expected.dice, rel=1e-12)
    assert float(row["hd95_mm"]) == pytest.approx(expected.hd95_mm, rel=1e-12)
    assert float(row["volume_truth_ml"]) == pytest.approx(358.7, rel=0.01)  # IBSI README
    png = results[0].png
    assert png is not None and _colour_pixels(png, PRED_COLOUR) > 50 and _colour_pixels(png, TRUTH_COLOUR) > 50
    # The CT is drawn in the lung window: many grey levels, not a black background.
    assert len(np.unique(np.asarray(Image.open(png).convert("L")))) > 50


def test_rtstruct_prediction_against_nifti_truth_and_folder_pairing(tmp_path: Path, ibsi, shared_data: Path) -> None:
    ct_dir, _rtstruct, series, gtv = ibsi
    pred = gtv.copy()
    pred[: pred.shape[0] // 2] = False  # half the tumour
    rt = build_rtstruct(series, [Region.of_kind("tumour", pred, name="GTV auto")], ALGORITHM)
    rt_file = tmp_path / "rt.dcm"
    pydicom.dcmwrite(rt_file, rt, enforce_file_format=True)
    truth = shared_data / "ibsi_ct_phantom" / "nifti" / "mask" / "mask.nii.gz"
    results = evaluate_cases(rt_file, truth, tmp_path / "out", ct=ct_dir)
    expected = evaluate_segmentation(pred, gtv, tuple(reversed(series.image.GetSpacing())))
    assert results[0].metrics.dice == pytest.approx(expected.dice, abs=1e-9)
    # Without the CT folder the DICOM input cannot be placed: a clear error.
    with pytest.raises(EvaluationError, match="--ct"):
        evaluate_cases(rt_file, truth, tmp_path / "out2")


def test_mismatched_grids_are_refused(tmp_path: Path) -> None:
    _write(np.ones((4, 8, 8), bool), tmp_path / "a.nii.gz")
    _write(np.ones((4, 8, 9), bool), tmp_path / "b.nii.gz")
    with pytest.raises(EvaluationError, match="same grid"):
        evaluate_cases(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "out")


def test_evaluate_cli(tmp_path: Path, nifti_cases) -> None:
    pred_dir, truth_dir, cases = nifti_cases
    app = typer.Typer()
    evaluate_cmd.register(app)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["evaluate", "seg", "--pred", str(pred_dir), "--truth", str(truth_dir),
                                      "--out", str(out), "--tolerance-mm", "2.0"])
    assert result.exit_code == 0, result.output
    rows = _rows(out / "metrics.csv")
    assert set(rows) == set(cases) and all(float(r["tolerance_mm"]) == 2.0 for r in rows.values())
    assert "shifted" in result.output
    missing = CliRunner().invoke(app, ["evaluate", "seg", "--pred", str(tmp_path / "nope"), "--truth", str(truth_dir)])
    assert missing.exit_code == 2 and "no such file" in missing.output
