"""Soak: many small instances into a running ``radnode serve``; memory stays flat, no fd leaks.

Sends ``--instances`` synthetic CT instances (``--size`` x ``--size`` pixels, 16-bit,
uncompressed) in series of ``--series-size`` over ``--associations`` successive DCMTK
``storescu`` associations to a ``radnode serve`` subprocess (the whole node: listener, completion,
routing, pipeline; the rules ignore every series, so no job runs and the listener's own
growth is what is measured). Series complete while the soak goes on (``quiet_seconds`` 1).

The node's resident memory (``VmRSS``) and open file descriptors (``/proc/PID/fd``) are read
after a warm-up association (the baseline: imports, caches and pools are in place by then),
in the middle, and at the end, once every series has completed and the associations are
closed. The run fails (exit 1) when

* any C-STORE is not answered Success, or the index does not hold every instance;
* RSS at the end exceeds the baseline by more than ``--max-rss-growth-mib``;
* the end has more than ``--max-fd-growth`` descriptors above the baseline.

Usage::

    .venv/bin/python benchmarks/soak.py [--instances 10000] [--associations 10] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

#: Default bounds: what "flat" and "no leak" mean for this run.
MAX_RSS_GROWTH_MIB = 32.0
MAX_FD_GROWTH = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def template(size: int) -> Dataset:
    """One small CT slice; every instance is this with its own UIDs and position."""
    rng = np.random.default_rng(0)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientID = "SOAK"
    ds.PatientName = "Soak^Test"
    ds.StudyDate = "20240101"
    ds.SeriesDescription = "soak"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def wait_echo(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    ae = AE(ae_title="SOAK")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("radnode serve exited during start-up")
        assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.2)
    raise RuntimeError("radnode serve did not answer C-ECHO")


def write_series(folder: Path, base: Dataset, count: int, series_size: int) -> None:
    """``count`` instances in series of ``series_size`` as Part 10 files (one study)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for number in range(count):
        if number % series_size == 0:
            series = generate_uid()
        ds = base.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number % series_size + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(number % series_size)]
        ds.NumberOfSeriesRelatedInstances = min(series_size, count - number // series_size * series_size)
        ds.save_as(folder / f"{number:05d}.dcm", enforce_file_format=True)


def send(port: int, folder: Path) -> int:
    """One DCMTK ``storescu`` association with every file of ``folder``; returns how many
    were not answered Success (TCP_NODELAY=1, as in benchmarks/ingest.py)."""
    result = subprocess.run(
        ["storescu", "-aet", "SOAK", "-aec", "RADNODE", "-v", "+sd", "--no-halt", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=3600,
    )
    successes = result.stdout.count("(Success)") + result.stderr.count("(Success)")
    return len(list(folder.glob("*.dcm"))) - successes


def index_counts(data: Path) -> tuple[int, int, int]:
    """(instances, series, series still receiving) in the node's index."""
    with sqlite3.connect(f"file:{data / 'radnode.sqlite'}?mode=ro", uri=True, timeout=30) as conn:
        instances = conn.execute("SELECT COUNT(DISTINCT sop_instance_uid) FROM instances").fetchone()[0]
        series = conn.execute("SELECT COUNT(*) FROM series").fetchone()[0]
        receiving = conn.execute("SELECT COUNT(*) FROM series WHERE state = 'receiving'").fetchone()[0]
    return int(instances), int(series), int(receiving)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--series-size", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="Rows and columns of each slice.")
    parser.add_argument("--warmup", type=int, default=200, help="Instances sent before the baseline is read.")
    parser.add_argument("--max-rss-growth-mib", type=float, default=MAX_RSS_GROWTH_MIB)
    parser.add_argument("--max-fd-growth", type=int, default=MAX_FD_GROWTH)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="radnode-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    port = free_port()
    config = work / "radnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port, "strict": False},
                "storage": {"data_dir": str(data), "min_free_gb": 0.1},
                "series": {"quiet_seconds": 1.0, "force_seconds": 60.0},
                "routing": [{"name": "soak", "action": "ignore"}],
                "metrics": {"enabled": False},
                "dashboard": {"enabled": False},
                "logging": {"level": "WARNING"},
            }
        )
    )
    env = dict(os.environ, TCP_NODELAY="1")
    with (work / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "radnode", "--config", str(config), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    base = template(args.size)
    per = args.instances // args.associations
    folders = []
    for number in range(args.associations):
        count = per if number < args.associations - 1 else args.instances - per * (args.associations - 1)
        folders.append(work / "send" / f"a{number:02d}")
        write_series(folders[-1], base, count, args.series_size)
    write_series(work / "send" / "warmup", base, args.warmup, args.series_size)
    failed = 0
    started = time.monotonic()
    try:
        wait_echo(port, proc)
        failed += send(port, work / "send" / "warmup")
        time.sleep(2.0)
        rss_start, fds_start = rss_mib(proc.pid), open_fds(proc.pid)
        rss_middle = rss_start
        send_started = time.monotonic()
        for number, folder in enumerate(folders):
            failed += send(port, folder)
            if number == args.associations // 2 - 1:
                rss_middle = rss_mib(proc.pid)
        send_seconds = time.monotonic() - send_started
        deadline = time.monotonic() + 60
        while index_counts(data)[2] and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)
        rss_end, fds_end = rss_mib(proc.pid), open_fds(proc.pid)
        instances, series, receiving = index_counts(data)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)

    total = args.instances + args.warmup
    growth = rss_end - rss_start
    print(f"soak: {args.instances} instances ({args.size}x{args.size}) over {args.associations} associations "
          f"in {send_seconds:.1f} s ({args.instances / send_seconds:.0f}/s); whole run {time.monotonic() - started:.1f} s")
    print(f"  indexed {instances}/{total} instances, {series} series ({receiving} still receiving), "
          f"non-Success responses {failed}, node exit code {code}")
    print(f"  node RSS MiB: start {rss_start:.1f}, middle {rss_middle:.1f}, end {rss_end:.1f} "
          f"(growth {growth:+.1f}, bound {args.max_rss_growth_mib:.0f})")
    print(f"  node open fds: start {fds_start}, end {fds_end} (bound +{args.max_fd_growth})")
    problems = []
    if failed or instances != total:
        problems.append(f"{failed} C-STORE(s) not Success, {instances} of {total} indexed")
    if receiving:
        problems.append(f"{receiving} series never completed")
    if growth > args.max_rss_growth_mib:
        problems.append(f"RSS grew {growth:.1f} MiB (bound {args.max_rss_growth_mib} MiB)")
    if fds_end - fds_start > args.max_fd_growth:
        problems.append(f"{fds_end - fds_start} more open fds at the end")
    if code != 0:
        problems.append(f"radnode serve exited {code} on SIGTERM")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
