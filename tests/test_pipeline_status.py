"""``radnode status`` and ``radnode jobs`` on a data folder with jobs, deliveries, schedules,
a sweep run and series in the listener's index."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from radnode.cli import jobs_cmd, status_cmd, sweep_cmd
from radnode.config import CONFIG_ENV_VAR
from radnode.node.index import InstanceRecord, NodeIndex
from radnode.node.scp import INDEX_FILE
from radnode.pipeline.jobs import FailureReason, JobSource, JobSpec, JobState, Phase, PhaseState, Priority
from radnode.pipeline.outbox import AttemptOutcome, Outbox
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.scheduler import PipelineScheduler, ScheduledTask, crontab_trigger, interval
from radnode.node.series_attributes import SeriesAttributes
from radnode.pipeline.sweep import RunState, SweepStore

from pipeline_support import first_header, write_result_objects

REFUSED = 0xA700


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root (settings come from $RADNODE_CONFIG)."""

    for module in (status_cmd, jobs_cmd, sweep_cmd):
        module.register(app)
    return app


@pytest.fixture
def node_dir(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    data = tmp_path / "data"
    config = {
        "storage": {"data_dir": str(data)},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"name": "planning", "ae_title": "TPS", "host": "127.0.0.1", "port": 4343, "objects": ["RTSTRUCT"]},
        ],
    }
    config_path = tmp_path / "radnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config_path))

    queue = SQLiteJobQueue.in_data_dir(data.resolve())
    done = queue.enqueue(JobSpec(series_uid="1.2.826.0.1.100", input_path=data / "in1", pipeline_version="1"))
    rejected = queue.enqueue(JobSpec(series_uid="1.2.826.0.1.200", input_path=data / "in2", pipeline_version="1"))
    running = queue.enqueue(JobSpec(series_uid="1.2.826.0.1.300", input_path=data / "in3", pipeline_version="1"))
    waiting = queue.enqueue(
        JobSpec(series_uid="1.2.826.0.1.400", input_path=data / "in4", pipeline_version="1", priority=Priority.SWEEP, source=JobSource.SWEEP)
    )
    for job in (done, rejected, running):
        assert queue.claim("w", 600) is not None
    queue.set_phase(done.id, Phase.CONTOURS, PhaseState.DONE, 2)
    queue.set_phase(done.id, Phase.REPORT, PhaseState.DONE, 1)
    queue.complete(done.id, "w", {"status": "done"})
    queue.fail(rejected.id, "w", FailureReason.QC_REJECTED, "QC failed: [too_few_slices] 5 slice(s)", retryable=False)

    out = tmp_path / "out"
    out.mkdir()
    files = write_result_objects(first_header(shared_data / "ibsi_ct_phantom" / "dicom" / "image"), out, ["SEG", "RTSTRUCT", "SR"])
    outbox = Outbox(data.resolve(), max_attempts=1)
    from radnode.config import load_settings

    settings = load_settings(config_path)
    items = outbox.stage(files, settings.destinations, job_id=done.id)
    for item in items:
        if item.destination == "pacs":
            outbox.record(item, AttemptOutcome.SUCCESS, status=0)
        else:
            outbox.record(item, AttemptOutcome.REFUSED, status=REFUSED, error="out of resources")
    outbox.record_destination("pacs", reachable=True)
    outbox.record_destination("planning", reachable=False, error="association rejected")

    scheduler = PipelineScheduler(data.resolve())
    scheduler.start([ScheduledTask("dispatch-retry", interval(15), lambda: None), ScheduledTask("nightly-sweep", crontab_trigger("0 1 * * *"), lambda: None)])
    scheduler.stop()

    store = SweepStore(data.resolve())
    run_id, _ = store.open_run(__import__("datetime").date(2024, 3, 1), __import__("datetime").date(2024, 3, 31))
    store.plan(run_id, SeriesAttributes("1.2.826.0.1.400", "1.2.3", modality="CT"))
    store.finish_run(run_id, RunState.DONE, found=3, skipped=2)

    index = NodeIndex(data.resolve() / INDEX_FILE)
    for n in range(3):
        index.add_instance(
            InstanceRecord(
                f"1.2.826.0.1.900.{n}", 1, "1.2.826.0.1.900", "1.2.826.0.1", "1.2.840.10008.5.1.4.1.1.2",
                "1.2.840.10008.1.2.1", "CT", "MODALITY1", "127.0.0.1", f"incoming/x/{n}.dcm", 100, time.time(),
            ),
            {"Modality": "CT"},
            expected_count=10,
        )
    index.close()
    return {"done": done.id, "rejected": rejected.id, "running": running.id, "waiting": waiting.id, "queue": queue, "outbox": outbox}


