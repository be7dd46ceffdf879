"""One daemon thread that runs rounds until stopped, and that a caller can wake early.

The dispatcher and the forwarder both need the same life cycle -- start once, stop after
the round in progress, wake now because work was just queued -- and the same guarantee that
an exception in one round (a locked database, a peer that misbehaves) never ends the
thread. Keeping that in one place keeps the two loops from drifting apart.
"""

from __future__ import annotations

import abc
import logging
import threading

log = logging.getLogger(__name__)


class BackgroundLoop(abc.ABC):
    """Calls :meth:`round` on its own thread; sleeps the seconds it returns, or until woken."""

    #: Name of the thread (shows in py-spy, logs and thread dumps).
    thread_name = "radnode-loop"

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def round(self) -> float:
        """Do one round of work; return how long to sleep before the next (0: go on now)."""

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the round in progress."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run the next round now (new work was queued, or a schedule fired)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.round()
            except Exception:  # one bad round must not end the thread
                log.exception("%s: round failed", self.thread_name)
                wait = 1.0
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
