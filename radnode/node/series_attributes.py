"""The attributes of a series that routing, completion and the sweep look at: one type.

A series reaches radnode two ways: an instance arrives (the listener parses its header,
:mod:`radnode.node.header`) or the archive describes it in a C-FIND answer (the sweep,
:mod:`radnode.pipeline.archive`). Both produce a :class:`SeriesAttributes`; the node's
index keeps it as JSON (:meth:`SeriesAttributes.to_json`, DICOM keywords as keys), the
completion event carries it, and the routing rules (:mod:`radnode.node.routing`) judge it.
The value converters below are the only ones: a header parsed from bytes, a decoded data
set and a C-FIND identifier all go through them, so a value means the same wherever it
came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue


def text_value(value: Any) -> str | None:
    """A text value stripped of padding; multi-values joined by a backslash; None if empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


def multi_value(value: Any) -> tuple[str, ...]:
    """A multi-valued text attribute as a tuple (a backslash-joined string is split)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split("\\"))
    try:
        return tuple(str(v).strip() for v in value)
    except TypeError:
        return (str(value).strip(),)


def float_value(value: Any) -> float | None:
    """A DS value (the first of several) as a float; None if absent or malformed."""
    return _number(value, float)


def int_value(value: Any) -> int | None:
    """An IS value (the first of several) as an int; None if absent or malformed."""
    return _number(value, int)


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, str):
        value = value.strip(" \x00").split("\\")[0]
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def da_value(value: str | None) -> date | None:
    """A DA value (YYYYMMDD, PS3.5 Table 6.2-1) as a date; None if absent or malformed."""
    if not value:
        return None
    try:
        return datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def element_value(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` in ``ds``, or None when the element is absent."""
    try:
        return ds[keyword].value
    except KeyError:
        return None


#: Index JSON key (DICOM keyword) of each attribute kept per series.
_KEYWORDS: dict[str, str] = {
    "modality": "Modality",
    "body_part_examined": "BodyPartExamined",
    "series_description": "SeriesDescription",
    "image_type": "ImageType",
    "slice_thickness": "SliceThickness",
    "station_name": "StationName",
    "study_date": "StudyDate",
    "manufacturer": "Manufacturer",
    "software_versions": "SoftwareVersions",
    "sop_class_uid": "SOPClassUID",
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
}
_MULTI = frozenset({"image_type", "software_versions"})


@dataclass(frozen=True)
class SeriesAttributes:
    """What is known about a series: its UIDs, the attributes rules test, who sent it.

    The instance-level attributes (SOP Class, SOP Instance UID, Image Type, Slice
    Thickness, Manufacturer) are those of one instance, the first one received. Text
    values are stripped; absent attributes are ``None`` (or an empty tuple). No
    patient-identifying attribute is kept.
    """

    series_instance_uid: str | None
    study_instance_uid: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    image_type: tuple[str, ...] = ()
    slice_thickness: float | None = None
    station_name: str | None = None
    #: As DA text (YYYYMMDD); :attr:`study_day` parses it.
    study_date: str | None = None
    manufacturer: str | None = None
    software_versions: tuple[str, ...] = ()
    series_number: int | None = None
    #: Distinct instances received (or the archive's Number of Series Related Instances).
    instance_count: int | None = None
    #: The AE title that sent the series (for the sweep: the archive's).
    calling_ae: str | None = None

    @property
    def study_day(self) -> date | None:
        """Study Date as a date; None when absent or malformed."""
        return da_value(self.study_date)

    def to_json(self) -> dict[str, Any]:
        """The attributes as the node's index keeps them (DICOM keywords, JSON values)."""
        values: dict[str, Any] = {}
        for name, keyword in _KEYWORDS.items():
            value = getattr(self, name)
            values[keyword] = list(value) if name in _MULTI else value
        return values

    @classmethod
    def from_json(
        cls, values: dict[str, Any], instance_count: int | None = None, calling_ae: str | None = None
    ) -> SeriesAttributes:
        """Attributes from :meth:`to_json` output (the index), plus count and sender."""
        fields: dict[str, Any] = {}
        for name, keyword in _KEYWORDS.items():
            value = values.get(keyword)
            if name in _MULTI:
                fields[name] = multi_value(value)
            elif name == "slice_thickness":
                fields[name] = float_value(value)
            else:
                fields[name] = text_value(value)
        return cls(instance_count=instance_count, calling_ae=calling_ae, **fields)

    @classmethod
    def from_dataset(cls, ds: Dataset, **extra: Any) -> SeriesAttributes:
        """Attributes from a decoded data set: a file's header or a C-FIND identifier."""
        return cls(**series_fields(ds), **extra)


def series_fields(ds: Dataset) -> dict[str, Any]:
    """The :class:`SeriesAttributes` fields found in ``ds`` (absent ones are None/empty)."""

    def text(keyword: str) -> str | None:
        return text_value(element_value(ds, keyword))

    return {
        "series_instance_uid": text("SeriesInstanceUID"),
        "study_instance_uid": text("StudyInstanceUID"),
        "sop_class_uid": text("SOPClassUID"),
        "sop_instance_uid": text("SOPInstanceUID"),
        "modality": text("Modality"),
        "body_part_examined": text("BodyPartExamined"),
        "series_description": text("SeriesDescription"),
        "image_type": multi_value(element_value(ds, "ImageType")),
        "slice_thickness": float_value(element_value(ds, "SliceThickness")),
        "station_name": text("StationName"),
        "study_date": text("StudyDate"),
        "manufacturer": text("Manufacturer"),
        "software_versions": multi_value(element_value(ds, "SoftwareVersions")),
        "series_number": int_value(element_value(ds, "SeriesNumber")),
    }
