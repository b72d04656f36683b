"""Trending items: hopping-window interaction counts in faust tables, top items to Redis.

The user-state consumer publishes, per applied batch, compact *item count deltas* to
``topic_item_deltas`` (:class:`ItemDeltaPublisher`): one message per source partition and target
partition holding the counts of the items that hash to the target, so the faust app sees ~10
messages per second rather than every raw event, and a table key always lives on the partition of
the message that updates it. Each delta also names its source partition and the source offsets it
counts: a replayed batch publishes its deltas again, and the faust app counts only offsets past the
newest it has counted from that source partition for that item group (:func:`fresh_counts`, kept in
a table), so every interaction is counted once. A delta's
Kafka timestamp is the event time of the newest event it counts; the windows follow it (faust's
``relative_to_stream``), so a replay of old data trends as it did then. That time is at most the
publisher's clock: an event stamped ahead of now (the contract lets one through up to
``FUSIONREC_MAX_FUTURE_SKEW_S`` ahead) would otherwise put its whole batch's counts into windows
that have not started, and a flush whose newest delta it was would query those windows instead of
the last ``trending_window_s``. On a broker with time-based
retention, replayed deltas with old timestamps are retained only briefly; live ones are current.

``fusionrec trending`` runs the faust worker (:func:`build_app`): two hopping-window tables keyed by
item and by category, windows of ``trending_window_s`` advancing every ``trending_step_s`` in event
time. Every ``trending_flush_s`` a timer writes the current window's top items to ``{g}:trend``,
the top items of each busy category to ``{g}:trend:c:<category>``, and the categories themselves to
``{g}:trend:categories`` (each flush replaces the lists: window expiry drops items on its own);
the recommendation writer reads ``{g}:trend`` as a candidate source.
"""

from __future__ import annotations

import heapq
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics, MetricSet, counter, gauge, histogram
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import AcknowledgedOutput, AcknowledgedPublisher, EventProducer
from fusionrec.streams.state import BatchResult

log = logging.getLogger(__name__)

CATEGORIES_KEPT = 50  # categories whose own top list is written each flush


class ItemDelta(msgspec.Struct, frozen=True):
    ts: float  # seconds: event time of the newest event counted, at most the publisher's clock (faust uses seconds)
    items: dict[str, int]
    categories: dict[str, str]
    source: int = -1  # the events partition counted (-1: not de-duplicated)
    target: int = -1  # the item group (crc32 of the item id modulo the partitions) the items belong to
    offsets: dict[str, list[int]] = {}  # item -> the source offsets its count is made of


def fresh_counts(offsets: dict[str, list[int]], next_offset: int) -> tuple[dict[str, int], int]:
    """Counts of the offsets at or past ``next_offset`` (the rest were counted before), and the new
    next offset of that source partition."""
    counts: dict[str, int] = {}
    high = next_offset
    for item, offs in offsets.items():
        n = sum(1 for o in offs if o >= next_offset)
        if n:
            counts[item] = n
        if offs:
            high = max(high, max(offs) + 1)
    return counts, high


class TrendingMetrics(MetricSet):
    component = "trending (fusionrec.streams.trending)"
    trending_deltas = counter("fusionrec_trending_deltas_total",
                              "Item count deltas published for the trending windows")
    trending_consumed = counter("fusionrec_trending_deltas_consumed_total",
                                "Item count deltas the trending worker added to its windows")
    trending_flush_seconds = histogram("fusionrec_trending_flush_seconds",
                                       "Wall time to query the windows and write the trending lists")
    trending_items = gauge("fusionrec_trending_items", "Items with interactions in the last window",
                           multiprocess_mode="livemax")
    trending_event_age = gauge("fusionrec_trending_event_age_seconds",
                               "Wall time minus the event time of the newest delta at the last flush",
                               multiprocess_mode="livemax")


