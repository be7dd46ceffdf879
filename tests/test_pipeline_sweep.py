"""The sweep against Orthanc holding CT series radnode never received.

C-FIND (study, then series), routing and "already processed" filters, C-MOVE back to
radnode's own listener (the node's real SCP), persisted progress that resumes, queueing
at sweep priority, processing, and a second sweep that does nothing.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from radnode.config import Settings
from radnode.node.index import NodeIndex, SeriesState
from radnode.node.scp import StorageNode
from radnode.node.storage import INDEX_FILE
from radnode.pipeline.jobs import JobSource, JobSpec, JobState, Priority
from radnode.pipeline.queue import SQLiteJobQueue
from radnode.pipeline.service import PipelineService
from radnode.pipeline.sweep import RunState, Sweeper, SweepStore
from radnode.testing.orthanc import OrthancServer, free_port

from pipeline_support import chain_ref, copy_ct_series, upload_folder, wait_for

MARCH_FROM, MARCH_TO = date(2024, 3, 1), date(2024, 3, 31)


@pytest.fixture(scope="module")
def archive_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, Path]]:
    """Three CT series from the phantom: two full ones in one study, one of 10 slices."""
    source = shared_data / "ibsi_ct_phantom" / "dicom" / "image"
    root = tmp_path_factory.mktemp("archive")
    series = {}
    for key, count, new_study in (("a", None, False), ("b", None, False), ("short", 10, True)):
        study_uid, series_uid = copy_ct_series(source, root / key, key, count=count, new_study=new_study)
        series[key] = (study_uid, series_uid, root / key)
    return series


def settings_for(tmp_path: Path, orthanc: OrthancServer, node_port: int, **extra: object) -> Settings:
    return Settings(
        storage={"data_dir": str(tmp_path / "data")},
        node={"ae_title": "RADNODE", "host": "127.0.0.1", "port": node_port},
        series={"quiet_seconds": 1.0, "force_seconds": 60.0},
        pacs={"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        destinations=[{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        sweep={"max_series_per_run": 1, "max_concurrent_retrievals": 2},
        pipeline={"workers": 1, "job_timeout_seconds": 120},
        metrics={"enabled": False},
        **extra,
    )


def incoming_files(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "incoming").rglob("*.dcm"))


def test_sweep_finds_retrieves_queues_and_then_does_nothing(
    tmp_path: Path, archive_series: dict[str, tuple[str, str, Path]]
) -> None:
    node_port = free_port()
    with OrthancServer(modalities={"RADNODE": ("RADNODE", "127.0.0.1", node_port)}) as orthanc:
        for _study, _series, folder in archive_series.values():
            upload_folder(orthanc, folder)
        settings = settings_for(tmp_path, orthanc, node_port)
        data_dir = Path(settings.storage.data_dir).resolve()
        node = StorageNode(settings)
        service = PipelineService(
            settings, completion=node.completion, chain=chain_ref("results_chain"), schedule_completion_checks=False,
            poll_seconds=0.2, heartbeat_seconds=1.0,
        )
        node.start()
        service.start()
        try:
            sweeper = service.sweeper()
            a_uid, b_uid, short_uid = (archive_series[k][1] for k in ("a", "b", "short"))

            # Dry run: lists what it would take, touches nothing.
            preview = sweeper.run(MARCH_FROM, MARCH_TO, dry_run=True)
            decisions = {d.candidate.series_instance_uid: d for d in preview.decisions}
            assert set(decisions) == {a_uid, b_uid, short_uid}
            assert decisions[a_uid].take and decisions[b_uid].take
            assert not decisions[short_uid].take and decisions[short_uid].reason.startswith("routing:")
            assert decisions[a_uid].candidate.instance_count == 60
            assert service.queue.list() == [] and SweepStore(data_dir).runs() == []
            assert sweeper.run(date(2023, 1, 1), date(2023, 12, 31), dry_run=True).decisions == []

            # First run stops at the per-run limit (1 series) ...
            first = sweeper.run(MARCH_FROM, MARCH_TO)
            assert len(first.queued) == 1 and first.remaining == 1 and first.failed == []
            (run,) = SweepStore(data_dir).runs()
            assert run["state"] == RunState.PARTIAL.value
            first_uid, first_job_id = first.queued[0]
            job = service.queue.get(first_job_id)
            assert job.priority == Priority.SWEEP and job.source is JobSource.SWEEP
            assert len(list(job.input_path.glob("*.dcm"))) == 60

            # ... the next run resumes it and fetches the other one.
            second = sweeper.run(MARCH_FROM, MARCH_TO)
            assert second.run_id == first.run_id and second.remaining == 0
            assert {uid for uid, _ in first.queued + second.queued} == {a_uid, b_uid}
            assert SweepStore(data_dir).runs()[0]["state"] == RunState.DONE.value

            # Both are processed and their results reach the archive.
            wait_for(
                lambda: all(j.state is JobState.DONE for j in service.queue.list()) and len(service.queue.list()) == 2,
                90, 0.3, "both sweep jobs to finish",
            )
            study_uid = archive_series["a"][0]
            wait_for(
                lambda: sorted(s["MainDicomTags"]["Modality"] for s in orthanc.study_series(study_uid)).count("SEG") == 2,
                30, 0.3, "results in the archive",
            )
            # The listener announced both series complete; no second job was queued for them.
            def both_processed() -> bool:
                records = [node.index.series(uid) for uid in (a_uid, b_uid)]
                return all(r is not None and r.state is SeriesState.PROCESSED for r in records)

            wait_for(both_processed, 15, 0.2, "the listener's completions to be handled")
            assert len(service.queue.list()) == 2

            # A second sweep finds everything processed and retrieves nothing.
            before = incoming_files(data_dir)
            third = sweeper.run(MARCH_FROM, MARCH_TO)
            assert third.queued == [] and third.failed == [] and third.taken == []
            reasons = {d.candidate.series_instance_uid: d.reason for d in third.decisions}
            assert reasons[a_uid].startswith("already processed") and reasons[b_uid].startswith("already processed")
            assert incoming_files(data_dir) == before
            assert len(service.queue.list()) == 2
        finally:
            service.stop()
            node.stop()


def test_sweep_with_c_get_and_skips_of_failed_series(tmp_path: Path, archive_series: dict[str, tuple[str, str, Path]]) -> None:
    # Orthanc answers C-FIND and C-GET only for AE titles it knows.
    with OrthancServer(modalities={"RADNODE": ("RADNODE", "127.0.0.1", free_port())}) as orthanc:
        study_uid, series_uid, folder = archive_series["short"]
        upload_folder(orthanc, folder)
        settings = Settings(
            storage={"data_dir": str(tmp_path / "data")},
            pacs={"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "retrieve": "get"},
        )
        queue = SQLiteJobQueue(tmp_path / "data" / "jobs.sqlite")
        sweeper = Sweeper(settings, queue, "1")  # no routing check: every CT series is taken
        report = sweeper.run(MARCH_FROM, MARCH_TO)
        ((uid, job_id),) = report.queued
        job = queue.get(job_id)
        # C-GET sub-operations take the ingest path: incoming/<study>/<series>, indexed.
        assert uid == series_uid and job.input_path == (tmp_path / "data").resolve() / "incoming" / study_uid / series_uid
        assert len(list(job.input_path.glob("*.dcm"))) == 10
        index = NodeIndex(tmp_path / "data" / INDEX_FILE)
        try:
            assert len(index.series_instances(series_uid)) == 10
        finally:
            index.close()
        # A series whose job failed is not fetched again by later sweeps.
        claimed = queue.claim("w", 60)
        assert claimed is not None
        queue.fail(claimed.id, "w", "qc_rejected", "too_few_slices", retryable=False)
        again = sweeper.run(MARCH_FROM, MARCH_TO)
        assert again.queued == [] and again.skipped[0].reason.startswith("failed before")
        queue.enqueue(JobSpec(series_uid="1.2.3", input_path=tmp_path, pipeline_version="1"))
        assert len(queue.list()) == 2


def test_sweep_command_dry_run_lists_what_it_would_take(
    tmp_path: Path, archive_series: dict[str, tuple[str, str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    import yaml
    from typer.testing import CliRunner

    from radnode.cli import sweep_cmd
    from radnode.config import CONFIG_ENV_VAR

    with OrthancServer(modalities={"RADNODE": ("RADNODE", "127.0.0.1", free_port())}) as orthanc:
        for key in ("a", "short"):
            upload_folder(orthanc, archive_series[key][2])
        config = {
            "storage": {"data_dir": str(tmp_path / "data")},
            "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        }
        (tmp_path / "radnode.yaml").write_text(yaml.safe_dump(config))
        monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "radnode.yaml"))
        app = typer.Typer()

        @app.callback()
        def main() -> None:
            """Test root."""

        sweep_cmd.register(app)
        result = CliRunner().invoke(app, ["sweep", "--from", "2024-03-01", "--to", "2024-03-31", "--dry-run"])
        assert result.exit_code == 0, result.output
        assert archive_series["a"][1] in result.output and archive_series["short"][1] in result.output
        assert "dry run: 1 series would be retrieved, 1 skipped" in result.output
        assert "routing: ignore" in result.output
        assert SQLiteJobQueue(tmp_path / "data" / "jobs.sqlite").list() == []
        assert orthanc.statistics()["CountInstances"] == 70  # nothing was added or moved
