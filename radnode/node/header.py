"""Read the few header attributes the node needs from an encoded data set, without decoding it.

The listener stores the bytes it received untouched; it only needs the UIDs that become
the storage path and index keys (the Study and Series Instance UIDs are not in the C-STORE
command, PS3.7 §9.3.1.1), plus the handful of attributes that series completion and the
routing rules look at. Parsing stops at the first element past (0020,1209), long before
Pixel Data, and for uncompressed CT only the first 64 KiB are looked at.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag

from radnode.node.series_attributes import (
    SeriesAttributes,
    element_value,
    float_value,
    int_value,
    multi_value,
    series_fields,
)

#: Implicit VR Little Endian (PS3.5 §A.1).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: Explicit VR Big Endian (retired, PS3.5 §A.3).
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: Deflated Explicit VR Little Endian (PS3.5 §A.5): the whole data set is deflated.
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
#: Transfer syntaxes whose data set is deflated (PS3.5 §A.5, A.6 JPIP Referenced Deflate,
#: and JPIP HTJ2K Referenced Deflate).
DEFLATED_TRANSFER_SYNTAXES = frozenset(
    {DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)

#: Parsing stops at the first element after (0020,1209) Number of Series Related Instances,
#: the highest-numbered attribute read here.
_LAST_TAG = 0x00201209
#: Bytes tried first; a CT header is a few KiB, so this nearly always suffices.
_PREFIX_BYTES = 64 * 1024
#: Upper bound of inflated bytes examined for a deflated data set.
_INFLATE_LIMIT = 1024 * 1024


class HeaderError(ValueError):
    """The data set could not be parsed far enough to read its identifying attributes."""


@dataclass(frozen=True)
class InstanceHeader(SeriesAttributes):
    """The attributes of one received instance: its series' attributes plus the few that
    say how big the series is and how the bytes were encoded.

    A header *is* the :class:`~radnode.node.series_attributes.SeriesAttributes` of its
    series as far as one instance can tell (the index keeps the first instance's);
    ``instance_count`` and ``calling_ae`` are filled in by whoever counts and received.
    """

    images_in_acquisition: int | None = None
    number_of_series_related_instances: int | None = None
    has_file_meta_elements: bool = False

    @property
    def expected_count(self) -> int | None:
        """Number of instances the series should have, when the data says so.

        (0020,1209) Number of Series Related Instances is exact when present; otherwise
        (0020,1002) Images in Acquisition is used, which equals the series size for the
        usual one-acquisition CT series (PS3.3 C.7.6.1). A value below 1 is ignored.
        """
        for value in (self.number_of_series_related_instances, self.images_in_acquisition):
            if value is not None and value >= 1:
                return value
        return None

    @classmethod
    def from_dataset(cls, ds: Dataset, **extra: Any) -> InstanceHeader:
        """Build the header from an already decoded data set (files on disk)."""
        return cls(
            **series_fields(ds),
            images_in_acquisition=int_value(element_value(ds, "ImagesInAcquisition")),
            number_of_series_related_instances=int_value(element_value(ds, "NumberOfSeriesRelatedInstances")),
            has_file_meta_elements=any(tag.group == 0x0002 for tag in ds.keys()),
            **extra,
        )


def _parse(data: bytes, implicit: bool, little: bool) -> tuple[InstanceHeader, bool]:
    """Parse ``data``; also say whether parsing stopped at the end marker (not at EOF)."""
    reached: list[bool] = []

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag > _LAST_TAG:
            reached.append(True)
            return True
        return False

    ds = read_dataset(io.BytesIO(data), is_implicit_VR=implicit, is_little_endian=little, stop_when=stop)
    return InstanceHeader.from_dataset(ds), bool(reached)


# --- fast path: a minimal element scanner ----------------------------------------------------
#
# pydicom builds a Dataset of every element before (0020,1209); on the hot path that costs
# more than writing the file. All attributes read here are text VRs (UI, CS, SH, LO, DA,
# DS, IS), so a scanner that walks element headers, skips sequences and decodes only those
# values is enough. Anything it does not expect sends the data set to pydicom instead.

_WANTED: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080060: "Modality",
    0x00080070: "Manufacturer",
    0x00081010: "StationName",
    0x0008103E: "SeriesDescription",
    0x00180015: "BodyPartExamined",
    0x00180050: "SliceThickness",
    0x00181020: "SoftwareVersions",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00201002: "ImagesInAcquisition",
    0x00201209: "NumberOfSeriesRelatedInstances",
}
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16


class _ScanError(ValueError):
    """The scanner met something it does not handle; pydicom takes over."""


class _Scanner:
    def __init__(self, data: memoryview, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.endian = "<" if little else ">"
        self.found: dict[int, bytes] = {}
        self.group2 = False

    def _header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, vr, value length, header size) of the element at ``pos``."""
        group, element = struct.unpack_from(self.endian + "HH", self.data, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            (length,) = struct.unpack_from(self.endian + "I", self.data, pos + 4)
            return tag, None, length, 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from(self.endian + "I", self.data, pos + 8)
            return tag, vr, length, 12
        if vr in _SHORT_VRS:
            (length,) = struct.unpack_from(self.endian + "H", self.data, pos + 6)
            return tag, vr, length, 8
        raise _ScanError(f"unexpected VR {vr!r}")

    def top_level(self) -> bool:
        """Scan the top-level data set; True when it reached past (0020,1209)."""
        pos, end = 0, len(self.data)
        while pos + 8 <= end:
            tag, vr, length, size = self._header(pos, self.implicit)
            if tag > _LAST_TAG:
                return True
            if tag >> 16 == 0x0002:
                self.group2 = True
            pos += size
            if length == _UNDEFINED:
                pos = self._skip_sequence(pos, self.implicit or vr == b"UN", 1)
                continue
            if tag in _WANTED:
                if pos + length > end:
                    raise _ScanError("value runs past the end of the data")
                self.found[tag] = bytes(self.data[pos : pos + length])
            pos += length
        if pos != end:
            raise _ScanError("data set ends inside an element header")
        return False

    def _skip_sequence(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the items of an undefined-length sequence; return the position after it."""
        if depth > _MAX_DEPTH:
            raise _ScanError("sequences nested too deep")
        while True:
            tag, _vr, length, size = self._header(pos, True)
            pos += size
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise _ScanError(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length != _UNDEFINED:
                pos += length
                continue
            while True:  # an undefined-length item: elements until the item delimiter
                tag, vr, length, size = self._header(pos, implicit)
                pos += size
                if tag == _ITEM_END:
                    break
                if length == _UNDEFINED:
                    pos = self._skip_sequence(pos, implicit or vr == b"UN", depth + 1)
                else:
                    pos += length
                if pos > len(self.data):
                    raise _ScanError("item runs past the end of the data")


def _scan_header(data: memoryview, implicit: bool, little: bool) -> tuple[InstanceHeader, bool]:
    scanner = _Scanner(data, implicit, little)
    reached = scanner.top_level()
    found = scanner.found
    charset = found.get(0x00080005)
    encodings = convert_encodings(list(multi_value(_ascii(charset)))) if charset else None

    def text(tag: int) -> str | None:
        raw = found.get(tag)
        if raw is None:
            return None
        if raw.isascii():
            value = raw.decode("ascii")
        elif encodings is not None:
            value = decode_bytes(raw, encodings, {0x5C})
        else:
            value = raw.decode("latin-1")
        value = value.strip(" \x00")
        return value or None

    header = InstanceHeader(
        sop_class_uid=text(0x00080016),
        sop_instance_uid=text(0x00080018),
        study_instance_uid=text(0x0020000D),
        series_instance_uid=text(0x0020000E),
        modality=text(0x00080060),
        body_part_examined=text(0x00180015),
        series_description=text(0x0008103E),
        image_type=multi_value(text(0x00080008)),
        slice_thickness=float_value(text(0x00180050)),
        station_name=text(0x00081010),
        study_date=text(0x00080020),
        manufacturer=text(0x00080070),
        software_versions=multi_value(text(0x00181020)),
        series_number=int_value(text(0x00200011)),
        images_in_acquisition=int_value(text(0x00201002)),
        number_of_series_related_instances=int_value(text(0x00201209)),
        has_file_meta_elements=scanner.group2,
    )
    return header, reached


def _ascii(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def parse_header(data: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    """Parse the identifying attributes of an encoded data set.

    Parameters
    ----------
    data
        The data set exactly as received in the C-STORE request (no File Meta).
    transfer_syntax
        The transfer syntax UID negotiated for its presentation context (PS3.5 §10).

    Raises
    ------
    HeaderError
        When the bytes are not a data set in that transfer syntax.
    """
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    view = memoryview(data)
    try:
        if transfer_syntax not in DEFLATED_TRANSFER_SYNTAXES:
            try:
                header, _reached = _scan_header(view, implicit, little)
                return header
            except (_ScanError, struct.error, LookupError):
                pass  # unusual encoding: let pydicom decide
        if transfer_syntax in DEFLATED_TRANSFER_SYNTAXES:
            try:
                raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(view, _INFLATE_LIMIT)
            except zlib.error as exc:
                raise HeaderError(f"deflated data set does not inflate: {exc}") from exc
            candidates = [raw]
        elif len(view) > _PREFIX_BYTES:
            candidates = [bytes(view[:_PREFIX_BYTES]), bytes(view)]
        else:
            candidates = [bytes(view)]
        last_error: Exception | None = None
        for index, chunk in enumerate(candidates):
            final = index == len(candidates) - 1
            try:
                header, reached_end = _parse(chunk, implicit, little)
            except Exception as exc:  # pydicom raises many types on bad bytes
                last_error = exc
                continue
            if not reached_end and not final:
                continue  # the prefix ended inside the header; read everything
            return header
        raise HeaderError(f"not a valid data set in transfer syntax {transfer_syntax}: {last_error}")
    finally:
        view.release()


def parse_header_fragments(fragments: Sequence[bytes | memoryview], transfer_syntax: str) -> InstanceHeader:
    """:func:`parse_header` for a data set that arrived in several pieces.

    The header of an image is nearly always inside the first P-DATA fragment, so the
    scanner tries that alone and the pieces are joined (one copy) only when it ends
    before (0020,1209), cannot be scanned, or the data set is deflated.
    """
    if len(fragments) == 1:
        return parse_header(fragments[0], transfer_syntax)
    if fragments and transfer_syntax not in DEFLATED_TRANSFER_SYNTAXES:
        implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
        try:
            header, reached = _scan_header(memoryview(fragments[0]), implicit, little)
        except (_ScanError, struct.error, LookupError):
            reached = False
        if reached:
            return header
    return parse_header(b"".join(fragments), transfer_syntax)
