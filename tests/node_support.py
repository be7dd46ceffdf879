"""Helpers shared by the ``test_node_*`` files: free ports, settings, DCMTK peers, test series.

Every peer runs for real on loopback; DCMTK tools get ``TCP_NODELAY=1`` (see
../shared/BENCHMARKS.md: without it they stall ~45 ms per instance on loopback).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from radnode.config import Settings
from radnode.config.loader import settings_from_mapping

IBSI_SLICES = Path("ibsi_ct_phantom") / "dicom" / "image"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1, and no inherited DCMTK config."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def node_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a test node on a free loopback port, with ``sections`` merged in."""
    mapping: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(data_dir), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 60, "force_seconds": 600},
        "metrics": {"enabled": False, "host": "127.0.0.1", "port": free_port()},
        "dashboard": {"enabled": False},
    }
    for name, values in sections.items():
        mapping.setdefault(name, {})
        if isinstance(values, dict):
            mapping[name].update(values)
        else:
            mapping[name] = values
    return settings_from_mapping(mapping, source="test")


def run_tool(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with TCP_NODELAY=1 and capture its output."""
    return subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)


def storescu(port: int, *paths: Path, aec: str = "RADNODE", aet: str = "STORESCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Send files or folders with DCMTK ``storescu`` (verbose, do not halt on a failure)."""
    args = ["storescu", "-v", "--no-halt", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)]
    args += ["+sd", *[str(p) for p in paths]] if any(Path(p).is_dir() for p in paths) else [str(p) for p in paths]
    return run_tool(args)


def echoscu(port: int, aec: str = "RADNODE", aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK ``echoscu``."""
    return run_tool(["echoscu", "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], timeout=30)


def dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as encoded on disk (after the File Meta group)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", f"{path} is not a Part 10 file"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


def copy_series(
    source: Path,
    out_dir: Path,
    count: int,
    mutate: Callable[[pydicom.Dataset, int], None] | None = None,
) -> tuple[str, str, list[Path]]:
    """Write ``count`` copies of one real slice with fresh UIDs as one new series.

    Returns (StudyInstanceUID, SeriesInstanceUID, files). Each copy gets its own SOP
    Instance UID, Instance Number and slice position, so they are distinct instances.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(source)
    study, series = generate_uid(), generate_uid()
    files = []
    for number in range(count):
        ds = template.copy()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = [-174.3945, -79.6255, -100.4 + 3.0 * number]
        if mutate is not None:
            mutate(ds, number)
        path = out_dir / f"slice{number:04d}.dcm"
        ds.save_as(path)
        files.append(path)
    return study, series, files


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextmanager
def running_node(settings: Settings) -> Iterator[Any]:
    """A started :class:`~radnode.node.scp.StorageNode`, stopped afterwards."""
    from radnode.node.scp import StorageNode

    node = StorageNode(settings)
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_seconds=5)


def stop_gracefully(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, up to 60 s for a clean exit (its code is what a test checks), else SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return int(process.returncode)
