"""The user-state stream: consumed batches → :class:`StateStore` → downstream hooks.

Hooks (``after_apply``) receive the users a batch touched; the recommendation writer of
:mod:`fusionrec.online` is one, the item-delta publisher of :mod:`fusionrec.streams.trending`
another. They run after the state write and before the batch's offsets are stored, and they see
every event of the batch, the ones the guards skipped as already applied included. So after a
retry, a replay or a crash before the offsets were stored, each output is produced again: a
recommendation list is ranked again from the state (the same or newer), and feedback decisions and
item deltas carry the source positions their consumers de-duplicate by. Every output is therefore
produced at least once and counted exactly once.

Write-behind: a consumed batch's user events wait in process for at most ``state.flush_ms`` (or
until ``state.flush_max_events`` wait; the consumer's poll never waits past that time,
:meth:`UserStateHandler.poll_wait`), then the state store applies all of them at once: one
compare-and-set per bucket, reading only what it does not keep in process. The hooks run after that
write, so they always see the state their events made. Until then the waiting events hold their
partitions' offsets back (:meth:`UserStateHandler.floor`); a revocation writes them before its commit,
and what a revocation could not write, or a lost partition's, is forgotten: the new owner replays it.

A hook may finish its outputs later (:class:`DeferredOutput`: ranking off the ingest path, see
:mod:`fusionrec.online.ranking.scheduler`; item deltas acknowledged after their produce, see
:class:`fusionrec.streams.trending.ItemDeltaPublisher`). The consumer then stores an events offset only once every
deferred output of the events before it is done (:meth:`UserStateHandler.floor`), finishes them all
before a revocation commits (:meth:`UserStateHandler.flush`), and forgets them when partitions are lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol, runtime_checkable

from fusionrec.core.metrics import Metrics, MetricSet, counter, histogram
from fusionrec.streams.consumer import Batch
from fusionrec.streams.state import BatchResult, Positioned, StateStore

log = logging.getLogger(__name__)

SAMPLE = 64
AfterApply = Callable[[BatchResult], None]


@runtime_checkable
class DeferredOutput(Protocol):
    """An ``after_apply`` hook whose outputs are finished later, off the ingest path."""

    def __call__(self, result: BatchResult) -> None: ...
    def floor(self) -> dict[int, int]: ...  # events partition -> first offset whose output is pending
    def accepting(self) -> bool: ...  # False: too much pending, stop fetching
    def flush(self, timeout_s: float | None = None) -> None: ...  # finish what is pending now
    def drop(self) -> None: ...  # forget everything pending (the partitions were lost)


class StateMetrics(MetricSet):
    component = "user-state stream (fusionrec.streams.user_state)"
    redis_write_seconds = histogram("fusionrec_state_redis_write_seconds",
                                    "Wall time of the Redis round trips applying one batch", ("stage",))
    freshness_seconds = histogram("fusionrec_state_freshness_seconds",
                                  "Kafka message timestamp to the state it changes visible in Redis")
    replay_skipped = counter("fusionrec_state_replay_skipped_total",
                             "Events skipped because their offset was already applied")
    duplicates = counter("fusionrec_state_duplicate_events_total",
                         "User events dropped as producer duplicates (an event id the user sent before)")
    recomputed = counter("fusionrec_state_recomputed_batches_total",
                         "Batches recomputed because another consumer wrote some of their users meanwhile "
                         "(users whose events arrive on two partitions)")


class UserStateHandler:
    """Applies a batch's catalog at once and its user events write-behind, then the hooks; observes
    freshness (see the module docstring)."""

    def __init__(self, store: StateStore, metrics: Metrics, after_apply: list[AfterApply] | None = None) -> None:
        self.store = store
        self.metrics = metrics.of(StateMetrics)
        self.after_apply = list(after_apply or [])
        self.deferred = [h for h in self.after_apply if isinstance(h, DeferredOutput)]
        state = store.settings.state
        self.flush_s = state.flush_ms / 1000.0
        self.flush_max = state.flush_max_events
        self._waiting: list[Positioned] = []  # consumed user events whose state is not written yet
        self._stamps: list[int] = []  # their batches' Kafka timestamps, for freshness
        self._first: dict[int, int] = {}  # partition -> first waiting offset
        self._last: dict[int, int] = {}  # partition -> last waiting offset
        self._since = 0.0  # monotonic time the oldest waiting event was consumed
        self._polled = 0.0  # when a poll that found nothing waiting began (poll_wait): it may have waited

    def floor(self) -> dict[int, int]:
        out = dict(self._first)
        for hook in self.deferred:
            for p, offset in hook.floor().items():
                out[p] = min(offset, out.get(p, offset))
        return out

    def accepting(self) -> bool:
        return all(hook.accepting() for hook in self.deferred)

    def tick(self) -> None:
        """Between batches: write the waiting events whose time is up."""
        if self._waiting and time.monotonic() - self._since >= self.flush_s:
            self.write()

    def poll_wait(self) -> float | None:
        """How long the next poll may wait: until the waiting events are due, and with none waiting, one
        write-behind window, which counts from that poll's start for the events it brings (the time they
        waited in the poll is part of their window)."""
        if self.flush_s <= 0:
            return None  # written as they come: the poll's own timeout
        if not self._waiting:
            self._polled = time.monotonic()
            return self.flush_s
        return max(0.0, self._since + self.flush_s - time.monotonic())

    def flush(self, timeout_s: float | None = None) -> int:
        """Write the waiting events and finish the hooks' pending outputs; returns the events written."""
        written = len(self._waiting)
        self.write()
        for hook in self.deferred:
            hook.flush(timeout_s)
        return written

    def forget(self, partitions: Collection[int]) -> None:
        """Revoked partitions: their waiting events (a revocation that could not write them) are
        forgotten, and so is what the store keeps of them; their new owner replays from the commit."""
        gone = set(partitions)
        if not gone:
            return
        if any(p in gone for p in self._first):
            self._waiting = [pe for pe in self._waiting if pe.partition not in gone]
            self._first = {p: o for p, o in self._first.items() if p not in gone}
            self._last = {p: o for p, o in self._last.items() if p not in gone}
        self.store.reset()  # their guards and users' recent items are the new owner's to change

    def settle(self, done: dict[int, int]) -> None:
        self.store.settle(done)

    def drop(self) -> None:
        self._waiting, self._stamps, self._first, self._last = [], [], {}, {}
        self.store.reset()
        for hook in self.deferred:
            hook.drop()

    def handle(self, batch: Batch) -> None:
        if not batch.taken:  # a retried batch is already waiting
            if batch.catalog:
                self.store.apply_catalog(batch.catalog)
            if batch.events:
                if not self._waiting:
                    now = time.monotonic()
                    # the window started with the idle poll that brought them (at most one window ago)
                    self._since = max(self._polled, now - self.flush_s) if self._polled else now
                    self._polled = 0.0
                last = self._last
                for pe in batch.events:
                    # a batch consumed again after an abandoned retry (the runtime rewinds) brings
                    # events that are waiting already
                    if pe.offset > last.get(pe.partition, -1):
                        self._waiting.append(pe)
                        last[pe.partition] = pe.offset
                        self._first.setdefault(pe.partition, pe.offset)
            self._stamps.extend(batch.timestamps)
            batch.taken = True
        if not self._waiting:
            self._observe_freshness()  # a catalog-only batch: applied already
        elif len(self._waiting) >= self.flush_max or time.monotonic() - self._since >= self.flush_s:
            self.write()

    def write(self) -> None:
        """Apply the waiting events in one go, then the hooks. On failure they stay waiting."""
        if not self._waiting:
            self._observe_freshness()
            return
        t0 = time.perf_counter()
        result = self.store.apply(self._waiting)
        self.metrics.redis_write_seconds.labels("state").observe(time.perf_counter() - t0)
        for hook in self.after_apply:
            hook(result)
        self._waiting, self._first, self._last = [], {}, {}
        if result.duplicates:
            self.metrics.duplicates.inc(result.duplicates)
            log.info("dropped %d producer duplicates (event ids their users sent before)", result.duplicates)
        if result.recomputed:
            self.metrics.recomputed.inc(result.recomputed)
        if result.skipped:
            self.metrics.replay_skipped.inc(result.skipped)
            log.info("skipped %d already-applied events", result.skipped)
        self._observe_freshness()

    def _observe_freshness(self) -> None:
        """Freshness from the Kafka message timestamp, sampled: at most SAMPLE observations per write,
        evenly spread, always including the oldest message (the worst case)."""
        stamps, self._stamps = self._stamps, []
        if not stamps:
            return
        now_ms = time.time() * 1000
        step = max(1, len(stamps) // SAMPLE)
        observe = self.metrics.freshness_seconds.observe
        for ts in (min(stamps), *stamps[step // 2::step]):
            if ts > 0:
                observe(max(0.0, (now_ms - ts) / 1000.0))
