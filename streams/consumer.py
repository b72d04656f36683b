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
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Message, TopicPartition

from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.contract import CatalogEvent, UserEvent, Validator
from fusionrec.streams.dlq import DeadLetter
from fusionrec.streams.metrics import StreamMetrics
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
    def flush(self, timeout_s: float | None = None) -> None: ...  # finish everything pending now
    def forget(self, partitions: Collection[int]) -> None: ...  # revoked events partitions: drop their pending
    def drop(self) -> None: ...  # the partitions were lost: drop everything pending


def validator_for(settings: Settings) -> Validator:
    pseudonyms = Pseudonyms.for_settings(settings)
    c = settings.contract
    return Validator(max_bytes=c.max_event_bytes, max_future_skew_ms=c.max_future_skew_s * 1000,
                     max_items_shown=c.max_items_shown, pseudonyms=pseudonyms if pseudonyms.enabled else None)


class EventsProcessor(BaseProcessor[Event]):
    """Validates user and catalog events and hands each batch to a :class:`BatchHandler`."""

    stage = "apply"

    def __init__(self, settings: Settings, handler: BatchHandler, metrics: StreamMetrics) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.validator = validator_for(settings)
        self.catalog_topic = settings.kafka.topic_catalog
        self.events_topic = settings.kafka.topic_events
        self.consumed: Offsets = {}  # next offset per partition whose batch the handler applied
        self.stored: Offsets = {}
        self._done_at = 0.0

    def decode(self, msg: Message) -> Event:
        if msg.topic() == self.catalog_topic:
            return self.validator.catalog_event(msg.value())
        return self.validator.user_event(msg.value())

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

    def accepting(self) -> bool:
        return self.handler.accepting()

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
            self.handler.flush(timeout_s)
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
                out[(topic, partition)] = self.stored[(topic, partition)] = nxt
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
                 consumer_options: dict[str, Any] | None = None, consumer: KafkaConsumer | None = None) -> None:
        self.handler = handler
        super().__init__(settings, EventsProcessor(settings, handler, metrics.of(StreamMetrics)), metrics,
                         group_id=group_id or settings.stream.group,
                         topics=topics or (settings.kafka.topic_events, settings.kafka.topic_catalog),
                         consumer_options=consumer_options, consumer=consumer)
