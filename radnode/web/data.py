"""What the dashboard shows, as JSON-ready data: the pages render it, ``/api/…`` returns it.

Every function reads the node's stores through the same code the CLI uses
(:func:`radnode.cli.status_cmd.collect_status`, :mod:`radnode.pipeline.steering`,
:func:`radnode.node.routing.evaluate`), so the dashboard never has its own idea of a rule.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from radnode.config import Settings
from radnode.web.users import User

#: Keys that identify a patient; shown only to the roles in ``dashboard.phi_roles``.
#: The node stores none of them today (headers are read without them); this is the net.
PHI_KEYS = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "patient_birth_date", "OtherPatientIDs"}
)
REDACTED = "(hidden)"
#: Most jobs a search looks through (newest first); the list pages through the matches.
SEARCH_WINDOW = 5000
#: ``radnode.pipeline.chain.RESULT_FILE``; not imported from there, which would load torch
#: into the web process for one string.
RESULT_FILE = "result.json"
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


class NotFound(LookupError):
    """A job, series or file that does not exist (the web answers 404)."""


def data_dir(settings: Settings) -> Path:
    return Path(settings.storage.data_dir).resolve()


def redact(value: Any, user: User, settings: Settings) -> Any:
    """``value`` with every PHI key's value replaced, unless the user's role may see PHI."""
    if user.role in settings.dashboard.phi_roles:
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if k in PHI_KEYS else redact(v, user, settings)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, user, settings) for v in value]
    return value


# --- overview ----------------------------------------------------------------------------------


def overview(settings: Settings, health: HealthCheck | None = None) -> dict[str, Any]:
    """``radnode status`` plus live health (when run inside ``radnode serve``), disk and recent errors."""
    from radnode.cli.status_cmd import collect_status

    status = collect_status(settings)
    folder = data_dir(settings)
    probe = folder if folder.exists() else folder.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    status["disk"] = {
        "free_gb": round(free_gb, 2),
        "min_free_gb": settings.storage.min_free_gb,
        "ok": free_gb >= settings.storage.min_free_gb,
    }
    if health is not None:
        healthy, details = health()
        status["health"] = {"healthy": healthy, **details}
    else:
        status["health"] = None
    errors: list[dict[str, Any]] = []
    for job in status["jobs"]["recent"]:
        if job.get("error"):
            errors.append({"what": f"job {job['id']}", "when": job.get("finished_at"), "error": job["error"]})
    for item in status["failed_deliveries"]:
        errors.append({"what": f"delivery {item['id']} to {item['destination']}", "when": None, "error": item["error"]})
    for stuck in status["series"]["stuck"]:
        errors.append({"what": f"series {stuck['series_uid']}", "when": stuck["first_failed_at"], "error": stuck["last_error"]})
    status["recent_errors"] = errors
    return status


# --- jobs -------------------------------------------------------------------------------------


def _series_attributes(settings: Settings, uids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Series description, study date, modality and instance count from the index, per UID."""
    from radnode.node.index import open_existing_index

    index = open_existing_index(data_dir(settings), settings.database.url)
    if index is None:
        return {}
    try:
        found: dict[str, dict[str, Any]] = {}
        for uid in set(uids):
            record = index.series(uid)
            if record is not None:
                attrs = record.attributes
                found[uid] = {
                    "series_description": attrs.get("SeriesDescription"),
                    "study_date": attrs.get("StudyDate"),
                    "modality": record.modality,
                    "instances": record.instance_count,
                    "series_state": record.state.value,
                }
        return found
    finally:
        index.close()


def _job_row(job: Any) -> dict[str, Any]:
    row = job.to_dict()
    row.pop("traceback", None)
    row.pop("result", None)
    return row


def list_jobs(
    settings: Settings, states: list[str] | None = None, query: str = "", page: int = 1, per_page: int = 25
) -> dict[str, Any]:
    """One page of jobs, newest first, filtered by state and by a text in UID/description/AE/error."""
    from radnode.pipeline.jobs import JobState
    from radnode.pipeline.queue import QUEUE_FILE, SQLiteJobQueue, open_queue

    wanted = [JobState(s) for s in states] if states else None  # ValueError for an unknown state
    page, per_page = max(1, page), max(1, min(per_page, 200))
    result: dict[str, Any] = {"page": page, "per_page": per_page, "states": states or [], "query": query}
    path = data_dir(settings) / QUEUE_FILE
    if not settings.database.url and not path.exists():
        return {**result, "jobs": [], "total": 0, "pages": 0}
    queue = open_queue(data_dir(settings), settings.database.url) if settings.database.url else SQLiteJobQueue(path)
    window = SEARCH_WINDOW if query else page * per_page + 1
    rows = [_job_row(j) for j in queue.list(states=wanted, limit=window)]
    attributes = _series_attributes(settings, (r["series_uid"] for r in rows))
    for row in rows:
        row["series"] = attributes.get(row["series_uid"], {})
    if query:
        needle = query.lower()
        rows = [
            r for r in rows
            if needle in " ".join(
                str(v) for v in (r["id"], r["series_uid"], r.get("study_uid"), r.get("calling_ae"), r.get("error"),
                                 r["series"].get("series_description"), r["series"].get("study_date"))
            ).lower()
        ]
    start = (page - 1) * per_page
    total = len(rows) if query else None
    result["jobs"] = rows[start : start + per_page]
    result["has_next"] = len(rows) > start + per_page
    result["total"] = total
    return result


