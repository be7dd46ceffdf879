"""Quality control of a CT series before it is used for segmentation or radiomics.

The rules here decide whether a stack of CT Image Storage instances (PS3.3 A.3) forms
one regular voxel grid: one orientation, slices evenly spaced along the slice normal,
no shear (gantry tilt), enough slices and thin enough ones. Each finding is a
:class:`QCIssue` with a stable, machine-readable ``code`` (the constants below) so the
pipeline, the database and the DICOM SR writer can act on it without parsing text, and a
``message`` for a human that names the UIDs and positions involved -- never a patient
name or ID.

The rules take plain numbers (positions, cosines, thicknesses) and UIDs, not files, so
they can be tested alone; :mod:`radnode.dicom_io.series` gathers those numbers from the
headers and applies the rules.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# --- issue codes (stable: stored in the database and written to reports) ----------------
NO_IMAGES = "no_images"
SERIES_NOT_FOUND = "series_not_found"
MIXED_SERIES = "mixed_series"
OTHER_SERIES_IGNORED = "other_series_ignored"
NOT_CT = "not_ct"
ENHANCED_CT_UNSUPPORTED = "enhanced_ct_unsupported"
LOCALIZER_EXCLUDED = "localizer_excluded"
DUPLICATE_INSTANCE = "duplicate_instance"
DUPLICATE_SLICES = "duplicate_slices"
MISSING_GEOMETRY = "missing_geometry"
INVALID_GEOMETRY = "invalid_geometry"
MIXED_ORIENTATION = "mixed_orientation"
INCONSISTENT_PIXEL_GRID = "inconsistent_pixel_grid"
GANTRY_TILT = "gantry_tilt"
MISSING_SLICES = "missing_slices"
NON_UNIFORM_SPACING = "non_uniform_spacing"
TOO_FEW_SLICES = "too_few_slices"
SLICE_THICKNESS_OVER_LIMIT = "slice_thickness_over_limit"
UNREADABLE_PIXEL_DATA = "unreadable_pixel_data"

#: Codes after which no voxel grid can be built at all, so :func:`load_series` raises
#: :class:`SeriesRejected` even with ``strict=False``.
FATAL_CODES: frozenset[str] = frozenset(
    {
        NO_IMAGES,
        SERIES_NOT_FOUND,
        MIXED_SERIES,
        NOT_CT,
        ENHANCED_CT_UNSUPPORTED,
        DUPLICATE_SLICES,
        MISSING_GEOMETRY,
        INVALID_GEOMETRY,
        MIXED_ORIENTATION,
        INCONSISTENT_PIXEL_GRID,
        UNREADABLE_PIXEL_DATA,
    }
)

# --- reasons for files left out of the volume (QCReport.excluded) -----------------------
EXCLUDED_NOT_DICOM = "not_dicom"
EXCLUDED_NON_IMAGE = "non_image_object"
EXCLUDED_LOCALIZER = LOCALIZER_EXCLUDED
EXCLUDED_OTHER_SERIES = OTHER_SERIES_IGNORED
EXCLUDED_DUPLICATE = DUPLICATE_INSTANCE
EXCLUDED_NOT_CT = NOT_CT
EXCLUDED_ENHANCED_CT = ENHANCED_CT_UNSUPPORTED

#: A gap of at least this many nominal spacings is reported as missing slices rather
#: than as irregular spacing.
_MISSING_SLICE_RATIO = 1.5
#: How many UIDs/positions a message lists before it says "and N more".
_MAX_LISTED = 5


class Severity(StrEnum):
    """How bad a :class:`QCIssue` is: an ``error`` fails the series, a ``warning`` does not."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class QCLimits:
    """Acceptance limits for a CT series (fed from the radnode configuration).

    Parameters
    ----------
    min_slices
        Fewest slices a series may have; fewer gives ``too_few_slices``.
    max_slice_thickness_mm
        Thickest reconstructed slice (Slice Thickness (0018,0050)) accepted; radiomics
        features drift with slice thickness, so thick reconstructions are refused.
    spacing_tolerance_mm
        Largest deviation of one slice-to-slice distance from the nominal spacing before
        the stack counts as ``non_uniform_spacing``.
    max_tilt_deg
        Largest angle between the slice normal (from Image Orientation (Patient)) and the
        line through the slice positions; a larger angle means a sheared stack
        (``gantry_tilt``) that a SimpleITK image cannot represent.
    orientation_tolerance
        Largest difference of any direction cosine between slices before the stack is
        ``mixed_orientation``; also the tolerance for unit length/orthogonality.
    """

    min_slices: int = 20
    max_slice_thickness_mm: float = 5.0
    spacing_tolerance_mm: float = 0.05
    max_tilt_deg: float = 0.5
    orientation_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.min_slices < 1:
            raise ValueError(f"QCLimits.min_slices must be >= 1, got {self.min_slices}")
        for name in ("max_slice_thickness_mm", "spacing_tolerance_mm", "orientation_tolerance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QCLimits.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.max_tilt_deg < 90:
            raise ValueError(f"QCLimits.max_tilt_deg must be in [0, 90), got {self.max_tilt_deg}")


@dataclass(frozen=True)
class QCIssue:
    """One finding: a stable ``code``, its ``severity``, a readable ``message`` and ``details``."""

    code: str
    severity: Severity
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, code: str, message: str, **details: Any) -> QCIssue:
        """Build an error issue (the series fails QC)."""
        return cls(code, Severity.ERROR, message, dict(details))

    @classmethod
    def warning(cls, code: str, message: str, **details: Any) -> QCIssue:
        """Build a warning issue (the series still passes)."""
        return cls(code, Severity.WARNING, message, dict(details))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "code": self.code,
            "severity": str(self.severity),
            "message": self.message,
            "details": _jsonable(self.details),
        }


