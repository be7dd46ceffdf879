"""Cohort files of the research commands, read with errors that name file, row and column.

Shapes (fixed, so cohorts from other tools plug in; see ``docs/research.md``):

* expression matrix ``EXPR.csv``: first column ``sample_id``, one numeric column per gene;
  CSV, TSV (``.tsv``/``.txt``) or Parquet;
* features ``FEAT.csv``: first column ``sample_id``, one numeric column per radiomic
  feature; the provenance columns ``radnode research export`` appends
  (:data:`METADATA_COLUMNS`) are set aside;
* clinical ``CLIN.csv``: ``sample_id,time,event`` (+ optional columns);
* gene sets: MSigDB GMT (``name<TAB>description<TAB>gene...``).

Every reader raises :class:`ResearchInputError`; the CLI turns it into one line on stderr
and exit code 2. :func:`staged_output` writes a command's outputs to a temporary sibling
folder and moves them into place only when all are written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from radnode import durable

SAMPLE_ID = "sample_id"
#: Columns ``research export`` adds after the features (provenance, not features).
METADATA_COLUMNS: tuple[str, ...] = (
    "patient_id", "study_instance_uid", "series_instance_uid", "study_date", "processed_at", "job_id",
    "pipeline_version", "radnode_version", "segmentation_model", "segmentation_version", "radiomics_engine",
    "profiles",
)


class ResearchInputError(ValueError):
    """A cohort file radnode cannot use; the message names the file, row/column and what was expected."""


@dataclass(frozen=True)
class GeneSet:
    """One gene set of a GMT file."""

    name: str
    description: str
    genes: tuple[str, ...]


def _read_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ResearchInputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            sep = "\t" if suffix in (".tsv", ".txt") else ","
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (ValueError, OSError, ImportError) as exc:
        raise ResearchInputError(f"{path}: cannot be read as a {suffix.lstrip('.') or 'CSV'} table ({exc})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _check_ids(frame: pd.DataFrame, path: Path, what: str) -> pd.Series:
    if frame.shape[1] == 0 or frame.columns[0] != SAMPLE_ID:
        first = frame.columns[0] if frame.shape[1] else "(nothing)"
        raise ResearchInputError(f"{path}: column 1 must be {SAMPLE_ID!r} ({what}); found {first!r}")
    ids = frame[SAMPLE_ID].astype(str).str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if empty.size:
        raise ResearchInputError(f"{path}: row {int(empty[0]) + 2}, column {SAMPLE_ID!r}: expected a sample ID, "
                                 "got an empty cell")
    dup = ids[ids.duplicated()]
    if not dup.empty:
        row = int(dup.index[0]) + 2
        raise ResearchInputError(f"{path}: row {row}, column {SAMPLE_ID!r}: sample {dup.iloc[0]!r} appears twice; "
                                 "expected one row per sample")
    return ids


def _numeric(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Columns as float64, or an error at the first cell that is not a finite number."""
    out: dict[str, np.ndarray] = {}
    for col in frame.columns:
        raw = frame[col]
        values = pd.to_numeric(raw.astype(str).str.strip() if raw.dtype == object else raw, errors="coerce")
        arr = values.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            i = int(bad[0])
            cell = raw.iloc[i]
            shown = "an empty cell" if str(cell).strip() == "" else repr(str(cell))
            raise ResearchInputError(f"{path}: row {i + 2}, column {col!r}: expected a number, got {shown}")
        out[col] = arr
    return pd.DataFrame(out, index=frame.index)


def read_matrix(path: str | os.PathLike[str], what: str = "expression") -> pd.DataFrame:
    """A samples × columns numeric table indexed by ``sample_id`` (the expression matrix or features).

    For features, :data:`METADATA_COLUMNS` are dropped. Raises :class:`ResearchInputError`
    for a missing/misplaced ``sample_id``, duplicate or empty IDs, duplicate column names,
    non-numeric/empty/non-finite cells, or no data column.
    """
    p = Path(path)
    frame = _read_raw(p)
    ids = _check_ids(frame, p, what)
    data = frame.drop(columns=[SAMPLE_ID])
    if what == "features":
        data = data.drop(columns=[c for c in METADATA_COLUMNS if c in data.columns])
    dup_cols = data.columns[data.columns.duplicated()]
    if len(dup_cols):
        raise ResearchInputError(f"{p}: column {dup_cols[0]!r} appears twice; expected unique {what} names")
    if data.shape[1] == 0:
        raise ResearchInputError(f"{p}: no {what} column after {SAMPLE_ID!r}")
    if data.shape[0] == 0:
        raise ResearchInputError(f"{p}: no sample rows")
    numeric = _numeric(data, p)
    numeric.index = pd.Index(ids.to_list(), name=SAMPLE_ID)
    return numeric


