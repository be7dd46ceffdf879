"""``radnode process``: the offline chain writes result.json for every outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from radnode.cli import app
from radnode.cli.process_cmd import EXIT_REJECTED


def run_process(input_path: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    result = CliRunner().invoke(app, [*extra, "process", str(input_path), "--out", str(out)])
    payload = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    return result.exit_code, payload, result.output


def test_real_ct_is_loaded_and_described(shared_data: Path, tmp_path: Path) -> None:
    ct_dir = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    code, payload, output = run_process(ct_dir, tmp_path / "out")
    assert code == 0, output
    first = pydicom.dcmread(next(ct_dir.glob("*.dcm")), stop_before_pixels=True)
    assert payload["status"] == "done"
    assert payload["input"]["series_instance_uid"] == first.SeriesInstanceUID
    assert payload["input"]["study_instance_uid"] == first.StudyInstanceUID
    assert payload["input"]["slices"] == len(list(ct_dir.glob("*.dcm")))
    assert payload["input"]["spacing_mm"][2] == 3.0
    assert payload["qc"]["passed"] is True
    assert [s["name"] for s in payload["stages"]][:2] == ["models", "load_and_qc"]
    assert payload["pipeline_version"] and payload["radnode_version"]
    # No PHI in the result summary: patient name and ID of the source are absent.
    text = (tmp_path / "out" / "result.json").read_text()
    assert str(first.PatientName) not in text


def test_qc_rejection_is_a_result_with_reasons(shared_data: Path, tmp_path: Path) -> None:
    slab = shared_data / "lidc_slabs" / "LIDC-IDRI-0001"  # 16 slices: below the default minimum
    code, payload, output = run_process(slab, tmp_path / "out")
    assert code == EXIT_REJECTED
    assert payload["status"] == "rejected"
    assert "too_few_slices" in [issue["code"] for issue in payload["qc"]["issues"]]
    assert "too_few_slices" in output


def test_qc_limits_come_from_the_configuration(shared_data: Path, tmp_path: Path) -> None:
    slab = shared_data / "lidc_slabs" / "LIDC-IDRI-0001"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("qc:\n  min_slices: 10\n")
    code, payload, output = run_process(slab, tmp_path / "out", "--config", str(cfg))
    assert code == 0, output
    assert payload["status"] == "done"
    assert payload["input"]["slices"] == 16


def test_folder_without_dicom_is_rejected_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    code, payload, output = run_process(empty, tmp_path / "out")
    assert code == EXIT_REJECTED
    assert payload["status"] == "rejected"
    assert payload["qc"]["issues"][0]["code"] == "no_images"
