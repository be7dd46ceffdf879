"""Helpers shared by the ``test_pipeline_*`` files: test chains, CT copies, a storage SCP.

The chain functions here are what the worker's documented hook runs in its child
process (``WorkerPool(chain="<this file>:<function>")``); they have the signature of
:func:`radnode.pipeline.chain.run_chain`. Their behaviour is chosen by the *name of the
input folder* (so one pool can run jobs that crash, raise, hang or succeed side by side)
and by environment variables, which the spawned child inherits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from radnode.dicom_io.uids import derive_uid, derived_object_uids

HERE = Path(__file__).resolve().parent
#: Reference to a chain in this file, for ``WorkerPool(chain=...)``.
SUPPORT_FILE = str(HERE / "pipeline_support.py")
#: Test-only entry point running ``radnode serve``'s node with a chain given as an argument.
SERVE_ENTRY = HERE / "serve_entry.py"

#: SOP classes of the result objects (PS3.4 B.5).
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
RESULT_CLASSES = {"SEG": SEG_STORAGE, "RTSTRUCT": RTSTRUCT_STORAGE, "SR": COMPREHENSIVE_SR_STORAGE}

#: Seconds the results chain waits between its two phases (env, read in the child).
ENV_PHASE_GAP = "RADNODE_TEST_PHASE_GAP"
#: Seconds the QC results chain waits before writing any result (env, read in the child).
ENV_START_DELAY = "RADNODE_TEST_START_DELAY"
#: When set, the results chain raises after phase one (phase two fails).
ENV_FAIL_REPORT = "RADNODE_TEST_FAIL_REPORT"
#: When set, the result objects lack SeriesInstanceUID (Orthanc refuses them with 0xA700).
ENV_BROKEN = "RADNODE_TEST_BROKEN_OBJECTS"


def chain_ref(name: str) -> str:
    """``"<path of this file>:<name>"``."""
    return f"{SUPPORT_FILE}:{name}"


def first_header(folder: Path) -> Dataset:
    """Header of one DICOM file in ``folder`` (sorted by name)."""
    for path in sorted(Path(folder).rglob("*.dcm")):
        return pydicom.dcmread(path, stop_before_pixels=True)
    raise FileNotFoundError(f"no .dcm file in {folder}")


def write_result_objects(
    source: Dataset, out_dir: Path, kinds: Iterable[str], version: str = "1", broken: bool = False
) -> list[Path]:
    """Write minimal SEG/RTSTRUCT/SR headers derived from ``source`` with deterministic UIDs.

    They carry what an archive indexes (patient/study of the source, derived series and
    SOP UIDs, SOP class, modality) and no content: the transport is what is under test.
    """
    paths = []
    for kind in kinds:
        uids = derived_object_uids("2.25", str(source.SeriesInstanceUID), kind, version)
        ds = Dataset()
        ds.SOPClassUID = RESULT_CLASSES[kind]
        ds.SOPInstanceUID = uids.sop_instance_uid
        ds.StudyInstanceUID = source.StudyInstanceUID
        if not broken:
            ds.SeriesInstanceUID = uids.series_instance_uid
        ds.Modality = kind
        ds.PatientID = source.get("PatientID", "")
        ds.PatientName = source.get("PatientName", "")
        ds.Manufacturer = "radnode"
        ds.SeriesNumber = {"SEG": 9101, "RTSTRUCT": 9102, "SR": 9103}[kind]
        ds.InstanceNumber = 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = Path(out_dir) / f"{kind}.dcm"
        tmp = path.with_name(f".{path.name}.tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# --- chains (run in the worker's child process) -------------------------------------------


def results_chain(
    input_path: Path,
    out_dir: Path,
    settings: Any,
    progress: Callable[[str, str], None] | None = None,
    on_phase: Callable[[str, dict[str, Path]], None] | None = None,
) -> dict[str, Any]:
    """Two-phase chain: SEG+RTSTRUCT handed over, a gap, then the SR handed over."""
    assert progress is not None and on_phase is not None
    source = first_header(input_path)
    broken = bool(os.environ.get(ENV_BROKEN))
    progress("write_contours", "start")
    contours = write_result_objects(source, out_dir, ["SEG", "RTSTRUCT"], broken=broken)
    progress("write_contours", "done")
    on_phase("contours", {p.stem: p for p in contours})
    (out_dir / "contours.time").write_text(repr(time.time()))
    time.sleep(float(os.environ.get(ENV_PHASE_GAP, "0")))
    if os.environ.get(ENV_FAIL_REPORT):
        raise RuntimeError("radiomics failed (test)")
    report = write_result_objects(source, out_dir, ["SR"], broken=broken)
    on_phase("report", {p.stem: p for p in report})
    return {"status": "done", "error": None, "outputs": {"SEG": "SEG.dcm", "RTSTRUCT": "RTSTRUCT.dcm", "SR": "SR.dcm"}}


def scripted_chain(
    input_path: Path,
    out_dir: Path,
    settings: Any,
    progress: Callable[[str, str], None] | None = None,
    on_phase: Callable[[str, dict[str, Path]], None] | None = None,
) -> dict[str, Any]:
    """Behaviour by input folder name: ``exit``, ``sigkill``, ``memory``, ``hang``, ``reject``,
    ``nophase`` (says done without handing over its phases), ``badphase`` (hands over a phase
    that does not exist), else ok (both phases handed over, with no objects).

    Writes its pid to ``<input>/pid`` (and its OOM score adjustment to ``<input>/oom_score_adj``)
    first, so a test can check the process is gone and that the OOM killer prefers it.
    """
    (Path(input_path) / "pid").write_text(str(os.getpid()))
    (Path(input_path) / "oom_score_adj").write_text(Path("/proc/self/oom_score_adj").read_text())
    if progress is not None:
        progress("start", "start")
    behaviour = Path(input_path).name.split("-")[0]
    if behaviour == "exit":
        os._exit(3)
    if behaviour == "sigkill":  # what the out-of-memory killer does
        os.kill(os.getpid(), signal.SIGKILL)
    if behaviour == "memory":
        raise MemoryError("cannot allocate 64 GiB for the test volume")
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "reject":
        return {"status": "rejected", "error": "too_few_slices: 3 slices (test)"}
    if behaviour == "slow":
        time.sleep(float(os.environ.get(ENV_PHASE_GAP, "2")))
    if behaviour == "nophase":
        return {"status": "done", "error": None, "outputs": {}}
    assert on_phase is not None
    if behaviour == "badphase":
        on_phase("segmentation", {})
    on_phase("contours", {})
    on_phase("report", {})
    return {"status": "done", "error": None, "outputs": {}}


# --- CT series for archives ------------------------------------------------------------------


def copy_ct_series(
    source: Path, target: Path, key: str, count: int | None = None, study_date: str = "20240315", new_study: bool = False
) -> tuple[str, str]:
    """Copy a CT series with new (deterministic) Series/SOP UIDs and a StudyDate.

    Returns (StudyInstanceUID, SeriesInstanceUID) of the copy. ``key`` makes the UIDs of
    different copies differ; ``count`` keeps the first slices only.
    """
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(source).glob("*.dcm"))
    if count is not None:
        files = files[:count]
    series_uid = derive_uid("2.25", "test-series", key)
    study_uid = None
    for path in files:
        ds = pydicom.dcmread(path)
        if new_study:
            ds.StudyInstanceUID = derive_uid("2.25", "test-study", key)
        study_uid = str(ds.StudyInstanceUID)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = derive_uid("2.25", "test-instance", key, str(path.name))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = study_date
        ds.SeriesDescription = f"test {key}"
        ds.save_as(target / path.name)
    assert study_uid is not None
    return study_uid, series_uid


def upload_folder(orthanc: Any, folder: Path) -> int:
    """Upload every .dcm file of ``folder`` to Orthanc over REST; returns how many."""
    count = 0
    for path in sorted(Path(folder).glob("*.dcm")):
        orthanc.upload(path.read_bytes())
        count += 1
    return count


class StorageSCP:
    """A pynetdicom Storage SCP writing to ``<data_dir>/incoming/<study>/<series>/`` (the listener's layout).

    Stands in for radnode's listener where a test needs only a C-MOVE destination.
    """

    def __init__(self, data_dir: Path, ae_title: str = "RADNODE") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.data_dir = Path(data_dir)
        self.received = 0
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.supported_contexts = AllStoragePresentationContexts
        self._handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server: Any = None
        self.port = 0

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        folder = self.data_dir / "incoming" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received += 1
        return 0x0000

    def __enter__(self) -> StorageSCP:
        from radnode.testing.orthanc import free_port

        self.port = free_port()
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=self._handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def slow_real_chain(
    input_path: Path,
    out_dir: Path,
    settings: Any,
    progress: Callable[[str, str], None] | None = None,
    on_phase: Callable[[str, dict[str, Path]], None] | None = None,
) -> Any:
    """The real chain (:func:`radnode.pipeline.chain.run_chain`), slowed down where a test
    needs time: ``$RADNODE_TEST_START_DELAY`` seconds before it starts, and
    ``$RADNODE_TEST_PHASE_GAP`` seconds after its contours phase was handed over."""
    from radnode.pipeline.chain import run_chain

    time.sleep(float(os.environ.get(ENV_START_DELAY, "0")))

    def phase_hook(phase: str, files: dict[str, Path]) -> None:
        if on_phase is not None:
            on_phase(phase, files)
        if phase == "contours":
            time.sleep(float(os.environ.get(ENV_PHASE_GAP, "0")))

    return run_chain(Path(input_path), Path(out_dir), settings, progress, on_phase=phase_hook)
