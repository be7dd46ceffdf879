"""Worker isolation: each job runs in its own process; crashes, MemoryError and timeouts end
as failed jobs with a reason while the worker pool keeps going.

The chain is injected through the documented hook (``WorkerPool(chain="file.py:function")``),
never by patching.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from radnode.config import Settings
from radnode.pipeline.jobs import Backoff, FailureReason, Job, JobSpec, JobState, Phase, PhaseState
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.messages import ChainStatus, Progress, StageState, finished_message, phase_message, progress_message
from radnode.pipeline.child import DEFAULT_CHAIN, OOM_SCORE_ADJ, resolve_chain
from radnode.pipeline.worker import WorkerPool

from pipeline_support import ENV_FAIL_REPORT, ENV_PHASE_GAP, chain_ref, wait_for

TIMEOUT = 4.0


def make_settings(tmp_path: Path, workers: int = 2, timeout: float = TIMEOUT, max_attempts: int = 1) -> Settings:
    return Settings(
        storage={"data_dir": str(tmp_path / "data")},
        pipeline={"workers": workers, "job_timeout_seconds": timeout, "max_attempts": max_attempts},
    )


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "inputs" / name
    path.mkdir(parents=True)
    return path


def enqueue(queue: SQLiteJobQueue, path: Path, max_attempts: int = 1) -> Job:
    uid = "1.2." + ".".join(str(ord(c)) for c in path.name[:8])
    return queue.enqueue(JobSpec(series_uid=uid, input_path=path, pipeline_version="1", max_attempts=max_attempts))


def wait_idle(queue: SQLiteJobQueue, timeout: float) -> None:
    wait_for(lambda: not any(j.active for j in queue.list(limit=1000)), timeout, 0.1, "all jobs to finish")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has no /proc/<pid>/status state other than Z.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def test_crashes_memory_errors_and_timeouts_fail_the_job_not_the_pool(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    jobs = {
        name: enqueue(queue, folder(tmp_path, name))
        for name in ("exit", "sigkill", "memory", "hang", "reject", "ok-before", "ok-after")
    }
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"), poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10)
    start = time.monotonic()
    pool.start()
    try:
        wait_idle(queue, 60)
    finally:
        pool.stop()
    elapsed = time.monotonic() - start
    final = {name: queue.get(job.id) for name, job in jobs.items()}

    assert final["exit"].state is JobState.FAILED and final["exit"].reason == FailureReason.CRASHED.value
    assert "exited with code 3" in (final["exit"].error or "")
    assert final["sigkill"].reason == FailureReason.CRASHED.value
    assert "SIGKILL" in (final["sigkill"].error or "")
    assert final["memory"].reason == FailureReason.EXCEPTION.value
    assert "MemoryError" in (final["memory"].error or "") and "MemoryError" in (final["memory"].traceback or "")
    assert final["hang"].reason == FailureReason.TIMEOUT.value
    assert f"{TIMEOUT:g} s" in (final["hang"].error or "")
    assert final["reject"].reason == FailureReason.QC_REJECTED.value and "too_few_slices" in (final["reject"].error or "")
    assert final["ok-before"].state is JobState.DONE and final["ok-after"].state is JobState.DONE
    # The hanging child was killed at the timeout, not left behind.
    hang_pid = int((tmp_path / "inputs" / "hang" / "pid").read_text())
    assert not pid_alive(hang_pid)
    assert final["hang"].result["seconds"] < TIMEOUT + 3
    assert elapsed < 40
    # Every job ran in a process other than this one.
    pids = {int((tmp_path / "inputs" / name / "pid").read_text()) for name in jobs}
    assert os.getpid() not in pids and len(pids) == len(jobs)
    # Under memory pressure the kernel kills a job process before the listener.
    assert int((tmp_path / "inputs" / "ok-after" / "oom_score_adj").read_text()) == OOM_SCORE_ADJ


def test_a_crashing_job_is_retried_with_backoff_then_fails(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, workers=1, max_attempts=2)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite", backoff=Backoff(0.5, 2, 5))
    job = enqueue(queue, folder(tmp_path, "exit"), max_attempts=2)
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"), poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10)
    pool.start()
    try:
        wait_idle(queue, 30)
    finally:
        pool.stop()
    final = queue.get(job.id)
    assert final.state is JobState.FAILED and final.attempts == 2
    history = queue.attempts(job.id)
    assert [h["outcome"] for h in history] == ["retrying", "failed"]
    assert history[1]["started_at"] - history[0]["finished_at"] >= 0.5  # waited out the backoff


def test_cancel_kills_the_running_child(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, workers=1, timeout=120)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    path = folder(tmp_path, "hang")
    job = enqueue(queue, path)
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"), poll_seconds=0.1, heartbeat_seconds=0.3, lease_seconds=10)
    pool.start()
    try:
        pid = int(wait_for(lambda: (path / "pid").exists() and (path / "pid").read_text(), 30, what="the child to start"))
        assert pid_alive(int(pid))
        queue.cancel(job.id)
        wait_for(lambda: not pid_alive(int(pid)), 15, what="the cancelled child to be killed")
        wait_for(lambda: not pool.busy(), 15, what="the worker to be free")
    finally:
        pool.stop()
    assert queue.get(job.id).state is JobState.CANCELLED


def test_stop_gives_running_jobs_back_to_the_queue(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, workers=1, timeout=120)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    path = folder(tmp_path, "hang")
    job = enqueue(queue, path, max_attempts=3)
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"), poll_seconds=0.1, heartbeat_seconds=0.3, lease_seconds=10)
    pool.start()
    pid = int(wait_for(lambda: (path / "pid").exists() and (path / "pid").read_text(), 30, what="the child to start"))
    pool.stop(timeout=30)
    assert not pid_alive(pid)
    released = queue.get(job.id)
    assert released.state is JobState.QUEUED and released.attempts == 0


def test_phases_are_delivered_as_they_finish_and_phase_one_survives_a_phase_two_failure(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    settings = make_settings(tmp_path, workers=1, timeout=60)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    delivered: list[tuple[int, Phase, float, list[str]]] = []

    def on_phase(job: Job, phase: Phase, out_dir: Path, files: list[Path]) -> int:
        # Exactly the files the chain handed over, all on disk at that moment.
        assert all(path.is_file() for path in files)
        names = sorted(p.name for p in files)
        delivered.append((job.id, phase, time.time(), names))
        return len(names)

    monkeypatch.setenv(ENV_PHASE_GAP, "1.5")
    good = queue.enqueue(JobSpec(series_uid="9.1", input_path=ct, pipeline_version="1", max_attempts=1))
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("results_chain"), on_phase=on_phase, poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10)
    pool.start()
    try:
        wait_idle(queue, 60)
        monkeypatch.setenv(ENV_FAIL_REPORT, "1")  # the next child inherits it
        monkeypatch.setenv(ENV_PHASE_GAP, "0")
        bad = queue.enqueue(JobSpec(series_uid="9.2", input_path=ct, pipeline_version="1", max_attempts=1))
        wait_idle(queue, 60)
    finally:
        pool.stop()

    good_phases = [(phase, names) for job_id, phase, _, names in delivered if job_id == good.id]
    # Contours were staged while the chain was still working on the report: only SEG+RTSTRUCT existed.
    assert good_phases[0] == (Phase.CONTOURS, ["RTSTRUCT.dcm", "SEG.dcm"])
    assert good_phases[1] == (Phase.REPORT, ["SR.dcm"])
    times = {phase: t for job_id, phase, t, _ in delivered if job_id == good.id}
    assert times[Phase.REPORT] - times[Phase.CONTOURS] >= 1.4
    done = queue.get(good.id)
    assert done.state is JobState.DONE
    assert done.phase_state(Phase.CONTOURS) is PhaseState.DONE and done.phase_state(Phase.REPORT) is PhaseState.DONE

    failed = queue.get(bad.id)
    assert failed.state is JobState.FAILED and "radiomics failed" in (failed.error or "")
    assert failed.phase_state(Phase.CONTOURS) is PhaseState.DONE  # never withdrawn
    assert failed.phase_state(Phase.REPORT) is PhaseState.FAILED
    assert [phase for job_id, phase, _, _ in delivered if job_id == bad.id] == [Phase.CONTOURS]


def test_real_chain_rejects_a_bad_series_without_retrying(tmp_path: Path, shared_data: Path) -> None:
    """A series with too few slices ends failed with the QC reason after one attempt."""
    ct = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    few = folder(tmp_path, "few")
    for path in sorted(ct.glob("*.dcm"))[:5]:
        shutil.copy(path, few / path.name)
    settings = make_settings(tmp_path, workers=1, timeout=120, max_attempts=3)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    job = queue.enqueue(JobSpec(series_uid="9.3", input_path=few, pipeline_version="1", max_attempts=3))
    pool = WorkerPool(queue, settings, tmp_path / "results", poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10)
    assert pool.chain == "radnode.pipeline.chain:run_chain"
    pool.start()
    try:
        wait_idle(queue, 90)
    finally:
        pool.stop()
    final = queue.get(job.id)
    assert final.state is JobState.FAILED and final.reason == FailureReason.QC_REJECTED.value
    assert final.attempts == 1
    assert "too_few_slices" in (final.error or "")
    assert (tmp_path / "results" / str(job.id) / "result.json").is_file()


def test_a_chain_that_hands_over_no_phase_or_an_unknown_one_fails_its_job(tmp_path: Path) -> None:
    """Results reach the outbox one way only (the chain's on_phase): "done" without
    handing a phase over, or a misspelt phase, is a failed attempt with the reason."""
    settings = make_settings(tmp_path, workers=1)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    staged: list[Phase] = []
    nophase = enqueue(queue, folder(tmp_path, "nophase"))
    badphase = enqueue(queue, folder(tmp_path, "badphase"))
    ok = enqueue(queue, folder(tmp_path, "ok"))
    pool = WorkerPool(
        queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"),
        on_phase=lambda job, phase, out_dir, files: staged.append(phase) or len(files),
        poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10,
    )
    pool.start()
    try:
        wait_idle(queue, 60)
    finally:
        pool.stop()
    missing = queue.get(nophase.id)
    assert missing.state is JobState.FAILED and missing.reason == FailureReason.STAGING_FAILED.value
    assert "without handing over phase(s) contours, report" in (missing.error or "")
    assert missing.phase_state(Phase.CONTOURS) is PhaseState.FAILED
    unknown = queue.get(badphase.id)
    assert unknown.state is JobState.FAILED and unknown.reason == FailureReason.EXCEPTION.value
    assert "unknown delivery phase 'segmentation'" in (unknown.error or "")
    assert queue.get(ok.id).state is JobState.DONE
    assert staged == [Phase.CONTOURS, Phase.REPORT]  # only the good job's phases


def test_the_environment_cannot_choose_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable that once let the environment pick the workers' code has no effect."""
    monkeypatch.setenv("RADNODE_PIPELINE_CHAIN", chain_ref("scripted_chain"))
    pool = WorkerPool(SQLiteJobQueue(tmp_path / "jobs.sqlite"), make_settings(tmp_path), tmp_path / "results")
    assert pool.chain == DEFAULT_CHAIN
    assert WorkerPool(pool.queue, pool.settings, tmp_path / "r2", chain=chain_ref("results_chain")).chain.endswith(":results_chain")


def test_child_messages_are_typed() -> None:
    assert progress_message("tumour", "done") == Progress("tumour", StageState.DONE)
    with pytest.raises(ValueError):
        progress_message("tumour", "finished")
    ready = phase_message("contours", {"SEG": "/r/SEG.dcm"})
    assert ready.phase is Phase.CONTOURS and ready.files == (Path("/r/SEG.dcm"),)
    with pytest.raises(ValueError, match="unknown delivery phase"):
        phase_message("phase:contours", {})
    assert finished_message({"status": "rejected", "error": "gantry_tilt"}).status is ChainStatus.REJECTED
    odd = finished_message({"status": "ok"})
    assert odd.status is ChainStatus.FAILED and "unknown status 'ok'" in (odd.error or "")


def test_chain_references_are_checked() -> None:
    assert callable(resolve_chain(chain_ref("scripted_chain")))
    with pytest.raises(ValueError, match="must look like"):
        resolve_chain("no_colon_here")
    with pytest.raises(ValueError, match="not a callable"):
        resolve_chain("radnode.pipeline.chain:PIPELINE_VERSION")


def test_graceful_stop_lets_a_running_job_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PHASE_GAP, "1.5")  # the "slow" job sleeps this long
    settings = make_settings(tmp_path, workers=1, timeout=60)
    queue = SQLiteJobQueue(tmp_path / "jobs.sqlite")
    path = folder(tmp_path, "slow")
    job = enqueue(queue, path)
    later = enqueue(queue, folder(tmp_path, "ok-later"))
    pool = WorkerPool(queue, settings, tmp_path / "results", chain=chain_ref("scripted_chain"), poll_seconds=0.1, heartbeat_seconds=0.3, lease_seconds=10)
    pool.start()
    wait_for(lambda: (path / "pid").exists(), 30, what="the child to start")
    pool.stop(timeout=30, drain_seconds=20)
    assert queue.get(job.id).state is JobState.DONE
    assert queue.get(later.id).state is JobState.QUEUED  # not started during the drain


