"""Disk full *during processing*: the results folder is a tiny tmpfs (mounted in a private
user + mount namespace of the node process, so the test needs no privilege) -- one page of
data (the chain's second object does not fit), or no free inode (the job's result folder
cannot even be made). The job fails with the operating system's reason and waits for a
retry; the listener, on another volume, keeps receiving."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from node_support import IBSI_SLICES, copy_series, dcmtk_env, echoscu, free_port, storescu, wait_until
from pipeline_support import SERVE_ENTRY, chain_ref

from radnode.node.index import NodeIndex
from radnode.pipeline.jobs import FailureReason, JobState
from radnode.pipeline.queue import SQLiteJobQueue

SUCCESS_LINE = "Received Store Response (Success)"


@pytest.mark.parametrize(("options", "expected"), [
    ("size=4k", "No space left on device"),
    ("size=64k,nr_inodes=1", "cannot prepare the result folder"),
], ids=["no-space", "no-inode"])
def test_disk_full_during_processing_fails_the_job_for_a_retry_and_the_node_keeps_receiving(
    options: str, expected: str, shared_data: Path, tmp_path: Path
) -> None:
    assert shutil.which("unshare"), "util-linux unshare is needed to give the node a tiny results volume"
    data = tmp_path / "data"
    results = data / "results"
    results.mkdir(parents=True)
    port = free_port()
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(data), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120},
        "pipeline": {"workers": 1, "job_timeout_seconds": 60, "max_attempts": 3},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
    }))
    # The node's process gets its own mount of a one-page tmpfs over <data>/results.
    command = [
        "unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
        f'mount -t tmpfs -o {options} radnode-results "$0" && exec "$@"', str(results),
        sys.executable, str(SERVE_ENTRY), "--config", str(config), "--chain", chain_ref("results_chain"),
    ]
    log = tmp_path / "serve.log"
    with open(log, "ab") as out:
        node = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env())
    try:
        assert wait_until(lambda: node.poll() is not None or echoscu(port).returncode == 0, timeout=60, interval=0.2)
        assert node.poll() is None, log.read_text()[-3000:]
        template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))
        _study, first, files = copy_series(template[30], tmp_path / "first", 25)
        assert storescu(port, *files).returncode == 0
        queue = SQLiteJobQueue.in_data_dir(data.resolve())

        def failed_attempt():  # type: ignore[no-untyped-def]
            jobs = [j for j in queue.list() if j.series_uid == first]
            return jobs and jobs[0].attempts >= 1 and jobs[0].state is not JobState.RUNNING and jobs[0]

        job = wait_until(failed_attempt, timeout=90, interval=0.3) and failed_attempt()
        assert job, log.read_text()[-3000:]
        assert job.state is JobState.RETRYING and job.attempts == 1 and job.max_attempts == 3
        assert job.reason == FailureReason.EXCEPTION.value
        assert expected in (job.error or "") and "No space left on device" in (job.error or "")
        assert job.not_before is not None and job.not_before > job.updated_at - 1  # a later attempt is scheduled

        # The listener keeps receiving while the results volume is full.
        _study2, second, more = copy_series(template[31], tmp_path / "second", 10)
        sent = storescu(port, *more)
        assert (sent.stdout + sent.stderr).count(SUCCESS_LINE) == 10, sent.stdout + sent.stderr
        node.send_signal(signal.SIGTERM)
        assert node.wait(60) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(30)
    index = NodeIndex(data / "radnode.sqlite")
    record = index.series(second)
    index.close()
    assert record is not None and record.instance_count == 10
