"""DIMSE status codes and A-ASSOCIATE-RJ reasons, as named constants: the ones the node
answers with, and the ones it reads from peers (C-STORE to destinations, C-FIND,
C-MOVE and C-GET to the archive). The one set for the whole project.

A bare number in a handler is how ``0x210`` ends up where ``0xC210`` was meant; every code
the node sends is defined here once, with the part of the standard it comes from.
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import code_to_category

# --- C-STORE response statuses (PS3.4 Table B.2-1, PS3.7 Annex C) -----------------------------

#: Success (PS3.7 C.1.1).
SUCCESS = 0x0000
#: Warning: Coercion of Data Elements (PS3.4 B.2.3). Not sent today; listed for completeness.
WARNING_COERCION = 0xB000
#: Refused: Out of Resources (PS3.4 Table B.2-1, range A7xx). Sent by the disk guard.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (PS3.4 Table B.2-1, range A9xx).
DATASET_MISMATCH = 0xA900
#: Error: Cannot understand (PS3.4 Table B.2-1, range Cxxx): the data set could not be parsed.
CANNOT_UNDERSTAND = 0xC000
#: Error: Cannot understand - a UID is not a valid UID (PS3.5 §9.1). Same Cxxx range.
INVALID_UID = 0xC001
#: Error: Cannot understand - a required attribute (Study/Series/SOP UID) is missing.
MISSING_ATTRIBUTE = 0xC002
#: Error: Cannot understand - the data set carries File Meta elements (group 0002, PS3.10 §7.1).
NONCONFORMANT_META = 0xC003
#: Failure: Processing failure (PS3.7 C.4.2): an unexpected local error (I/O, database).
PROCESSING_FAILURE = 0x0110
#: Failure: the C-STORE handler raised (the code pynetdicom answers with in that case,
#: PS3.7 Annex C, Cxxx range); the fast receive path answers the same.
HANDLER_FAILURE = 0xC211

# --- C-MOVE / C-GET response statuses the sweep reads (PS3.4 C.4.2.1.5, C.4.3.1.4) -----------

#: C-MOVE failure: move destination unknown (the archive does not know our AE title).
MOVE_DESTINATION_UNKNOWN = 0xA801

#: Human-readable names for logs and the audit trail.
STATUS_NAMES: dict[int, str] = {
    SUCCESS: "success",
    WARNING_COERCION: "warning-coercion",
    OUT_OF_RESOURCES: "out-of-resources",
    DATASET_MISMATCH: "dataset-does-not-match-sop-class",
    CANNOT_UNDERSTAND: "cannot-understand",
    INVALID_UID: "invalid-uid",
    MISSING_ATTRIBUTE: "missing-attribute",
    NONCONFORMANT_META: "nonconformant-meta",
    PROCESSING_FAILURE: "processing-failure",
    HANDLER_FAILURE: "handler-failure",
}

# --- Status categories (PS3.7 Annex C), as :func:`pynetdicom.status.code_to_category` names them

CATEGORY_SUCCESS = "Success"
CATEGORY_PENDING = "Pending"
CATEGORY_WARNING = "Warning"


def category(code: int) -> str:
    """The category of a status a peer answered (``Success``, ``Warning``, ``Failure``, ...)."""
    return str(code_to_category(code))


def format_status(code: int | None) -> str:
    """A DIMSE status as ``0xA700`` (or ``-`` when the peer sent none)."""
    return "-" if code is None else f"0x{code:04X}"


def status_name(code: int) -> str:
    """Return the short name of a status code (``0x....`` when unknown)."""
    return STATUS_NAMES.get(code, f"0x{code:04X}")


# --- A-ASSOCIATE-RJ parameters (PS3.8 §9.3.4, Table 9-21) ------------------------------------


class RejectResult(IntEnum):
    """Result field of the A-ASSOCIATE-RJ PDU."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """Source field of the A-ASSOCIATE-RJ PDU."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """Reason/Diag. field for source = DICOM UL service-user (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07