def results_folder(settings: Settings, job_id: int) -> Path:
    """``<data_dir>/results/<job id>``; the id is an int, so the path cannot leave ``results``."""
    from radnode.pipeline.service import RESULTS_DIR

    return data_dir(settings) / RESULTS_DIR / str(int(job_id))


def job_detail(settings: Settings, job_id: int) -> dict[str, Any]:
    """One job: its record, attempts, deliveries, result.json and which overlay PNGs exist."""
    from radnode.dicom_io.overlays import OVERLAY_DIR, OVERLAY_NAMES
    from radnode.node.status import format_status
    from radnode.pipeline.outbox import Outbox, outbox_exists
    from radnode.pipeline.queue import QUEUE_FILE, JobNotFound, SQLiteJobQueue, open_queue

    path = data_dir(settings) / QUEUE_FILE
    if not settings.database.url and not path.exists():
        raise NotFound(f"job {job_id} not found (no job queue yet)")
    queue = open_queue(data_dir(settings), settings.database.url) if settings.database.url else SQLiteJobQueue(path)
    try:
        job = queue.get(job_id)
    except JobNotFound as exc:
        raise NotFound(str(exc)) from None
    detail: dict[str, Any] = {"job": job.to_dict(), "attempts": queue.attempts(job.id)}
    detail["job"].pop("result", None)
    detail["series"] = _series_attributes(settings, [job.series_uid]).get(job.series_uid, {})
    deliveries = []
    if outbox_exists(data_dir(settings), settings.database.url):
        for item in Outbox(data_dir(settings), database_url=settings.database.url).items(job_id=job.id):
            deliveries.append(
                {
                    "id": item.id, "object": item.object_type, "sop_instance_uid": item.sop_instance_uid,
                    "destination": item.destination, "state": item.state.value, "attempts": item.attempts,
                    "status": format_status(item.last_status), "error": item.last_error,
                }
            )
    detail["deliveries"] = deliveries
    detail["review"] = review_state(settings, job.id)
    folder = results_folder(settings, job.id)
    result_path = folder / RESULT_FILE
    try:
        detail["result"] = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        detail["result"] = None
    detail["overlays"] = [n for n in OVERLAY_NAMES if (folder / OVERLAY_DIR / n).is_file()]
    detail["demo_models"] = sorted(
        name for name, model in ((detail["result"] or {}).get("models") or {}).items()
        if isinstance(model, dict) and model.get("demo")
    )
    return detail


def overlay_file(settings: Settings, job_id: int, name: str) -> Path:
    """The overlay PNG ``name`` of a job; only the names the renderer writes are ever opened."""
    from radnode.dicom_io.overlays import OVERLAY_DIR, OVERLAY_NAMES

    if name not in OVERLAY_NAMES:
        raise NotFound(f"no overlay called {name!r}")
    folder = (results_folder(settings, job_id) / OVERLAY_DIR).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise NotFound(f"job {job_id} has no overlay {name}")
    return path


def review_state(settings: Settings, job_id: int) -> dict[str, Any] | None:
    """What awaits review in a job (destinations, structures) and the decision, if any."""
    from radnode.pipeline.outbox import Outbox, outbox_exists
    from radnode.pipeline.review import awaiting

    if not outbox_exists(data_dir(settings), settings.database.url):
        return None
    outbox = Outbox(data_dir(settings), database_url=settings.database.url)
    decision = outbox.review(job_id)
    return {"awaiting": awaiting(outbox, job_id), "decision": decision.to_dict() if decision else None}


#: Most structures one decision may name (an RTSTRUCT of radnode's has three).
MAX_STRUCTURES = 100


def structure_names(values: Iterable[object]) -> list[str]:
    """Structure names from a request: strings of 1-64 characters (ROI Name is LO), at most 100."""
    names = [v for v in values if v != ""]
    if len(names) > MAX_STRUCTURES or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in names):
        raise ValueError(f"structures must be at most {MAX_STRUCTURES} names of 1-64 characters")
    return [str(v) for v in names]


