"""Receive-path tuning of pynetdicom 3 for one accepted association.

pynetdicom's association machinery is built for generality. For a stream of 0.5 MB CT
slices on one association, three of its habits cost more than the durable write itself:

* its DUL thread polls the socket and its queues, sleeping 1 ms whenever there is nothing
  to do (the next request arrives ~0.1 ms after our response but is looked at only when
  the sleep ends);
* a received P-DATA-TF PDU is copied about six times on its way to the C-STORE handler
  (socket chunks, ``bytes()``, the PDU field, each PDV item, its value without the
  control byte, the BytesIO of the data set);
* a complete C-STORE request is handed from the DUL thread to the association thread
  (which polls its queue every millisecond), and the response travels back the same
  way, encoded through a pydicom Dataset.

:func:`tune_association` swaps three objects of one association for drop-in subclasses:

* :class:`SelectingDUL` waits in ``select()`` on the socket and on a wake-up pipe that
  the outgoing queue writes to, so it reacts to a new PDU or to our own response at once;
  it reads each P-DATA-TF PDU into one buffer and cuts its PDV items as memoryviews of
  it (no copy). Everything else in its loop is pynetdicom's own (state machine, timers,
  abort on error, every other PDU type);
* :class:`RecvIntoSocket` reads a PDU with ``recv_into`` into one buffer of the
  announced length;
* :class:`StoreDIMSE` (only when a store handler is given) reads a C-STORE-RQ command
  set itself (five elements; pydicom's decoding of it cost more than the rest of the
  request), keeps the data set fragments as those memoryviews, hands each to a sink the
  node opened when the command arrived (a temporary file: the write overlaps the
  receive) and, once the last one arrived, calls the handler *on the DUL thread* and
  queues the C-STORE response (command
  set encoded here, PS3.7 §9.3.1.2 and Annex E) on the same thread. Every other DIMSE
  message, and any C-STORE it cannot vouch for (malformed command, unknown context, SOP
  class not that of its context), is replayed into pynetdicom's ordinary path.
  pynetdicom's association thread, which polls for those every millisecond, is left as
  it is (letting it block instead saved idle CPU but measured slower under load).

Both are applied only to the exact pynetdicom classes they were written against, and
only under the pynetdicom minor series they were tested with (:data:`SUPPORTED_PYNETDICOM`,
pinned ``>=3.0.4,<3.1`` in pyproject.toml). The node uses them when ``node.fast_receive``
is on and :func:`self_test` -- run once at start-up -- finds every pynetdicom internal they
rely on (:data:`REQUIRED_INTERNALS`) where it expects it; otherwise it logs why and runs
pynetdicom's ordinary path. ``make test`` runs ``tests/test_node_*`` both ways.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from radnode.node import status as dimse_status

try:  # an internal helper: its absence must mean "no fast path", not "no node"
    from pynetdicom.utils import make_target
except ImportError:  # pragma: no cover - only under an unsupported pynetdicom
    make_target = None  # type: ignore[assignment]

LOGGER = logging.getLogger(__name__)

#: pynetdicom releases this module was tested against: [3.0, 3.1) (pinned in pyproject.toml).
SUPPORTED_PYNETDICOM = ((3, 0), (3, 1))
#: Longest wait in ``select()`` between checks of the kill flag and the ARTIM/idle timers.
IDLE_WAIT_SECONDS = 0.01
#: PDU type of P-DATA-TF (PS3.8 §9.3.5).
P_DATA_TF_TYPE = 0x04
#: PDU types of PS3.8 §9.3 (anything else is Evt19, as pynetdicom does).
_PDU_TYPES = frozenset(range(0x01, 0x08))
#: Message Control Header bits of a PDV (PS3.8 Annex E.2).
_COMMAND_BIT = 0x01
_LAST_BIT = 0x02
#: Message Control Header of a complete, single-fragment command (command, last).
_LAST_COMMAND_FRAGMENT = b"\x03"
#: C-STORE-RQ/-RSP Command Field and "no data set" Command Data Set Type (PS3.7 §9.3.1, E.1).
C_STORE_RQ_COMMAND_FIELD = 0x0001
C_STORE_RSP_COMMAND_FIELD = 0x8001
NO_DATA_SET = 0x0101
#: Events whose handlers need pynetdicom's own decoded PDU objects.
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)


#: pynetdicom internals the fast path uses: (class, attribute) that must exist on the class
#: (methods it calls or overrides) ...
REQUIRED_INTERNALS: tuple[tuple[type, str], ...] = (
    (DULServiceProvider, "run_reactor"),
    (DULServiceProvider, "_process_recv_primitive"),
    (DULServiceProvider, "_is_transport_event"),
    (DULServiceProvider, "_read_pdu_data"),
    (DULServiceProvider, "_decode_pdu"),
    (DULServiceProvider, "send_pdu"),
    (DIMSEServiceProvider, "receive_primitive"),
    (DIMSEServiceProvider, "send_msg"),
    (AssociationSocket, "recv"),
)
#: ... and instance attributes a fresh acceptor association must have: (object, attribute).
REQUIRED_STATE: tuple[tuple[str, str], ...] = (
    ("dul", "to_provider_queue"),
    ("dul", "event_queue"),
    ("dul", "_recv_pdu"),
    ("dul", "_idle_timer"),
    ("dul", "artim_timer"),
    ("dul", "_kill_thread"),
    ("dul", "state_machine"),
    ("dul", "socket"),
    ("dul", "assoc"),
    ("assoc", "_dul_ready"),
    ("assoc", "_kill"),
    ("assoc", "is_aborted"),
    ("assoc", "is_established"),
    ("dimse", "message"),
    ("dimse", "maximum_pdu_size"),
    ("dimse", "dul"),
)


def self_test() -> str | None:
    """Check, on a throw-away association, that the fast path fits this pynetdicom.

    Returns ``None`` when it does, else what is missing (for the start-up warning). Runs
    no network: the association gets an unconnected socket and no thread is started.
    """
    if not pynetdicom_supported(pynetdicom.__version__):
        return f"pynetdicom {pynetdicom.__version__} is not in the tested series {SUPPORTED_PYNETDICOM}"
    if make_target is None:
        return "pynetdicom.utils.make_target is missing"
    missing = [f"{cls.__name__}.{name}" for cls, name in REQUIRED_INTERNALS if not callable(getattr(cls, name, None))]
    if missing:
        return f"pynetdicom lacks {', '.join(missing)}"
    import socket

    from pynetdicom import AE

    with socket.socket() as raw:
        try:
            assoc = Association(AE(), "acceptor")
            assoc.set_socket(AssociationSocket(assoc, client_socket=raw))
            parts = {"assoc": assoc, "dul": assoc.dul, "dimse": assoc.dimse}
            absent = [f"{owner}.{name}" for owner, name in REQUIRED_STATE if not hasattr(parts[owner], name)]
            if absent:
                return f"a pynetdicom association lacks {', '.join(absent)}"
            if not tune_association(assoc, lambda *args: (0, None)):
                return "pynetdicom's association classes are not the ones the fast path subclasses"
            if type(assoc.dimse) is not StoreDIMSE or type(assoc.dul.socket) is not RecvIntoSocket:
                return "the fast path's classes did not take hold of a test association"
        except Exception as exc:  # any surprise in pynetdicom's internals means: do not use it
            return f"setting up a test association failed: {type(exc).__name__}: {exc}"
    return None


def pynetdicom_supported(version: str = pynetdicom.__version__) -> bool:
    """True when ``version`` is a pynetdicom release in :data:`SUPPORTED_PYNETDICOM`."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    low, high = SUPPORTED_PYNETDICOM
    return low <= major_minor < high


