"""``radnode serve --roles``: the roles of one node in two processes on one data folder.

One process runs the listener and series completion, the other the workers, dispatch and
the scheduler; they share only the files under the data folder. A series sent with DCMTK
``storescu`` to the first must become a job that the second runs (a test chain, through
``tests/serve_entry.py``), whose results the second delivers to a real Orthanc; the
series ends ``processed`` in the listener's index although no process runs both parts.
A third process asking for a role already taken exits 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from node_support import IBSI_SLICES, copy_series, free_port, stop_gracefully, storescu, wait_until
from pipeline_support import SERVE_ENTRY, chain_ref
from radnode.node.index import NodeIndex, SeriesState
from radnode.node.storage import INDEX_FILE
from radnode.pipeline.jobs import JobState
from radnode.pipeline.outbox import ItemState, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.testing.orthanc import OrthancServer


def _start(config: Path, log: Path, roles: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(SERVE_ENTRY), "--config", str(config), "--roles", roles]
    command += ["--chain", chain_ref("results_chain")]
    with log.open("ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(aet="PACS", workdir=tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_listener_and_pipeline_in_two_processes_process_and_deliver_a_series(
    shared_data: Path, tmp_path: Path, orthanc: OrthancServer
) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "radnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port, "strict": False},
                "storage": {"data_dir": str(data), "min_free_gb": 0.01},
                "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
                "routing": [{"name": "ct", "match": {"modality": ["CT"]}, "action": "process"}],
                "destinations": [
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                "pipeline": {"workers": 1, "job_timeout_seconds": 120},
                "metrics": {"enabled": False},
                "dashboard": {"enabled": False},
            }
        )
    )
    template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[30]
    study, series, files = copy_series(template, tmp_path / "series", 12)

    front = _start(config, tmp_path / "front.log", "listener,completion")
    back = _start(config, tmp_path / "back.log", "dispatch,workers,scheduler")
    logs = lambda: f"front:\n{(tmp_path / 'front.log').read_text()[-3000:]}\nback:\n{(tmp_path / 'back.log').read_text()[-3000:]}"  # noqa: E731
    try:
        assert wait_until(lambda: storescu(port, files[0].parent).returncode == 0 or front.poll() is not None, 60, 0.5), logs()
        assert front.poll() is None and back.poll() is None, logs()

        # A role already taken by a running process cannot be run a second time.
        third = subprocess.run(
            [sys.executable, str(SERVE_ENTRY), "--config", str(config), "--roles", "workers"],
            capture_output=True, text=True, timeout=60,
        )
        assert third.returncode == 1 and "workers role" in third.stdout + third.stderr, third.stdout + third.stderr

        queue = SQLiteJobQueue.in_data_dir(data)
        outbox = Outbox(data)

        def delivered() -> bool:
            job = queue.latest_for_series(series, None)
            if job is None or job.state is not JobState.DONE:
                return False
            items = outbox.items(job_id=job.id)
            return len(items) == 3 and all(item.state is ItemState.SENT for item in items)

        assert wait_until(delivered, 90, 0.25), logs()
        job = queue.latest_for_series(series, None)
        assert job is not None and job.instance_count == len(files)
        kinds = sorted(s["MainDicomTags"].get("Modality") for s in orthanc.series())
        assert kinds == ["RTSTRUCT", "SEG", "SR"], kinds

        index = NodeIndex(data / INDEX_FILE)
        try:
            assert wait_until(lambda: index.series(series).state is SeriesState.PROCESSED, 10), index.series(series)
        finally:
            index.close()
    finally:
        codes = (stop_gracefully(front), stop_gracefully(back))
    assert codes == (0, 0), logs()
