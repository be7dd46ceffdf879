"""Tell systemd how the node is doing: readiness, watchdog pings, status, stopping.

``radnode.service`` is ``Type=notify``: systemd considers the node started only when it
sends ``READY=1``, shows the last ``STATUS=`` line in ``systemctl status``, and with
``WatchdogSec=`` restarts it when the ``WATCHDOG=1`` pings stop. The protocol
(``sd_notify(3)``) is one datagram of newline-separated ``KEY=VALUE`` assignments sent to
the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the Linux
abstract namespace). Speaking it takes the standard ``socket`` module only, so radnode
needs no libsystemd binding.

Outside systemd (``$NOTIFY_SOCKET`` unset: a terminal, a test, ``make run``) every call is a
no-op that returns ``False``; a failed send is logged and never raised, because a lost
notification must not take the DICOM listener down.

The watchdog pings from its own thread at half of ``$WATCHDOG_USEC`` (the interval
``sd_watchdog_enabled(3)`` recommends), and only while the process's liveness check passes:
``radnode serve`` feeds it the listener's own health (listening, completion timer alive;
:func:`radnode.cli.serve_cmd.watchdog_liveness`), so a listener that stopped answering
falls silent and systemd restarts it (``Restart=on-failure``) after ``WatchdogSec=``, while
a stalled scheduler or worker never restarts the listener.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Self

log = logging.getLogger(__name__)

#: Environment variable with the notification socket's address (sd_notify(3)).
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
#: Watchdog timeout in microseconds, set by systemd when the unit has ``WatchdogSec=``.
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
#: PID the watchdog settings are meant for; another process (a child) must not ping.
WATCHDOG_PID_ENV = "WATCHDOG_PID"
#: The environment variables of the protocol, removed once read so that worker processes
#: spawned by the node do not inherit them and speak for the service.
PROTOCOL_ENV = (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)

#: Notification fields (sd_notify(3)).
READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"
RELOADING = "RELOADING=1"
#: sd_watchdog_enabled(3): ping at half the timeout so one late ping is not fatal.
WATCHDOG_FRACTION = 0.5

Liveness = Callable[[], bool]
HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]


def socket_address(value: str) -> str | bytes:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value.

    An absolute path is a file-system socket; ``@name`` is ``name`` in the abstract
    namespace (a leading NUL byte). Anything else (e.g. ``vsock:``) is not supported here.

    Raises
    ------
    ValueError
        For an address that is neither, naming ``$NOTIFY_SOCKET`` and what is allowed.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    raise ValueError(
        f"${NOTIFY_SOCKET_ENV}={value!r} is not supported: expected an absolute socket path "
        "or @name (abstract namespace)"
    )


def watchdog_interval(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings, or ``None`` when systemd wants none.

    ``$WATCHDOG_USEC`` must be a positive integer and, when ``$WATCHDOG_PID`` is set, it
    must name this process (sd_watchdog_enabled(3)).
    """
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV)
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring $%s=%r: not an integer number of microseconds", WATCHDOG_USEC_ENV, raw)
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner and owner.strip() != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000 * WATCHDOG_FRACTION


