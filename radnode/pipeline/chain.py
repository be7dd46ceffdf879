"""The processing chain: the stages of one job, listed in one place.

``radnode process`` runs it offline on a folder; the worker runs the same function for
queued jobs. Each stage is a plain typed function of the previous stages' outputs, so a
test can call any of them alone, and each stage's wall time lands in ``result.json``.
Later stages (segmentation, regions, radiomics, classifiers, writers) plug in here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from radnode import __version__
from radnode.config import Settings
from radnode.dicom_io.qc import QCLimits
from radnode.dicom_io.series import CTSeries, SeriesRejected, load_series

log = logging.getLogger(__name__)

#: Bumped whenever a change alters what the chain produces; part of derived output UIDs
#: and of the "already processed" check, so new outputs never collide with old ones.
PIPELINE_VERSION = "1"

RESULT_FILE = "result.json"

#: Called with (stage name, "start" | "done") so a CLI can draw progress.
ProgressHook = Callable[[str, str], None]


@dataclass
class StageTiming:
    """Wall time of one stage, as reported in result.json."""

    name: str
    seconds: float
    status: str = "done"


@dataclass
class ChainResult:
    """What a chain run produced; serialised to ``result.json``."""

    status: str  # "done" | "rejected" | "failed"
    input_path: str
    series: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    stages: list[StageTiming] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "radnode_version": __version__,
            "pipeline_version": PIPELINE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": self.status,
            "error": self.error,
            "input": {"path": self.input_path, **self.series},
            "qc": self.qc,
            "stages": [vars(s) for s in self.stages],
            "outputs": self.outputs,
        }


class _Stages:
    """Times stages and reports them to an optional progress hook."""

    def __init__(self, result: ChainResult, hook: ProgressHook | None) -> None:
        self._result = result
        self._hook = hook

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._hook:
            self._hook(name, "start")
        start = time.perf_counter()
        status = "failed"
        try:
            yield
            status = "done"
        finally:
            self._result.stages.append(StageTiming(name, round(time.perf_counter() - start, 3), status))
            if self._hook:
                self._hook(name, status)


def qc_limits(settings: Settings) -> QCLimits:
    """QC limits for the chain, from the ``qc`` section of the settings."""
    return QCLimits(**settings.qc.model_dump())


def load_and_check(input_path: Path, settings: Settings) -> CTSeries:
    """Stage 1: read one CT series and run QC; raises ``SeriesRejected`` on QC errors."""
    return load_series(input_path, qc_limits=qc_limits(settings), strict=True)


def describe_series(series: CTSeries) -> dict[str, Any]:
    """UIDs and geometry of the input, for result.json (no patient names or IDs)."""
    image = series.image
    return {
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "modality": series.modality,
        "slices": len(series.datasets),
        "size": list(image.GetSize()),
        "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "origin_mm": [round(v, 6) for v in image.GetOrigin()],
        "direction": [round(v, 9) for v in image.GetDirection()],
        "convolution_kernel": series.convolution_kernel,
        "slice_thickness_mm": series.slice_thickness,
    }


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON next to ``path`` and rename it in place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_chain(
    input_path: Path,
    out_dir: Path,
    settings: Settings,
    progress: ProgressHook | None = None,
) -> ChainResult:
    """Run the whole chain on one series folder and write ``out_dir/result.json``.

    A QC rejection is a normal outcome (status ``rejected`` with the reasons), not an
    exception: a hospital wants to see *why* a series was not processed.
    """
    result = ChainResult(status="failed", input_path=str(input_path))
    stages = _Stages(result, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with stages.stage("load_and_qc"):
            try:
                series = load_and_check(input_path, settings)
            except SeriesRejected as rejected:
                result.status = "rejected"
                result.qc = rejected.report.to_dict()
                result.error = rejected.report.summary()
                raise
        result.series = describe_series(series)
        result.qc = series.qc.to_dict()
        result.status = "done"
        log.info("chain done for series %s", series.series_instance_uid)
    except SeriesRejected:
        log.warning("series at %s rejected by QC: %s", input_path, result.error)
    except Exception as exc:  # a job must always leave a result.json saying what broke
        result.status = "failed"
        result.error = f"{type(exc).__name__}: {exc}"
        log.exception("chain failed for %s", input_path)
    result.outputs["result"] = RESULT_FILE
    write_json_atomically(out_dir / RESULT_FILE, result.to_dict())
    return result
