"""End to end: ``radnode serve`` with ``database.url`` keeps its series index and audit trail in
PostgreSQL. The listener and series completion run as two processes (``--roles``) that share
nothing but the database and the data folder; a series sent with DCMTK ``storescu`` is indexed
by one and completed by the other, and no SQLite index is created."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

from node_support import IBSI_SLICES, copy_series, dcmtk_env, echoscu, free_port, stop_gracefully, storescu, wait_until
from pg_support import PgCluster, pg_cluster  # noqa: F401  (session fixture)
from radnode.node.audit import read_audit_db
from radnode.node.index import NodeIndex, SeriesState
from radnode.node.storage import INDEX_FILE


def _serve(config: Path, log: Path, roles: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "radnode", "--config", str(config), "serve", "--roles", roles],
            stdout=handle, stderr=subprocess.STDOUT, env=dcmtk_env(),
        )


def test_a_series_received_by_serve_is_indexed_completed_and_audited_in_postgresql(
    pg_cluster: PgCluster, shared_data: Path, tmp_path: Path
) -> None:
    url = pg_cluster.create_database("e2e")
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "radnode.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"ae_title": "RADNODE", "host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(data), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120.0},
        "database": {"url": url},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
    }))
    template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[30]
    study, series, files = copy_series(template, tmp_path / "series", 8)
    listener = _serve(config, tmp_path / "listener.log", "listener")
    completion = _serve(config, tmp_path / "completion.log", "completion")
    logs = lambda: "\n".join(f"{n}:\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in ("listener", "completion"))  # noqa: E731
    index = NodeIndex(tmp_path / "unused.sqlite", database_url=url)
    try:
        assert wait_until(lambda: listener.poll() is not None or echoscu(port).returncode == 0, 60, 0.2), logs()
        sent = storescu(port, files[0].parent)
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: (s := index.series(series)) is not None and s.state in (SeriesState.COMPLETE, SeriesState.PROCESSED), 30), logs()
        record = index.series(series)
        assert record is not None and (record.instance_count, record.completion_reason, record.calling_ae) == (8, "quiet", "STORESCU")
        assert len(index.series_instances(series)) == 8
        assert wait_until(lambda: "series-complete" in {r["event"] for r in read_audit_db(url)}, 30), logs()
        assert listener.poll() is None and completion.poll() is None, logs()
    finally:
        codes = (stop_gracefully(listener), stop_gracefully(completion))
        index.close()
    assert codes == (0, 0), logs()
    events = Counter(r["event"] for r in read_audit_db(url))
    assert events["instance-stored"] == 8 and events["series-complete"] == 1 and events["association-accepted"] >= 2
    stored = {r["sop_instance_uid"] for r in read_audit_db(url) if r["event"] == "instance-stored"}
    assert stored == {r.sop_instance_uid for r in NodeIndex(tmp_path / "unused.sqlite", database_url=url).series_instances(series)}
    assert not (data / INDEX_FILE).exists()  # nothing went to an embedded index
    assert study == record.study_instance_uid