@dataclass(frozen=True)
class StoreCommand:
    """The parts of a C-STORE request's command set (PS3.7 §9.3.1.1) the node uses."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


class FragmentSink(Protocol):
    """Where a C-STORE data set is written while it arrives (a temporary file)."""

    def append_quietly(self, part: bytes | memoryview) -> None:
        """Append one fragment; never raises (a failure is remembered by the sink)."""

    def discard(self) -> None:
        """Give up on the sink (safe to call more than once)."""


#: ``handler(assoc, command, fragments, sink) -> (status, error comment)``; ``fragments``
#: are the data set's PDV values in order (without their control bytes), valid during the
#: call; ``sink`` is what the stager returned for this request (the handler owns it now).
StoreHandler = Callable[
    [Association, StoreCommand, list[memoryview], "FragmentSink | None"], tuple[int, str | None]
]
#: ``stager(assoc, command) -> sink or None``: called when a C-STORE-RQ command arrived,
#: before its data set; each data fragment is appended to the sink as it arrives.
Stager = Callable[[Association, StoreCommand], "FragmentSink | None"]


def encode_c_store_rsp(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int, error_comment: str | None = None
) -> bytes:
    """Encode a C-STORE-RSP command set (PS3.7 §9.3.1.2), Implicit VR Little Endian.

    A command set is always Implicit VR Little Endian (PS3.7 §6.3.1); elements in
    ascending tag order, UIs padded with NUL and the LO Error Comment with a space to
    even length, (0000,0000) Command Group Length first.
    """

    def element(element_number: int, value: bytes, pad: bytes = b"\x00") -> bytes:
        if len(value) % 2:
            value += pad
        return struct.pack("<HHI", 0x0000, element_number, len(value)) + value

    body = b"".join(
        (
            element(0x0002, sop_class_uid.encode("ascii", "replace")),
            element(0x0100, struct.pack("<H", C_STORE_RSP_COMMAND_FIELD)),
            element(0x0120, struct.pack("<H", message_id)),
            element(0x0800, struct.pack("<H", NO_DATA_SET)),
            element(0x0900, struct.pack("<H", status)),
            element(0x0902, error_comment[:64].encode("ascii", "replace"), b" ") if error_comment else b"",
            element(0x1000, sop_instance_uid.encode("ascii", "replace")),
        )
    )
    return element(0x0000, struct.pack("<I", len(body))) + body


class RecvIntoSocket(AssociationSocket):
    """An :class:`AssociationSocket` that reads a PDU straight into one buffer.

    Same contract as pynetdicom's ``recv``: returns what was read, shorter only when the
    peer closed the connection.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        sock = self.socket
        assert sock is not None
        while read < nr_bytes:
            count = sock.recv_into(view[read:], nr_bytes - read)
            if not count:
                return buffer[:read]
            read += count
        return buffer


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that also writes a byte to a pipe on ``put``, to wake a ``select()``."""

    def __init__(self, wake_fd: int) -> None:
        super().__init__()
        self._wake_fd = wake_fd

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        try:
            os.write(self._wake_fd, b"\x01")
        except OSError:
            pass  # pipe full (a wake-up is pending anyway) or already closed


def _split_pdvs(body: memoryview) -> list[tuple[int, memoryview]]:
    """(context ID, value) of each PDV item of a P-DATA-TF PDU body (PS3.8 §9.3.5.1);
    the values are views of ``body``."""
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + 6 > end:
            raise ValueError("P-DATA-TF PDU ends inside a PDV item header")
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"PDV item length {length} does not fit the PDU")
        items.append((body[offset + 4], body[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return items


def _as_pdu(items: list[tuple[int, memoryview]]) -> P_DATA_TF:
    """The PDV items as pynetdicom's P-DATA-TF PDU object (for its state machine)."""
    pdu = P_DATA_TF()
    for context_id, value in items:
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        item.presentation_data_value = value  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
    return pdu


class SelectingDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in ``select()`` instead of sleeping."""

    def run(self) -> None:
        # Thread.__init__ bound the original run_reactor as target; run ours instead.
        make_target(self.run_reactor)()

    def run_reactor(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        outgoing = _WakingQueue(write_fd)
        while True:  # keep anything queued before the swap
            try:
                outgoing.put(self.to_provider_queue.get_nowait())
            except queue.Empty:
                break
        self.to_provider_queue = outgoing
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if idle:
                    self._wait(read_fd)
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    LOGGER.exception("error in the DUL reactor; aborting the association")
                    self._abort_now()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            os.close(read_fd)
            os.close(write_fd)

    def _read_pdu_data(self) -> None:
        """Read one PDU; P-DATA-TF PDUs are cut into PDV views without copying.

        Same events as pynetdicom's reader: Evt17 when the connection closes mid-PDU,
        Evt19 for an unknown or undecodable PDU, else the event of the PDU type. When a
        handler is bound to ``EVT_DATA_RECV`` or ``EVT_PDU_RECV`` (they expect pynetdicom's
        own objects), pynetdicom's decoder is used for every PDU.
        """
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError):
            LOGGER.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            LOGGER.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            LOGGER.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        if len(body) != length:
            LOGGER.error("the received PDU is shorter than announced (%d of %d bytes)", len(body), length)
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == P_DATA_TF_TYPE and not any(self.assoc.get_handlers(e) for e in _PDU_EVENTS):
                pdu, event = _as_pdu(_split_pdvs(memoryview(body))), "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
        except Exception:
            LOGGER.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _wait(self, wake_fd: int) -> None:
        """Block until the peer sends, our side queues a PDU, or the idle wait ends."""
        handle = getattr(self.socket, "socket", None)
        if isinstance(handle, ssl.SSLSocket) and handle.pending():
            return  # decrypted bytes already buffered: select() cannot see them
        watched: list[Any] = [wake_fd]
        if handle is not None and handle.fileno() >= 0:
            watched.append(handle)
        try:
            select.select(watched, [], [], IDLE_WAIT_SECONDS)
        except (OSError, ValueError):
            pass  # socket closed under us: the loop notices through the state machine
        try:
            while os.read(wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _abort_now(self) -> None:
        # As pynetdicom does on a reactor error: A-ABORT, bypassing the state machine.
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


def parse_c_store_rq(command_set: bytes | memoryview) -> tuple[int, int, str, str] | None:
    """Read a C-STORE-RQ command set (PS3.7 §9.3.1.1, Implicit VR Little Endian).

    Returns ``(message id, data set type, affected SOP class UID, affected SOP instance
    UID)``, or None when the bytes are not a well-formed C-STORE-RQ that carries a
    data set, so that pynetdicom decodes (and, if need be, refuses) them as usual.
    """
    values: dict[int, bytes] = {}
    view = memoryview(command_set)
    offset, end = 0, len(view)
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return None
        values[element] = bytes(view[offset : offset + length])
        offset += length
    try:
        (field,) = struct.unpack("<H", values[0x0100])
        (message_id,) = struct.unpack("<H", values[0x0110])
        (data_set_type,) = struct.unpack("<H", values[0x0800])
        sop_class = values[0x0002].decode("ascii")
        sop_instance = values[0x1000].decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != C_STORE_RQ_COMMAND_FIELD or data_set_type == NO_DATA_SET:
        return None
    return message_id, data_set_type, sop_class.rstrip("\x00 "), sop_instance.rstrip("\x00 ")


class StoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, answering C-STORE requests on the DUL thread.

    Set up by :func:`tune_association`, which sets :attr:`store_handler`. While no
    message is in progress in pynetdicom, command fragments are held back and read here
    (:func:`parse_c_store_rq`); a C-STORE-RQ this provider can vouch for is then served
    from its data fragments, anything else is replayed into pynetdicom's own decoder.
    """

    store_handler: StoreHandler
    stager: Stager | None
    _command_pdvs: list[tuple[int, bytes | memoryview]]
    _store: StoreCommand | None
    _fragments: list[memoryview]
    _sink: FragmentSink | None
    _contexts: dict[int, tuple[str, str]] | None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            control = data[0]
            if self._store is not None:
                if not control & _COMMAND_BIT:
                    fragment = memoryview(data)[1:]
                    self._fragments.append(fragment)
                    if self._sink is not None:
                        self._sink.append_quietly(fragment)
                    if control & _LAST_BIT:
                        self._answer_store()
                    continue
                # PS3.8 Annex E: a data set's fragments are not interrupted by a command.
                LOGGER.warning("command fragment inside the data set of C-STORE %s; dropped", self._store.message_id)
                self.discard_staged()
                self._store, self._fragments, self._sink = None, [], None
            if self.message is None and control & _COMMAND_BIT:
                self._command_pdvs.append((context_id, data))
                if control & _LAST_BIT:
                    self._end_of_command()
                continue
            self._to_pynetdicom(context_id, data)

    def discard_staged(self) -> None:
        """Discard what is staged for a C-STORE whose data set is still arriving (the
        connection closed, or a protocol error). Safe from any thread: later fragments
        then go nowhere and a completed request is written the ordinary way."""
        sink = self._sink
        if sink is not None:
            sink.discard()

    def _to_pynetdicom(self, context_id: int, data: bytes | memoryview) -> None:
        # One PDV at a time (the P_DATA setter would refuse a memoryview; pynetdicom's
        # P_DATA_TF.to_primitive fills the list the same way).
        single = P_DATA()
        single.presentation_data_value_list.append((context_id, data))  # type: ignore[arg-type]
        super().receive_primitive(single)

    def _end_of_command(self) -> None:
        pdvs, self._command_pdvs = self._command_pdvs, []
        command = self._store_command(pdvs)
        if command is None:
            for context_id, data in pdvs:
                self._to_pynetdicom(context_id, data)
            return
        self._store, self._fragments = command, []
        if self.stager is not None:
            try:
                self._sink = self.stager(self.assoc, command)
            except Exception:
                LOGGER.exception("staging C-STORE %s failed; it is written when complete", command.sop_instance_uid)
                self._sink = None

    def _store_command(self, pdvs: list[tuple[int, bytes | memoryview]]) -> StoreCommand | None:
        """The request's command if this provider answers it, else None (pynetdicom does)."""
        context_id = pdvs[-1][0]
        parsed = parse_c_store_rq(b"".join(memoryview(data)[1:] for _, data in pdvs))
        if parsed is None:
            return None
        message_id, _data_set_type, sop_class, sop_instance = parsed
        if self._contexts is None:
            self._contexts = {
                int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in self.assoc.accepted_contexts
                if cx.context_id is not None and cx.transfer_syntax
            }
        context = self._contexts.get(context_id)
        if context is None or context[0] == Verification or context[0] != sop_class:
            return None
        return StoreCommand(context_id, message_id, sop_class, sop_instance, context[1])

    def _answer_store(self) -> None:
        command, fragments, sink = self._store, self._fragments, self._sink
        self._store, self._fragments, self._sink = None, [], None
        assert command is not None
        try:
            status, comment = self.store_handler(self.assoc, command, fragments, sink)
        except Exception:
            LOGGER.exception("C-STORE handler failed for SOP instance %s", command.sop_instance_uid)
            status, comment = dimse_status.HANDLER_FAILURE, "Exception in the C-STORE handler"
        finally:
            fragments.clear()
            if sink is not None:
                sink.discard()  # whatever the handler did not commit
        if not self.assoc.is_established:
            return
        encoded = encode_c_store_rsp(
            command.sop_class_uid, command.sop_instance_uid, command.message_id, status, comment
        )
        limit = self.maximum_pdu_size  # the peer's; 0 = unlimited (PS3.8 §D.1)
        if limit and len(encoded) + 6 > limit:
            self.send_msg(_c_store_response(command, status, comment), command.context_id)  # fragments it
            return
        response = P_DATA()
        response.presentation_data_value_list.append((command.context_id, _LAST_COMMAND_FRAGMENT + encoded))  # type: ignore[arg-type]
        self.dul.send_pdu(response)