class ItemDeltaPublisher(AcknowledgedPublisher):
    """``after_apply`` hook of the user-state stream: the batch's item counts to the deltas topic.

    Produced without waiting (a :class:`~fusionrec.streams.user_state.DeferredOutput`, through
    :class:`~fusionrec.streams.producer.AcknowledgedOutput`): the stream stores an events offset
    only once every delta counting an offset before it is acknowledged, waits for them all before a
    revocation commits, and stops fetching while ``max_pending`` wait. The faust app counts each
    (source partition, item group) past the newest offset it has counted, so the deltas of one group
    arrive in order and without gaps: a failed delta is produced again with every unacknowledged
    one behind it, in order.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 producer: EventProducer | None = None, clock: Callable[[], float] = time.time,
                 max_pending: int = 10_000) -> None:
        self.settings = settings
        self.clock = clock  # seconds since the epoch: the latest event time a delta is given
        self.metrics = metrics.of(TrendingMetrics) if metrics is not None else None
        # uncompressed: faust's client (aiokafka) has no lz4 codec without an extra library
        self.output = AcknowledgedOutput(settings, settings.kafka.topic_item_deltas, producer=producer,
                                         producer_options={"linger.ms": 5, "compression.type": "none"},
                                         max_pending=max_pending)
        self._encoder = msgspec.json.Encoder()

    def __call__(self, result: BatchResult) -> None:
        self.output.recover()
        if not result.item_offsets:
            return
        n = self.settings.kafka.partitions
        ts_ms = min(result.max_ts, int(self.clock() * 1000))
        published = 0
        for source, items in result.item_offsets.items():
            parts: dict[int, dict[str, list[int]]] = defaultdict(dict)
            for item, item_offsets in items.items():
                parts[zlib.crc32(item.encode()) % n][item] = item_offsets
            for target, group in parts.items():
                delta = ItemDelta(ts=ts_ms / 1000.0, items={i: len(o) for i, o in group.items()},
                                  categories={i: c for i in group if (c := result.categories.get(i))},
                                  source=source, target=target, offsets=group)
                first = min(o for offs in group.values() for o in offs)
                self.output.send(self._encoder.encode(delta), f"p{target}", {source: first}, timestamp=ts_ms)
                published += len(group)
        if self.metrics is not None:
            self.metrics.trending_deltas.inc(published)


def top_by_category(counts: dict[str, float], categories: dict[str, str], per_category: int,
                    kept: int = CATEGORIES_KEPT) -> tuple[dict[str, float], dict[str, list[tuple[str, float]]]]:
    """Category totals and each of the ``kept`` busiest categories' top items."""
    by_cat: dict[str, list[tuple[str, float]]] = defaultdict(list)
    totals: dict[str, float] = defaultdict(float)
    for item, c in counts.items():
        cat = categories.get(item)
        if cat and c > 0:
            by_cat[cat].append((item, c))
            totals[cat] += c
    busiest = heapq.nlargest(kept, totals.items(), key=lambda kv: kv[1])
    return dict(totals), {cat: heapq.nlargest(per_category, by_cat[cat], key=lambda kv: kv[1])
                          for cat, _ in busiest}


