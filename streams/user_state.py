"""The user-state stream: consumed batches → :class:`StateStore` → downstream hooks.

Hooks (``after_apply``) receive the users a batch touched; the recommendation writer of
:mod:`fusionrec.online` is one, the item-delta publisher of :mod:`fusionrec.streams.trending`
another. They run after the state write and before the batch's offsets are stored, and they see
every event of the batch, the ones the guards skipped as already applied included. So after a
retry, a replay or a crash before the offsets were stored, each output is produced again: a
recommendation list is ranked again from the state (the same or newer), and feedback decisions and
item deltas carry the source positions their consumers de-duplicate by. Every output is therefore
produced at least once and counted exactly once.

A hook may finish its outputs later (:class:`DeferredOutput`: ranking off the ingest path, see
:mod:`fusionrec.online.ranking.scheduler`). The consumer then stores an events offset only once every
deferred output of the events before it is done (:meth:`UserStateHandler.floor`), finishes them all
before a revocation commits (:meth:`UserStateHandler.flush`), and forgets them when partitions are lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from fusionrec.core.metrics import Metrics, MetricSet, counter, histogram
from fusionrec.streams.consumer import Batch
from fusionrec.streams.state import BatchResult, StateStore

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


class UserStateHandler:
    """Applies a batch's catalog and user events, then the hooks; observes freshness."""

    def __init__(self, store: StateStore, metrics: Metrics, after_apply: list[AfterApply] | None = None) -> None:
        self.store = store
        self.metrics = metrics.of(StateMetrics)
        self.after_apply = list(after_apply or [])
        self.deferred = [h for h in self.after_apply if isinstance(h, DeferredOutput)]

    def floor(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for hook in self.deferred:
            for p, offset in hook.floor().items():
                out[p] = min(offset, out.get(p, offset))
        return out

    def accepting(self) -> bool:
        return all(hook.accepting() for hook in self.deferred)

    def flush(self, timeout_s: float | None = None) -> None:
        for hook in self.deferred:
            hook.flush(timeout_s)

    def drop(self) -> None:
        for hook in self.deferred:
            hook.drop()

    def handle(self, batch: Batch) -> None:
        t0 = time.perf_counter()
        if batch.catalog:
            self.store.apply_catalog(batch.catalog)
        result = self.store.apply(batch.events)
        t1 = time.perf_counter()
        self.metrics.redis_write_seconds.labels("state").observe(t1 - t0)
        for hook in self.after_apply:
            hook(result)
        if result.skipped:
            self.metrics.replay_skipped.inc(result.skipped)
            log.info("skipped %d already-applied events", result.skipped)
        # Freshness from the Kafka message timestamp, sampled: at most SAMPLE observations per batch,
        # evenly spread, always including the oldest message (the batch's worst case).
        now_ms = time.time() * 1000
        stamps = batch.timestamps
        step = max(1, len(stamps) // SAMPLE)
        observe = self.metrics.freshness_seconds.observe
        for ts in (min(stamps, default=0), *stamps[step // 2::step]):
            if ts > 0:
                observe(max(0.0, (now_ms - ts) / 1000.0))