def _c_store_response(command: StoreCommand, status: int, comment: str | None) -> C_STORE:
    """The same response as a pynetdicom primitive (for peers with a tiny maximum PDU)."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = command.message_id
    response.AffectedSOPClassUID = command.sop_class_uid
    response.AffectedSOPInstanceUID = command.sop_instance_uid
    response.Status = status
    if comment:
        response.ErrorComment = comment[:64]
    return response


def tune_association(
    assoc: Association, store_handler: StoreHandler | None = None, stager: Stager | None = None
) -> bool:
    """Swap in :class:`SelectingDUL`, :class:`RecvIntoSocket` and, with a
    ``store_handler`` (and optionally a ``stager``), :class:`StoreDIMSE` before the
    association starts.

    Must run before the association's threads start (``evt.EVT_CONN_OPEN``). Returns
    False, changing nothing, under another pynetdicom release or when the classes are not
    the exact pynetdicom ones.
    """
    dul = assoc.dul
    if not pynetdicom_supported() or type(dul) is not DULServiceProvider or dul.is_alive():
        return False
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = RecvIntoSocket
    dul.__class__ = SelectingDUL
    dimse = assoc.dimse
    if store_handler is not None and type(dimse) is DIMSEServiceProvider:
        dimse.__class__ = StoreDIMSE
        assert isinstance(dimse, StoreDIMSE)
        dimse.store_handler = store_handler
        dimse.stager = stager
        dimse._sink = None
        dimse._command_pdvs = []
        dimse._store = None
        dimse._fragments = []
        dimse._contexts = None
    return True