class SystemdNotifier:
    """Sends ``sd_notify`` messages to the service manager; a no-op without one.

    Parameters
    ----------
    address
        The ``$NOTIFY_SOCKET`` value; ``None`` disables notifications.
    watchdog_seconds
        Interval of watchdog pings (half of ``WatchdogSec=``); ``None`` disables them.

    Examples
    --------
    >>> notifier = SystemdNotifier.from_environment()          # doctest: +SKIP
    >>> notifier.ready("listening on 0.0.0.0:11112", liveness=node_alive)  # doctest: +SKIP
    >>> notifier.stopping()                                     # doctest: +SKIP
    >>> notifier.close()                                        # doctest: +SKIP
    """

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            try:
                self._address = socket_address(address)
            except ValueError as exc:
                log.warning("%s; systemd notifications are off", exc)
        self.watchdog_seconds = watchdog_seconds if self._address is not None else None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._watchdog: WatchdogThread | None = None
        self._failing = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, unset_environment: bool = True
    ) -> SystemdNotifier:
        """Read ``$NOTIFY_SOCKET`` and the watchdog variables.

        With ``unset_environment`` (the default) the variables are removed afterwards, as
        ``sd_notify(unset_environment=1)`` does, so processes spawned later (the job
        workers) cannot notify on the service's behalf.
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get(NOTIFY_SOCKET_ENV), watchdog_interval(env))
        if unset_environment:
            for name in PROTOCOL_ENV:
                env.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``$NOTIFY_SOCKET`` was set and valid)."""
        return self._address is not None

    # -- the protocol -------------------------------------------------------------------

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` fields; ``True`` when it was sent."""
        if self._address is None or not fields:
            return False
        for item in fields:
            if "=" not in item or "\n" in item:
                raise ValueError(f"sd_notify field {item!r} must be KEY=VALUE on one line")
        message = "\n".join(fields).encode("utf-8")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(message, self._address)
            except OSError as exc:
                # Once per outage, not once per watchdog ping.
                if not self._failing:
                    log.warning("sd_notify %s failed: %s (further failures are not logged)", fields[0].split("=", 1)[0], exc)
                self._failing = True
                return False
            if self._failing:
                log.info("sd_notify works again")
                self._failing = False
        return True

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status radnode`` shows."""
        return self.notify(_status_field(text))

    def watchdog(self) -> bool:
        """One watchdog ping (normally sent by the watchdog thread)."""
        return self.notify(WATCHDOG)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on a slow start or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    # -- life cycle ---------------------------------------------------------------------

    def ready(self, status: str | None = None, liveness: Liveness | None = None) -> bool:
        """Report the node ready, and start watchdog pings if systemd asked for them.

        Parameters
        ----------
        status
            Status line sent with ``READY=1``.
        liveness
            Called before every ping; a ping is sent only when it returns ``True``. It
            should say whether the node still *works* (listener thread up, job queue
            answering), not whether it is *ready for data*: a full disk is reported by
            ``/healthz`` and the C-STORE status, and a restart would not free space.
        """
        fields = [READY] + ([_status_field(status)] if status else [])
        sent = self.notify(*fields)
        if self.watchdog_seconds is not None and self._watchdog is None:
            self._watchdog = WatchdogThread(self, self.watchdog_seconds, liveness or _always)
            self._watchdog.start()
        return sent

    def reloading(self) -> bool:
        """Report that a configuration reload (SIGHUP) is in progress.

        ``MONOTONIC_USEC`` accompanies ``RELOADING=1`` as sd_notify(3) asks; send
        :meth:`ready` (or :meth:`status`) when the reload is done.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING, f"MONOTONIC_USEC={now_usec}")

    def stopping(self, status: str | None = "stopping") -> bool:
        """Stop the watchdog pings and report that the node is shutting down."""
        self._stop_watchdog()
        fields = [STOPPING] + ([_status_field(status)] if status else [])
        return self.notify(*fields)

    def close(self) -> None:
        """Stop the watchdog and close the socket."""
        self._stop_watchdog()
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WatchdogThread(threading.Thread):
    """Pings the watchdog every ``interval`` seconds while ``liveness()`` holds.

    An exception in ``liveness`` counts as "not alive" (logged with its traceback).
    Transitions are logged once, not every interval, so a sick node does not flood the
    journal.
    """

    def __init__(self, notifier: SystemdNotifier, interval: float, liveness: Liveness) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {interval}")
        super().__init__(name="radnode-watchdog", daemon=True)
        self.notifier = notifier
        self.interval = interval
        self.liveness = liveness
        self._stop_event = threading.Event()
        self._alive = True

    def run(self) -> None:
        # Ping at once: READY=1 has just been sent and the timer starts with it.
        while True:
            self._tick()
            if self._stop_event.wait(self.interval):
                return

    def _tick(self) -> None:
        try:
            alive = bool(self.liveness())
        except Exception:
            log.exception("watchdog liveness check failed")
            alive = False
        if alive:
            if not self._alive:
                log.info("node is alive again: watchdog pings resume")
            self.notifier.watchdog()
        elif self._alive:
            log.warning(
                "liveness check failed: watchdog pings stop; systemd restarts the node after "
                "WatchdogSec= unless it recovers"
            )
        self._alive = alive

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pinging (no ping is sent after this returns)."""
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def liveness_from_health(health: HealthCheck) -> Liveness:
    """Watchdog liveness from a health check, without the disk-space part.

    Alive means the listener is listening (when the check reports it) and every part that
    reports an ``ok`` says so. Free disk space is left
    out on purpose: below ``storage.min_free_gb`` the node keeps running and answers
    C-STORE with "Out of Resources"; restarting it would not free a byte.
    """

    def alive() -> bool:
        _, details = health()
        if not details.get("listening", True):
            return False
        return all(bool(part.get("ok", True)) for part in details.values() if isinstance(part, dict))

    return alive


def _always() -> bool:
    return True


def _status_field(text: str) -> str:
    # STATUS= is one line; keep it short enough for `systemctl status`.
    return "STATUS=" + " ".join(text.split())[:200]
