"""Ingest throughput: radnode vs DCMTK storescp vs Orthanc, same slices, same sender.

Sends the same N phantom-like 512x512 CT slices (uncompressed, ~0.5 MB each) with one
DCMTK ``storescu`` association to each receiver, every receiver on fresh storage, and
prints instances/s and radnode's ratios; then radnode once more with 4 parallel
associations. Every DCMTK process and Orthanc get ``TCP_NODELAY=1`` (without it they stall
~45 ms per instance on loopback; ../shared/BENCHMARKS.md). radnode runs as ``radnode
serve`` with its durable path and default ``storage.index_sync: normal`` (each file and
its folder fsynced before Success; index rows committed to the WAL without an fsync, and
re-built from the files after a power loss); Orthanc with ``SyncStorageArea`` on;
storescp writes files without fsync.

Usage::

    .venv/bin/python benchmarks/ingest.py [--slices 500] [--rounds 3] [--workdir DIR]

``--database-url postgresql://…`` adds ``radnode+pg`` and ``radnode+pg x4``: the same node
with ``database.url`` set, so its series index (and audit trail) live in PostgreSQL. Each
of their runs gets a fresh database, created and dropped through that URL (its role needs
``CREATEDB``); ``radnode+pg / radnode`` is the price of the shared index.

With several rounds the receivers take turns, and the median per receiver is reported,
so that a noisy neighbour on the machine hits all of them alike. Every run gets a new,
empty storage folder, and ``sync`` runs before each one, so that nobody pays for the
write-back of another's (unsynced) files during its own run. The folders are deleted
only at the end: deleting ~260 MB (with online discard) slows the next few hundred
fsyncs, which would tax the receivers that fsync (radnode, Orthanc) and not storescp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

TARGET_VS_ORTHANC = 1.2
TARGET_VS_STORESCP = 0.3

#: Runs ``radnode serve`` even before the command is listed in radnode.cli.main.
SERVE = """
from radnode.cli.main import app
from radnode.cli import serve_cmd
if "serve" not in {c.name for c in app.registered_commands}:
    serve_cmd.register(app)
app(prog_name="radnode")
"""


def env() -> dict[str, str]:
    variables = dict(os.environ)
    variables["TCP_NODELAY"] = "1"
    return variables


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_slices(out: Path, count: int) -> list[Path]:
    """Phantom-like 512x512 CT slices: body, two lungs, a nodule, noise; one series."""
    files = sorted(out.glob("*.dcm"))
    if len(files) == count:
        return files
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    body = ((xx - 256) / 220) ** 2 + ((yy - 256) / 160) ** 2 < 1
    lungs = (((xx - 170) / 75) ** 2 + ((yy - 245) / 105) ** 2 < 1) | (((xx - 342) / 75) ** 2 + ((yy - 245) / 105) ** 2 < 1)
    rng = np.random.default_rng(20240517)
    for number in range(count):
        hu = np.full((512, 512), -1000.0, np.float32)
        hu[body] = 40.0
        hu[lungs] = -850.0
        nodule = ((xx - 150) ** 2 + (yy - 230) ** 2) < (12 - abs(number - count / 2) / 30) ** 2
        hu[nodule] = 20.0
        hu += rng.normal(0, 12, hu.shape).astype(np.float32)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH0001"
        ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "CT", "CHEST", "Thorax 1.0 phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = number + 1
        ds.SliceThickness, ds.PixelSpacing = 1.0, [0.78, 0.78]
        ds.ImagePositionPatient = [-200.0, -200.0, -250.0 + number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype(np.int16).tobytes()
        ds.save_as(out / f"CT_{number + 1:04d}.dcm", enforce_file_format=True)
    return sorted(out.glob("*.dcm"))


def wait_echo(port: int, aec: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{aec} receiver exited during start-up (code {proc.returncode})")
        echo = subprocess.run(["echoscu", "-aec", aec, "127.0.0.1", str(port)], env=env(), capture_output=True, check=False)
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aec} receiver did not answer C-ECHO within {timeout} s")


@contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as handle:
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env())
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, aec: str, groups: list[list[Path]]) -> float:
    """Send each group on its own storescu association, all at once; return seconds."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, group)],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    errors = [s.communicate()[1].decode() for s in senders]
    elapsed = time.perf_counter() - started
    failed = [e for s, e in zip(senders, errors) if s.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu to {aec} failed: {failed[0][-500:]}")
    return elapsed


def count_files(folder: Path, suffix: str = "") -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffix))


