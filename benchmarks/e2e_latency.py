"""End-to-end latency: last CT instance in → contours, then SR, in the PACS.

Starts Orthanc (the PACS) and ``radnode serve`` on loopback with ``series.quiet_seconds``
set low, sends a synthetic 512×512×N chest CT to radnode with DCMTK ``storescu`` (one
association), and measures from the moment storescu has its last acknowledgement:

* phase 1: SEG and RTSTRUCT stored in Orthanc (what a planning system waits for);
* phase 2: the SR stored in Orthanc (after radiomics and classifiers).

The node runs with its default settings, so the tumour is segmented by the bundled demo
model (``models.segmentation_bundle: demo``); the figure names the bundle. Usage::

    .venv/bin/python benchmarks/e2e_latency.py [--slices 100] [--quiet 1.0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radnode.config.model import Settings
from radnode.phantom import generate_phantom
from radnode.testing.orthanc import OrthancServer, free_port


def modalities_in_study(orthanc: OrthancServer, study_uid: str) -> set[str]:
    """Modalities of the series Orthanc holds in the study."""
    try:
        return {s["MainDicomTags"].get("Modality", "") for s in orthanc.study_series(study_uid)}
    except Exception:  # the study does not exist yet
        return set()


def wait_until(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition`` every 50 ms; return the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADNODE")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--quiet", type=float, default=1.0, help="series.quiet_seconds")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radnode-e2e-bench-"))
    generate_phantom(work / "phantom", seed=21, slices=args.slices, tumors=1)
    first = next((work / "phantom" / "ct").glob("*.dcm"))
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)

    node_port, pacs_port = free_port(), free_port()
    config = {
        "node": {"host": "127.0.0.1", "port": node_port},
        "storage": {"data_dir": str(work / "data")},
        "series": {"quiet_seconds": args.quiet, "force_seconds": 600},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        "metrics": {"enabled": False},
    }
    (work / "radnode.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, TCP_NODELAY="1")
    with OrthancServer(aet="PACS", workdir=work / "orthanc", extra_config={"DicomPort": pacs_port}) as orthanc:
        log = (work / "node.log").open("wb")
        node = subprocess.Popen(
            [sys.executable, "-m", "radnode", "--config", str(work / "radnode.yaml"), "serve"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            wait_until(lambda: echo_ok(node_port), 60, "radnode to answer C-ECHO")
            subprocess.run(
                ["storescu", "-aec", "RADNODE", "-aet", "BENCH", "127.0.0.1", str(node_port), "+sd", str(work / "phantom" / "ct")],
                check=True, env=env,
            )
            last_in = time.monotonic()
            contours = wait_until(lambda: {"SEG", "RTSTRUCT"} <= modalities_in_study(orthanc, study_uid), args.timeout, "SEG + RTSTRUCT")
            report = wait_until(lambda: "SR" in modalities_in_study(orthanc, study_uid), args.timeout, "the SR")
        finally:
            node.terminate()
            node.wait(60)
            log.close()
    bundle = Settings().models.segmentation_bundle
    print(f"{args.slices} slices 512x512, quiet_seconds {args.quiet}, segmentation bundle {bundle}, {os.cpu_count()} CPU(s)")
    print(f"last instance acknowledged -> SEG+RTSTRUCT in Orthanc: {contours - last_in:6.1f} s  (phase 1)")
    print(f"last instance acknowledged -> SR in Orthanc:           {report - last_in:6.1f} s  (phase 2)")


if __name__ == "__main__":
    main()
