"""The user-state stage on the consume runtime: events and catalog in, a :class:`Batch` to a handler.

:class:`BatchConsumer` is :class:`~fusionrec.streams.runtime.ConsumeRuntime` with the
:class:`EventsProcessor`: messages are validated against the event contract (step 2 of the runtime's
order), the handler applies the batch to Redis (step 3), and offsets are stored once the handler
returned, the dead letters are acknowledged and every output derived from the events before them is
done: outputs the handler defers (ranking off the ingest path) hold an events partition's offset back
at their :meth:`~BatchHandler.floor`. A crash before that replays from the stored offset; the state
store's offset guards make the replay harmless and the outputs are derived again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.contract import CatalogEvent, UserEvent, Validator
from fusionrec.streams.dlq import DeadLetter
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.positions import AppliedPositions, PositionMetrics, reconcile
from fusionrec.streams.producer import kafka_config
from fusionrec.streams.runtime import (
    TRANSIENT,
    BaseProcessor,
    ConsumeRuntime,
    KafkaConsumer,
    Offsets,
    Polled,
)
from fusionrec.streams.state import Positioned

log = logging.getLogger(__name__)

Event = UserEvent | CatalogEvent
# How long deferred outputs may take to finish before offsets are committed; what is left is derived
# again by whoever replays from the committed offsets (a rebalance callback must stay short).
REVOKE_FLUSH_S = 3.0
# How long an assignment retries reading Redis' applied positions before the consumer gives up, and
# how long it waits for the message at an offset the broker says it does not have.
ASSIGN_RETRY_S = 60.0
PROBE_S = 5.0
SHUTDOWN_FLUSH_S = 30.0
# Offsets are committed once a second; recomputing the floor (a pass over the pending users) more
# often than this would only cost the ingest path.
DONE_EVERY_S = 0.1


@dataclass
class Batch:
    """One consumed batch after validation."""

    events: list[Positioned] = field(default_factory=list)
    catalog: list[CatalogEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # Kafka message timestamps (ms) of the valid messages, for freshness.
    timestamps: list[int] = field(default_factory=list)
    # set by a handler that took the batch in: a retry of the batch's step must not take it again
    taken: bool = False


class BatchHandler(Protocol):
    def handle(self, batch: Batch) -> None: ...
    def floor(self) -> dict[int, int]: ...  # events partition -> first offset whose outputs are pending
    def accepting(self) -> bool: ...
    def tick(self) -> None: ...  # between batches: finish what is due
    def poll_wait(self) -> float | None: ...  # longest the next poll may wait (None: the batch timeout)
    def flush(self, timeout_s: float | None = None) -> int: ...  # finish everything pending now (events written)
    def forget(self, partitions: Collection[int]) -> None: ...  # revoked events partitions: drop their pending
    def drop(self) -> None: ...  # the partitions were lost: drop everything pending
    def settle(self, done: dict[int, int]) -> None: ...  # events partition -> last offset no replay goes back to


def validator_for(settings: Settings) -> Validator:
    pseudonyms = Pseudonyms.for_settings(settings)
    c = settings.contract
    return Validator(max_bytes=c.max_event_bytes, max_future_skew_ms=c.max_future_skew_s * 1000,
                     max_items_shown=c.max_items_shown, pseudonyms=pseudonyms if pseudonyms.enabled else None)


class EventsProcessor(BaseProcessor[Event]):
    """Validates user and catalog events and hands each batch to a :class:`BatchHandler`."""

    stage = "apply"

    def __init__(self, settings: Settings, handler: BatchHandler, metrics: StreamMetrics,
                 positions: AppliedPositions | None = None, position_metrics: PositionMetrics | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        # where the stream stands in Redis (fusionrec.streams.positions), and the consumer to reconcile
        # it with on assignment (set by BatchConsumer once it exists)
        self.positions = positions
        self.position_metrics = position_metrics
        self.broker: KafkaConsumer | None = None
        self.validator = validator_for(settings)
        self.pseudonyms = Pseudonyms.for_settings(settings)  # the validator's function, for dead letters
        self.catalog_topic = settings.kafka.topic_catalog
        self.events_topic = settings.kafka.topic_events
        self.consumed: Offsets = {}  # next offset per partition whose batch the handler applied
        self.stored: Offsets = {}
        self._done_at = 0.0

    def decode(self, msg: Message, now_ms: int) -> Event:
        if msg.topic() == self.catalog_topic:
            return self.validator.catalog_event(msg.value(), now_ms)
        return self.validator.user_event(msg.value(), now_ms)

    def dead_letter(self, letter: DeadLetter) -> DeadLetter:
        """With pseudonyms on, a user events letter leaves without a raw user id
        (:meth:`DeadLetter.pseudonymised`); catalog letters carry item ids only."""
        if letter.topic == self.catalog_topic or not self.pseudonyms.enabled:
            return letter
        return letter.pseudonymised(self.pseudonyms, self.validator.max_bytes)

    def process(self, polled: Polled[Event]) -> None:
        if polled.scratch is None:  # first attempt: build the handler's batch once
            polled.scratch = self._batch(polled)
        self.handler.handle(polled.scratch)

    def completed(self, polled: Polled[Event]) -> Offsets:
        self.consumed.update(polled.next)
        return self._done()

    def tick(self) -> Offsets:
        self.handler.tick()
        return self._done()

    def poll_wait(self) -> float | None:
        return self.handler.poll_wait()

    def accepting(self) -> bool:
        return self.handler.accepting()

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """Start each events partition where Redis and Kafka agree it stands (see
        :mod:`fusionrec.streams.positions`); transient errors retried for up to ``ASSIGN_RETRY_S``."""
        events = [tp for tp in partitions if tp.topic == self.events_topic]
        if not events or self.positions is None or self.broker is None:
            return
        deadline = time.monotonic() + ASSIGN_RETRY_S
        backoff = 0.1
        while True:
            try:
                self._reconcile(events)
                return
            except TRANSIENT as exc:
                if time.monotonic() + backoff > deadline:
                    raise
                log.warning("reconciling %s failed (%s: %s); retrying in %.1fs",
                            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in events), type(exc).__name__, exc,
                            backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.settings.stream.retry_max_backoff_s)

    def _reconcile(self, events: list[TopicPartition]) -> None:
        assert self.positions is not None and self.broker is not None
        committed = {tp.partition: tp.offset for tp in self.broker.committed(events, timeout=30) if tp.offset >= 0}
        applied, guarded = self.positions.read([tp.partition for tp in events])
        resets: list[int] = []
        for tp in events:
            low, high = self.broker.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=30,
                                                          cached=False)
            done = applied[tp.partition]
            if done is not None and done >= high:
                high = max(high, self._log_end(tp.topic, tp.partition, done))
            found = reconcile(tp.topic, tp.partition, committed=committed.get(tp.partition),
                              applied=applied[tp.partition], low=low, high=high, has_guards=guarded[tp.partition],
                              policy=self.settings.stream.offset_mismatch)
            if self.position_metrics is not None:
                self.position_metrics.reconciled.labels(found.outcome).inc()
                self.position_metrics.unrecoverable.inc(found.unrecoverable)
            if found.start is not None:
                tp.offset = found.start
            if found.outcome == "topic_reset":
                resets.append(tp.partition)
            if found.outcome not in ("in_step", "fresh"):
                (log.info if found.outcome == "redis_ahead" else log.warning)(
                    "%s[%d]: %s (committed %s, applied in Redis %s, topic [%d, %d)): starting at %s%s", tp.topic,
                    tp.partition, found.outcome, committed.get(tp.partition), applied[tp.partition], low, high,
                    found.start, f"; {found.unrecoverable} events are no longer in the topic"
                    if found.unrecoverable else "")
        if resets:
            self.positions.reset(resets)
            self.handler.forget(resets)
            self.handler.settle({p: -1 for p in resets})

    def _log_end(self, topic: str, partition: int, offset: int) -> int:
        """``offset + 1`` if the partition holds a message at ``offset``, else 0: read, not asked.

        A broker's end offset (ListOffsets) is what decides that a topic lost data, and one wrong answer
        would stop the consumer. Some Kafka-compatible brokers answer the base offset of the last record
        batch plus one (the embedded broker does), so before trusting an end offset below what Redis
        applied, the message itself is fetched with a throwaway consumer."""
        probe = Consumer(kafka_config(self.settings, **{
            "group.id": f"fusionrec-probe-{uuid.uuid4().hex}", "enable.auto.commit": False,
            "auto.offset.reset": "error", "enable.partition.eof": True}), logger=log)
        try:
            probe.assign([TopicPartition(topic, partition, offset)])
            deadline = time.monotonic() + PROBE_S
            while (left := deadline - time.monotonic()) > 0:
                msg = probe.poll(min(left, 0.5))
                if msg is None:
                    continue
                err = msg.error()
                if err is None:
                    return offset + 1 if (msg.offset() or -1) >= offset else 0
                if err.code() in (KafkaError._PARTITION_EOF, KafkaError.OFFSET_OUT_OF_RANGE,
                                  KafkaError._AUTO_OFFSET_RESET):
                    return 0
            return 0
        finally:
            probe.close()

    def revoked(self, partitions: list[TopicPartition]) -> Offsets:
        self._flush("revoke", REVOKE_FLUSH_S)
        done = self._done(force=True)
        self.handler.forget([tp.partition for tp in partitions if tp.topic == self.events_topic])
        self._forget(partitions)
        return done

    def lost(self, partitions: list[TopicPartition]) -> None:
        self.handler.drop()  # their new owner replays from the committed offsets and derives them again
        self._forget(partitions)

    def drain(self) -> Offsets:
        self._flush("shutdown", SHUTDOWN_FLUSH_S)
        return self._done(force=True)

    def _flush(self, why: str, timeout_s: float) -> None:
        try:
            written = self.handler.flush(timeout_s)
            if written:
                log.info("%s: wrote the state of %d waiting events before the commit", why, written)
        except TRANSIENT as exc:  # the offsets stay at the floor: a replay derives the outputs again
            log.warning("pending outputs not finished at %s (%s: %s); they are derived again on replay",
                        why, type(exc).__name__, exc)

    def _done(self, force: bool = False) -> Offsets:
        """Consumed offsets, held back at the first events offset whose deferred outputs are pending;
        only what moved since the last call (at most every ``DONE_EVERY_S`` unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._done_at < DONE_EVERY_S:
            return {}
        self._done_at = now
        floor = self.handler.floor()
        out: Offsets = {}
        for (topic, partition), nxt in self.consumed.items():
            if topic == self.events_topic and partition in floor:
                nxt = min(nxt, floor[partition])
            if self.stored.get((topic, partition), -1) < nxt:
                out[(topic, partition)] = nxt
        done = {p: nxt - 1 for (topic, p), nxt in out.items() if topic == self.events_topic and nxt > 0}
        if done and self.positions is not None:
            try:
                self.positions.mark(done)  # in Redis before Kafka: a replay never starts past it
            except TRANSIENT as exc:
                log.warning("could not record applied positions (%s: %s); offsets are stored once it is",
                            type(exc).__name__, exc)
                return {}
            self.handler.settle(done)
        self.stored.update(out)
        return out

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.consumed.pop((tp.topic, tp.partition), None)
            self.stored.pop((tp.topic, tp.partition), None)

    def _batch(self, polled: Polled[Event]) -> Batch:
        batch = Batch(dead=polled.dead)
        types: Counter[str] = Counter()
        for rec in polled.records:
            if isinstance(rec.value, CatalogEvent):
                batch.catalog.append(rec.value)
            else:
                batch.events.append(Positioned(rec.partition, rec.offset, rec.value))
                types[rec.value.type] += 1
            batch.timestamps.append(rec.timestamp)
        for event_type, n in types.items():
            self.metrics.events.labels(self.events_topic, event_type).inc(n)
        if batch.catalog:
            self.metrics.events.labels(self.catalog_topic, "catalog").inc(len(batch.catalog))
        return batch


class BatchConsumer(ConsumeRuntime[Event]):
    """The user-state consumer: the runtime running an :class:`EventsProcessor`."""

    def __init__(self, settings: Settings, handler: BatchHandler, metrics: Metrics, *,
                 group_id: str | None = None, topics: Sequence[str] | None = None,
                 consumer_options: dict[str, Any] | None = None, consumer: KafkaConsumer | None = None,
                 positions: AppliedPositions | None = None) -> None:
        self.handler = handler
        processor = EventsProcessor(settings, handler, metrics.of(StreamMetrics), positions,
                                    metrics.of(PositionMetrics))
        super().__init__(settings, processor, metrics,
                         group_id=group_id or settings.stream.group,
                         topics=topics or (settings.kafka.topic_events, settings.kafka.topic_catalog),
                         consumer_options=consumer_options, consumer=consumer)
        processor.broker = self._consumer