def fresh(folder: Path) -> None:
    """Check that a run's storage folder is new, then flush every dirty page of the machine."""
    if folder.exists():
        raise RuntimeError(f"{folder} exists: every run needs new, empty storage")
    os.sync()


@contextmanager
def dashboard_viewer(port: int, data: Path, every: float) -> Iterator[None]:
    """An open dashboard tab: a logged-in viewer whose overview refreshes every ``every`` s (0: no tab)."""
    import http.cookiejar
    import re
    import threading
    import urllib.parse
    import urllib.request

    from radnode.web.users import UserStore

    if every <= 0:
        yield
        return
    UserStore(data).add("bench", "viewer", "benchmark-password")
    stop = threading.Event()

    def poll() -> None:
        base = f"http://127.0.0.1:{port}/"
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        while not stop.is_set():
            try:
                token = re.search(r'name="csrf-token" content="([^"]+)"', opener.open(base + "login", timeout=5).read().decode())
                body = urllib.parse.urlencode({"username": "bench", "password": "benchmark-password", "csrf_token": token.group(1)})
                opener.open(base + "login", data=body.encode(), timeout=5).read()
                break
            except OSError:
                stop.wait(0.2)
        while not stop.wait(every):
            opener.open(base + "partials/overview", timeout=5).read()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database beside ``admin_url``'s (dropped afterwards); yields its URL."""
    import uuid

    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    name = f"radnode_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_radnode(
    work: Path,
    data: Path,
    files: list[Path],
    associations: int,
    dashboard: bool = False,
    poll: float = 1.0,
    database_url: str | None = None,
) -> float:
    """radnode serve; ``dashboard`` turns the web dashboard on, with a viewer polling it every ``poll`` s;
    ``database_url`` puts its index in a fresh database of that server."""
    if database_url is not None:
        with fresh_database(database_url) as url:
            return _run_radnode(work, data, files, associations, dashboard, poll, url)
    return _run_radnode(work, data, files, associations, dashboard, poll, None)


def _run_radnode(
    work: Path, data: Path, files: list[Path], associations: int, dashboard: bool, poll: float, database_url: str | None
) -> float:
    fresh(data)
    port = free_port()
    web_port = free_port()
    config = work / "radnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"host": "127.0.0.1", "port": port},
                "storage": {"data_dir": str(data), "min_free_gb": 0.5},
                "series": {"quiet_seconds": 600, "force_seconds": 3600},
                "metrics": {"enabled": False},
                "dashboard": {"enabled": dashboard, "host": "127.0.0.1", "port": web_port},
                "logging": {"level": "WARNING"},
                **({"database": {"url": database_url}} if database_url else {}),
            }
        )
    )
    with process([sys.executable, "-c", SERVE, "--config", str(config), "serve"], work / "radnode.log") as proc:
        wait_echo(port, "RADNODE", proc)
        groups = [files[k::associations] for k in range(associations)]
        with dashboard_viewer(web_port, data, poll) if dashboard else nullcontext():
            seconds = send(port, "RADNODE", groups)
    stored = count_files(data / "incoming", ".dcm")
    if stored != len(files):
        raise RuntimeError(f"radnode stored {stored} of {len(files)} instances")
    return seconds


def run_storescp(work: Path, out: Path, files: list[Path]) -> float:
    fresh(out)
    out.mkdir()
    port = free_port()
    with process(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)], work / "storescp.log") as proc:
        wait_echo(port, "STORESCP", proc)
        seconds = send(port, "STORESCP", [files])
    if count_files(out) != len(files):
        raise RuntimeError(f"storescp stored {count_files(out)} of {len(files)} instances")
    return seconds


