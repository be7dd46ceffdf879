"""Scale-out throughput: series per hour, SQLite single node vs 1 and 2 PostgreSQL workers.

One run, one synthetic cohort (``--series`` copies of the IBSI CT phantom, ``--slices``
slices each, new UIDs per copy), three set-ups on loopback:

* ``sqlite``: ``radnode serve`` with one local worker (the embedded default);
* ``pg-1``: a node with ``pipeline.workers: 0`` and one ``radnode worker`` process;
* ``pg-2``: the same node with two ``radnode worker`` processes (separate scratch folders).

Each worker runs a fixed-time test chain (``--work`` seconds per series, spent sleeping
between the two delivery phases) so the figure measures what scale-out adds or costs
around the processing -- C-GET of the series from the node, hand-back of the results
through PostgreSQL, staging -- and how it parallelises; with the real chain the per-series
processing time dominates and each worker adds its machine's throughput. The time runs
from the first instance sent until every job is ``done``. PostgreSQL is a throw-away
cluster (as in the tests). Usage::

    .venv/bin/python benchmarks/scaleout.py [--series 8] [--slices 10] [--work 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from node_support import IBSI_SLICES, storescu  # noqa: E402
from pg_support import start_cluster  # noqa: E402
from pipeline_support import ENV_PHASE_GAP, SERVE_ENTRY, chain_ref, copy_ct_series, wait_for  # noqa: E402
from radnode.pipeline.jobs import JobState  # noqa: E402
from radnode.pipeline.queue import open_queue  # noqa: E402
from radnode.testing.orthanc import free_port  # noqa: E402

WORKER_ENTRY = REPO / "tests" / "worker_entry.py"


def _echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def run_setup(name: str, root: Path, cohort: list[Path], work: float, url: str | None, workers: int) -> float:
    """Seconds from the first instance sent until every job is done."""
    folder = root / name
    folder.mkdir()
    port = free_port()
    config = {
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(folder / "data"), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
        "routing": [{"name": "ct", "match": {"modality": ["CT"]}, "action": "process"}],
        "pipeline": {"workers": 0 if url else 1, "job_timeout_seconds": 600},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
        "logging": {"level": "WARNING"},
    }
    if url:
        config["database"] = {"url": url, "lease_seconds": 30}
    (folder / "node.yaml").write_text(yaml.safe_dump(config))
    worker_config = {"database": {"url": url}, "storage": {"data_dir": str(folder / "wdata")}, "logging": {"level": "WARNING"}}
    (folder / "worker.yaml").write_text(yaml.safe_dump(worker_config))
    env = dict(os.environ, **{ENV_PHASE_GAP: str(work)})
    log = (folder / "processes.log").open("ab")
    processes = [subprocess.Popen(
        [sys.executable, str(SERVE_ENTRY), "--config", str(folder / "node.yaml"), "--chain", chain_ref("results_chain")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )]
    try:
        wait_for(lambda: _echo(port), 60, 0.2, "the node")
        for index in range(workers if url else 0):
            processes.append(subprocess.Popen(
                [sys.executable, str(WORKER_ENTRY), "--config", str(folder / "worker.yaml"),
                 "--scratch", str(folder / f"scratch{index}"), "--chain", chain_ref("results_chain")],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            ))
        if url:
            from radnode.pipeline.pg_shared import SharedState

            wait_for(lambda: len(SharedState(url).workers()) >= workers, 60, 0.2, "workers")
        queue = open_queue(folder / "data", url)
        started = time.monotonic()
        for series in cohort:
            sent = storescu(port, series)
            assert sent.returncode == 0, sent.stderr
        wait_for(
            lambda: (jobs := queue.list(limit=1000)) and len(jobs) == len(cohort) and all(j.state is JobState.DONE for j in jobs),
            3600, 0.2, f"{name}: all jobs done",
        )
        return time.monotonic() - started
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--work", type=float, default=2.0, help="seconds of (simulated) processing per series")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="radnode-scaleout-"))
    cluster, pg_root = start_cluster()
    try:
        cohort = []
        for n in range(args.series):
            target = root / "cohort" / str(n)
            copy_ct_series(args.data / IBSI_SLICES, target, key=f"bench-{n}", count=args.slices)
            cohort.append(target)
        seconds = {
            "sqlite": run_setup("sqlite", root, cohort, args.work, None, 1),
            "pg-1": run_setup("pg-1", root, cohort, args.work, cluster.create_database("bench"), 1),
            "pg-2": run_setup("pg-2", root, cohort, args.work, cluster.create_database("bench"), 2),
        }
    finally:
        cluster.stop("immediate")
        shutil.rmtree(pg_root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    per_hour = {name: round(args.series / s * 3600, 1) for name, s in seconds.items()}
    report = {
        "series": args.series, "slices": args.slices, "work_seconds": args.work,
        "seconds": {k: round(v, 2) for k, v in seconds.items()}, "series_per_hour": per_hour,
        "ratio_pg1_vs_sqlite": round(per_hour["pg-1"] / per_hour["sqlite"], 2),
        "ratio_pg2_vs_sqlite": round(per_hour["pg-2"] / per_hour["sqlite"], 2),
        "ratio_pg2_vs_pg1": round(per_hour["pg-2"] / per_hour["pg-1"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
