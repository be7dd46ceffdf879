"""Send what waits in the outbox to each destination with C-STORE (PS3.4 Annex B).

One association per destination and round, proposing exactly the SOP classes of the due
items (a peer that accepts only what it is offered, like ``storescu -R``, then works).
Every attempt's outcome goes back to :class:`~radnode.pipeline.outbox.Outbox`, which
decides the item's next state; this module only talks DICOM and classifies statuses.

Status handling (PS3.4 B.2.3, PS3.7 Annex C):

* ``0x0000`` success, and the warnings ``0xB000`` (coercion of data elements), ``0xB006``
  (elements discarded), ``0xB007`` (data set does not match SOP class): stored; the code
  is recorded with the item;
* any failure status (``0xA7xx`` out of resources, ``0xA9xx`` data set does not match SOP
  class, ``0xCxxx`` cannot understand, ``0x0122`` SOP class not supported, ...): refused,
  counts towards the outbox's attempt limit;
* no association, an abort, or no response within the DIMSE timeout: the destination is
  *down*; its items wait (exponential backoff), they are never given up.

Files are sent as they are: the data set bytes of the outbox file go out unchanged (a
forwarded series keeps every private or slightly malformed element its scanner wrote),
whenever the peer accepted the file's own transfer syntax. Only when it accepted just
another one is the file decoded and converted by pynetdicom (uncompressed syntaxes).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config

from radnode.config import Destination, Settings
from radnode.pipeline.background import BackgroundLoop
from radnode.node import status as dimse_status
from radnode.node.status import format_status
from radnode.pipeline.outbox import AttemptOutcome, ItemState, Outbox, OutboxItem

log = logging.getLogger(__name__)

#: Most items sent on one association per round; the rest follow in the next round.
DEFAULT_BATCH_LIMIT = 100
#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: odd IDs 1-255).
MAX_CONTEXTS = 128


def classify_status(status: int) -> AttemptOutcome:
    """Map a C-STORE response status to the outbox's outcome."""
    category = dimse_status.category(status)
    if category == dimse_status.CATEGORY_SUCCESS:
        return AttemptOutcome.SUCCESS
    if category == dimse_status.CATEGORY_WARNING:
        return AttemptOutcome.WARNING
    return AttemptOutcome.REFUSED


@dataclass
class DispatchSummary:
    """What one round did (for logs, metrics and tests)."""

    sent: int = 0
    refused: int = 0
    unreachable: int = 0
    local_errors: int = 0
    destinations_down: list[str] = field(default_factory=list)

    def add(self, other: DispatchSummary) -> None:
        self.sent += other.sent
        self.refused += other.refused
        self.unreachable += other.unreachable
        self.local_errors += other.local_errors
        self.destinations_down += other.destinations_down


