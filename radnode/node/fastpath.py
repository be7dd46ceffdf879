"""Receive-path tuning of pynetdicom 3 for one accepted association.

pynetdicom's association reactor is built for generality: its DUL thread polls the socket
and its queues, sleeping 1 ms whenever there is nothing to do, and reads each PDU in 4 KiB
pieces. For a stream of 0.5 MB CT slices on one association that costs about a
millisecond per instance in sleeps alone (the next request arrives ~0.1 ms after our
response, but is only looked at when the sleep ends). :func:`tune_association` swaps two
pieces of one association for drop-in subclasses:

* :class:`SelectingDUL` waits in ``select()`` on the socket and on a wake-up pipe that
  the outgoing queue writes to, so it reacts to a new PDU or to our own response at once
  instead of after the next sleep; everything else in its loop is pynetdicom's own
  (state machine, timers, abort on error);
* :class:`RecvIntoSocket` reads a PDU with ``recv_into`` into one buffer of the announced
  length.

Both are applied only to the exact pynetdicom classes they were written against
(pynetdicom >=3.0,<4, pinned in pyproject.toml); anything else is left untouched and runs
at pynetdicom's own pace. ``tests/test_node_*`` run every association through them.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

LOGGER = logging.getLogger(__name__)

#: Longest wait in ``select()`` between checks of the kill flag and the ARTIM/idle timers.
IDLE_WAIT_SECONDS = 0.01


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


def tune_association(assoc: Association) -> bool:
    """Swap in :class:`SelectingDUL` and :class:`RecvIntoSocket` before the association starts.

    Must run before the association's threads start (``evt.EVT_CONN_OPEN``). Returns
    False, changing nothing, when the classes are not the exact pynetdicom ones.
    """
    dul = assoc.dul
    if type(dul) is not DULServiceProvider or dul.is_alive():
        return False
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = RecvIntoSocket
    dul.__class__ = SelectingDUL
    return True
