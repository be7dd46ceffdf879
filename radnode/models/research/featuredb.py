"""The research feature database: one row per processed series and region (SQLAlchemy Core).

Where
-----
``storage.feature_db_url`` (any SQLAlchemy URL); empty means the SQLite file
``<storage.data_dir>/features.sqlite`` beside the node's other databases.

What
----
Table ``research_features``: patient ID, study/series UIDs, study date, region, the
region's radiomics profile, the tumour model and version, the radiomics engine version,
radnode and pipeline versions, the job, when it was processed, and the features as one
JSON object (a region has up to ~2000 features, more than a SQLite table has columns).
A reprocessed series with the same versions replaces its rows; other versions are kept
beside them, so a cohort can be exported per pipeline version.

The patient ID is stored because cohorts join clinical labels on it; it never goes to a log.

:func:`export_table` pivots the rows to the ``FEAT.csv`` shape: ``sample_id`` first, then
``<region>_<feature>`` columns, then the provenance columns
(:data:`~radnode.models.research.tables.METADATA_COLUMNS`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    insert,
    select,
)

from radnode.models.research.tables import SAMPLE_ID, ResearchInputError

log = logging.getLogger(__name__)

DB_FILE = "features.sqlite"
REGIONS: tuple[str, ...] = ("tumour", "ring", "lung")

metadata = MetaData()
features_table = Table(
    "research_features",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_id", String(64)),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False, index=True),
    Column("study_date", String(8)),  # DICOM DA, YYYYMMDD ('' unknown)
    Column("region", String(32), nullable=False),
    Column("profile", String(64), nullable=False, default=""),
    Column("segmentation_model", String(64), nullable=False, default=""),
    Column("segmentation_version", String(32), nullable=False, default=""),
    Column("radiomics_engine", String(64), nullable=False, default=""),
    Column("pipeline_version", String(16), nullable=False),
    Column("radnode_version", String(32), nullable=False, default=""),
    Column("job_id", Integer),
    Column("processed_at", String(32), nullable=False),
    Column("features", Text, nullable=False),
    UniqueConstraint("series_instance_uid", "region", "profile", "segmentation_model", "segmentation_version",
                     "radiomics_engine", "pipeline_version", name="one_row_per_version"),
)


def database_url(data_dir: str | os.PathLike[str], url: str = "") -> str:
    """The configured URL, or the SQLite file in the data folder."""
    if url:
        return url
    return f"sqlite:///{(Path(data_dir) / DB_FILE).resolve()}"


def open_db(url: str) -> Engine:
    """An engine with the table created if missing (a SQLite file's folder too)."""
    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        connect_args["timeout"] = 30.0  # several workers may finish at once
    engine = create_engine(url, connect_args=connect_args)
    metadata.create_all(engine)
    return engine


def rows_from_result(result: dict[str, Any], patient_id: str | None, study_date: str | None,
                     job_id: int | None = None) -> list[dict[str, Any]]:
    """Rows of one ``result.json`` (status ``done``): one per region whose radiomics finished."""
    if result.get("status") != "done":
        return []
    series = result.get("input") or {}
    radiomics = result.get("radiomics") or {}
    tumour = (result.get("models") or {}).get("tumour") or {}
    engine = radiomics.get("engine") or {}
    rows = []
    for region, data in (radiomics.get("regions") or {}).items():
        if data.get("status") != "done" or not data.get("features"):
            continue
        rows.append({
            "patient_id": patient_id or None,
            "study_instance_uid": str(series.get("study_instance_uid") or ""),
            "series_instance_uid": str(series.get("series_instance_uid") or ""),
            "study_date": (study_date or "")[:8],
            "region": str(region),
            "profile": str(data.get("profile") or ""),
            "segmentation_model": str(tumour.get("method") or tumour.get("name") or ""),
            "segmentation_version": str(tumour.get("version") or ""),
            "radiomics_engine": f"{engine.get('name', '')} {engine.get('version', '')}".strip(),
            "pipeline_version": str(result.get("pipeline_version") or ""),
            "radnode_version": str(result.get("radnode_version") or ""),
            "job_id": job_id,
            "processed_at": str(result.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")),
            "features": json.dumps({k: v for k, v in data["features"].items()}),
        })
    return rows


_KEY = ("series_instance_uid", "region", "profile", "segmentation_model", "segmentation_version", "radiomics_engine",
        "pipeline_version")


def add_rows(engine: Engine, rows: Iterable[dict[str, Any]]) -> int:
    """Insert rows, replacing any with the same series, region and versions; returns the count."""
    rows = list(rows)
    with engine.begin() as conn:
        for row in rows:
            conn.execute(delete(features_table).where(and_(*(features_table.c[k] == row[k] for k in _KEY))))
            conn.execute(insert(features_table).values(**row))
    return len(rows)


def series_header(input_path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """PatientID and StudyDate of the first DICOM file of a series folder (``None`` when unreadable)."""
    import pydicom

    folder = Path(input_path)
    candidates = sorted(folder.rglob("*.dcm")) or sorted(p for p in folder.rglob("*") if p.is_file())
    for path in candidates[:20]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"])
        except Exception:  # noqa: BLE001 - try the next file
            continue
        return (str(ds.get("PatientID", "")) or None, str(ds.get("StudyDate", "")) or None)
    return None, None


def record_result(url: str, result_json: str | os.PathLike[str], input_path: str | os.PathLike[str] | None,
                  job_id: int | None = None) -> int:
    """Add the rows of one finished job's ``result.json`` to the database at ``url``."""
    result = json.loads(Path(result_json).read_text(encoding="utf-8"))
    patient_id, study_date = series_header(input_path) if input_path is not None else (None, None)
    rows = rows_from_result(result, patient_id, study_date, job_id)
    if not rows:
        return 0
    return add_rows(open_db(url), rows)


def _parse_date(text: str | None, option: str) -> str | None:
    if not text:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date().strftime("%Y%m%d")
        except ValueError:
            continue
    raise ResearchInputError(f"{option} {text!r}: expected a date as YYYY-MM-DD or YYYYMMDD")


def export_table(engine: Engine, *, date_from: str | None = None, date_to: str | None = None,
                 regions: Sequence[str] = (), pipeline_version: str | None = None,
                 sample_key: str = "patient") -> pd.DataFrame:
    """The database in the ``FEAT.csv`` shape, one row per sample (its latest processed series).

    ``date_from``/``date_to`` filter on the study date (inclusive); ``sample_key`` chooses the
    ``sample_id``: ``patient`` (PatientID), ``study`` (StudyInstanceUID) or ``series``.
    """
    lo, hi = _parse_date(date_from, "--from"), _parse_date(date_to, "--to")
    for r in regions:
        if r not in REGIONS:
            raise ResearchInputError(f"--region {r!r}: expected one of {', '.join(REGIONS)}")
    key_column = {"patient": "patient_id", "study": "study_instance_uid", "series": "series_instance_uid"}.get(sample_key)
    if key_column is None:
        raise ResearchInputError(f"--sample-id {sample_key!r}: expected patient, study or series")
    t = features_table
    query = select(t)
    if lo:
        query = query.where(t.c.study_date >= lo)
    if hi:
        query = query.where(t.c.study_date <= hi)
    if regions:
        query = query.where(t.c.region.in_(list(regions)))
    if pipeline_version:
        query = query.where(t.c.pipeline_version == pipeline_version)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query.order_by(t.c.processed_at, t.c.id))]
    per_series: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        version = (row["series_instance_uid"], row["pipeline_version"], row["segmentation_model"],
                   row["segmentation_version"])
        entry = per_series.setdefault(version, {
            "patient_id": row["patient_id"] or "", "study_instance_uid": row["study_instance_uid"],
            "series_instance_uid": row["series_instance_uid"], "study_date": row["study_date"] or "",
            "processed_at": row["processed_at"], "job_id": row["job_id"], "pipeline_version": row["pipeline_version"],
            "radnode_version": row["radnode_version"], "segmentation_model": row["segmentation_model"],
            "segmentation_version": row["segmentation_version"], "radiomics_engine": row["radiomics_engine"],
            "profiles": {}, "values": {}})
        entry["processed_at"] = max(entry["processed_at"], row["processed_at"])
        entry["profiles"][row["region"]] = row["profile"]
        for name, value in json.loads(row["features"]).items():
            entry["values"][f"{row['region']}_{name}"] = float(value) if value is not None else math.nan
    latest: dict[str, dict[str, Any]] = {}
    for entry in sorted(per_series.values(), key=lambda e: e["processed_at"]):
        sample = str(entry[key_column] or "")
        if not sample:
            log.warning("series %s has no %s; left out of the export", entry["series_instance_uid"], key_column)
            continue
        if sample in latest:  # the sample ID itself may be a PatientID: not logged
            log.info("series %s replaces series %s of the same sample in the export (processed later)",
                     entry["series_instance_uid"], latest[sample]["series_instance_uid"])
        latest[sample] = entry
    feature_names = sorted({n for e in latest.values() for n in e["values"]})
    records = []
    for sample, e in latest.items():
        record: dict[str, Any] = {SAMPLE_ID: sample}
        record.update({n: e["values"].get(n, math.nan) for n in feature_names})
        record.update({k: e[k] for k in ("patient_id", "study_instance_uid", "series_instance_uid", "study_date",
                                         "processed_at", "job_id", "pipeline_version", "radnode_version",
                                         "segmentation_model", "segmentation_version", "radiomics_engine")})
        record["profiles"] = ";".join(f"{r}:{p}" for r, p in sorted(e["profiles"].items()))
        records.append(record)
    columns = [SAMPLE_ID, *feature_names, "patient_id", "study_instance_uid", "series_instance_uid", "study_date",
               "processed_at", "job_id", "pipeline_version", "radnode_version", "segmentation_model",
               "segmentation_version", "radiomics_engine", "profiles"]
    return pd.DataFrame.from_records(records, columns=columns)


def join_clinical(table: pd.DataFrame, clinical_path: str | os.PathLike[str], sample_key: str) -> pd.DataFrame:
    """Clinical rows of the exported samples, matched on the first column of the clinical CSV.

    That column is ``sample_id``, ``patient_id`` or ``study_instance_uid``; its values are
    compared with the export's patient IDs (``patient_id``/``sample_id`` with
    ``--sample-id patient``) or study UIDs. Returns the clinical table re-keyed by the
    export's ``sample_id`` in the export's order; raises when no row matches.
    """
    p = Path(clinical_path)
    try:
        clin = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise ResearchInputError(f"{p}: cannot be read as CSV ({exc})") from exc
    first = clin.columns[0] if len(clin.columns) else ""
    if first not in (SAMPLE_ID, "patient_id", "study_instance_uid"):
        raise ResearchInputError(f"{p}: column 1 must be sample_id, patient_id or study_instance_uid; found {first!r}")
    join_on = {"patient_id": "patient_id", "study_instance_uid": "study_instance_uid"}.get(
        first, {"patient": "patient_id", "study": "study_instance_uid", "series": "series_instance_uid"}[sample_key])
    lookup = {str(v).strip(): i for i, v in enumerate(clin[first])}
    keep = [(s, lookup[str(k)]) for s, k in zip(table[SAMPLE_ID], table[join_on]) if str(k) in lookup]
    if not keep:
        raise ResearchInputError(f"{p}: no value of column {first!r} matches an exported {join_on}; expected the "
                                 "same patient IDs or study UIDs as the feature database")
    out = clin.iloc[[i for _, i in keep]].drop(columns=[first]).copy()
    out.insert(0, SAMPLE_ID, [s for s, _ in keep])
    return out.reset_index(drop=True)


