"""``radnode serve`` as a process: kill -9 in the middle of a 300-slice send, restart, and
graceful SIGTERM; ``radnode route --explain`` on a real series folder."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import yaml
from node_support import IBSI_SLICES, copy_series, dataset_bytes, dcmtk_env, echoscu, free_port, wait_until
from typer.testing import CliRunner

from radnode.node.index import NodeIndex, SeriesState

#: Runs the real CLI; adds the node commands if the application does not list them yet.
CLI = """
import sys
from radnode.cli.main import app
from radnode.cli import route_cmd, serve_cmd
names = {c.name for c in app.registered_commands}
for module, name in ((serve_cmd, "serve"), (route_cmd, "route")):
    if name not in names:
        module.register(app)
app(prog_name="radnode")
"""


def _cli_app():  # type: ignore[no-untyped-def]
    from radnode.cli import route_cmd, serve_cmd
    from radnode.cli.main import app

    names = {c.name for c in app.registered_commands}
    for module, name in ((serve_cmd, "serve"), (route_cmd, "route")):
        if name not in names:
            module.register(app)
    return app


def _write_config(path: Path, data_dir: Path, port: int) -> Path:
    config = {
        "node": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(data_dir), "min_free_gb": 0.01},
        "series": {"quiet_seconds": 1.0, "force_seconds": 120},
        "metrics": {"enabled": False},
        "dashboard": {"enabled": False},
        "logging": {"level": "INFO"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    handle = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "--config", str(config), "serve"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=dcmtk_env(),
    )
    handle.close()
    return proc


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    assert wait_until(lambda: proc.poll() is not None or echoscu(port).returncode == 0, timeout=30, interval=0.2)
    assert proc.poll() is None, "radnode serve exited during start-up"


def _acknowledged(storescu_output: str) -> list[Path]:
    """Files storescu saw answered with Success (``Sending file`` then ``Success``)."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        match = re.match(r"I: Sending file: (.+)$", line)
        if match:
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def _stored_count(audit: Path) -> int:
    try:
        return audit.read_text().count('"event": "instance-stored"')
    except FileNotFoundError:
        return 0