@dataclass(frozen=True)
class ExcludedFile:
    """A file found with the series but left out of the volume, and why (a code above)."""

    path: str
    reason: str
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "path": self.path,
            "reason": self.reason,
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
        }


@dataclass(frozen=True)
class QCReport:
    """Structured QC result of one series.

    ``passed`` is true when no issue is an error. ``recorded`` holds acquisition and
    reconstruction facts kept for harmonisation (kernel, slice thickness, spacing,
    manufacturer, model, kVp, ...). Build it with :meth:`from_issues` so ``passed``
    always agrees with ``issues``.
    """

    passed: bool
    issues: list[QCIssue]
    excluded: list[ExcludedFile]
    recorded: dict[str, Any]

    @classmethod
    def from_issues(
        cls,
        issues: Sequence[QCIssue],
        excluded: Sequence[ExcludedFile] = (),
        recorded: Mapping[str, Any] | None = None,
    ) -> QCReport:
        """Build a report whose ``passed`` flag is derived from ``issues``."""
        issue_list = list(issues)
        passed = not any(i.severity is Severity.ERROR for i in issue_list)
        return cls(passed, issue_list, list(excluded), dict(recorded or {}))

    @property
    def errors(self) -> list[QCIssue]:
        """Issues with severity ``error``."""
        return [i for i in self.issues if i.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[QCIssue]:
        """Issues with severity ``warning``."""
        return [i for i in self.issues if i.severity is Severity.WARNING]

    @property
    def codes(self) -> set[str]:
        """The set of issue codes present."""
        return {i.code for i in self.issues}

    @property
    def fatal(self) -> bool:
        """True when an error makes it impossible to build a voxel grid at all."""
        return any(i.code in FATAL_CODES for i in self.errors)

    def has(self, code: str) -> bool:
        """Whether an issue with ``code`` is present."""
        return code in self.codes

    def summary(self) -> str:
        """One line per error (or 'passed' plus warnings), for logs and exception text."""
        if self.passed:
            extra = "; ".join(f"[{w.code}] {w.message}" for w in self.warnings)
            return "QC passed" + (f" with warnings: {extra}" if extra else "")
        return "QC failed: " + "; ".join(f"[{e.code}] {e.message}" for e in self.errors)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (``json.dumps`` works on it)."""
        return {
            "passed": self.passed,
            "issues": [i.to_dict() for i in self.issues],
            "excluded": [e.to_dict() for e in self.excluded],
            "recorded": _jsonable(self.recorded),
        }


class SeriesRejected(Exception):
    """Raised when a series fails QC; ``report`` holds the full :class:`QCReport`."""

    def __init__(self, report: QCReport) -> None:
        super().__init__(report.summary())
        self.report = report


# --- rules ------------------------------------------------------------------------------


def check_slice_count(n_slices: int, series_uid: str, limits: QCLimits) -> list[QCIssue]:
    """``too_few_slices`` when the series has fewer than ``limits.min_slices`` slices."""
    if n_slices >= limits.min_slices:
        return []
    return [
        QCIssue.error(
            TOO_FEW_SLICES,
            f"series {series_uid} has {n_slices} slice(s); at least {limits.min_slices} "
            "are required (QCLimits.min_slices)",
            n_slices=n_slices,
            min_slices=limits.min_slices,
        )
    ]


def check_orientation(
    orientations: np.ndarray, sop_uids: Sequence[str], limits: QCLimits
) -> list[QCIssue]:
    """Check Image Orientation (Patient) (0020,0037) of every slice (PS3.3 C.7.6.2.1.1).

    Parameters
    ----------
    orientations
        ``(N, 6)`` row and column direction cosines, one row per slice.
    sop_uids
        SOP Instance UIDs in the same order, to name offending slices.
    limits
        Tolerances.

    Returns
    -------
    list of QCIssue
        ``invalid_geometry`` when the first slice's cosines are not two orthogonal unit
        vectors; ``mixed_orientation`` when any slice differs from the first.
    """
    tol = limits.orientation_tolerance
    ref = orientations[0]
    row, col = ref[:3], ref[3:]
    issues: list[QCIssue] = []
    if (
        abs(np.linalg.norm(row) - 1) > tol
        or abs(np.linalg.norm(col) - 1) > tol
        or abs(float(np.dot(row, col))) > tol
    ):
        issues.append(
            QCIssue.error(
                INVALID_GEOMETRY,
                f"Image Orientation (Patient) {_fmt(ref)} of instance {sop_uids[0]} is not two "
                f"orthogonal unit vectors (tolerance {tol})",
                sop_instance_uid=sop_uids[0],
                orientation=ref.tolist(),
            )
        )
    deviation = np.abs(orientations - ref).max(axis=1)
    odd = np.flatnonzero(deviation > tol)
    if odd.size:
        odd_uids = [sop_uids[i] for i in odd]
        issues.append(
            QCIssue.error(
                MIXED_ORIENTATION,
                f"{odd.size} of {len(sop_uids)} slices have an Image Orientation (Patient) "
                f"different from {_fmt(ref)} (instance {sop_uids[0]}), e.g. "
                f"{_fmt(orientations[odd[0]])}: {format_list(odd_uids)}",
                reference_orientation=ref.tolist(),
                sop_instance_uids=odd_uids,
                orientations=[orientations[i].tolist() for i in odd],
            )
        )
    return issues


def check_spacing(
    positions_mm: np.ndarray, sop_uids: Sequence[str], limits: QCLimits
) -> list[QCIssue]:
    """Check the distances between consecutive slices along the slice normal.

    Parameters
    ----------
    positions_mm
        Sorted (ascending) projections of Image Position (Patient) on the slice normal.
    sop_uids
        SOP Instance UIDs in the same order.
    limits
        Tolerances.

    Returns
    -------
    list of QCIssue
        ``duplicate_slices`` (two instances at one position), ``missing_slices`` (a gap of
        1.5 nominal spacings or more; the nominal spacing is the median distance) or
        ``non_uniform_spacing`` (any other distance off by more than
        ``limits.spacing_tolerance_mm``).
    """
    if positions_mm.size < 2:
        return []
    gaps = np.diff(positions_mm)
    tol = limits.spacing_tolerance_mm
    issues: list[QCIssue] = []
    dup = np.flatnonzero(gaps <= tol)
    if dup.size:
        pairs = [(sop_uids[i], sop_uids[i + 1], round(float(positions_mm[i]), 3)) for i in dup]
        issues.append(
            QCIssue.error(
                DUPLICATE_SLICES,
                f"{dup.size} pair(s) of different instances share one slice position: "
                + format_list([f"{a} and {b} at {p} mm" for a, b, p in pairs]),
                pairs=[{"sop_instance_uids": [a, b], "position_mm": p} for a, b, p in pairs],
            )
        )
        return issues
    nominal = float(np.median(gaps))
    big = np.flatnonzero(gaps >= _MISSING_SLICE_RATIO * nominal)
    if big.size:
        holes = [
            {
                "after_index": int(i),
                "from_mm": round(float(positions_mm[i]), 3),
                "to_mm": round(float(positions_mm[i + 1]), 3),
                "between_sop_instance_uids": [sop_uids[i], sop_uids[i + 1]],
                "estimated_missing": max(1, round(float(gaps[i]) / nominal) - 1),
            }
            for i in big
        ]
        total = sum(h["estimated_missing"] for h in holes)
        issues.append(
            QCIssue.error(
                MISSING_SLICES,
                f"about {total} slice(s) missing (nominal spacing {nominal:.3f} mm): "
                + format_list(
                    [
                        f"gap of {h['to_mm'] - h['from_mm']:.3f} mm between {h['from_mm']} and "
                        f"{h['to_mm']} mm (instances {h['between_sop_instance_uids'][0]} and "
                        f"{h['between_sop_instance_uids'][1]})"
                        for h in holes
                    ]
                ),
                nominal_spacing_mm=nominal,
                gaps=holes,
                estimated_missing=total,
            )
        )
    rest = np.ones(gaps.size, dtype=bool)
    rest[big] = False
    off = np.flatnonzero(rest & (np.abs(gaps - nominal) > tol))
    if off.size:
        issues.append(
            QCIssue.error(
                NON_UNIFORM_SPACING,
                f"slice spacing varies from {gaps[rest].min():.3f} to {gaps[rest].max():.3f} mm "
                f"(nominal {nominal:.3f} mm, tolerance {tol} mm) at: "
                + format_list(
                    [
                        f"{gaps[i]:.3f} mm between {positions_mm[i]:.3f} and "
                        f"{positions_mm[i + 1]:.3f} mm (instances {sop_uids[i]} and "
                        f"{sop_uids[i + 1]})"
                        for i in off
                    ]
                ),
                nominal_spacing_mm=nominal,
                min_spacing_mm=float(gaps[rest].min()),
                max_spacing_mm=float(gaps[rest].max()),
                irregular_after_index=[int(i) for i in off],
            )
        )
    return issues


def check_tilt(
    positions: np.ndarray,
    normal: np.ndarray,
    series_uid: str,
    limits: QCLimits,
    gantry_tilt_attribute: float | None = None,
) -> list[QCIssue]:
    """Detect a sheared stack (gantry tilt) from the slice positions.

    A tilted acquisition stored with untilted Image Orientation (Patient) has slice
    origins that drift sideways along the stack; the voxel grid is then not orthogonal and
    an image built from origin/spacing/direction would put voxels in the wrong place.

    Parameters
    ----------
    positions
        ``(N, 3)`` Image Position (Patient) values sorted along the normal.
    normal
        Unit slice normal (row cosine x column cosine).
    series_uid
        Series Instance UID, for the message.
    limits
        ``max_tilt_deg`` is the largest angle accepted.
    gantry_tilt_attribute
        Gantry/Detector Tilt (0018,1120) if present; reported only.
    """
    if positions.shape[0] < 2:
        return []
    span = positions[-1] - positions[0]
    length = float(np.linalg.norm(span))
    if length == 0.0:
        return []
    cos = min(1.0, abs(float(np.dot(span, normal))) / length)
    angle = math.degrees(math.acos(cos))
    if angle <= limits.max_tilt_deg:
        return []
    attr = ""
    if gantry_tilt_attribute is not None:
        attr = f"; Gantry/Detector Tilt is {gantry_tilt_attribute}"
    return [
        QCIssue.error(
            GANTRY_TILT,
            f"series {series_uid}: slice positions run at {angle:.2f} degrees to the slice "
            f"normal (limit {limits.max_tilt_deg}){attr}; the stack is sheared and needs "
            "resampling before use",
            tilt_deg=angle,
            max_tilt_deg=limits.max_tilt_deg,
            gantry_detector_tilt=gantry_tilt_attribute,
        )
    ]


def check_slice_thickness(
    thicknesses_mm: Sequence[float | None],
    spacing_mm: float | None,
    series_uid: str,
    limits: QCLimits,
) -> list[QCIssue]:
    """``slice_thickness_over_limit`` when Slice Thickness (0018,0050) exceeds the limit.

    When no slice has a Slice Thickness, the slice spacing stands in for it.
    """
    known = [t for t in thicknesses_mm if t is not None]
    if known:
        thickness, source = max(known), "Slice Thickness (0018,0050)"
    elif spacing_mm is not None:
        thickness, source = spacing_mm, "slice spacing (Slice Thickness absent)"
    else:
        return []
    if thickness <= limits.max_slice_thickness_mm:
        return []
    return [
        QCIssue.error(
            SLICE_THICKNESS_OVER_LIMIT,
            f"series {series_uid}: {source} is {thickness:g} mm, over the limit of "
            f"{limits.max_slice_thickness_mm:g} mm (QCLimits.max_slice_thickness_mm)",
            slice_thickness_mm=thickness,
            max_slice_thickness_mm=limits.max_slice_thickness_mm,
            source=source,
        )
    ]


# --- helpers ------------------------------------------------------------------------------


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in np.asarray(values).ravel()) + "]"


def format_list(items: Sequence[str]) -> str:
    """Join ``items`` for a message, listing at most five and counting the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, sets and paths into JSON-friendly values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