def read_clinical(path: str | os.PathLike[str], required: Sequence[str] = ("time", "event")) -> pd.DataFrame:
    """The clinical table indexed by ``sample_id``; ``time`` > 0 and ``event`` 0/1 when required.

    Other columns are kept as text (histology, stage) or numbers (covariates).
    """
    p = Path(path)
    frame = _read_raw(p)
    ids = _check_ids(frame, p, "clinical")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ResearchInputError(f"{p}: column(s) {missing} not found; expected {[SAMPLE_ID, *required]} "
                                 f"(the table has {list(frame.columns)})")
    out = frame.drop(columns=[SAMPLE_ID]).copy()
    out.index = pd.Index(ids.to_list(), name=SAMPLE_ID)
    if "time" in required:
        out["time"] = _numeric(frame[["time"]], p)["time"].to_numpy()
        bad = np.flatnonzero(out["time"].to_numpy() <= 0)
        if bad.size:
            raise ResearchInputError(f"{p}: row {int(bad[0]) + 2}, column 'time': expected a positive time, "
                                     f"got {out['time'].iloc[int(bad[0])]}")
    if "event" in required:
        ev = _numeric(frame[["event"]], p)["event"].to_numpy()
        bad = np.flatnonzero(~np.isin(ev, (0.0, 1.0)))
        if bad.size:
            raise ResearchInputError(f"{p}: row {int(bad[0]) + 2}, column 'event': expected 1 (death/progression) "
                                     f"or 0 (censored), got {frame['event'].iloc[int(bad[0])]!r}")
        out["event"] = ev.astype(int)
    return out


def read_gmt(path: str | os.PathLike[str], max_genes: int | None = 500, min_genes: int = 1) -> list[GeneSet]:
    """Gene sets of an MSigDB GMT file; sets with more than ``max_genes`` genes are left out (paper: 500)."""
    p = Path(path)
    if not p.is_file():
        raise ResearchInputError(f"{p}: file not found")
    sets: list[GeneSet] = []
    seen: set[str] = set()
    with p.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.rstrip("\n\r").split("\t")]
            if len(fields) < 3 or not fields[0]:
                raise ResearchInputError(f"{p}: line {line_no}: expected 'name<TAB>description<TAB>gene...' "
                                         f"(MSigDB GMT), got {len(fields)} tab-separated field(s)")
            if fields[0] in seen:
                raise ResearchInputError(f"{p}: line {line_no}: gene set {fields[0]!r} appears twice")
            seen.add(fields[0])
            genes = tuple(dict.fromkeys(g for g in fields[2:] if g))
            if len(genes) < min_genes or (max_genes is not None and len(genes) > max_genes):
                continue
            sets.append(GeneSet(fields[0], fields[1], genes))
    if not sets:
        raise ResearchInputError(f"{p}: no gene set with {min_genes} to {max_genes} genes")
    return sets


def restrict_gene_sets(sets: Sequence[GeneSet], genes: Sequence[str], gmt_path: str | os.PathLike[str],
                       expr_path: str | os.PathLike[str]) -> list[tuple[GeneSet, np.ndarray]]:
    """Each set with the column indices of its genes in the expression matrix; sets with none dropped.

    Raises when no set shares a gene with the matrix (wrong species, IDs instead of symbols).
    """
    position = {g: i for i, g in enumerate(genes)}
    out = [(s, np.array([position[g] for g in s.genes if g in position], dtype=int)) for s in sets]
    out = [(s, idx) for s, idx in out if idx.size]
    if not out:
        example = ", ".join(list(sets[0].genes)[:3])
        raise ResearchInputError(f"{gmt_path}: no gene of any gene set is a column of {expr_path} (e.g. {example}; "
                                 f"the matrix has {', '.join(list(genes)[:3])}, ...): expected HGNC symbols in both")
    return out


def match_samples(a: pd.DataFrame, b: pd.DataFrame, a_path: str | os.PathLike[str],
                  b_path: str | os.PathLike[str]) -> list[str]:
    """Sample IDs in both tables (in ``a``'s order); an error naming both files when there are none."""
    common = [s for s in a.index if s in set(b.index)]
    if not common:
        raise ResearchInputError(f"{a_path} and {b_path}: no {SAMPLE_ID} in both (first of each: "
                                 f"{list(a.index[:3])} vs {list(b.index[:3])}); expected the same sample IDs")
    return common


@contextmanager
def staged_output(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``out_dir`` whose files are moved into ``out_dir`` only on success.

    On any exception the temporary folder is removed and ``out_dir`` is left as it was, so
    a failed command never leaves half of its outputs behind.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        durable.replace_tree(tmp, final)
        return
    for item in sorted(tmp.iterdir()):
        durable.replace_tree(item, final / item.name)
    tmp.rmdir()