def test_status_shows_series_jobs_destinations_schedule_and_sweep(node_dir: dict[str, object]) -> None:
    runner = CliRunner()
    result = runner.invoke(make_app(), ["status"])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in (
        "Jobs by state", "1.2.826.0.1.900", "receiving", "3/10", "qc_rejected", "too_few_slices",
        "pacs", "planning", "TPS@127.0.0.1:4343", "down", "association rejected", "0xA700",
        "dispatch-retry", "nightly-sweep", "cron[", "hour='1'", "last sweep: run 1", "2024-03-01..2024-03-31",
        "contours: done 2/3 sent", "report: done 1/1 sent",
    ):
        assert needle in text, f"{needle!r} missing from status output:\n{text}"

    data = json.loads(runner.invoke(make_app(), ["status", "--json"]).output)
    assert data["jobs"]["counts"] == {"queued": 1, "running": 1, "retrying": 0, "done": 1, "failed": 1, "cancelled": 0}
    assert data["series"]["counts"]["receiving"] == 1
    dests = {d["name"]: d for d in data["destinations"]}
    assert (dests["pacs"]["sent"], dests["pacs"]["state"]) == (3, "up")
    assert (dests["planning"]["failed"], dests["planning"]["state"]) == (1, "down")
    assert [f["status"] for f in data["failed_deliveries"]] == ["0xA700"]
    assert {s["task"] for s in data["schedule"]} == {"dispatch-retry", "nightly-sweep"}
    assert data["last_sweep"]["queued"] == 0 and data["last_sweep"]["found"] == 3


def test_status_on_a_node_that_never_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_path = tmp_path / "radnode.yaml"
    config_path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "empty")}}))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config_path))
    result = CliRunner().invoke(make_app(), ["status"])
    assert result.exit_code == 0, result.output
    assert "last sweep: never" in result.output and "(none configured)" in result.output
    assert not (tmp_path / "empty" / "jobs.sqlite").exists()  # status created nothing


def test_jobs_list_show_retry_cancel(node_dir: dict[str, object]) -> None:
    runner = CliRunner()
    app = make_app()
    queue: SQLiteJobQueue = node_dir["queue"]  # type: ignore[assignment]
    outbox: Outbox = node_dir["outbox"]  # type: ignore[assignment]

    listed = json.loads(runner.invoke(app, ["jobs", "list", "--state", "failed", "--json"]).output)
    assert [j["id"] for j in listed] == [node_dir["rejected"]]
    bad = runner.invoke(app, ["jobs", "list", "--state", "sleeping"])
    assert bad.exit_code == 2 and "allowed" in bad.output

    shown = runner.invoke(app, ["jobs", "show", str(node_dir["rejected"])])
    assert shown.exit_code == 0 and "too_few_slices" in shown.output and "qc_rejected" in shown.output

    retried = runner.invoke(app, ["jobs", "retry", str(node_dir["rejected"])])
    assert retried.exit_code == 0, retried.output
    assert queue.get(node_dir["rejected"]).state is JobState.QUEUED  # type: ignore[arg-type]

    rearmed = runner.invoke(app, ["jobs", "retry", str(node_dir["done"])])
    assert rearmed.exit_code == 0 and "1 failed delivery(ies) re-armed" in rearmed.output
    assert [i.destination for i in outbox.items(job_id=node_dir["done"]) if i.state.value == "pending"] == ["planning"]  # type: ignore[arg-type]

    refused = runner.invoke(app, ["jobs", "retry", str(node_dir["waiting"])])
    assert refused.exit_code == 1 and "can be retried" in refused.output

    cancelled = runner.invoke(app, ["jobs", "cancel", str(node_dir["waiting"])])
    assert cancelled.exit_code == 0 and queue.get(node_dir["waiting"]).state is JobState.CANCELLED  # type: ignore[arg-type]
    again = runner.invoke(app, ["jobs", "cancel", str(node_dir["waiting"])])
    assert again.exit_code == 1 and "cancelled" in again.output
    missing = runner.invoke(app, ["jobs", "cancel", "9999"])
    assert missing.exit_code == jobs_cmd.EXIT_NOT_FOUND and "no job with id 9999" in missing.output


def test_sweep_without_a_pacs_section_says_what_is_missing(node_dir: dict[str, object]) -> None:
    result = CliRunner().invoke(make_app(), ["sweep", "--from", "2024-01-01", "--to", "2024-12-31", "--dry-run"])
    assert result.exit_code == 2 and "pacs" in result.output


def test_metrics_expose_jobs_queue_age_and_dispatch_failures(node_dir: dict[str, object]) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from radnode.config import load_settings
    from radnode.pipeline.service import PipelineService

    service = PipelineService(load_settings())  # not started: metrics read the stores
    registry = CollectorRegistry()
    service.register_metrics(registry)
    text = generate_latest(registry).decode()
    for line in (
        'radnode_pipeline_jobs{state="done"} 1.0',
        'radnode_pipeline_jobs{state="failed"} 1.0',
        'radnode_pipeline_jobs{state="queued"} 1.0',
        'radnode_outbox_items{destination="planning",state="failed"} 1.0',
        'radnode_dispatch_attempts_total{destination="planning",outcome="refused"} 1.0',
        'radnode_dispatch_attempts_total{destination="pacs",outcome="success"} 3.0',
    ):
        assert line in text, f"{line!r} missing:\n{text}"
    age = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("radnode_pipeline_queue_age_seconds "))
    assert 0 < age < 60
    assert "radnode_job_duration_seconds_bucket" in text or "radnode_job_duration_seconds" in text
