"""The node serves its stored series with C-GET (what remote workers fetch their input with).

Real peers only: the series reaches the node with DCMTK ``storescu``; it is fetched back
with radnode's worker SCU and with DCMTK ``getscu``; the AE allow-list decides who may.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from node_support import IBSI_SLICES, node_settings, run_tool, running_node, storescu, wait_until
from radnode.pipeline.pg_shared import NodeAddress
from radnode.pipeline.remote_worker import FetchError, fetch_series


def _address(node: object, port: int) -> NodeAddress:
    return NodeAddress("RADNODE", "RADNODE", "127.0.0.1", port, "1", None, time.time())


def test_stored_series_is_served_by_c_get_to_allowed_aes_only(shared_data: Path, tmp_path: Path) -> None:
    sources = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:8]
    settings = node_settings(
        tmp_path / "data", node={"strict": True, "allowed_calling_aes": ["STORESCU", "RADWORKER", "GETSCU"]}
    )
    header = pydicom.dcmread(sources[0], stop_before_pixels=True)
    with running_node(settings) as node:
        sent = storescu(node.port, *sources)
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: len(node.index.series_instances(header.SeriesInstanceUID)) == 8, 30)
        address = _address(node, node.port)

        # radnode's worker side: every instance, byte-identical pixel data
        count = fetch_series(address, str(header.StudyInstanceUID), str(header.SeriesInstanceUID), tmp_path / "w", "RADWORKER")
        assert count == 8
        fetched = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (tmp_path / "w").glob("*.dcm")}
        for source in sources:
            original = pydicom.dcmread(source)
            assert fetched[original.SOPInstanceUID].PixelData == original.PixelData

        # an independent peer: DCMTK getscu at SERIES level
        out = tmp_path / "getscu"
        out.mkdir()
        got = run_tool([
            "getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "RADNODE", "-od", str(out),
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={header.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={header.SeriesInstanceUID}", "127.0.0.1", str(node.port),
        ])
        assert got.returncode == 0, got.stdout + got.stderr
        assert len(list(out.iterdir())) == 8

        # not on the allow-list: the association is rejected, nothing is written
        with pytest.raises(FetchError, match="refused"):
            fetch_series(address, None, str(header.SeriesInstanceUID), tmp_path / "x", "INTRUDER")
        assert list((tmp_path / "x").iterdir()) == []
        # a series the node does not hold: a failure status with a reason
        with pytest.raises(FetchError, match="not stored"):
            fetch_series(address, None, "1.2.3.999", tmp_path / "y", "RADWORKER")


def test_c_get_over_tls_with_the_workers_client_certificate(shared_data: Path, tmp_path: Path) -> None:
    from radnode.config.model import TLSSettings
    from test_node_ingest import _make_pki

    pki = _make_pki(tmp_path / "pki")
    tls = {"enabled": True, "cert_file": str(pki["srv.crt"]), "key_file": str(pki["srv.key"]),
           "ca_file": str(pki["ca.crt"]), "require_client_cert": True}
    sources = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[:3]
    header = pydicom.dcmread(sources[0], stop_before_pixels=True)
    settings = node_settings(tmp_path / "data", node={"tls": tls})
    with running_node(settings) as node:
        sent = storescu(node.port, *sources, extra=("+tls", str(pki["cli.key"]), str(pki["cli.crt"]), "+cf", str(pki["ca.crt"])))
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: len(node.index.series_instances(header.SeriesInstanceUID)) == 3, 30)
        address = NodeAddress("RADNODE", "RADNODE", "127.0.0.1", node.port, "1", None, time.time(), tls=True)
        worker_tls = TLSSettings(ca_file=pki["ca.crt"], cert_file=pki["cli.crt"], key_file=pki["cli.key"])
        assert fetch_series(address, None, str(header.SeriesInstanceUID), tmp_path / "w", "RADWORKER", tls=worker_tls) == 3
        # without the client certificate the node refuses the TLS handshake
        with pytest.raises(FetchError):
            fetch_series(address, None, str(header.SeriesInstanceUID), tmp_path / "x", "RADWORKER", tls=TLSSettings(ca_file=pki["ca.crt"]))