def test_a_corrupted_model_or_classifier_bundle_fails_the_job_naming_it(tmp_path: Path, shared_data: Path) -> None:
    """A damaged bundle stops the job before it delivers anything, with a reason that names
    the bundle; the worker pool goes on (the next job runs once the bundle is repaired)."""
    from radnode.config.model import DEMO_CLASSIFIER_BUNDLE
    from radnode.models.tumour import DEMO_BUNDLE_PATH

    seg = tmp_path / "raseg-site"
    shutil.copytree(DEMO_BUNDLE_PATH, seg)
    classifier = tmp_path / "egfr-site"
    shutil.copytree(DEMO_CLASSIFIER_BUNDLE, classifier)

    def flip_last_byte(path: Path) -> bytes:
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
        return original

    seg_weights = next(seg.glob("weights.*"))
    seg_original = flip_last_byte(seg_weights)
    model_file = classifier / "model.skops"
    classifier_original = flip_last_byte(model_file)
    ct = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    few = folder(tmp_path, "few")
    for path in sorted(ct.glob("*.dcm"))[:5]:
        shutil.copy(path, few / path.name)

    def run(settings: Settings, input_path: Path) -> Job:
        queue = SQLiteJobQueue(tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.sqlite")
        job = queue.enqueue(JobSpec(series_uid="9.9", input_path=input_path, pipeline_version="1", max_attempts=1))
        pool = WorkerPool(queue, settings, tmp_path / "results", poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10)
        pool.start()
        try:
            wait_idle(queue, 120)
        finally:
            pool.stop()
        return queue.get(job.id)

    def settings_with(segmentation: Path | str) -> Settings:
        return Settings(
            storage={"data_dir": str(tmp_path / "data")},
            pipeline={"workers": 1, "job_timeout_seconds": 120, "max_attempts": 1},
            models={"segmentation_bundle": str(segmentation), "classifier_bundles": {"EGFR": str(classifier)}},
        )

    broken_seg = run(settings_with(seg), ct)
    assert broken_seg.state is JobState.FAILED and broken_seg.reason == FailureReason.CHAIN_ERROR.value
    assert f"segmentation bundle {seg} (models.segmentation_bundle) is unusable" in (broken_seg.error or "")
    assert "SHA-256" in (broken_seg.error or "")
    assert broken_seg.phase_state(Phase.CONTOURS) is PhaseState.FAILED  # nothing was delivered

    seg_weights.write_bytes(seg_original)
    broken_classifier = run(settings_with(seg), ct)
    assert broken_classifier.state is JobState.FAILED
    assert f"classifier bundle {classifier} for EGFR (models.classifier_bundles) is unusable" in (broken_classifier.error or "")
    assert broken_classifier.phase_state(Phase.CONTOURS) is PhaseState.FAILED

    model_file.write_bytes(classifier_original)
    repaired = run(settings_with(seg), few)  # both bundles pass their checks: QC judges the series
    assert repaired.reason == FailureReason.QC_REJECTED.value and "too_few_slices" in (repaired.error or "")
