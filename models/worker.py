"""One embedding worker: a Kafka consumer thread feeding an encoder thread through a bounded queue.

Commit order (per consumed batch, in consume order):

1. ``consume(num_messages=embed_batch_size, timeout=embed_max_wait_s)``: a batch is as large as the
   encoder takes in one go, or whatever arrived within the max wait.
2. Invalid catalog events go to ``<catalog>.dlq`` with their reason, acknowledged before step 5.
3. The valid events go into a queue of at most ``embed_queue_batches`` batches. When it is full the
   worker pauses its partitions (keeping its group membership) instead of fetching more, and resumes
   once the encoder has caught up: memory stays bounded whatever the producers do.
4. The encoder thread writes vectors to Redis (retrying transient errors); item metadata is the
   user-state stream's to write.
5. Only then are the batch's offsets stored; librdkafka commits them in the background, and
   synchronously on revoke and close.

A worker killed anywhere replays from its last committed offset, on whichever worker takes over the
partitions; vectors written before the crash are recognised by their content hash and not embedded
again. An unexpected error in the encoder thread stops the worker and is re-raised by :meth:`run`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from fusionrec.core.errors import DeliveryError, InvalidEventError, StateStoreError
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.models.embedder import CatalogEmbedder, EmbedMetrics, EmbedResult
from fusionrec.streams.consumer import consumer_config, delivered, validator_for
from fusionrec.streams.contract import CatalogEvent
from fusionrec.streams.dlq import DeadLetter, DeadLetterPublisher, position
from fusionrec.streams.metrics import StreamMetrics

log = logging.getLogger(__name__)

STATUS_EVERY_S = 10.0
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, DeliveryError, StateStoreError)


@dataclass
class Work:
    events: list[CatalogEvent] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)  # Kafka timestamps (ms) of the valid events
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # last offset per partition


class EmbedWorker:
    """Consumes ``catalog`` in the embedding group and keeps one model version's vectors current."""

    def __init__(self, settings: Settings, embedder: CatalogEmbedder, metrics: Metrics, *,
                 group_id: str | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics.of(EmbedMetrics)
        self.stream_metrics = metrics.of(StreamMetrics)
        self.validator = validator_for(settings)
        self._consumer = Consumer(consumer_config(settings, group_id or settings.embed.group), logger=log)
        self._dlq = DeadLetterPublisher(settings, metrics)
        self._queue: queue.Queue[Work | None] = queue.Queue(maxsize=settings.embed.queue_batches)
        self._done: queue.Queue[Work] = queue.Queue()
        self._failure: BaseException | None = None
        self._paused: list[TopicPartition] = []
        self.consumed = 0
        self.result = EmbedResult()
        store = embedder.store
        self._status_key = store.keys.worker_status(store.worker or "worker")
        self._reported = 0.0

    # ------------------------------------------------------------------ consumer thread
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; drains the queue, commits and closes; re-raises encoder errors."""
        encoder = threading.Thread(target=self._encode_loop, args=(stop,), name="encoder", daemon=True)
        encoder.start()
        self._consumer.subscribe([self.settings.kafka.topic_catalog], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke, on_lost=self._on_revoke)
        try:
            while not stop.is_set() and self._failure is None:
                self._store_done()
                if time.monotonic() - self._reported > STATUS_EVERY_S:
                    self._report()
                if self._overloaded():
                    continue
                msgs = self._consumer.consume(self.settings.embed.batch_size, self.settings.embed.max_wait_s)
                if msgs:
                    self._accept(msgs, stop)
        finally:
            self._queue.put(None)
            encoder.join(timeout=60)
            self._store_done()
            self._close()
        if self._failure is not None:
            raise self._failure

    def _overloaded(self) -> bool:
        """Pause while the queue is full; serve the group meanwhile."""
        depth = self._queue.qsize()
        self.metrics.embed_queue_batches.set(depth)
        if depth < self.settings.embed.queue_batches:
            if self._paused:
                self._consumer.resume([tp for tp in self._paused if tp in self._consumer.assignment()])
                self._paused = []
                self.metrics.embed_paused.set(0)
            return False
        if not self._paused:
            self._paused = self._consumer.assignment()
            self._consumer.pause(self._paused)
            self.metrics.embed_paused.set(1)
            log.debug("encoder queue full (%d batches): paused %d partitions", depth, len(self._paused))
        msg = self._consumer.poll(0.05)
        if msg is not None and msg.error() is None:
            # Fetched before the pause took effect: rewind so it is consumed again later.
            self._consumer.seek(TopicPartition(*position(msg)))
        return True

    def _accept(self, msgs: list[Message], stop: threading.Event) -> None:
        work = Work()
        dead: list[DeadLetter] = []
        for msg in delivered(msgs):
            topic, partition, offset = position(msg)
            work.offsets[(topic, partition)] = offset
            try:
                work.events.append(self.validator.catalog_event(msg.value()))
                work.timestamps.append(msg.timestamp()[1])
            except InvalidEventError as exc:
                dead.append(DeadLetter.of(msg, exc.reason, exc.detail))
        if work.events:
            self.stream_metrics.events.labels(self.settings.kafka.topic_catalog, "catalog").inc(len(work.events))
        if not self._retrying("dead_letters", stop, lambda: self._dlq.publish(dead)):
            return  # stopping: nothing of this batch is committed, it is consumed again
        self.consumed += len(msgs)
        self._queue.put(work)  # never blocks: consume() only runs while the queue has room

    def _store_done(self) -> None:
        while True:
            try:
                work = self._done.get_nowait()
            except queue.Empty:
                return
            offsets = [TopicPartition(t, p, o + 1) for (t, p), o in work.offsets.items()]
            try:
                self._consumer.store_offsets(offsets=offsets)
            except KafkaException as exc:
                # Partitions revoked meanwhile: their new owner replays from the committed offset.
                log.info("could not store offsets %s: %s", _fmt(offsets), exc)
            for (t, p), o in work.offsets.items():
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
                if high >= 0:
                    self.stream_metrics.lag.record(t, p, high, o + 1)

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", _fmt(partitions))
        self._report(added=partitions)

    def _report(self, added: Sequence[TopicPartition] = (), removed: Sequence[TopicPartition] = ()) -> None:
        """Publish this worker's partitions, model version and counts under ``P:{m}:worker:<name>``."""
        held = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        held |= {(tp.topic, tp.partition) for tp in added}
        held -= {(tp.topic, tp.partition) for tp in removed}
        status = {"version": self.embedder.version, "device": str(self.embedder.encoder.device),
                  "partitions": sorted(p for _t, p in held), "consumed": self.consumed,
                  "embedded": self.result.embedded, "at": int(time.time() * 1000)}
        try:
            self.embedder.store.redis.set(self._status_key, json.dumps(status), ex=int(3 * STATUS_EVERY_S))
        except redis.RedisError as exc:
            log.debug("could not publish worker status: %s", exc)
        self._reported = time.monotonic()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _fmt(partitions))
        self._store_done()
        self._report(removed=partitions)
        for tp in partitions:
            self.stream_metrics.lag.forget(tp.topic, tp.partition)
        self._paused = [tp for tp in self._paused if tp not in partitions]
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.debug("commit on revoke: %s", exc)

    def _close(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", exc)
        finally:
            self._consumer.close()
            self._dlq.close()

    # ------------------------------------------------------------------ encoder thread
    def _encode_loop(self, stop: threading.Event) -> None:
        try:
            while (work := self._queue.get()) is not None:
                if work.events and not self._retrying("embed", stop, lambda w=work: self._embed(w)):
                    break  # stopping: the rest is replayed from the committed offsets
                self._done.put(work)
        except BaseException as exc:  # reaches run() in the consumer thread with its traceback
            log.error("encoder thread failed: %s", exc)
            self._failure = exc

    def _embed(self, work: Work) -> None:
        self.result.add(self.embedder.process(work.events))
        now_ms = time.time() * 1000
        for ts in work.timestamps:
            if ts > 0:
                self.metrics.embed_visible_seconds.observe(max(0.0, (now_ms - ts) / 1000.0))

    def _retrying(self, stage: str, stop: threading.Event, step: object) -> bool:
        backoff = 0.1
        while True:
            try:
                step()  # type: ignore[operator]
                return True
            except TRANSIENT as exc:
                self.stream_metrics.retries.labels(stage).inc()
                log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__, exc, backoff)
            if stop.wait(backoff):
                return False
            backoff = min(backoff * 2, self.settings.stream.retry_max_backoff_s)


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions)
