"""When is a series complete? DICOM does not say, so radnode has an explicit, tested rule.

A series (round) is complete when the first of these holds:

* **expected count** - the data announced how many instances the series has
  ((0020,1209) Number of Series Related Instances, else (0020,1002) Images in
  Acquisition; see :attr:`radnode.node.header.InstanceHeader.expected_count`) and that
  many distinct SOP instances have arrived in this round: complete at once;
* **quiet** - ``series.quiet_seconds`` have passed without a new instance;
* **force** - ``series.force_seconds`` have passed since the round's first instance, even
  if instances still trickle in.

Timers are timestamps in the SQLite index (wall clock, so they survive a restart): after
a crash, the first :meth:`SeriesCompletion.check_due` completes everything that fell due
while the node was down. Completion is announced to subscribers through
:meth:`SeriesCompletion.subscribe`; the durable record is the series row in state
``complete``, which :meth:`SeriesCompletion.replay` announces again to a subscriber that
starts later.

An announcement that fails (the subscriber raises: routing, the job queue) is never
dropped: it is recorded in the index (``completion_failures``: attempts, last error, next
try) and retried with exponential backoff by every later :meth:`SeriesCompletion.check_due`
until it succeeds or the series moves on (processed, or a new round that is announced
anew). ``radnode status`` lists such series as *stuck*.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from radnode.config.model import SeriesSettings
from radnode.node.index import CompletionFailure, NodeIndex, SeriesRecord, SeriesState
from radnode.node.series_attributes import SeriesAttributes

LOGGER = logging.getLogger(__name__)

#: Delay before the first retry of a failed announcement; doubled per further failure.
RETRY_BASE_SECONDS = 5.0
#: Longest delay between retries, so a series stuck for hours is still tried every few minutes.
RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class SeriesCompleted:
    """A series (or a new round of an updated series) is complete and can be routed."""

    series_instance_uid: str
    study_instance_uid: str
    round: int
    reason: str
    instance_count: int
    expected_count: int | None
    completed_at: float
    calling_ae: str
    modality: str | None
    attributes: SeriesAttributes = field(default_factory=lambda: SeriesAttributes(None), compare=False)

    @property
    def is_update(self) -> bool:
        """True for a later round: instances arrived after the series was complete."""
        return self.round > 1

    @classmethod
    def from_record(cls, record: SeriesRecord, reason: str | None = None) -> SeriesCompleted:
        """Build the event from a series row in state ``complete``."""
        return cls(
            series_instance_uid=record.series_instance_uid,
            study_instance_uid=record.study_instance_uid,
            round=record.round,
            reason=reason or record.completion_reason or "unknown",
            instance_count=record.instance_count,
            expected_count=record.expected_count,
            completed_at=record.completed_at or 0.0,
            calling_ae=record.calling_ae,
            modality=record.modality,
            attributes=SeriesAttributes.from_json(record.attributes, record.instance_count, record.calling_ae),
        )


class CompletionSubscriber(Protocol):
    """Anything called with each :class:`SeriesCompleted` (the pipeline, a logger)."""

    def __call__(self, event: SeriesCompleted) -> None: ...


class SeriesCompletion:
    """Applies the completion rule to the index and notifies subscribers.

    Parameters
    ----------
    index
        The node's index, which holds series state and timers.
    settings
        ``series`` section: ``quiet_seconds`` and ``force_seconds``.
    retry_base_seconds, retry_max_seconds
        Backoff of failed announcements: ``min(max, base * 2 ** (attempts - 1))``.
    """

    def __init__(
        self,
        index: NodeIndex,
        settings: SeriesSettings,
        retry_base_seconds: float = RETRY_BASE_SECONDS,
        retry_max_seconds: float = RETRY_MAX_SECONDS,
    ) -> None:
        self.index = index
        self.settings = settings
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._subscribers: list[CompletionSubscriber] = []
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._retry_lock = threading.Lock()
        # Keys of recorded failures, so a successful announcement costs no index write.
        self._failing = {(f.series_instance_uid, f.subscriber) for f in index.completion_failures()}

    def subscribe(self, subscriber: CompletionSubscriber) -> None:
        """Call ``subscriber(event)`` for every completion from now on."""
        with self._lock:
            self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: CompletionSubscriber) -> None:
        """Stop calling ``subscriber``; unknown subscribers are ignored."""
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def check_due(self, now: float | None = None) -> list[SeriesCompleted]:
        """Complete every series that is due at ``now`` (default: the wall clock).

        The state change commits before any subscriber runs; a subscriber that raises does
        not stop the others, and its announcement is retried later (see the module
        docstring), which this call also does for every retry that is due. Returns the
        newly completed events, in order.
        """
        now = time.time() if now is None else now
        with self._check_lock:
            done = self.index.complete_due(now, self.settings.quiet_seconds, self.settings.force_seconds)
        events = [SeriesCompleted.from_record(record, reason) for record, reason in done]
        with self._lock:
            subscribers = list(self._subscribers)
        for event in events:
            LOGGER.info(
                "series %s complete (round %d, %s, %d instance(s)%s)",
                event.series_instance_uid,
                event.round,
                event.reason,
                event.instance_count,
                f" of {event.expected_count} expected" if event.expected_count else "",
            )
            for subscriber in subscribers:
                self._announce(event, subscriber, now)
        self._retry_due(subscribers, now)
        return events

    def pending(self) -> list[SeriesCompleted]:
        """Series that are complete but not yet processed (to re-announce after a restart)."""
        return [SeriesCompleted.from_record(r) for r in self.index.series_in_state(SeriesState.COMPLETE)]

    def replay(self, subscriber: CompletionSubscriber, now: float | None = None) -> int:
        """Announce every :meth:`pending` series to ``subscriber`` (one that starts later,
        e.g. the pipeline after a restart); failures are retried like any other.
        Returns how many announcements succeeded."""
        now = time.time() if now is None else now
        return sum(self._announce(event, subscriber, now) for event in self.pending())

    def stuck(self) -> list[CompletionFailure]:
        """Complete series whose announcement failed and waits for a retry."""
        return self.index.completion_failures()

    def _retry_delay(self, attempts: int) -> float:
        return float(min(self.retry_max_seconds, self.retry_base_seconds * 2 ** min(attempts - 1, 32)))

    def _announce(self, event: SeriesCompleted, subscriber: CompletionSubscriber, now: float) -> bool:
        """Call ``subscriber(event)``; record a failure for a retry, or clear an old one."""
        name = subscriber_name(subscriber)
        key = (event.series_instance_uid, name)
        try:
            subscriber(event)
        except Exception as exc:
            failure = self.index.record_completion_failure(
                event.series_instance_uid, name, event.round, now, f"{type(exc).__name__}: {exc}", self._retry_delay
            )
            self._failing.add(key)
            LOGGER.error(
                "completion subscriber %s failed for series %s (attempt %d); retry in %.0f s",
                name, event.series_instance_uid, failure.attempts, failure.next_attempt_at - now,
                exc_info=failure.attempts == 1,
            )
            return False
        if key in self._failing:
            self.index.clear_completion_failure(*key)
            self._failing.discard(key)
            LOGGER.info("completion subscriber %s succeeded for series %s after a retry", name, event.series_instance_uid)
        return True

    def _retry_due(self, subscribers: list[CompletionSubscriber], now: float) -> None:
        if not self._failing or not self._retry_lock.acquire(blocking=False):
            return  # nothing to retry, or another thread is retrying right now
        try:
            self._retry_failures(subscribers, now)
        finally:
            self._retry_lock.release()

    def _retry_failures(self, subscribers: list[CompletionSubscriber], now: float) -> None:
        by_name = {subscriber_name(s): s for s in subscribers}
        for failure in self.index.completion_failures(due_at=now):
            subscriber = by_name.get(failure.subscriber)
            if subscriber is None:
                continue  # not subscribed in this process: stays listed as stuck
            record = self.index.series(failure.series_instance_uid)
            if record is None or record.state is not SeriesState.COMPLETE or record.round != failure.round:
                # Processed meanwhile, or a new round (which is announced on its own).
                self.index.clear_completion_failure(failure.series_instance_uid, failure.subscriber)
                self._failing.discard((failure.series_instance_uid, failure.subscriber))
                continue
            self._announce(SeriesCompleted.from_record(record), subscriber, now)

    def mark_processed(self, series_instance_uid: str, now: float | None = None) -> bool:
        """Record that a complete series was processed; False if it was not complete."""
        return self.index.mark_processed(series_instance_uid, time.time() if now is None else now)


def subscriber_name(subscriber: CompletionSubscriber) -> str:
    """A stable name for a subscriber (its qualified name), as recorded with its failures."""
    func = getattr(subscriber, "__func__", subscriber)
    module = getattr(func, "__module__", None) or type(subscriber).__module__
    qualname = getattr(func, "__qualname__", None) or type(subscriber).__qualname__
    return f"{module}.{qualname}"


class CompletionTimer:
    """Runs :meth:`SeriesCompletion.check_due` on a small background thread.

    The listener's own clock, so series complete (and failed announcements are retried)
    whether or not a pipeline runs in the same process; the pipeline's scheduler may call
    ``check_due`` too (it is serialised). :meth:`wake` makes it check at once (used when a
    series reaches its expected count).

    Parameters
    ----------
    completion
        The checker to run.
    interval
        Seconds between checks; by default a quarter of ``quiet_seconds``, clamped to
        0.2-5 s, so a quiet period overshoots by at most that much.
    """

    def __init__(self, completion: SeriesCompletion, interval: float | None = None) -> None:
        self.completion = completion
        quiet = completion.settings.quiet_seconds
        self.interval = interval if interval is not None else min(5.0, max(0.2, quiet / 4))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radnode-completion", daemon=True)

    def start(self) -> None:
        """Start the thread (an immediate first check resumes timers after a restart)."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The thread runs (started and not stopped)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def wake(self) -> None:
        """Check now instead of at the next tick."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for a running check to finish."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.completion.check_due()
            except Exception:
                LOGGER.exception("series completion check failed; retrying in %.1f s", self.interval)
            self._wake.wait(self.interval)
            self._wake.clear()