def _tls_args(settings: Settings, dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """Client TLS context for a destination with ``tls: true`` (PS3.15 B.1)."""
    if not dest.tls:
        return None
    tls = settings.node.tls
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context, dest.host


class Dispatcher:
    """Sends due outbox items to the configured destinations.

    Parameters
    ----------
    outbox
        Where items come from and outcomes go.
    settings
        Destinations, our AE title and the network timeouts (``node.*_timeout``).
    batch_limit
        Most items per destination and round.
    """

    def __init__(self, outbox: Outbox, settings: Settings, batch_limit: int = DEFAULT_BATCH_LIMIT) -> None:
        self.outbox = outbox
        self.settings = settings
        self.batch_limit = batch_limit
        self._lock = threading.Lock()

    def destinations(self) -> dict[str, Destination]:
        return {d.name: d for d in self.settings.destinations}

    def run_once(self) -> DispatchSummary:
        """Send every due item once; safe to call from several threads (rounds serialise)."""
        summary = DispatchSummary()
        with self._lock:
            configured = self.destinations()
            due = self.outbox.due(configured.keys(), limit=self.batch_limit * max(1, len(configured)))
            for name, items in due.items():
                summary.add(self.send(configured[name], items[: self.batch_limit]))
        return summary

    def _contexts(self, ae: AE, items: Sequence[OutboxItem]) -> None:
        """One presentation context per SOP class and file transfer syntax, so that an
        accepted context means the file goes out as it is (a peer accepts one transfer
        syntax per context, its own preference), plus one per SOP class offering the
        uncompressed syntaxes for a converted copy when the exact one is refused."""
        contexts: list[tuple[str, list[str]]] = []
        fallback = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for item in items:
            exact = (item.sop_class_uid, [item.transfer_syntax_uid])
            if exact not in contexts:
                contexts.append(exact)
        for sop_class in dict.fromkeys(item.sop_class_uid for item in items):
            contexts.append((sop_class, fallback))
        if len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts exceed the {MAX_CONTEXTS} of one association")
        for sop_class, transfer_syntaxes in contexts:
            ae.add_requested_context(sop_class, transfer_syntaxes)

    def _down(self, dest: Destination, items: Sequence[OutboxItem], reason: str, summary: DispatchSummary) -> None:
        self.outbox.record_destination(dest.name, reachable=False, error=reason)
        for item in items:
            self.outbox.record(item, AttemptOutcome.UNREACHABLE, error=reason)
            summary.unreachable += 1
        delay = self.outbox.defer_destination(dest.name)
        summary.destinations_down.append(dest.name)
        address = dest.url if dest.type == "dicomweb" else f"{dest.ae_title}@{dest.host}:{dest.port}"
        log.warning(
            "destination %s (%s) unreachable: %s; %d item(s) wait, next try in %.0f s",
            dest.name, address, reason, len(items), delay,
        )

    def send(self, dest: Destination, items: Sequence[OutboxItem]) -> DispatchSummary:
        """Send ``items`` to ``dest`` over one association and record every attempt."""
        summary = DispatchSummary()
        if not items:
            return summary
        if dest.type == "dicomweb":
            from radnode.pipeline.dicomweb_send import DicomWebSender

            DicomWebSender(self.outbox, self._down).send(dest, items, summary)
            return summary
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        self._contexts(ae, items)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=_tls_args(self.settings, dest))
        except (OSError, ValueError, RuntimeError) as exc:
            self._down(dest, items, f"cannot associate: {exc}", summary)
            return summary
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association aborted or no connection"
            self._down(dest, items, reason, summary)
            return summary
        self.outbox.record_destination(dest.name, reachable=True)
        try:
            for index, item in enumerate(items):
                if not assoc.is_established:
                    self._down(dest, items[index:], "association lost during the round", summary)
                    break
                started = time.time()
                try:
                    dataset = _sendable(assoc, item)
                except (InvalidDicomError, OSError, EOFError) as exc:
                    self.outbox.record(
                        item, AttemptOutcome.LOCAL_ERROR, error=f"cannot read outbox file {item.path}: {exc}", started_at=started
                    )
                    summary.local_errors += 1
                    continue
                try:
                    response = assoc.send_c_store(dataset)
                except (ValueError, AttributeError) as exc:
                    # No accepted presentation context for this SOP class / transfer syntax.
                    self.outbox.record(item, AttemptOutcome.REFUSED, error=f"not sendable to {dest.name}: {exc}", started_at=started)
                    summary.refused += 1
                    continue
                except RuntimeError as exc:
                    self._down(dest, items[index:], f"association failed: {exc}", summary)
                    break
                if "Status" not in response:
                    # Timeout, abort or invalid response: the peer, not the object, is the problem.
                    self._down(dest, items[index:], "no C-STORE response (timeout or abort)", summary)
                    break
                status = int(response.Status)
                outcome = classify_status(status)
                comment = str(response.get("ErrorComment", "") or "") or None
                updated = self.outbox.record(item, outcome, status=status, error=comment, started_at=started)
                if outcome is AttemptOutcome.REFUSED:
                    summary.refused += 1
                    log.warning(
                        "%s %s refused by %s with status %s%s (attempt %d%s)",
                        item.object_type, item.sop_instance_uid, dest.name, format_status(status),
                        f": {comment}" if comment else "", updated.attempts,
                        ", giving up" if updated.state is ItemState.FAILED else "",
                    )
                else:
                    summary.sent += 1
                    log.info(
                        "%s %s stored at %s (status %s)", item.object_type, item.sop_instance_uid, dest.name, format_status(status)
                    )
        finally:
            if assoc.is_established:
                assoc.release()
        return summary


def _sendable(assoc: Any, item: OutboxItem) -> Path | pydicom.Dataset:
    """The file itself when the peer accepted its transfer syntax (sent byte for byte,
    never decoded), else the decoded data set for pynetdicom to convert."""
    exact = any(
        cx.abstract_syntax == item.sop_class_uid and cx.transfer_syntax[0] == item.transfer_syntax_uid
        for cx in assoc.accepted_contexts
    )
    if exact:
        if not item.path.is_file():
            raise OSError(f"{item.path} is missing")
        # pynetdicom sends a file path's data set unread only with this switch (read at
        # each call); the node sends nothing else by path.
        _config.STORE_SEND_CHUNKED_DATASET = True
        return item.path
    log.info(
        "%s %s: peer did not accept transfer syntax %s; sending a converted copy",
        item.object_type, item.sop_instance_uid, item.transfer_syntax_uid,
    )
    return pydicom.dcmread(item.path)


class DispatchLoop(BackgroundLoop):
    """A thread that runs dispatch rounds when woken, when items fall due, or every ``idle_seconds``.

    Parameters
    ----------
    dispatcher
        Does the sending.
    idle_seconds
        Longest sleep between rounds when nothing is due.
    """

    #: Shortest sleep between rounds, so overdue items of an unconfigured destination
    #: cannot turn the loop into a busy wait.
    MIN_WAIT_SECONDS = 0.2

    thread_name = "radnode-dispatch"

    def __init__(self, dispatcher: Dispatcher, idle_seconds: float = 30.0) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.idle_seconds = idle_seconds
        self.rounds = 0

    def round(self) -> float:
        """One dispatch round (a round ends after at most one C-STORE per item); sleep until the next item is due."""
        try:
            self.dispatcher.run_once()
        except Exception:
            log.exception("dispatch round failed")
        self.rounds += 1
        next_due = self.dispatcher.outbox.next_due_at(self.dispatcher.destinations().keys())
        if next_due is None:
            return self.idle_seconds
        return min(self.idle_seconds, max(self.MIN_WAIT_SECONDS, next_due - time.time()))
