"""The one Kafka consume loop: batches in, validated events to a handler, offsets out.

Commit order (the guarantee every fusionrec consumer relies on):

1. ``consume(num_messages=batch_size)``; transport errors are logged, partition EOF ignored.
2. Each message is validated; bad ones become :class:`DeadLetter` s.
3. The handler applies the valid events to Redis. Transient failures are retried with back-off while
   the partitions are paused (the consumer keeps its group membership); nothing is skipped.
4. Dead letters are produced and acknowledged.
5. Only then are the batch's offsets stored; librdkafka commits stored offsets in the background and
   synchronously on revoke and close.

A crash between 3 and 5 replays the batch; the handler's offset guards make that harmless.
SIGTERM (``stop`` set) lets the current batch finish, then commits and closes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from fusionrec.core.errors import DeliveryError, InvalidEventError, StateStoreError
from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.contract import CatalogEvent, Validator
from fusionrec.streams.dlq import DeadLetter, DeadLetterPublisher, position
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.producer import kafka_config
from fusionrec.streams.state import Positioned

log = logging.getLogger(__name__)

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ResponseError,
             DeliveryError, StateStoreError)


@dataclass
class Batch:
    """One consumed batch after validation."""

    events: list[Positioned] = field(default_factory=list)
    catalog: list[CatalogEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # Kafka message timestamps (ms) of the valid messages, for freshness.
    timestamps: list[int] = field(default_factory=list)


class BatchHandler(Protocol):
    def handle(self, batch: Batch) -> None: ...


def validator_for(settings: Settings) -> Validator:
    pseudonyms = Pseudonyms.for_settings(settings)
    c = settings.contract
    return Validator(max_bytes=c.max_event_bytes, max_future_skew_ms=c.max_future_skew_s * 1000,
                     max_items_shown=c.max_items_shown, pseudonyms=pseudonyms if pseudonyms.enabled else None)


def delivered(msgs: Sequence[Message]) -> Iterator[Message]:
    """The messages that carry data: transport errors are logged and skipped, fatal ones raised."""
    for msg in msgs:
        err = msg.error()
        if err is None:
            yield msg
        elif err.fatal():
            raise KafkaException(err)
        else:
            log.warning("consumer error: %s", err)


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    """librdkafka options of every fusionrec consumer: manual offset store, cooperative rebalancing."""
    return kafka_config(settings, **{
        "group.id": group_id,
        "enable.auto.commit": True, "enable.auto.offset.store": False, "auto.commit.interval.ms": 1000,
        "auto.offset.reset": "earliest", "session.timeout.ms": settings.effective_session_timeout_ms(),
        "enable.partition.eof": False, "partition.assignment.strategy": "cooperative-sticky",
        # bounds how long a fetch may wait at the broker for more data (latency under light load)
        "fetch.wait.max.ms": 50,
        **extra,
    })


class BatchConsumer:
    """Runs the consume → validate → apply → dead-letter → store-offsets loop for one group member."""

    def __init__(self, settings: Settings, handler: BatchHandler, metrics: Metrics, *,
                 group_id: str | None = None, topics: Sequence[str] | None = None,
                 consumer_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics.of(StreamMetrics)
        self.topics = list(topics or (settings.kafka.topic_events, settings.kafka.topic_catalog))
        self.validator = validator_for(settings)
        conf = consumer_config(settings, group_id or settings.stream.group, **(consumer_options or {}))
        self._consumer = Consumer(conf, logger=log)
        self._dlq = DeadLetterPublisher(settings, metrics)
        self._revoked = threading.Event()
        self.consumed = 0
        self.batches = 0

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop`` is set (or ``until()`` is true); always commits and closes."""
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_revoke)
        try:
            while not stop.is_set() and not (until and until()):
                msgs = self._consumer.consume(self.settings.stream.batch_size, self.settings.stream.batch_timeout_s)
                if msgs:
                    self._process(msgs, stop)
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", exc)
        finally:
            self._consumer.close()
            self._dlq.close()

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", _fmt(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _fmt(partitions))
        self._revoked.set()
        for tp in partitions:
            self.metrics.lag.forget(tp.topic, tp.partition)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.debug("commit on revoke: %s", exc)

    # ------------------------------------------------------------------ one batch
    def _process(self, msgs: list[Message], stop: threading.Event) -> None:
        started = time.perf_counter()
        batch = self._validate(msgs)
        self._revoked.clear()
        if not self._retrying("apply", stop, lambda: self.handler.handle(batch)):
            return
        if not self._retrying("dead_letters", stop, lambda: self._dlq.publish(batch.dead)):
            return
        self._store_offsets(msgs)
        self.consumed += len(msgs)
        self.batches += 1
        self.metrics.batch_size.observe(len(msgs))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _validate(self, msgs: list[Message]) -> Batch:
        batch = Batch()
        types: Counter[str] = Counter()
        for msg in delivered(msgs):
            topic, partition, offset = position(msg)
            try:
                if topic == self.settings.kafka.topic_catalog:
                    batch.catalog.append(self.validator.catalog_event(msg.value()))
                else:
                    ev = self.validator.user_event(msg.value())
                    batch.events.append(Positioned(partition, offset, ev))
                    types[ev.type] += 1
                batch.timestamps.append(msg.timestamp()[1])
            except InvalidEventError as exc:
                batch.dead.append(DeadLetter.of(msg, exc.reason, exc.detail))
        for event_type, n in types.items():
            self.metrics.events.labels(self.settings.kafka.topic_events, event_type).inc(n)
        if batch.catalog:
            self.metrics.events.labels(self.settings.kafka.topic_catalog, "catalog").inc(len(batch.catalog))
        return batch

    def _retrying(self, stage: str, stop: threading.Event, step: Callable[[], None]) -> bool:
        """Run ``step`` until it succeeds; False when stopped or the partitions were taken away."""
        backoff = 0.1
        paused: list[TopicPartition] = []
        try:
            while True:
                try:
                    step()
                    return True
                except TRANSIENT as exc:
                    self.metrics.retries.labels(stage).inc()
                    log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__, exc, backoff)
                if not paused:
                    paused = self._consumer.assignment()
                    self._consumer.pause(paused)
                self._wait(backoff)
                if stop.is_set() or self._revoked.is_set():
                    log.warning("%s abandoned (%s); the batch will be replayed", stage,
                                "stopping" if stop.is_set() else "partitions revoked")
                    return False
                backoff = min(backoff * 2, self.settings.stream.retry_max_backoff_s)
        finally:
            if paused:
                self._consumer.resume([tp for tp in paused if tp in self._consumer.assignment()])

    def _wait(self, seconds: float) -> None:
        """Sleep while serving group membership; paused partitions deliver nothing."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self._consumer.poll(min(left, 0.5))
            if msg is not None and msg.error() is None:
                # Fetched before the pause took effect: rewind so it is consumed again later.
                self._consumer.seek(TopicPartition(*position(msg)))

    def _store_offsets(self, msgs: list[Message]) -> None:
        last: dict[tuple[str, int], int] = {}
        for msg in msgs:
            if msg.error() is None:
                topic, partition, offset = position(msg)
                last[(topic, partition)] = offset
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        try:
            self._consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # Partitions revoked meanwhile: their new owner replays from the committed offset.
            log.warning("could not store offsets %s: %s", _fmt(offsets), exc)
        for (t, p), o in last.items():
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if high >= 0:
                self.metrics.lag.record(t, p, high, o + 1)


def _fmt(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions)
