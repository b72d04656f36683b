"""Ranking off the ingest path: touched users are marked dirty and ranked by a thread of their own.

:class:`RankScheduler` is an ``after_apply`` hook of the user-state stream that only records which
users a batch touched (merging what each touch says: actions, impressions, source positions, newest
event time). Its thread wakes every ``rec_cycle_ms``, takes the users whose last ranking is at least
``rec_debounce_ms`` old, oldest first, and ranks them through :class:`RecommendationWriter` in chunks
until the cycle's ``rec_budget_ms`` is spent: a user with many events in a short time is ranked once
for all of them, and ranking yields the interpreter to ingest between chunks.

Exactly once in effect, as in the synchronous path: the consumer stores an events offset only when
every output derived from the events before it is written (the list) and acknowledged (the feedback
decision, produced without waiting: ``outputs`` add their unacknowledged offsets). :meth:`floor` is
the first offset per events partition whose output is still pending; the stream stores
``min(consumed, floor)``. A crash replays from there and the replayed events' outputs
are derived again (see :mod:`fusionrec.streams.state`). On revocation and shutdown :meth:`flush`
ranks everything pending before the offsets are committed; lost partitions are dropped
(:meth:`drop`), since their new owner replays them. Transient failures in the thread put the users
back and are retried with back-off; the pending set is bounded (``rec_max_dirty``), beyond which
the stream stops fetching until ranking catches up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fusionrec.core.metrics import Metrics, MetricSet, gauge, histogram
from fusionrec.core.settings import Settings
from fusionrec.online.learning.feedback import first_offsets
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import TRANSIENT
from fusionrec.streams.state import BatchResult, UserTouch

log = logging.getLogger(__name__)

CHUNK = 256  # users ranked in one go by one ranking process (one candidate read and one write round trip)


class Refresher(Protocol):
    """What ranks and writes a chunk of users' lists: the writer itself, or the ranking process."""

    def refresh(self, users: dict[str, UserTouch]) -> int: ...


class PendingOutput(Protocol):
    """What a ranking produces without waiting (the feedback log): held back until acknowledged."""

    def floor(self) -> dict[int, int]: ...  # events partition -> first offset whose output is unacknowledged
    def accepting(self) -> bool: ...
    def flush(self, timeout_s: float | None = None) -> None: ...
    def drop(self) -> None: ...


class SchedulerMetrics(MetricSet):
    component = "ranking scheduler (fusionrec.online.ranking.scheduler)"
    recs_dirty = gauge("fusionrec_recs_dirty_users", "Users whose recommendations wait to be ranked",
                       multiprocess_mode="livesum")
    recs_lag = histogram("fusionrec_recs_event_to_list_seconds",
                         "Ingest of a user's first pending event to their list written")


@dataclass
class Pending:
    """What a user's lists still owe: the merged touches since their last ranking."""

    touch: UserTouch
    first: dict[int, int] = field(default_factory=dict)  # events partition -> first offset not yet output
    since: float = 0.0  # monotonic time the first pending event was applied

    def merge(self, touch: UserTouch) -> None:
        t = self.touch
        seen = set(t.positions)
        for action, pos in zip(touch.actions, touch.positions, strict=True):
            if pos not in seen:  # a replayed batch reports events again
                t.actions.append(action)
                t.positions.append(pos)
        t.shown.extend(touch.shown)
        for p, offset in touch.upto.items():
            t.upto[p] = max(offset, t.upto.get(p, -1))
        t.recent, t.last_ts = touch.recent, max(t.last_ts, touch.last_ts)


