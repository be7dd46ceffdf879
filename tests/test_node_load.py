"""Load and faults on a whole node process (listener + pipeline, ``tests/serve_entry.py``
with a test chain): ``kill -9`` in the middle of a 500-slice send, and eight concurrent
associations while a job runs. DCMTK ``storescu`` is the sender; every acknowledgement it
printed is checked against the files on disk."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import yaml
from node_support import IBSI_SLICES, copy_series, dataset_bytes, dcmtk_env, echoscu, free_port, storescu, wait_until
from pipeline_support import ENV_PHASE_GAP, SERVE_ENTRY, chain_ref

from radnode.node.index import NodeIndex, SeriesState
from radnode.pipeline.jobs import JobState
from radnode.pipeline.queue import SQLiteJobQueue

SUCCESS_LINE = "Received Store Response (Success)"
QUIET_SECONDS = 2.0


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "radnode.yaml"
    path.write_text(yaml.safe_dump({
        "node": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_gb": 0.01},
        "series": {"quiet_seconds": QUIET_SECONDS, "force_seconds": 600},
        "pipeline": {"workers": 1, "job_timeout_seconds": 120, "max_attempts": 1},
        "metrics": {"enabled": False},
    }))
    return path


def _start(config: Path, port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SERVE_ENTRY), "--config", str(config), "--chain", chain_ref("results_chain")],
            stdout=out, stderr=subprocess.STDOUT, env={**dcmtk_env(), **(env or {})},
        )
    assert wait_until(lambda: proc.poll() is not None or echoscu(port).returncode == 0, timeout=60, interval=0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


def _acknowledged(output: str) -> list[Path]:
    """Files storescu saw answered with Success (``Sending file`` then the Success response)."""
    acked, current = [], None
    for line in output.splitlines():
        match = re.match(r"I: Sending file: (.+)$", line)
        if match:
            current = Path(match.group(1).strip())
        elif SUCCESS_LINE in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_kill_9_during_a_500_slice_send_then_restart_completes_and_processes_once(
    shared_data: Path, tmp_path: Path
) -> None:
    template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[30]
    study, series, files = copy_series(template, tmp_path / "series", 500)
    sop_of = {f: pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    port = free_port()
    config = _config(tmp_path, port)
    data = tmp_path / "data"
    log = tmp_path / "node.log"
    node = _start(config, port, log)
    send_log = tmp_path / "storescu.log"
    try:
        with open(send_log, "wb") as out:
            sender = subprocess.Popen(
                ["storescu", "-v", "-aec", "RADNODE", "127.0.0.1", str(port), *map(str, files)],
                stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env(),
            )
            # Not before the send started: after the 100th acknowledgement the sender printed.
            assert wait_until(lambda: send_log.read_text().count(SUCCESS_LINE) >= 100, timeout=60, interval=0.002)
            node.send_signal(signal.SIGKILL)
            node.wait(10)
            sender.wait(60)
    finally:
        if node.poll() is None:
            node.kill()
    acked = _acknowledged(send_log.read_text())
    assert 100 <= len(acked) < 500, f"the kill was not mid-send: {len(acked)} acknowledged"
    print(f"kill -9 after {len(acked)} of 500 acknowledgements")

    node = _start(config, port, log)
    try:
        assert list((data / "tmp").iterdir()) == []  # no temporary file survives the restart
        folder = data / "incoming" / study / series
        for source in acked:  # every acknowledged instance: present, same bytes, readable
            path = folder / f"{sop_of[source]}.dcm"
            assert path.is_file(), f"acknowledged {source.name} is missing"
            assert dataset_bytes(path) == dataset_bytes(source)
            assert pydicom.dcmread(path).pixel_array.shape == (201, 204)
        queue = SQLiteJobQueue.in_data_dir(data.resolve())
        assert wait_until(lambda: any(j.state is JobState.DONE for j in queue.list()), timeout=60, interval=0.2), (
            log.read_text()[-3000:]
        )
        time.sleep(3 * QUIET_SECONDS)  # time for a second completion or job, if there were one
        jobs = [j for j in queue.list() if j.series_uid == series]
        assert len(jobs) == 1 and jobs[0].state is JobState.DONE  # processed once
        index = NodeIndex(data / "radnode.sqlite")
        record = index.series(series)
        index.close()
        on_disk = len(list(folder.glob("*.dcm")))
        assert record is not None and record.state is SeriesState.PROCESSED and record.instance_count == on_disk >= len(acked)
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
    finally:
        if node.poll() is None:
            node.kill()


def _full_size(ds: pydicom.Dataset, number: int) -> None:
    """A 512 x 512 slice (the size of a clinical CT slice), pixels varying with the slice."""
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes([number % 251]) * (512 * 512 * 2)


def test_eight_concurrent_associations_while_a_job_runs(shared_data: Path, tmp_path: Path) -> None:
    """Seven 15-slice series and one 500-slice series of 512 x 512 slices at once, while a job is in its chain:
    every acknowledged instance is stored and indexed, and the node's peak memory grows by
    far less than the data it received (nothing is held in memory per series)."""
    template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))
    port = free_port()
    config = _config(tmp_path, port)
    data = tmp_path / "data"
    log = tmp_path / "node.log"
    node = _start(config, port, log, env={ENV_PHASE_GAP: "30"})  # the job sits in its chain
    try:
        _s, busy, first = copy_series(template[5], tmp_path / "busy", 20)
        assert storescu(port, *first).returncode == 0
        queue = SQLiteJobQueue.in_data_dir(data.resolve())
        assert wait_until(lambda: any(j.state is JobState.RUNNING for j in queue.list()), timeout=60, interval=0.2)
        baseline = _peak_rss_mib(node.pid)
        sends = [copy_series(template[10], tmp_path / "s0", 500, mutate=_full_size)]  # 500 x 0.5 MiB
        sends += [copy_series(template[10 + k], tmp_path / f"s{k}", 15) for k in range(1, 8)]
        received_bytes = sum(f.stat().st_size for _s2, _uid, files in sends for f in files)
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda s: storescu(port, *s[2], aet=f"SCU{s[1][-6:]}"), sends))
        assert any(j.state is JobState.RUNNING for j in queue.list())  # the job was running throughout
        peak = _peak_rss_mib(node.pid)
        node.send_signal(signal.SIGTERM)
        assert node.wait(90) == 0
    finally:
        if node.poll() is None:
            node.kill()
    index = NodeIndex(data / "radnode.sqlite")
    try:
        for (study, series_uid, files), result in zip(sends, results):
            acked = _acknowledged(result.stdout + result.stderr)
            assert len(acked) == len(files), result.stdout[-2000:] + result.stderr[-2000:]
            folder = data / "incoming" / study / series_uid
            for source in acked:
                sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
                assert dataset_bytes(folder / f"{sop}.dcm") == dataset_bytes(source)
            record = index.series(series_uid)
            assert record is not None and record.instance_count == len(files)
    finally:
        index.close()
    assert list((data / "tmp").iterdir()) == []
    growth = peak - baseline
    print(f"node peak RSS {baseline:.0f} -> {peak:.0f} MiB while receiving {received_bytes / 2**20:.0f} MiB")
    assert growth < 0.25 * received_bytes / 2**20, f"peak RSS grew {growth:.0f} MiB for {received_bytes / 2**20:.0f} MiB"