def test_kill_9_mid_send_loses_nothing_acknowledged_then_restart_completes(shared_data: Path, tmp_path: Path) -> None:
    template = sorted((shared_data / IBSI_SLICES).glob("*.dcm"))[30]
    study, series, files = copy_series(template, tmp_path / "series", 300)
    sop_of = {f: pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    data = tmp_path / "data"
    port = free_port()
    config = _write_config(tmp_path / "radnode.yaml", data, port)
    log = tmp_path / "serve.log"

    server = _start_serve(config, log)
    try:
        _wait_listening(port, server)
        send_log = tmp_path / "storescu.log"
        with open(send_log, "wb") as out:
            sender = subprocess.Popen(
                ["storescu", "-v", "-aec", "RADNODE", "127.0.0.1", str(port), "+sd", str(tmp_path / "series")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
            )
            assert wait_until(lambda: _stored_count(data / "audit" / "audit.jsonl") >= 60, timeout=60, interval=0.005)
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            sender.wait(60)
    finally:
        if server.poll() is None:
            server.kill()

    acked = _acknowledged(send_log.read_text())
    # The node may have stored an instance whose response never left: acked <= stored.
    assert 50 <= len(acked) < 300, f"kill was not mid-send: {len(acked)} acknowledged"
    index = NodeIndex(data / "radnode.sqlite")
    indexed = {r.sop_instance_uid: r for r in index.series_instances(series)}
    index.close()
    for source in acked:
        sop = sop_of[source]
        path = data / "incoming" / study / series / f"{sop}.dcm"
        assert path.is_file(), f"acknowledged {source.name} is missing"
        assert sop in indexed and indexed[sop].path == path.relative_to(data).as_posix()
        assert dataset_bytes(path) == dataset_bytes(source)
    last = data / "incoming" / study / series / f"{sop_of[acked[-1]]}.dcm"
    assert pydicom.dcmread(last).pixel_array.shape == (201, 204)

    # Restart: leftovers cleaned, everything on disk indexed, the series completes.
    server = _start_serve(config, log)
    try:
        _wait_listening(port, server)
        assert list((data / "tmp").iterdir()) == []

        def complete() -> bool:
            index = NodeIndex(data / "radnode.sqlite")
            record = index.series(series)
            index.close()
            return record is not None and record.state is SeriesState.COMPLETE

        assert wait_until(complete, timeout=20, interval=0.2)
        index = NodeIndex(data / "radnode.sqlite")
        record = index.series(series)
        on_disk = len(list((data / "incoming" / study / series).glob("*.dcm")))
        assert record is not None and record.instance_count == on_disk >= len(acked)
        index.close()

        # SIGTERM during a send: no new associations, the open one finishes, exit 0.
        rest = [f for f in files if f not in set(acked)]
        sender = subprocess.Popen(
            ["storescu", "-v", "-aec", "RADNODE", "127.0.0.1", str(port), *map(str, rest)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
        )
        before = _stored_count(data / "audit" / "audit.jsonl")
        assert wait_until(lambda: _stored_count(data / "audit" / "audit.jsonl") > before + 5, timeout=30, interval=0.005)
        server.send_signal(signal.SIGTERM)
        output = sender.communicate(timeout=60)[0].decode()
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert sender.returncode == 0, output
    assert len(_acknowledged(output)) == len(rest)
    assert echoscu(port).returncode != 0  # no longer listening
    assert len(list((data / "incoming" / study / series).glob("*.dcm"))) == 300
    assert "received SIGTERM" in log.read_text()


def test_route_explain_prints_rules_and_conditions(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / IBSI_SLICES
    runner = CliRunner()
    app = _cli_app()

    default = runner.invoke(app, ["route", "--explain", str(folder)])
    assert default.exit_code == 0, default.output
    assert "rule 1 'chest-ct' -> process: MATCH (decides)" in default.output
    assert "[ok  ] min_instances: wants >= 20 instances; series has 60" in default.output
    assert "=> process (profile default)" in default.output

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "destinations:\n"
        "  - {name: archive, ae_title: ARCHIVE, host: 127.0.0.1, port: 11113}\n"
        "routing:\n"
        "  - name: thick-only\n"
        "    match: {modality: [CT], slice_thickness_min: 5}\n"
        "    action: process\n"
        "  - name: from-cerr\n"
        "    match: {station_name: '^cerr$', calling_ae: [PACS]}\n"
        "    action: forward\n"
        "    destinations: [archive]\n"
    )
    explained = runner.invoke(app, ["route", "--explain", str(folder), "--rules", str(rules), "--calling-ae", "PACS"])
    assert explained.exit_code == 0, explained.output
    assert "[FAIL] slice_thickness: wants 5.0 <= SliceThickness <=; series has 3.0" in explained.output
    assert "rule 2 'from-cerr' -> forward: MATCH (decides)" in explained.output
    assert "=> forward (to archive)" in explained.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  - name: broken\n    match: {series_description: '([unclosed'}\n    action: process\n")
    refused = runner.invoke(app, ["route", "--explain", str(folder), "--rules", str(bad)])
    assert refused.exit_code == 2
    assert "line 3" in refused.output and "invalid regular expression" in refused.output

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    nothing = runner.invoke(app, ["route", "--explain", str(empty)])
    assert nothing.exit_code == 1


def test_serve_refuses_an_invalid_port_override(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "radnode.yaml", tmp_path / "data", free_port())
    result = CliRunner().invoke(_cli_app(), ["--config", str(config), "serve", "--port", "70000"])
    assert result.exit_code == 2 and "node.port" in result.output


#: Modules of the models that only the job process may import (the listener stays small
#: and a model's import-time failure cannot take it down).
MODEL_MODULES = ("torch", "monai", "radiomics", "sklearn", "joblib", "radnode.models.tumour", "radnode.pipeline.chain")


def test_the_node_process_never_imports_torch_or_the_models(shared_data: Path, tmp_path: Path) -> None:
    """Everything ``radnode serve`` imports -- the CLI, the node, the pipeline service -- in a
    fresh interpreter that then receives a real series, completes, routes, runs a job in its
    child process and stages the results: none of the model libraries is ever in its
    ``sys.modules`` (the job process imports them)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_support import SERVE_ENTRY, chain_ref

    from radnode.pipeline.jobs import JobState
    from radnode.pipeline.queue import SQLiteJobQueue

    port = free_port()
    config = _write_config(tmp_path / "radnode.yaml", tmp_path / "data", port)
    modules_out = tmp_path / "modules.json"
    with open(tmp_path / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SERVE_ENTRY), "--config", str(config), "--chain", chain_ref("results_chain"),
             "--modules-out", str(modules_out)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
        )
    try:
        _wait_listening(port, proc)
        _study, _series, files = copy_series(next((shared_data / IBSI_SLICES).glob("*.dcm")), tmp_path / "ct", 30)
        from node_support import storescu

        assert storescu(port, *files).returncode == 0
        queue = SQLiteJobQueue.in_data_dir((tmp_path / "data").resolve())
        assert wait_until(lambda: any(j.state is JobState.DONE for j in queue.list()), timeout=90, interval=0.3), (
            (tmp_path / "serve.log").read_text()[-3000:]
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    import json

    loaded = set(json.loads(modules_out.read_text()))
    assert "radnode.cli.main" in loaded and "radnode.pipeline.service" in loaded and "radnode.node.scp" in loaded
    assert "radnode.pipeline.messages" in loaded  # the job's messages really were received
    leaked = sorted(m for m in loaded if any(m == name or m.startswith(name + ".") for name in MODEL_MODULES))
    assert leaked == []