def review_decide(
    settings: Settings, job_id: int, user: User, decision: str, rejected: list[str], comment: str
) -> dict[str, Any]:
    """Approve (leaving out ``rejected``) or reject a job's deliveries awaiting review.

    ``NotFound`` for an unknown job, ``ValueError`` for a structure the job's RTSTRUCT lacks,
    :class:`radnode.pipeline.outbox.ReviewError` when nothing awaits or it was decided.
    """
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.queue import JobNotFound, open_queue
    from radnode.pipeline.review import approve, awaiting, reject

    try:
        open_queue(data_dir(settings), settings.database.url).get(job_id)
    except JobNotFound as exc:
        raise NotFound(str(exc)) from None
    if decision == "reject" and not comment.strip():
        raise ValueError("a rejection needs a reason (field 'reason')")
    outbox = Outbox(data_dir(settings), database_url=settings.database.url)
    known = awaiting(outbox, job_id)["structures"]
    unknown = [n for n in rejected if n not in known]
    if unknown:
        raise ValueError(f"job {job_id} has no structure awaiting review called {', '.join(map(repr, unknown))}")
    if decision == "approve":
        result = approve(outbox, job_id, user.name, results_folder(settings, job_id), rejected=rejected,
                         comment=comment, uid_root=settings.output.uid_root)
    else:
        result = reject(outbox, job_id, user.name, comment)
    return result.to_dict()


def retry(settings: Settings, job_id: int) -> str:
    """``radnode jobs retry`` (same rules); returns its message."""
    from radnode.pipeline.outbox import Outbox
    from radnode.pipeline.queue import open_queue
    from radnode.pipeline.steering import retry_job

    url = settings.database.url
    return retry_job(open_queue(data_dir(settings), url), Outbox(data_dir(settings), database_url=url), job_id).message()


def cancel(settings: Settings, job_id: int) -> str:
    """``radnode jobs cancel`` (same rules); returns a message."""
    from radnode.pipeline.queue import open_queue
    from radnode.pipeline.steering import cancel_job

    job = cancel_job(open_queue(data_dir(settings), settings.database.url), job_id)
    return f"job {job.id} cancelled (series {job.series_uid})"


# --- rules ------------------------------------------------------------------------------------


def rules(settings: Settings) -> dict[str, Any]:
    """The routing rules in order, and the destinations they may name."""
    return {
        "rules": [r.model_dump(mode="json", exclude_none=True) for r in settings.routing],
        "destinations": [d.model_dump(mode="json") for d in settings.destinations],
    }


def _decision(settings: Settings, facts: Any) -> dict[str, Any]:
    from radnode.node.routing import evaluate, format_decision

    decision = evaluate(settings.routing, facts, settings.output.uid_root)
    return {
        "series_uid": facts.series_instance_uid,
        "action": decision.action,
        "rule": decision.rule_name,
        "profile": decision.profile,
        "destinations": list(decision.destinations),
        "reason": decision.reason,
        "guard": decision.guard,
        "checks": [
            {
                "rule": c.rule.name, "action": c.rule.action, "matched": c.matched, "decides": c.applies
                and c.rule.name == decision.rule_name, "blocked_by": c.blocked_by,
                "conditions": [vars(cond) for cond in c.conditions],
            }
            for c in decision.checks
        ],
        "explain": format_decision(decision, facts),
    }


def explain_upload(settings: Settings, content: bytes, calling_ae: str | None = None) -> dict[str, Any]:
    """``route --explain`` for one uploaded DICOM file (one instance of its series)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from radnode.node.header import InstanceHeader

    try:
        header = InstanceHeader.from_dataset(dcmread(io.BytesIO(content), stop_before_pixels=True))
    except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError) as exc:
        raise ValueError(f"not a readable DICOM file: {exc}") from None
    return _decision(settings, replace(header, instance_count=1, calling_ae=calling_ae or None))


def explain_series(settings: Settings, series_uid: str) -> dict[str, Any]:
    """``route --explain`` for a series the node received (facts as the index kept them)."""
    from radnode.node.index import open_existing_index
    from radnode.node.series_attributes import SeriesAttributes

    record = None
    index = open_existing_index(data_dir(settings), settings.database.url)
    if index is not None:
        try:
            record = index.series(series_uid)
        finally:
            index.close()
    if record is None:
        raise NotFound(f"no received series {series_uid}")
    facts = SeriesAttributes.from_json(record.attributes, record.instance_count, record.calling_ae)
    return _decision(settings, facts)


# --- audit ------------------------------------------------------------------------------------


def audit(settings: Settings, event: str = "", query: str = "", limit: int = 200) -> dict[str, Any]:
    """The newest ``limit`` audit records matching an event name and a text, newest first."""
    from radnode.node.storage import AUDIT_FILE

    path = data_dir(settings) / AUDIT_FILE
    limit = max(1, min(limit, 5000))
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    events: set[str] = set()
    if path.exists():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                events.add(str(record.get("event")))
                if event and record.get("event") != event:
                    continue
                if query and query.lower() not in line.lower():
                    continue
                kept.append(record)
    return {"records": list(reversed(kept)), "events": sorted(events), "event": event, "query": query}
