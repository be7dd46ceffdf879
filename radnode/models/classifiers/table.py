"""Feature and label tables: CSV in, named numpy matrices out (no pandas).

A *feature table* is a CSV file whose first column is the case identifier (header
``case_id``) and whose other columns are numeric features, one case per row. A *label
table* has ``case_id`` and one column per endpoint (or a single column ``label``).
Features are joined to labels by case identifier, in the order of the feature table.

Case identifiers may be patient-derived, so error messages name row numbers and column
names, never identifiers.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Header of the identifier column of feature and label tables.
CASE_ID_COLUMN = "case_id"
#: Column read when a label table has no column named after the endpoint.
GENERIC_LABEL_COLUMN = "label"
#: Cell texts read as a missing value (NaN).
MISSING_TEXTS = frozenset({"", "nan", "NaN", "NA", "N/A", "null", "None"})


class FeatureTableError(ValueError):
    """A feature or label table that cannot be used (the message says why and where)."""


@dataclass(frozen=True)
class FeatureTable:
    """Named feature matrix.

    Attributes
    ----------
    case_ids
        One identifier per row.
    names
        Feature names, in column order.
    values
        float64 matrix ``(len(case_ids), len(names))``; NaN marks a missing value.
    """

    case_ids: tuple[str, ...]
    names: tuple[str, ...]
    values: np.ndarray

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim != 2 or v.shape != (len(self.case_ids), len(self.names)):
            raise FeatureTableError(
                f"feature matrix shape {v.shape} does not match {len(self.case_ids)} cases x "
                f"{len(self.names)} features"
            )
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise FeatureTableError(f"duplicate feature names: {dup}")
        object.__setattr__(self, "values", v)

    def select(self, names: Sequence[str]) -> FeatureTable:
        """The columns ``names`` in that order (``KeyError`` names what is missing)."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"features not in the table: {missing}")
        cols = [index[n] for n in names]
        return FeatureTable(self.case_ids, tuple(names), self.values[:, cols])

    def rows(self, mask: np.ndarray) -> FeatureTable:
        """The rows where ``mask`` (bool or index array) selects."""
        idx = np.arange(len(self.case_ids))[mask]
        return FeatureTable(tuple(self.case_ids[i] for i in idx), self.names, self.values[idx])


def read_feature_csv(path: str | os.PathLike[str]) -> FeatureTable:
    """Read a feature table (see the module docstring).

    Raises
    ------
    FeatureTableError
        When the file has no ``case_id`` column, a cell is not a number, or an
        identifier repeats; the message names the file, row and column.
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise FeatureTableError(f"{p}: empty feature table") from None
        header = [h.strip() for h in header]
        if not header or header[0] != CASE_ID_COLUMN:
            raise FeatureTableError(f"{p}: the first column must be {CASE_ID_COLUMN!r}, got {header[:1]}")
        names = tuple(header[1:])
        if not names:
            raise FeatureTableError(f"{p}: no feature columns after {CASE_ID_COLUMN!r}")
        ids: list[str] = []
        rows: list[list[float]] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise FeatureTableError(f"{p} line {line_no}: {len(row)} cells, the header has {len(header)}")
            values = []
            for name, cell in zip(names, row[1:]):
                text = cell.strip()
                if text in MISSING_TEXTS:
                    values.append(math.nan)
                    continue
                try:
                    values.append(float(text))
                except ValueError:
                    raise FeatureTableError(
                        f"{p} line {line_no}: feature {name!r} is not a number ({text[:20]!r})"
                    ) from None
            ids.append(row[0].strip())
            rows.append(values)
    if len(set(ids)) != len(ids):
        raise FeatureTableError(f"{p}: repeated {CASE_ID_COLUMN} values")
    matrix = np.array(rows, dtype=np.float64).reshape(len(rows), len(names))
    return FeatureTable(tuple(ids), names, matrix)


def write_feature_csv(table: FeatureTable, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as a feature CSV (``repr`` of each float, so values round-trip exactly)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([CASE_ID_COLUMN, *table.names])
        for cid, row in zip(table.case_ids, table.values):
            writer.writerow([cid, *(repr(float(v)) for v in row)])
    return p


def read_label_csv(path: str | os.PathLike[str], endpoint: str) -> dict[str, str]:
    """Raw label text per case identifier for one endpoint.

    The column named ``endpoint`` (case-insensitive) is read, else a column ``label``.
    Empty cells are left out (a case without a label is not a training case).
    """
    p = Path(path)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if CASE_ID_COLUMN not in fields:
            raise FeatureTableError(f"{p}: label table needs a {CASE_ID_COLUMN!r} column, has {fields}")
        lower = {f.lower(): f for f in fields}
        column = lower.get(endpoint.lower()) or lower.get(GENERIC_LABEL_COLUMN)
        if column is None:
            raise FeatureTableError(
                f"{p}: no column {endpoint!r} (or {GENERIC_LABEL_COLUMN!r}) among {fields}"
            )
        out: dict[str, str] = {}
        for row in reader:
            row = {(k or "").strip(): (v or "") for k, v in row.items()}
            text = row.get(column, "").strip()
            if text and text not in MISSING_TEXTS:
                out[row[CASE_ID_COLUMN].strip()] = text
    return out


def write_label_csv(case_ids: Sequence[str], labels: Sequence[object], path: str | os.PathLike[str],
                    column: str = GENERIC_LABEL_COLUMN) -> Path:
    """Write a two-column label table."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([CASE_ID_COLUMN, column])
        for cid, lab in zip(case_ids, labels):
            writer.writerow([cid, lab])
    return p


def join_labels(table: FeatureTable, labels: dict[str, str]) -> tuple[FeatureTable, list[str]]:
    """Rows of ``table`` that have a label, and their label texts in the same order.

    Raises
    ------
    FeatureTableError
        When no case of the feature table has a label.
    """
    keep = np.array([cid in labels for cid in table.case_ids], dtype=bool)
    if not keep.any():
        raise FeatureTableError("no case of the feature table has a label (case_id values do not match)")
    if not keep.all():
        logger.info("%d of %d feature rows have no label and are left out", int((~keep).sum()), len(keep))
    sub = table.rows(keep)
    return sub, [labels[c] for c in sub.case_ids]


def training_arrays(x: np.ndarray, y: np.ndarray, folds: int, method: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Check a training set; return ``(x, y, n_classes, k)`` with ``k`` the usable CV folds.

    Raises ``ValueError`` (naming ``method``) for NaN/infinite features, fewer than two
    classes, or a class too small for two folds.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"method {method} needs finite features; the training matrix has NaN or infinite values")
    counts = np.bincount(y)
    present = counts[counts > 0]
    if len(present) < 2:
        raise ValueError(f"method {method} needs at least two classes, got class counts {counts.tolist()}")
    k = int(min(folds, present.min()))
    if k < 2:
        raise ValueError(f"every class needs at least 2 cases for cross-validation, got counts {counts.tolist()}")
    return x, y, len(present), k