def run_orthanc(work: Path, db: Path, files: list[Path]) -> float:
    fresh(db)
    db.mkdir()
    port = free_port()
    config = work / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(db),
                "IndexDirectory": str(db),
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "DicomCheckCalledAet": False,
                "HttpServerEnabled": False,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "StorageCompression": False,
                "SyncStorageArea": True,
                "StableAge": 600,
                "Plugins": [],
            }
        )
    )
    with process(["Orthanc", str(config)], work / "orthanc.log") as proc:
        wait_echo(port, "ORTHANC", proc)
        seconds = send(port, "ORTHANC", [files])
    stored = sum(1 for p in db.rglob("*") if p.is_file() and len(p.name) == 36)  # attachment UUIDs
    if stored != len(files):
        raise RuntimeError(f"Orthanc stored {stored} of {len(files)} instances")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep slices and logs here (default: a temp dir).")
    parser.add_argument("--only", default="", help="Comma-separated receivers, e.g. 'radnode,radnode+web'.")
    parser.add_argument("--web-poll", type=float, default=1.0,
                        help="radnode+web: seconds between overview refreshes of the polling viewer (0: dashboard idle).")
    parser.add_argument("--database-url", default=None,
                        help="Also run radnode with its index in PostgreSQL (a fresh database per run, created via this URL).")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="radnode-ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    files = make_slices(work / "slices", args.slices)
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"{len(files)} slices, {size_mb:.0f} MB, {args.rounds} round(s), work dir {work}")

    runs = work / "runs"  # one new storage folder per run, all deleted at the end
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    receivers: dict[str, Callable[[Path], float]] = {
        "storescp": lambda storage: run_storescp(work, storage, files),
        "orthanc": lambda storage: run_orthanc(work, storage, files),
        "radnode": lambda storage: run_radnode(work, storage, files, 1),
        "radnode x4": lambda storage: run_radnode(work, storage, files, 4),
        "radnode+web": lambda storage: run_radnode(work, storage, files, 1, dashboard=True, poll=args.web_poll),
    }
    if args.database_url:
        receivers["radnode+pg"] = lambda storage: run_radnode(work, storage, files, 1, database_url=args.database_url)
        receivers["radnode+pg x4"] = lambda storage: run_radnode(work, storage, files, 4, database_url=args.database_url)
    if args.only:
        receivers = {name: run for name, run in receivers.items() if name in args.only.split(",")}
    rates: dict[str, list[float]] = {name: [] for name in receivers}
    for round_number in range(args.rounds):
        for name, run in receivers.items():
            seconds = run(runs / f"round{round_number + 1}-{name.replace(' ', '-')}")
            rates[name].append(len(files) / seconds)
            print(f"  round {round_number + 1} {name:11s} {len(files) / seconds:7.1f} instances/s ({seconds:.2f} s)")
    median = {name: statistics.median(values) for name, values in rates.items()}
    print("\nmedian instances/s (one storescu association unless noted):")
    for name, value in median.items():
        print(f"  {name:11s} {value:7.1f}")
    if {"radnode", "orthanc", "storescp"} <= set(median):
        vs_orthanc = median["radnode"] / median["orthanc"]
        vs_storescp = median["radnode"] / median["storescp"]
        print(f"\nradnode / Orthanc  = {vs_orthanc:.2f}  (target >= {TARGET_VS_ORTHANC})")
        print(f"radnode / storescp = {vs_storescp:.2f}  (target >= {TARGET_VS_STORESCP})")
    if {"radnode", "radnode x4"} <= set(median):
        print(f"radnode x4 / radnode = {median['radnode x4'] / median['radnode']:.2f}")
    if {"radnode", "radnode+web"} <= set(median):
        print(f"radnode+web / radnode = {median['radnode+web'] / median['radnode']:.2f}  (dashboard on, viewer polling every {args.web_poll:g} s)")
    if {"radnode", "radnode+pg"} <= set(median):
        print(f"radnode+pg / radnode = {median['radnode+pg'] / median['radnode']:.2f}  (series index and audit in PostgreSQL)")
    if {"radnode x4", "radnode+pg x4"} <= set(median):
        print(f"radnode+pg x4 / radnode x4 = {median['radnode+pg x4'] / median['radnode x4']:.2f}")
    shutil.rmtree(runs, ignore_errors=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
