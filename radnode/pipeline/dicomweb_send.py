"""Deliver outbox items to a ``type: dicomweb`` destination with STOW-RS (PS3.18 §10.5).

The DICOMweb counterpart of the C-STORE code in :mod:`radnode.pipeline.dispatch`, with the
same contract towards :class:`~radnode.pipeline.outbox.Outbox`: every attempt is recorded,
a peer that cannot be reached delays items (never loses them), a refused object counts
towards the attempt limit. The HTTP work is :mod:`dicomweb_client`'s ``store_instances``.

How an answer maps to the outbox (PS3.18 §10.5.3):

* no connection, a timeout, HTTP 5xx other than 507, 401 or 403 (credentials: an operator
  must fix the configuration; the items wait): the destination is *down*;
* an instance in the Referenced SOP Sequence, or HTTP 200 with no list: *sent* (a Warning
  Reason makes it a warning);
* an instance in the Failed SOP Sequence: *refused* with its Failure Reason as the status;
  except 0x0111 (duplicate SOP instance) or an HTTP 409 whose only complaint is that the
  instance exists already: the archive has it, which is what exactly-once needs -- *sent*;
* any other 4xx / 507 without a per-instance answer: every item of the request is refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radnode.config import Destination
from radnode.pipeline.dicomweb_http import dicomweb_client
from radnode.node.status import format_status
from radnode.pipeline.outbox import AttemptOutcome, ItemState, Outbox, OutboxItem

log = logging.getLogger(__name__)

#: Failure Reason "duplicate SOP instance" (PS3.7 C.5.8 / PS3.4 Annex C status 0x0111).
DUPLICATE_SOP_INSTANCE = 0x0111
#: Most instances in one STOW-RS request (results are a few objects; a forwarded series is split).
ITEMS_PER_REQUEST = 16
#: Text of a 409 body or Failure Reason comment that says the instance is there already.
_ALREADY_THERE = ("already exist", "already stored", "duplicate")

#: Called when the destination is down: (destination, items, reason, summary).
OnDown = Callable[[Destination, Sequence[OutboxItem], str, Any], None]


def _store_response(response: requests.Response | None) -> Dataset | None:
    """The Store Instances response body as a data set, if it is DICOM JSON."""
    if response is None or not response.content:
        return None
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def item_outcomes(
    http_status: int, body: Dataset | None, text: str, sop_uids: Sequence[str]
) -> dict[str, tuple[AttemptOutcome, int | None, str | None]]:
    """Per SOP Instance UID: outcome, status (Failure/Warning Reason) and error, from a STOW-RS answer."""
    referenced: dict[str, int | None] = {}
    failed: dict[str, int | None] = {}
    if body is not None:
        for item in body.get("ReferencedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            referenced[uid] = int(item.WarningReason) if "WarningReason" in item else None
        for item in body.get("FailedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            failed[uid] = int(item.FailureReason) if "FailureReason" in item else None
    already = http_status == 409 and any(hint in text.lower() for hint in _ALREADY_THERE)
    outcomes: dict[str, tuple[AttemptOutcome, int | None, str | None]] = {}
    for uid in sop_uids:
        if uid in failed:
            reason = failed[uid]
            if reason == DUPLICATE_SOP_INSTANCE or (already and not referenced):
                outcomes[uid] = (AttemptOutcome.SUCCESS, reason, "already stored at the destination")
            else:
                outcomes[uid] = (AttemptOutcome.REFUSED, reason, f"HTTP {http_status}: failure reason {format_status(reason)}")
        elif uid in referenced:
            warning = referenced[uid]
            kind = AttemptOutcome.WARNING if warning is not None else AttemptOutcome.SUCCESS
            outcomes[uid] = (kind, warning, None)
        elif http_status == 200 or already:
            outcomes[uid] = (AttemptOutcome.SUCCESS, None, "already stored at the destination" if already else None)
        else:
            outcomes[uid] = (AttemptOutcome.REFUSED, None, f"HTTP {http_status}: {text[:200] or 'instance not acknowledged'}")
    return outcomes


class DicomWebSender:
    """Sends a destination's due items with STOW-RS and records every attempt.

    Parameters
    ----------
    outbox
        Where outcomes go.
    on_down
        The dispatcher's handling of an unreachable destination (records and defers).
    """

    def __init__(self, outbox: Outbox, on_down: OnDown) -> None:
        self.outbox = outbox
        self.on_down = on_down

    def send(self, dest: Destination, items: Sequence[OutboxItem], summary: Any) -> None:
        """Send ``items`` to ``dest`` in requests of at most :data:`ITEMS_PER_REQUEST`; add to ``summary``."""
        assert dest.url is not None  # checked by the settings
        client = dicomweb_client(dest.url, dest.auth)
        for start in range(0, len(items), ITEMS_PER_REQUEST):
            if not self._request(client, dest, items[start : start + ITEMS_PER_REQUEST], summary):
                return  # the rest were not attempted; on_down deferred every pending item of dest

    def _request(self, client: Any, dest: Destination, items: Sequence[OutboxItem], summary: Any) -> bool:
        """One STOW-RS request; False when the destination turned out to be down."""
        started = time.time()
        datasets, sendable = [], []
        for item in items:
            try:
                datasets.append(pydicom.dcmread(item.path))
                sendable.append(item)
            except (InvalidDicomError, OSError, EOFError) as exc:
                self.outbox.record(item, AttemptOutcome.LOCAL_ERROR, error=f"cannot read outbox file {item.path}: {exc}", started_at=started)
                summary.local_errors += 1
        if not sendable:
            return True
        try:
            answer = client.store_instances(datasets)
            http_status, body, text = 200, answer, ""
        except requests.HTTPError as exc:
            response = exc.response
            http_status = response.status_code if response is not None else 0
            if http_status in (401, 403) or (http_status >= 500 and http_status != 507):
                self.on_down(dest, sendable, f"HTTP {http_status} from {dest.url}", summary)
                return False
            body = _store_response(response)
            text = response.text if response is not None and body is None else ""
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.on_down(dest, sendable, f"cannot reach {dest.url}: {type(exc).__name__}", summary)
            return False
        self.outbox.record_destination(dest.name, reachable=True)
        outcomes = item_outcomes(http_status, body, text, [i.sop_instance_uid for i in sendable])
        for item in sendable:
            outcome, code, error = outcomes[item.sop_instance_uid]
            updated = self.outbox.record(item, outcome, status=code, error=error, started_at=started)
            if outcome is AttemptOutcome.REFUSED:
                summary.refused += 1
                log.warning(
                    "%s %s refused by %s: %s (attempt %d%s)", item.object_type, item.sop_instance_uid, dest.name, error,
                    updated.attempts, ", giving up" if updated.state is ItemState.FAILED else "",
                )
            else:
                summary.sent += 1
                log.info("%s %s stored at %s by STOW-RS%s", item.object_type, item.sop_instance_uid, dest.name, f" ({error})" if error else "")
        return True