class TrendingWriter:
    """Writes one flush of trending lists to Redis (one MULTI: readers never see half a flush)."""

    def __init__(self, client: Any, settings: Settings, keys: Keys | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)

    def write(self, counts: dict[str, float], categories: dict[str, str],
              category_totals: dict[str, float] | None = None) -> None:
        top = heapq.nlargest(self.settings.trending.top, counts.items(), key=lambda kv: kv[1])
        totals, per_cat = top_by_category(counts, categories, max(10, self.settings.trending.top // 5))
        totals = category_totals if category_totals is not None else totals
        ttl = self.settings.trending.window_s * 2
        pipe = self.redis.pipeline(transaction=True)
        for key, pairs in ((self.keys.trending(), top),
                           (self.keys.trending_categories(), list(totals.items())),
                           *((self.keys.trending(cat), pairs) for cat, pairs in per_cat.items())):
            pipe.delete(key)
            pairs = [(i, c) for i, c in pairs if c > 0]
            if pairs:
                pipe.zadd(key, dict(pairs))
                pipe.expire(key, ttl)
        pipe.execute()


def build_app(settings: Settings, bootstrap: str, metrics: Metrics | None = None) -> Any:
    """The faust app (worker without its web server; short timeouts for the embedded broker)."""
    import faust

    from fusionrec.core.redis_client import connect

    datadir = Path(settings.ops.run_dir) / "trending" / settings.redis.prefix
    datadir.mkdir(parents=True, exist_ok=True)  # faust writes its table state there

    app = faust.App(
        f"{settings.redis.prefix}-trending", broker=f"kafka://{bootstrap}", store="memory://",
        web_enabled=False, topic_partitions=settings.kafka.partitions, topic_replication_factor=1,
        broker_session_timeout=settings.effective_session_timeout_ms() / 1000,
        broker_heartbeat_interval=1.0, broker_rebalance_timeout=10.0, consumer_auto_offset_reset="earliest",
        table_cleanup_interval=float(settings.trending.step_s),
        datadir=str(datadir),
    )
    metrics = metrics or Metrics()
    tm = metrics.of(TrendingMetrics)
    window, step = float(settings.trending.window_s), float(settings.trending.step_s)

    class Delta(faust.Record, serializer="json"):
        ts: float
        items: dict[str, int]
        categories: dict[str, str]
        source: int = -1
        target: int = -1
        offsets: dict[str, list[int]] = {}  # noqa: RUF012 - a faust field default, never mutated

    topic = app.topic(settings.kafka.topic_item_deltas, value_type=Delta)
    item_counts = app.Table("trending-items", default=int, partitions=settings.kafka.partitions) \
        .hopping(window, step, expires=window * 2, key_index=True).relative_to_stream()
    category_counts = app.Table("trending-categories", default=int, partitions=settings.kafka.partitions) \
        .hopping(window, step, expires=window * 2, key_index=True).relative_to_stream()
    # next source offset per (deltas partition, events partition): what a replayed delta already counted
    counted = app.Table("trending-counted", default=int, partitions=settings.kafka.partitions)
    writer = TrendingWriter(connect(settings), settings)
    categories: dict[str, str] = {}
    # the newest event: window queries are relative to its (event-time) timestamp
    state: dict[str, Any] = {"event": None, "dirty": False}

    @app.agent(topic)
    async def count(stream: Any) -> None:
        async for event in stream.events():
            delta = event.value
            items = delta.items
            if delta.source >= 0:
                key = f"{delta.target}:{delta.source}"  # one target's deltas all reach one partition
                items, counted[key] = fresh_counts(delta.offsets, counted[key])
            per_category: dict[str, int] = defaultdict(int)
            for item, n in items.items():
                item_counts[item] += n
                cat = delta.categories.get(item)
                if cat:
                    categories[item] = cat
                    per_category[cat] += n
            for cat, n in per_category.items():
                category_counts[cat] += n
            state["event"], state["dirty"] = event, True
            tm.trending_consumed.inc()

    @app.timer(interval=settings.trending.flush_s)
    async def flush() -> None:
        event = state["event"]
        if not state["dirty"] or event is None:
            return
        state["dirty"] = False
        t0 = time.perf_counter()
        # the oldest window still holding the newest event: the full last ``window`` of event time
        # (``current()`` would be the newest window, which has only just started)
        back = window - step
        current = {k: float(v) for k, v in item_counts.items(event).delta(back, event)}  # type: ignore[attr-defined,call-arg]
        totals = {k: float(v) for k, v in category_counts.items(event).delta(back, event)}  # type: ignore[attr-defined,call-arg]
        writer.write(current, categories, totals)
        tm.trending_flush_seconds.observe(time.perf_counter() - t0)
        tm.trending_items.set(sum(1 for v in current.values() if v))
        tm.trending_event_age.set(max(0.0, time.time() - event.message.timestamp))
        log.info("trending: %d items in the current window", sum(1 for v in current.values() if v))

    return app


def run_worker(settings: Settings, bootstrap: str, metrics: Metrics | None = None) -> None:
    """Run the trending faust worker in the foreground until interrupted."""
    app = build_app(settings, bootstrap, metrics)
    app.finalize()
    from faust.worker import Worker

    Worker(app, loglevel=settings.ops.log_level.lower(), quiet=True).execute_from_commandline()
