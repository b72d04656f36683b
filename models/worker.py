"""One embedding worker: the consume runtime feeding an encoder thread through a bounded queue.

The worker is :class:`~fusionrec.streams.runtime.ConsumeRuntime` running an :class:`EmbedProcessor`,
whose offset policy is *stored when finished*. Per consumed batch, in consume order:

1. ``consume(num_messages=embed_batch_size, timeout=embed_max_wait_s)``: a batch is as large as the
   encoder takes in one go, or whatever arrived within the max wait.
2. Invalid catalog events go to ``<catalog>.dlq`` with their reason, acknowledged before step 5.
3. The valid events go into a queue of at most ``embed_queue_batches`` batches. While it is full the
   processor is not accepting: the runtime pauses the partitions (keeping the group membership)
   instead of fetching more, and resumes once the encoder has caught up, so memory stays bounded
   whatever the producers do, and nothing ever blocks on a full queue.
4. The encoder thread takes every batch queued at that moment into one encoder call (a backlog is
   embedded in fewer, larger calls, texts sorted by token count across them), writes the vectors to
   Redis (retrying transient errors); item metadata is the user-state stream's to write.
5. Only then are the batch's offsets stored (the runtime asks for finished work between batches,
   on revoke and on close); librdkafka commits them in the background, and synchronously on revoke
   and close.

A worker killed anywhere replays from its last committed offset, on whichever worker takes over the
partitions; vectors written before the crash are recognised by their content hash and not embedded
again. An unexpected error in the encoder thread stops the worker and is re-raised by :meth:`run`.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import redis
from confluent_kafka import Message, TopicPartition

from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.models.embedder import CatalogEmbedder, EmbedMetrics, EmbedResult
from fusionrec.streams.consumer import validator_for
from fusionrec.streams.contract import CatalogEvent
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import BaseProcessor, ConsumeRuntime, Offsets, Polled, retrying

log = logging.getLogger(__name__)

STATUS_EVERY_S = 10.0


@dataclass
class Work:
    events: list[CatalogEvent] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)  # Kafka timestamps (ms) of the valid events
    offsets: Offsets = field(default_factory=dict)  # next offset per partition


class EmbedProcessor(BaseProcessor[CatalogEvent]):
    """Catalog events → the encoder thread's queue; offsets are done when their vectors are written."""

    stage = "enqueue"

    def __init__(self, settings: Settings, embedder: CatalogEmbedder, metrics: Metrics) -> None:
        self.settings = settings
        self.embedder = embedder
        self.metrics = metrics.of(EmbedMetrics)
        self.stream_metrics = metrics.of(StreamMetrics)
        self.validator = validator_for(settings)
        self.stop = threading.Event()  # the run's stop: the encoder gives up retrying when it is set
        self._queue: queue.Queue[Work | None] = queue.Queue(maxsize=settings.embed.queue_batches)
        self._done: queue.Queue[Work] = queue.Queue()
        self.failure: BaseException | None = None
        self.consumed = 0
        self.result = EmbedResult()
        self.held: set[tuple[str, int]] = set()
        self.in_flight = 0  # batches queued or encoding whose offsets the runtime has not been handed
        store = embedder.store
        self._status_key = store.keys.worker_status(store.worker or "worker")
        self._reported = 0.0
        self._encoder = threading.Thread(target=self._encode_loop, name="encoder", daemon=True)
        self._encoder.start()

    # ------------------------------------------------------------------ consumer thread (runtime hooks)
    def decode(self, msg: Message, now_ms: int) -> CatalogEvent:
        return self.validator.catalog_event(msg.value(), now_ms)

    def process(self, batch: Polled[CatalogEvent]) -> None:
        work = Work(events=[r.value for r in batch.records], timestamps=[r.timestamp for r in batch.records],
                    offsets=dict(batch.next))
        if work.events:
            self.stream_metrics.events.labels(self.settings.kafka.topic_catalog, "catalog").inc(len(work.events))
        self.consumed += batch.size
        self.in_flight += 1
        self._queue.put_nowait(work)  # room is guaranteed: the runtime only polls while accepting()

    def completed(self, batch: Polled[CatalogEvent]) -> Offsets:
        return self._finished()

    def tick(self) -> Offsets:
        if time.monotonic() - self._reported > STATUS_EVERY_S:
            self._report()
        return self._finished()

    def accepting(self) -> bool:
        depth = self._queue.qsize()
        self.metrics.embed_queue_batches.set(depth)
        room = depth < self.settings.embed.queue_batches
        self.metrics.embed_paused.set(0 if room else 1)
        return room

    def finished(self) -> bool:
        return self.failure is not None

    def assigned(self, partitions: list[TopicPartition]) -> None:
        self.held |= {(tp.topic, tp.partition) for tp in partitions}
        self._report()

    def revoked(self, partitions: list[TopicPartition]) -> Offsets:
        self.held -= {(tp.topic, tp.partition) for tp in partitions}
        self._report()
        return self._finished()

    def lost(self, partitions: list[TopicPartition]) -> None:
        self.held -= {(tp.topic, tp.partition) for tp in partitions}
        self._report()

    def drain(self) -> Offsets:
        self._queue.put(None)  # the encoder finishes what is queued (or stops at ``stop``), then exits
        self._encoder.join(timeout=60)
        return self._finished()

    def _finished(self) -> Offsets:
        done: Offsets = {}
        while True:
            try:
                done.update(self._done.get_nowait().offsets)
            except queue.Empty:
                return done
            self.in_flight -= 1

    def _report(self) -> None:
        """Publish this worker's partitions, model version and counts under ``P:{m}:worker:<name>``."""
        status = {"version": self.embedder.version, "device": str(self.embedder.encoder.device),
                  "runtime": self.embedder.encoder.runtime,
                  "partitions": sorted(p for _t, p in self.held), "consumed": self.consumed,
                  "embedded": self.result.embedded, "at": int(time.time() * 1000)}
        try:
            self.embedder.store.redis.set(self._status_key, json.dumps(status), ex=int(3 * STATUS_EVERY_S))
        except redis.RedisError as exc:
            log.debug("could not publish worker status: %s", exc)
        self._reported = time.monotonic()

    # ------------------------------------------------------------------ encoder thread
    def _encode_loop(self) -> None:
        try:
            closing = False
            while not closing and (work := self._queue.get()) is not None:
                # Whatever else is queued goes into the same encoder call: a backlog is embedded in fewer,
                # larger calls whose texts are sorted by token count across all of them (less padding).
                works = [work]
                while len(works) < self.settings.embed.queue_batches:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        closing = True
                        break
                    works.append(more)
                if any(w.events for w in works) and not retrying(
                        functools.partial(self._embed, works), stage="embed", stop=self.stop,
                        max_backoff_s=self.settings.stream.retry_max_backoff_s, metrics=self.stream_metrics):
                    break  # stopping: the rest is replayed from the committed offsets
                for w in works:  # in consume order: a later batch's offsets supersede an earlier one's
                    self._done.put(w)
        except BaseException as exc:  # reaches run() in the consumer thread with its traceback
            log.error("encoder thread failed: %s", exc)
            self.failure = exc

    def _embed(self, works: list[Work]) -> None:
        self.result.add(self.embedder.process([ev for w in works for ev in w.events]))
        now_ms = time.time() * 1000
        for ts in (ts for w in works for ts in w.timestamps):
            if ts > 0:
                self.metrics.embed_visible_seconds.observe(max(0.0, (now_ms - ts) / 1000.0))


class EmbedWorker:
    """Consumes ``catalog`` in the embedding group and keeps one model version's vectors current."""

    def __init__(self, settings: Settings, embedder: CatalogEmbedder, metrics: Metrics, *,
                 group_id: str | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.processor = EmbedProcessor(settings, embedder, metrics)
        self.runtime = ConsumeRuntime(settings, self.processor, metrics, group_id=group_id or settings.embed.group,
                                      topics=[settings.kafka.topic_catalog], max_messages=settings.embed.batch_size,
                                      timeout_s=settings.embed.max_wait_s)

    @property
    def consumed(self) -> int:
        return self.processor.consumed

    @property
    def result(self) -> EmbedResult:
        return self.processor.result

    def settled(self) -> bool:
        """Every batch consumed so far is embedded and its offsets are handed to the consumer."""
        return self.processor.in_flight == 0

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; drains the queue, commits and closes; re-raises encoder errors."""
        self.processor.stop = stop
        self.runtime.run(stop)
        if self.processor.failure is not None:
            raise self.processor.failure

