"""Deterministic UIDs for the objects radnode derives from a CT series.

A re-run of the same job on the same input must re-send *the same* objects, so a
receiving archive overwrites or ignores them instead of piling up copies. Every UID a
writer needs is therefore a pure function of its inputs (source series UID, object type,
pipeline version, ...), never of the clock or a random generator.

Two encodings, both valid per PS3.5 §9.1 (digits and dots, no leading zero in a
component, at most 64 characters):

* root ``2.25``: PS3.5 §B.2 -- ``2.25.`` followed by the decimal integer of a UUID. The
  UUID is a name-based UUID (RFC 9562 version 5, SHA-1) of the parts, so it is unique
  without any registration.
* any other (organisation) root: the root, a dot, and a decimal number taken from a
  SHA-256 digest of the parts, as many digits as fit in 64 characters (at least
  :data:`MIN_SUFFIX_DIGITS`, so collisions stay negligible).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

#: PS3.5 §9.1: a UID is at most 64 characters.
UID_MAX_LENGTH = 64
#: PS3.5 §B.2: the root under which UUID-derived UIDs live.
UUID_ROOT = "2.25"
#: Fewest digits a suffix under an organisation root may have (≈ 83 bits of digest).
MIN_SUFFIX_DIGITS = 25
#: PS3.5 §9.1: components of digits, no leading zeros (except a lone 0), dot-separated.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: Namespace of radnode's name-based UUIDs (itself a UUID5 of a fixed name, so constant).
RADNODE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radnode:derived-uid")


class DerivedObject(StrEnum):
    """The kinds of object radnode writes; part of every derived UID."""

    SEG = "SEG"
    RTSTRUCT = "RTSTRUCT"
    SR = "SR"


def is_valid_uid(value: str) -> bool:
    """Return whether ``value`` is a syntactically valid UID (PS3.5 §9.1)."""
    return len(value) <= UID_MAX_LENGTH and UID_PATTERN.fullmatch(value) is not None


def _check_root(root: str) -> str:
    root = root.strip()
    if not UID_PATTERN.fullmatch(root):
        raise ValueError(
            f"UID root {root!r} is not a valid UID prefix: digits and dots only, no leading "
            "zeros in a component (PS3.5 §9.1)"
        )
    if root != UUID_ROOT and len(root) + 1 + MIN_SUFFIX_DIGITS > UID_MAX_LENGTH:
        raise ValueError(
            f"UID root {root!r} is {len(root)} characters; at most "
            f"{UID_MAX_LENGTH - 1 - MIN_SUFFIX_DIGITS} leave room for a unique suffix"
        )
    return root


def _encode(parts: Iterable[str]) -> bytes:
    # Length-prefixed so ("ab", "c") and ("a", "bc") never collide.
    out = bytearray()
    for part in parts:
        raw = str(part).encode("utf-8")
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def derive_uid(root: str, *parts: str) -> str:
    """Derive a UID from ``root`` and ``parts``; equal inputs give equal UIDs.

    Parameters
    ----------
    root
        ``"2.25"`` for UUID-derived UIDs (PS3.5 §B.2) or an organisation's registered
        root (at most 38 characters).
    *parts
        Strings that identify the object (order matters). At least one.

    Returns
    -------
    str
        A valid UID of at most 64 characters.

    Raises
    ------
    ValueError
        If ``root`` is not a valid UID prefix or leaves too little room, or no part is
        given.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part besides the root")
    root = _check_root(root)
    payload = _encode(parts)
    if root == UUID_ROOT:
        name = payload.hex()
        return f"{UUID_ROOT}.{uuid.uuid5(RADNODE_UUID_NAMESPACE, name).int}"
    digits = UID_MAX_LENGTH - len(root) - 1
    number = int.from_bytes(hashlib.sha256(payload).digest(), "big") % (10**digits)
    return f"{root}.{number}"


def series_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """Return a short digest of the set of instances a result was computed from.

    Part of the derived UIDs, so a series that gained or lost instances (and was
    reprocessed) yields new objects instead of different objects under old UIDs.
    """
    digest = hashlib.sha256()
    for uid in sorted(str(u) for u in sop_instance_uids):
        digest.update(uid.encode("ascii", "replace") + b"\0")
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class DerivedUIDs:
    """The identifiers of one derived object."""

    series_instance_uid: str
    sop_instance_uid: str

    def sub_uid(self, root: str, *parts: str) -> str:
        """A further UID that belongs to this object (tracking, dimension organisation)."""
        return derive_uid(root, self.sop_instance_uid, *parts)


def derived_object_uids(
    root: str,
    source_series_uid: str,
    kind: DerivedObject | str,
    pipeline_version: str,
    *extra: str,
) -> DerivedUIDs:
    """Series and SOP Instance UIDs of the ``kind`` object derived from a series.

    Parameters
    ----------
    root
        UID root (``OutputSettings.uid_root``).
    source_series_uid
        Series Instance UID of the input CT series.
    kind
        SEG, RTSTRUCT or SR.
    pipeline_version
        Version of what produced the object; a new version gives new UIDs.
    *extra
        Further identifying strings (e.g. :func:`series_fingerprint` of the input
        instances, model versions).
    """
    kind = DerivedObject(kind)
    base = (str(source_series_uid), kind.value, str(pipeline_version), *extra)
    return DerivedUIDs(
        series_instance_uid=derive_uid(root, "series", *base),
        sop_instance_uid=derive_uid(root, "instance", *base),
    )
