"""Derived outputs exactly once in effect: after transient failures in every step of the user-state
stream, the feedback decisions and item deltas, de-duplicated as their consumers do, equal what the
events say, and every user's list reflects their last event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.core.errors import DeliveryError
from fusionrec.core.metrics import Metrics
from fusionrec.streams.metrics import StreamMetrics
from tests.integration.helpers import assert_outputs_exactly_once, drive, make_settings, preloaded


class FailsAfter:
    """Wraps a step: on the listed calls it does its work, then raises (so a retry repeats finished work)."""

    def __init__(self, step: Callable[..., Any], calls: set[int], error: type[Exception]) -> None:
        self.step, self.calls, self.error, self.n = step, calls, error, 0

    def __call__(self, *args: Any) -> Any:
        self.n += 1
        out = self.step(*args)
        if self.n in self.calls:
            raise self.error(f"injected failure after call {self.n}")
        return out


@pytest.mark.parametrize("flush_ms", [0, 40], ids=["state-written-per-batch", "write-behind"])
def test_transient_failures_in_every_step_leave_outputs_exactly_once(services, rclient: redis.Redis, flush_ms):
    # write-behind: every second batch fills the write (600 events), so the writes, and the failures
    # injected into them, come while the stream runs whatever the window lets through
    s = make_settings(services, partitions=2, batch_size=300, rec_debounce_ms=0, state_flush_ms=flush_ms,
                      state_flush_max_events=600)
    ds = preloaded(s)
    metrics = Metrics()
    pipeline = StatePipeline(s, metrics=metrics)
    # each step fails after doing its work on some calls: the state write, the ranking and list write
    # (in the ranking thread), the feedback log and the item deltas
    # (write-behind writes two batches at once: the second failure comes in the retry of the first)
    fails = {2, 7} if flush_ms == 0 else {2, 3}
    pipeline.store.apply = FailsAfter(pipeline.store.apply, fails, redis.ConnectionError)  # type: ignore[method-assign]
    ranking, deltas = pipeline.handler.after_apply
    assert ranking is pipeline.ranking and pipeline.writer.sink is not None
    pipeline.writer.sink = FailsAfter(pipeline.writer.sink, {2, 4}, DeliveryError)
    pipeline.writer.refresh = FailsAfter(pipeline.writer.refresh, {3}, redis.TimeoutError)  # type: ignore[method-assign]
    pipeline.handler.after_apply = [ranking, FailsAfter(deltas, {4, 11} if flush_ms == 0 else {1, 2}, DeliveryError)]
    drive(pipeline, len(ds.events))
    retries = metrics.of(StreamMetrics).retries
    if flush_ms == 0:  # one state write per batch, in the batch's step
        assert retries.labels("apply")._value.get() == 4 and retries.labels("rank")._value.get() == 3
    else:  # writes of several batches, in a batch's step or between batches
        assert retries.labels("apply")._value.get() + retries.labels("tick")._value.get() == 4
        # fewer, larger rankings: the later injected ranking failures may come in the final flush
        assert retries.labels("rank")._value.get() >= 1

    out = assert_outputs_exactly_once(s, rclient, ds)
    interactions = int((ds.events.type != "impression").sum())
    assert out.logged_actions > interactions, "no failure repeated any feedback"
    assert out.logged_counts > interactions, "no failure repeated any delta"
