"""The DICOM listener: a pynetdicom Storage and Verification SCP with access control.

:class:`StorageNode` wires the pieces together - access policy, TLS, durable ingest,
series completion, audit log and metrics - and owns their life cycle. The C-STORE handler
is deliberately short: it hands the encoded data set (never decoded) to
:class:`radnode.node.ingest.Ingestor` and turns the outcome into a named status.

Receive-path choices (see ``benchmarks/ingest.py`` for the figures):

* the data set is never decoded: as each of its PDUs arrives it is appended to the
  instance's temporary file behind a hand-encoded File Meta (:meth:`StorageNode._stage`),
  so when the last PDU is in only the fsync, rename and index commit are left; only the
  few header attributes needed are scanned (:mod:`radnode.node.header`). Whenever the
  staged file is not exactly File Meta + data set, the bytes kept in memory are written
  instead;
* ``node.max_pdu`` defaults to 0 (unlimited), so senders use their largest PDUs;
* pynetdicom's per-PDU and per-DIMSE logging handlers are unbound: they format every PDU
  (and copy every data set once) even when nothing is logged;
* each association's DUL waits in ``select()`` instead of polling with 1 ms sleeps, reads
  PDUs with ``recv_into`` and keeps the data set fragments as views of the received PDUs;
  a C-STORE is validated, written, indexed and answered on that DUL thread as soon as its
  last PDU arrives, without the two hand-overs to and from pynetdicom's association
  thread (:mod:`radnode.node.fastpath`). ``evt.EVT_C_STORE`` (:meth:`StorageNode._on_c_store`)
  serves any C-STORE the fast path leaves to pynetdicom;
* the index row is committed with ``storage.index_sync`` (default ``normal``: the WAL is not
  fsync'ed; a row a power loss rolls back is re-created from its file at start-up, see
  :mod:`radnode.node.index`), so two device flushes per instance remain (file, folder);
* associations run in parallel, each on its own threads, up to ``node.max_associations``;
  nothing on the path holds a node-wide lock except the short index commit.

This module never imports torch or MONAI: the listener must start in a second and stay up
whatever the models do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from radnode.config.model import Settings
from radnode.node import status
from radnode.node.access import AccessPolicy, exposure_warnings
from radnode.node.audit import AuditLog
from radnode.node.completion import (
    CompletionSubscriber,
    CompletionTimer,
    SeriesCompleted,
    SeriesCompletion,
)
from radnode.node.fastpath import (
    FragmentSink,
    StoreCommand,
    StoreDIMSE,
    tune_association,
)
from radnode.node.fastpath import self_test as fastpath_self_test
from radnode.node.index import NodeIndex
from radnode.node.ingest import Ingestor, StoreOutcome, StoreRequest
from radnode.node.metrics import MetricsServer, NodeMetrics
from radnode.node.quarantine import Quarantine
from radnode.node.retrieve import SeriesGetProvider, get_contexts
from radnode.node.storage import (
    AUDIT_FILE,
    INDEX_FILE,
    InstanceStore,
    InvalidUIDError,
    TemporaryFile,
    encode_file_meta,
    validate_uid,
)
from radnode.node.tls import build_server_context

LOGGER = logging.getLogger(__name__)

#: A health check reports ``(healthy, details)`` for ``/healthz``.
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]

#: pynetdicom's logging handlers that run once per PDU or DIMSE message.
_CHATTY_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def storage_contexts(serve_get: bool = False) -> list[Any]:
    """Presentation contexts we accept: every storage SOP class pynetdicom knows, plus
    Verification, each with every transfer syntax (compressed ones included).

    ``serve_get`` adds Query/Retrieve GET (:mod:`radnode.node.retrieve`) and lets a peer
    take the storage SCP role (SCP/SCU role selection, PS3.7 D.3.3.4), which is how the
    C-STORE sub-operations of a C-GET reach it; a peer that negotiates no roles keeps the
    default ones."""
    contexts = [build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts]
    if serve_get:
        for cx in contexts:
            cx.scu_role, cx.scp_role = True, True
        contexts += get_contexts()
    contexts.append(build_context(Verification, ALL_TRANSFER_SYNTAXES))
    return contexts


class StorageNode:
    """The running DICOM node.

    Parameters
    ----------
    settings
        The effective configuration; ``node``, ``storage``, ``series``, ``output``
        and ``metrics`` are read.
    listen
        Run the listener role: accept associations (and serve metrics). ``False`` in a
        process that runs series completion only (``radnode serve --roles completion``).
    complete
        Run the completion role: the timer that completes series in the shared index.
        ``False`` when another process on the data folder runs it; that process finds
        what this one indexed at its next tick.

    Examples
    --------
    >>> node = StorageNode(settings)            # doctest: +SKIP
    >>> node.completion.subscribe(print)        # doctest: +SKIP
    >>> node.start(); ...; node.stop()          # doctest: +SKIP
    """

    def __init__(self, settings: Settings, *, listen: bool = True, complete: bool = True) -> None:
        self.settings = settings
        self.listen = listen
        self.complete = complete
        data_dir = Path(settings.storage.data_dir)
        self.store = InstanceStore(data_dir, settings.storage.min_free_gb)
        self.index = NodeIndex(self.store.data_dir / INDEX_FILE, settings.storage.index_sync, settings.database.url)
        self.audit = AuditLog(self.store.data_dir / AUDIT_FILE, settings.database.url)
        self.metrics = NodeMetrics()
        self.completion = SeriesCompletion(self.index, settings.series)
        self.timer = CompletionTimer(self.completion)
        self.ingestor = Ingestor(
            self.store,
            self.index,
            self.audit,
            settings.series.on_update,
            on_expected_reached=self.timer.wake,
            quarantine=Quarantine.from_settings(self.store, settings.storage),
        )
        self.access = AccessPolicy(settings.node)
        self.completion.subscribe(self._record_completion)
        self._server: ThreadedAssociationServer | None = None
        self._metrics_server: MetricsServer | None = None
        self._in_flight = 0
        self._in_flight_cv = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()
        self._health_checks: dict[str, HealthCheck] = {}
        #: Whether associations use :mod:`radnode.node.fastpath` (decided in :meth:`start`).
        self.fast_receive = False

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Recover from a crash, then listen. Returns once the socket is bound.

        Without the listener role only the completion timer starts.
        """
        if not self.listen:
            if self.complete:
                self.timer.start()
            LOGGER.info("series completion running on %s (no listener in this process)", self.store.data_dir)
            return
        node = self.settings.node
        if _config.STORE_RECV_CHUNKED_DATASET:
            raise RuntimeError(
                "the listener needs pynetdicom's _config.STORE_RECV_CHUNKED_DATASET = False "
                "(it writes the received bytes itself)"
            )
        self.fast_receive = self._choose_receive_path()
        self.store.clean_temporary()
        recovered = self.ingestor.recover_orphans()
        if recovered:
            LOGGER.warning("indexed %d file(s) written before a crash but never indexed", recovered)
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.require_called_aet = False  # checked (and audited) in _on_requested
        ssl_context = build_server_context(node.tls) if node.tls.enabled else None
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected_by_pynetdicom),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_GET, SeriesGetProvider(self.index, self.store.data_dir).handle),
        ]
        server = ae.start_server(
            (node.host, node.port),
            block=False,
            ssl_context=ssl_context,
            evt_handlers=handlers,
            contexts=storage_contexts(serve_get=True),
        )
        assert server is not None
        for event in _CHATTY_EVENTS:
            for handler, _args in list(server.get_handlers(event)):
                if getattr(handler, "__self__", None) is not self:
                    server.unbind(event, handler)
        self._server = server
        self.metrics.active_associations.set_function(lambda: len(server.active_associations))
        if self.complete:
            self.timer.start()
        if self.settings.metrics.enabled:
            self._metrics_server = MetricsServer(
                self.metrics, self.settings.metrics.host, self.settings.metrics.port, self.health
            )
            self._metrics_server.start()
            LOGGER.info(
                "metrics on http://%s:%d/metrics", self.settings.metrics.host, self._metrics_server.port
            )
        for warning in exposure_warnings(node):
            LOGGER.warning("%s", warning)
        LOGGER.info(
            "%s listening on %s:%d%s, data in %s",
            node.ae_title,
            node.host,
            self.port,
            " (TLS)" if ssl_context else "",
            self.store.data_dir,
        )

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (useful when ``node.port`` is 0)."""
        if self._server is None:
            raise RuntimeError("the node is not started")
        return int(self._server.server_address[1])

    @property
    def metrics_port(self) -> int | None:
        """The port of the metrics endpoint, or ``None`` when disabled."""
        return self._metrics_server.port if self._metrics_server else None

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop gracefully: refuse new associations, let open ones finish, then close.

        Associations still open after ``grace_seconds`` get an A-ABORT, but only once
        no C-STORE is being written, so nothing half-acknowledged remains.
        """
        if self._stopped.is_set():
            return
        server = self._server
        if server is not None:
            server.shutdown()
            deadline = time.monotonic() + grace_seconds
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            with self._in_flight_cv:
                self._closing = True
                self._in_flight_cv.wait_for(lambda: self._in_flight == 0, timeout=self.settings.node.dimse_timeout)
            for assoc in server.active_associations:
                LOGGER.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
        self.timer.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        self.index.close()
        self.audit.close()
        self._stopped.set()
        LOGGER.info("%s stopped", self.settings.node.ae_title)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def subscribe(self, subscriber: CompletionSubscriber) -> None:
        """Shortcut for ``node.completion.subscribe``."""
        self.completion.subscribe(subscriber)

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """Let another part of the process (the pipeline) report in ``/healthz``."""
        self._health_checks[name] = check

    def listener_health(self) -> tuple[bool, dict[str, Any]]:
        """The listener's own health: listening (with the listener role), enough disk to
        accept data, and the completion timer alive (with the completion role). What the
        systemd watchdog of this process follows; the pipeline's parts are not part of it."""
        free = self.store.free_bytes()
        self.metrics.disk_free_bytes.set(free)
        room = free >= self.store.min_free_bytes
        details: dict[str, Any] = {"disk_ok": room, "free_bytes": free}
        healthy = room
        if self.listen:
            listening = self._server is not None and not self._stopped.is_set() and not self._closing
            details["listening"] = listening
            healthy = healthy and listening
        if self.complete:
            ticking = self.timer.alive
            details["completion"] = {"ok": ticking}
            healthy = healthy and ticking
        return healthy, details

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: :meth:`listener_health` and every added check (the pipeline)."""
        healthy, details = self.listener_health()
        for name, check in self._health_checks.items():
            ok, extra = check()
            healthy = healthy and ok
            details[name] = {"ok": ok, **extra}
        return healthy, details

    # --- association events ---------------------------------------------------------------

    def _on_conn_open(self, event: Event) -> None:
        # Runs before the association thread starts: tune its receive path.
        assoc = event.assoc
        for chatty in _CHATTY_EVENTS:
            for handler, _args in list(assoc.get_handlers(chatty)):
                if getattr(handler, "__self__", None) is not self:
                    assoc.unbind(chatty, handler)
        if self.fast_receive:
            tune_association(assoc, self._store_on_dul_thread, self._stage)

    def _choose_receive_path(self) -> bool:
        """``node.fast_receive``, if the fast path's self-test passes on this pynetdicom."""
        if not self.settings.node.fast_receive:
            LOGGER.info("receive path: pynetdicom's ordinary path (node.fast_receive is off)")
            return False
        problem = fastpath_self_test()
        if problem is not None:
            LOGGER.warning(
                "receive path: the fast path's self-test failed (%s); falling back to pynetdicom's "
                "ordinary path (slower, equally correct)", problem,
            )
            return False
        LOGGER.info("receive path: fast (node.fast_receive, self-test passed)")
        return True

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        peer = assoc.requestor.address
        decision = self.access.check(calling, called, peer)
        if decision.accepted:
            if decision.unlisted_calling_ae and self.settings.node.allowed_calling_aes:
                LOGGER.warning("accepting unlisted calling AE %r from %s (node.strict is off)", calling, peer)
            return
        assert decision.result is not None and decision.source is not None and decision.reason is not None
        LOGGER.warning("rejecting association from %r at %s: %s", calling, peer, decision.explanation)
        self.audit.record(
            "association-rejected",
            calling_ae=calling,
            called_ae=called,
            peer_address=peer,
            peer_port=assoc.requestor.port,
            result=int(decision.result),
            source=int(decision.source),
            reason=int(decision.reason),
            detail=decision.explanation,
        )
        self.metrics.associations.labels(outcome="rejected").inc()
        assoc.acse.send_reject(int(decision.result), int(decision.source), int(decision.reason))
        assoc.kill()

    def _on_rejected_by_pynetdicom(self, event: Event) -> None:
        # pynetdicom's own refusals, e.g. maximum associations reached (transient,
        # service-provider presentation, local-limit-exceeded; PS3.8 Table 9-21).
        assoc = event.assoc
        primitive = assoc.acceptor.primitive
        self.audit.record(
            "association-rejected",
            calling_ae=str(assoc.requestor.primitive.calling_ae_title).strip(),
            peer_address=assoc.requestor.address,
            result=getattr(primitive, "result", None),
            source=getattr(primitive, "result_source", None),
            reason=getattr(primitive, "diagnostic", None),
            detail="refused by the association layer (limit or negotiation)",
        )
        self.metrics.associations.labels(outcome="rejected").inc()

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        self.metrics.associations.labels(outcome="accepted").inc()
        self.audit.record(
            "association-accepted",
            calling_ae=assoc.requestor.ae_title,
            called_ae=self.settings.node.ae_title,
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            tls=self.settings.node.tls.enabled,
        )

    def _on_released(self, event: Event) -> None:
        self.metrics.associations.labels(outcome="released").inc()

    def _on_aborted(self, event: Event) -> None:
        self.metrics.associations.labels(outcome="aborted").inc()
        self.audit.record(
            "association-aborted",
            calling_ae=event.assoc.requestor.ae_title,
            peer_address=event.assoc.requestor.address,
        )

    # --- C-STORE --------------------------------------------------------------------------

    def _stage(self, assoc: Association, command: StoreCommand) -> TemporaryFile | None:
        """Open the temporary file of a C-STORE as soon as its command arrived.

        It gets the File Meta of the command's UIDs, and each data set fragment is
        appended as its PDU arrives, so that writing overlaps receiving and only the
        fsync is left at the end. Nothing is staged when the disk guard is tripped, the
        node is closing or a command UID is not valid (the ingest then answers as usual).
        """
        if self._closing or not self.store.has_room():
            return None
        try:
            sop_class = validate_uid(command.sop_class_uid, "Affected SOP Class UID")
            sop_instance = validate_uid(command.sop_instance_uid, "Affected SOP Instance UID")
            transfer_syntax = validate_uid(command.transfer_syntax_uid, "Transfer Syntax UID")
        except InvalidUIDError:
            return None
        meta = encode_file_meta(sop_class, sop_instance, transfer_syntax, assoc.requestor.ae_title)
        try:
            return self.store.temporary(prefix=meta)
        except OSError as exc:
            LOGGER.error("cannot stage SOP instance %s: %s", sop_instance, exc)
            return None

    def _store_on_dul_thread(
        self, assoc: Association, command: StoreCommand, fragments: list[memoryview], sink: FragmentSink | None
    ) -> tuple[int, str | None]:
        """validate -> write (fsync, rename, fsync dir) -> index -> (status, comment).

        Called by :class:`radnode.node.fastpath.StoreDIMSE` once the last PDU of a
        C-STORE request arrived; the response leaves right after it returns.
        """
        outcome = self._ingest(
            command.sop_class_uid,
            command.sop_instance_uid,
            command.transfer_syntax_uid,
            assoc.requestor.ae_title,
            assoc.requestor.address,
            fragments,
            sink if isinstance(sink, TemporaryFile) else None,
        )
        return outcome.status, outcome.error_comment

    def _on_conn_close(self, event: Event) -> None:
        # A transfer cut short leaves a staged temporary file: delete it now.
        dimse = event.assoc.dimse
        if isinstance(dimse, StoreDIMSE):
            dimse.discard_staged()

    def _on_c_store(self, event: Event) -> int | Dataset:
        """The same for a C-STORE that pynetdicom decoded itself (fast path not applied)."""
        request = event.request
        with request.DataSet.getbuffer() as dataset:
            outcome = self._ingest(
                str(request.AffectedSOPClassUID or ""),
                str(request.AffectedSOPInstanceUID or ""),
                str(event.context.transfer_syntax),
                event.assoc.requestor.ae_title,
                event.assoc.requestor.address,
                [dataset],
            )
        if outcome.status == status.SUCCESS:
            return status.SUCCESS
        return _status(outcome.status, outcome.error_comment)

    def _ingest(
        self,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        calling_ae: str,
        peer: str,
        fragments: Sequence[bytes | memoryview],
        staged: TemporaryFile | None = None,
    ) -> StoreOutcome:
        started = time.perf_counter()
        with self._in_flight_cv:
            if self._closing:
                return StoreOutcome(
                    status.PROCESSING_FAILURE, "rejected", "Node is shutting down; retry later", "shutting-down"
                )
            self._in_flight += 1
        try:
            request = StoreRequest(sop_class, sop_instance, transfer_syntax, calling_ae, peer, tuple(fragments))
            outcome = self.ingestor.ingest(request, staged)
            size = request.size
        finally:
            with self._in_flight_cv:
                self._in_flight -= 1
                self._in_flight_cv.notify_all()
        self.metrics.bytes_received.inc(size)
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        if outcome.status == status.SUCCESS:
            self.metrics.instances_received.labels(outcome=outcome.outcome).inc()
        else:
            self.metrics.instances_rejected.labels(outcome.reason or "unknown").inc()
        return outcome

    # --- completion -----------------------------------------------------------------------

    def _record_completion(self, event: SeriesCompleted) -> None:
        self.metrics.series_completed.labels(reason=event.reason).inc()
        self.audit.record(
            "series-complete",
            series_instance_uid=event.series_instance_uid,
            study_instance_uid=event.study_instance_uid,
            round=event.round,
            reason=event.reason,
            instance_count=event.instance_count,
            expected_count=event.expected_count,
            calling_ae=event.calling_ae,
        )


def _status(code: int, comment: str | None) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902), LO of <= 64 chars."""
    response = Dataset()
    response.Status = code
    if comment:
        response.ErrorComment = comment[:64]
    return response
