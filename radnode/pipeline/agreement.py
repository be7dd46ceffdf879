"""Agreement of radnode's tumour contours with clinicians' GTVs, per case and per model.

Every done job whose result.json has a clinician's GTV (``tumour_source: clinician``)
adds one row to ``<data_dir>/contour_agreement.sqlite``: the model (name + version),
Dice, HD95 and the volume ratio model / clinician. The running summary per model is
real-world monitoring of the model on the hospital's own data; ``radnode status`` and
``/metrics`` show it. One row per (series, clinician RTSTRUCT, model): a job that runs
again on the same inputs replaces its row rather than counting twice.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from radnode.pipeline.sqlite_db import SQLiteDB

log = logging.getLogger(__name__)

AGREEMENT_DB = "contour_agreement.sqlite"
#: Bucket bounds of the Dice histogram in /metrics.
DICE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agreement (
    series_uid     TEXT NOT NULL,
    rtstruct_uid   TEXT NOT NULL,
    model          TEXT NOT NULL,
    model_version  TEXT NOT NULL,
    roi_name       TEXT NOT NULL,
    dice           REAL NOT NULL,
    hd95_mm        REAL,
    volume_ratio   REAL,
    job_id         INTEGER,
    recorded_at    REAL NOT NULL,
    PRIMARY KEY (series_uid, rtstruct_uid, model, model_version)
);
"""


@dataclass(frozen=True)
class ModelAgreement:
    """The running summary of one model (name + version) against clinicians' GTVs."""

    model: str
    version: str
    cases: int
    dice_mean: float
    dice_median: float
    hd95_mean_mm: float | None
    volume_ratio_mean: float | None
    dice_values: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("dice_values")
        return out


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else None


class AgreementStore:
    """The per-case agreement table (WAL SQLite; survives restarts)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / AGREEMENT_DB
        self._db = SQLiteDB(self.path, _SCHEMA)

    @classmethod
    def existing(cls, data_dir: Path | str) -> AgreementStore | None:
        """The store when the node ever recorded a case (``radnode status`` creates nothing)."""
        return cls(data_dir) if (Path(data_dir) / AGREEMENT_DB).is_file() else None

    def record(self, series_uid: str, clinician: dict[str, Any], job_id: int | None = None) -> None:
        """Record one case from result.json's ``clinician_contour`` block."""
        agreed, model = clinician["agreement"], clinician["model"]
        with self._db.write() as conn:
            conn.execute(
                "INSERT INTO agreement VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (series_uid, rtstruct_uid, model, model_version) DO UPDATE SET "
                "roi_name = excluded.roi_name, dice = excluded.dice, hd95_mm = excluded.hd95_mm, "
                "volume_ratio = excluded.volume_ratio, job_id = excluded.job_id, recorded_at = excluded.recorded_at",
                (
                    series_uid, clinician["sop_instance_uid"], model["name"], model["version"], clinician["roi_name"],
                    agreed["dice"], agreed.get("hd95_mm"), agreed.get("volume_ratio"), job_id, time.time(),
                ),
            )

    def record_result(self, result_json: Path, job_id: int | None = None) -> bool:
        """Record a job's result.json when its tumour source is a clinician's GTV; True if recorded."""
        result = json.loads(result_json.read_text())
        clinician = result.get("clinician_contour") or {}
        if result.get("status") != "done" or result.get("tumour_source") != "clinician" or "agreement" not in clinician:
            return False
        self.record(str(result["input"]["series_instance_uid"]), clinician, job_id)
        return True

    def cases(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest cases first."""
        with self._db.connect() as conn:
            rows = conn.execute("SELECT * FROM agreement ORDER BY recorded_at DESC LIMIT ?", (limit,)).fetchall()
        return [dict(row) for row in rows]

    def summary(self) -> list[ModelAgreement]:
        """Count, mean/median Dice, mean HD95 and mean volume ratio per model name + version."""
        with self._db.connect() as conn:
            rows = conn.execute(
                "SELECT model, model_version, dice, hd95_mm, volume_ratio FROM agreement ORDER BY model, model_version"
            ).fetchall()
        grouped: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            grouped.setdefault((row["model"], row["model_version"]), []).append(row)
        return [
            ModelAgreement(
                model=model,
                version=version,
                cases=len(group),
                dice_mean=round(statistics.fmean(r["dice"] for r in group), 4),
                dice_median=round(statistics.median(r["dice"] for r in group), 4),
                hd95_mean_mm=_mean(r["hd95_mm"] for r in group),
                volume_ratio_mean=_mean(r["volume_ratio"] for r in group),
                dice_values=tuple(r["dice"] for r in group),
            )
            for (model, version), group in grouped.items()
        ]


class AgreementCollector:
    """Prometheus collector of the per-model summary, read at scrape time.

    ``radnode_contour_agreement_cases{model,version}``, ``..._dice_mean``,
    ``..._dice_median``, ``..._hd95_mean_mm``, ``..._volume_ratio_mean`` and the histogram
    ``radnode_contour_agreement_dice{model,version}``.
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        store = AgreementStore.existing(self.data_dir)
        summary = store.summary() if store is not None else []
        labels = ["model", "version"]
        families = {
            "cases": GaugeMetricFamily("radnode_contour_agreement_cases", "Cases with a clinician GTV, per tumour model.", labels=labels),
            "dice_mean": GaugeMetricFamily("radnode_contour_agreement_dice_mean", "Mean Dice of the model's tumour with clinicians' GTVs.", labels=labels),
            "dice_median": GaugeMetricFamily("radnode_contour_agreement_dice_median", "Median Dice of the model's tumour with clinicians' GTVs.", labels=labels),
            "hd95_mean_mm": GaugeMetricFamily("radnode_contour_agreement_hd95_mean_mm", "Mean HD95 (mm) to clinicians' GTVs.", labels=labels),
            "volume_ratio_mean": GaugeMetricFamily("radnode_contour_agreement_volume_ratio_mean", "Mean volume ratio model / clinician GTV.", labels=labels),
        }
        dice = HistogramMetricFamily("radnode_contour_agreement_dice", "Dice of the model's tumour with clinicians' GTVs.", labels=labels)
        for entry in summary:
            key = [entry.model, entry.version]
            for name, family in families.items():
                value = getattr(entry, name)
                if value is not None:
                    family.add_metric(key, value)
            buckets = [(str(b), sum(1 for d in entry.dice_values if d <= b)) for b in DICE_BUCKETS]
            buckets.append(("+Inf", entry.cases))
            dice.add_metric(key, buckets, sum_value=sum(entry.dice_values))
        yield from families.values()
        yield dice
