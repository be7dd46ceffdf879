"""Deterministic UIDs (radnode.dicom_io.uids): valid per PS3.5 §9.1, stable, distinct."""

from __future__ import annotations

import re
import uuid

import pytest

from radnode.config.model import OutputSettings
from radnode.dicom_io.uids import (
    UID_MAX_LENGTH,
    DerivedObject,
    derive_uid,
    derived_object_uids,
    is_valid_uid,
    series_fingerprint,
)

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
ORG_ROOT = "1.2.826.0.1.3680043.10.543"
SERIES = "1.3.6.1.4.1.9590.100.1.2.296658988911737913102339329841519593982"


def _valid(uid: str) -> bool:
    return len(uid) <= UID_MAX_LENGTH and UID_RE.fullmatch(uid) is not None


@pytest.mark.parametrize("root", ["2.25", ORG_ROOT, "1.2.3", "9" * 10 + ".1" * 7])
def test_derived_uid_is_valid_and_stable(root: str) -> None:
    first = derive_uid(root, "series", SERIES, "SEG", "1")
    again = derive_uid(root, "series", SERIES, "SEG", "1")
    assert first == again
    assert _valid(first), first
    assert is_valid_uid(first)
    assert first.startswith(root + ".")


def test_uuid_root_follows_ps3_5_b2() -> None:
    uid = derive_uid("2.25", "a", "b")
    number = int(uid.split(".", 2)[2])
    assert 0 < number < 2**128
    # a name-based UUID (version 5, RFC 4122 variant) per PS3.5 §B.2
    as_uuid = uuid.UUID(int=number)
    assert as_uuid.version == 5
    assert as_uuid.variant == uuid.RFC_4122


def test_org_root_uses_the_full_length_for_the_suffix() -> None:
    uid = derive_uid(ORG_ROOT, "x")
    suffix = uid[len(ORG_ROOT) + 1 :]
    # as many digits as fit (leading zeros cannot occur in int formatting)
    assert len(uid) <= UID_MAX_LENGTH
    assert len(suffix) >= UID_MAX_LENGTH - len(ORG_ROOT) - 1 - 3


def test_the_longest_configurable_root_still_gives_valid_uids() -> None:
    longest = "1." + "2" * 22  # OutputSettings.uid_root allows 24 characters
    assert OutputSettings(uid_root=longest).uid_root == longest
    uid = derive_uid(longest, SERIES, "SR")
    assert _valid(uid)


@pytest.mark.parametrize("parts", [("a", "bc"), ("ab", "c"), ("c", "ab"), ("abc",)])
def test_part_boundaries_and_order_matter(parts: tuple[str, ...]) -> None:
    others = {("a", "bc"), ("ab", "c"), ("c", "ab"), ("abc",)} - {parts}
    uid = derive_uid("2.25", *parts)
    assert all(derive_uid("2.25", *o) != uid for o in others)


def test_many_inputs_give_distinct_uids() -> None:
    for root in ("2.25", ORG_ROOT):
        uids = {derive_uid(root, SERIES, str(i)) for i in range(2000)}
        assert len(uids) == 2000


@pytest.mark.parametrize("root", ["1.02.3", "abc", "1..2", ".1", "1.2.", "1." + "2" * 40, ""])
def test_invalid_roots_are_rejected_with_the_root_named(root: str) -> None:
    with pytest.raises(ValueError, match="UID root"):
        derive_uid(root, "x")


def test_no_parts_is_an_error() -> None:
    with pytest.raises(ValueError):
        derive_uid("2.25")


def test_object_uids_depend_on_every_input() -> None:
    base = derived_object_uids("2.25", SERIES, DerivedObject.SEG, "1")
    assert base == derived_object_uids("2.25", SERIES, "SEG", "1")
    assert base.series_instance_uid != base.sop_instance_uid
    variants = [
        derived_object_uids("2.25", SERIES, DerivedObject.RTSTRUCT, "1"),
        derived_object_uids("2.25", SERIES, DerivedObject.SEG, "2"),
        derived_object_uids("2.25", SERIES + "1", DerivedObject.SEG, "1"),
        derived_object_uids(ORG_ROOT, SERIES, DerivedObject.SEG, "1"),
        derived_object_uids("2.25", SERIES, DerivedObject.SEG, "1", "fingerprint"),
    ]
    for other in variants:
        assert other.sop_instance_uid != base.sop_instance_uid
        assert other.series_instance_uid != base.series_instance_uid
        assert _valid(other.sop_instance_uid) and _valid(other.series_instance_uid)
    with pytest.raises(ValueError):
        derived_object_uids("2.25", SERIES, "CT", "1")


def test_series_fingerprint_ignores_order_but_not_membership() -> None:
    uids = [f"1.2.3.{i}" for i in range(50)]
    assert series_fingerprint(uids) == series_fingerprint(reversed(uids))
    assert series_fingerprint(uids) != series_fingerprint(uids[:-1])