class RankScheduler:
    """``after_apply`` hook that defers ranking to a background thread (see the module docstring)."""

    def __init__(self, writer: Refresher, settings: Settings, metrics: Metrics | None = None,
                 outputs: Sequence[PendingOutput] = ()) -> None:
        self.writer = writer
        self.outputs = list(outputs)  # what a ranking produces without waiting (the feedback log)
        self.settings = settings
        registry = metrics or Metrics()
        self.metrics = registry.of(SchedulerMetrics)
        self.stream_metrics = registry.of(StreamMetrics)
        self.debounce_s = settings.rec.debounce_ms / 1000.0
        self.cycle_s = settings.rec.cycle_ms / 1000.0
        self.budget_s = settings.rec.budget_ms / 1000.0
        self.max_dirty = settings.rec.max_dirty
        # a writer that ranks with several processes at once takes a chunk for each
        self.chunk = CHUNK * max(1, int(getattr(writer, "parallel", 1)))
        self._pending: dict[str, Pending] = {}
        self._inflight: dict[str, Pending] = {}  # being ranked right now: still pending for floor()
        self._ranked_at: dict[str, float] = {}  # user -> monotonic time of their last ranking
        self._lock = threading.Lock()
        self._rank_lock = threading.Lock()  # one ranking at a time: the thread, or a flush
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.failure: BaseException | None = None
        self.ranked = 0
        self._thread = threading.Thread(target=self._loop, name="ranker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the stream's side
    def __call__(self, result: BatchResult) -> None:
        if self.failure is not None:
            raise RuntimeError("the ranking thread failed") from self.failure
        now = time.monotonic()
        with self._lock:
            for uid, touch in result.users.items():
                entry = self._pending.get(uid)
                if entry is None:
                    self._pending[uid] = Pending(UserTouch(recent=touch.recent, last_ts=touch.last_ts,
                                                           actions=list(touch.actions), shown=list(touch.shown),
                                                           positions=list(touch.positions), upto=dict(touch.upto)),
                                                 first=first_offsets(touch.positions, touch.upto), since=now)
                else:
                    entry.merge(touch)
                    for p, offset in first_offsets(touch.positions, touch.upto).items():
                        entry.first[p] = min(offset, entry.first.get(p, offset))
            self.metrics.recs_dirty.set(len(self._pending))
        if result.users:
            self._wake.set()

    def floor(self) -> dict[int, int]:
        """First events offset per partition whose outputs are still pending."""
        out: dict[int, int] = {}
        with self._lock:
            for entry in (*self._pending.values(), *self._inflight.values()):
                for p, offset in entry.first.items():
                    if offset < out.get(p, offset + 1):
                        out[p] = offset
        for output in self.outputs:
            for p, offset in output.floor().items():
                if offset < out.get(p, offset + 1):
                    out[p] = offset
        return out

    def accepting(self) -> bool:
        return len(self._pending) < self.max_dirty and all(o.accepting() for o in self.outputs)

    def flush(self, timeout_s: float | None = None) -> None:
        """Rank pending users now (revocation, shutdown), for at most ``timeout_s``; transient errors
        are retried with back-off until then, and the last one propagates. What is left stays pending,
        and the offsets stay at :meth:`floor`: a replay derives it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        backoff = 0.1
        with self._rank_lock:
            while deadline is None or time.monotonic() < deadline:
                with self._lock:
                    batch = {uid: self._pending.pop(uid) for uid in list(self._pending)[: self.chunk]}
                    self._inflight.update(batch)
                if not batch:
                    break
                try:
                    self._rank(batch)
                    backoff = 0.1
                except TRANSIENT as exc:  # back in the pending set: try again while there is time
                    if deadline is not None and time.monotonic() + backoff >= deadline:
                        raise
                    self.stream_metrics.retries.labels("rank").inc()
                    log.warning("ranking failed while flushing (%s: %s); retrying in %.1fs",
                                type(exc).__name__, exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.stream.retry_max_backoff_s)
        for output in self.outputs:  # what the rankings produced, acknowledged
            output.flush(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def drop(self) -> None:
        """Forget what is pending: the partitions were lost and their new owner replays them."""
        with self._rank_lock, self._lock:
            self._pending.clear()
            self.metrics.recs_dirty.set(0)
        for output in self.outputs:
            output.drop()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(30)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        backoff = 0.1
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._cycle(started)
                    backoff = 0.1
                except TRANSIENT as exc:
                    self.stream_metrics.retries.labels("rank").inc()
                    log.warning("ranking failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.settings.stream.retry_max_backoff_s)
                    continue
                # idle: sleep until the stream marks someone dirty; else until the next cycle
                self._wake.wait(max(0.0, self.cycle_s - (time.monotonic() - started)) if self._pending else 1.0)
                self._wake.clear()
        except BaseException as exc:  # reaches the stream at its next batch
            log.exception("the ranking thread failed")
            self.failure = exc

    def _cycle(self, started: float) -> None:
        while time.monotonic() - started < self.budget_s:
            with self._rank_lock:
                batch = self._due(time.monotonic())
                if not batch:
                    return
                self._rank(batch)

    def _due(self, now: float) -> dict[str, Pending]:
        """Up to ``chunk`` pending users not ranked within the debounce interval, oldest first (taken out):
        the pending dict keeps arrival order, so the first due ones are the oldest."""
        with self._lock:
            due = []
            for uid in self._pending:
                if now - self._ranked_at.get(uid, 0.0) >= self.debounce_s:
                    due.append(uid)
                    if len(due) == self.chunk:
                        break
            batch = {uid: self._pending.pop(uid) for uid in due}
            self._inflight.update(batch)
            return batch

    def _rank(self, batch: dict[str, Pending]) -> None:
        try:
            self.writer.refresh({uid: e.touch for uid, e in batch.items()})
        except BaseException:
            with self._lock:  # back in the queue, merged with whatever arrived meanwhile
                for uid, entry in batch.items():
                    del self._inflight[uid]
                    newer = self._pending.pop(uid, None)
                    if newer is not None:
                        entry.merge(newer.touch)
                        for p, offset in newer.first.items():
                            entry.first[p] = min(offset, entry.first.get(p, offset))
                    self._pending[uid] = entry
            raise
        now = time.monotonic()
        with self._lock:
            for uid, entry in batch.items():
                del self._inflight[uid]
                self._ranked_at[uid] = now
                self.metrics.recs_lag.observe(now - entry.since)
            if len(self._ranked_at) > 4 * self.max_dirty:  # forget rankings older than the debounce
                self._ranked_at = {u: t for u, t in self._ranked_at.items() if now - t < self.debounce_s}
            self.metrics.recs_dirty.set(len(self._pending))
        self.ranked += len(batch)
