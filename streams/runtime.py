"""The consume runtime: the one confluent-kafka loop every fusionrec stage runs on.

The user-state stream, the embedding workers and the learner each plug in a :class:`Processor`; the
runtime owns the consumer, the dead-letter publisher, retries, rebalances, lag and shutdown. Per
polled batch, in this order (the labels ``Step 1`` … ``Step 5`` in :meth:`ConsumeRuntime._step` match):

1. **Poll** ``consume(max_messages, timeout)``. Transport errors are logged and skipped, fatal ones
   raised; partition EOF is not reported (``enable.partition.eof`` is off).
2. **Decode** each message with :meth:`Processor.decode`, given the batch's one clock read (the
   contract's future-skew bound is checked against it). :class:`InvalidEventError` becomes a dead
   letter with its reason; *any other exception* a message causes becomes a dead letter with reason
   ``invalid_value``. A message never crashes a loop. :meth:`Processor.dead_letter` may rewrite
   each letter (the user-state stage pseudonymises user ids in its events topic's letters).
3. **Process** the decoded batch (:meth:`Processor.process`). Errors in :data:`TRANSIENT` are retried
   with exponential back-off while every assigned partition is paused, so the member keeps its group
   membership and nothing newer is fetched. A retry that is abandoned (stopping, or the partitions
   were revoked) rewinds the partitions the member still owns to the batch's first offsets, so the
   batch is consumed again rather than skipped.
4. **Dead letters** are produced to ``<topic>.dlq`` and acknowledged (retried the same way).
5. **Offsets**: :meth:`Processor.completed` names the offsets whose side effects are done, and the
   runtime stores them. The policy is the processor's: *after the side effect* (the batch itself:
   user state), *when finished* (work handed to another thread: the embedding workers), or *in a
   checkpoint* (nothing per batch; :meth:`Processor.tick` returns the checkpoint's offsets: the
   learner, which also seeks to them on assignment). librdkafka commits stored offsets every second,
   and the runtime commits synchronously on revoke and on close.

Between batches the runtime calls :meth:`Processor.tick` (checkpoints, leases; transient errors
retried). A poll waits for a full batch at most ``stream.batch_timeout_s``, and never past
:meth:`Processor.poll_wait`, so work a tick has due (write-behind state) is not held up by a quiet
topic. While :meth:`Processor.accepting` is false, the runtime pauses its partitions and serves the group
instead of fetching (bounded memory under overload).

Rebalances are cooperative (``cooperative-sticky``). On assignment :meth:`Processor.assigned` may set
start offsets. On revocation the offsets :meth:`Processor.revoked` reports done are stored and
committed synchronously before the partitions go. Lost partitions (the member was fenced) are
dropped without committing: their new owner already replays them.

SIGTERM sets ``stop``: the current batch finishes, :meth:`Processor.drain` reports the offsets of
work in flight, they are committed, and the consumer and producers close.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import redis
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition
from redis.exceptions import ClusterError

from fusionrec.core.errors import DeliveryError, InvalidEventError, StateStoreError, WorkerLostError
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.streams.dlq import DeadLetter, DeadLetterPublisher, position
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.producer import kafka_config

log = logging.getLogger(__name__)

# The one list of errors a stage waits out instead of failing: Redis unreachable, loading, failing
# over, out of memory or answering a script error (a Lua error names its cause in the log at each
# retry), a cluster resharding, Kafka not acknowledging, and a state guard that moved (a concurrent
# writer: recompute from fresh state).
# (``ResponseError`` covers OOM, READONLY, TRYAGAIN and CLUSTERDOWN replies.)
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.ResponseError, ClusterError, DeliveryError, StateStoreError,
    WorkerLostError)

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to consume
T = TypeVar("T")


@dataclass(frozen=True)
class Record(Generic[T]):
    """One decoded message with its position and Kafka timestamp (ms; 0 when absent)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    value: T


@dataclass
class Polled(Generic[T]):
    """One polled batch after decoding: what a processor processes."""

    records: list[Record[T]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    first: Offsets = field(default_factory=dict)  # first offset per partition (where a rewind goes)
    next: Offsets = field(default_factory=dict)  # last offset + 1 per partition (what is stored)
    size: int = 0  # messages polled, errors included
    # whatever the processor keeps between attempts of the same batch (work a retry must not redo)
    scratch: Any = None


class Processor(Protocol[T]):
    """A stage on the runtime. Only ``decode`` and ``process`` are required; see :class:`BaseProcessor`."""

    stage: str  # label of the retry metric

    def decode(self, msg: Message, now_ms: int) -> T: ...  # now_ms: the batch's one clock read
    def dead_letter(self, letter: DeadLetter) -> DeadLetter: ...
    def process(self, batch: Polled[T]) -> None: ...
    def completed(self, batch: Polled[T]) -> Offsets: ...
    def tick(self) -> Offsets: ...
    def poll_wait(self) -> float | None: ...  # longest the next poll may wait for messages (None: the batch timeout)
    def accepting(self) -> bool: ...
    def finished(self) -> bool: ...
    def assigned(self, partitions: list[TopicPartition]) -> None: ...
    def revoked(self, partitions: list[TopicPartition]) -> Offsets: ...
    def lost(self, partitions: list[TopicPartition]) -> None: ...
    def drain(self) -> Offsets: ...
    def close(self) -> None: ...


class BaseProcessor(Generic[T]):
    """Defaults: offsets stored after the side effect, no ticks, always accepting."""

    stage = "process"

    def decode(self, msg: Message, now_ms: int) -> T:
        raise NotImplementedError

    def dead_letter(self, letter: DeadLetter) -> DeadLetter:
        """What a message that failed :meth:`decode` carries to the DLQ: by default, what came."""
        return letter

    def process(self, batch: Polled[T]) -> None:
        raise NotImplementedError

    def completed(self, batch: Polled[T]) -> Offsets:
        return batch.next

    def tick(self) -> Offsets:
        return {}

    def poll_wait(self) -> float | None:
        return None

    def accepting(self) -> bool:
        return True

    def finished(self) -> bool:
        return False

    def assigned(self, partitions: list[TopicPartition]) -> None:
        pass

    def revoked(self, partitions: list[TopicPartition]) -> Offsets:
        return {}

    def lost(self, partitions: list[TopicPartition]) -> None:
        pass

    def drain(self) -> Offsets:
        return {}

    def close(self) -> None:
        pass


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


def retrying(step: Callable[[], None], *, stage: str, stop: threading.Event, max_backoff_s: float,
             metrics: StreamMetrics, wait: Callable[[float], bool] | None = None) -> bool:
    """Run ``step`` until it succeeds (True), retrying :data:`TRANSIENT` errors with back-off.

    ``wait(seconds)`` sleeps between attempts and returns True to abandon (default: ``stop``).
    """
    wait = wait or stop.wait
    backoff = 0.1
    while True:
        try:
            step()
            return True
        except TRANSIENT as exc:
            metrics.retries.labels(stage).inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__, exc, backoff)
        if wait(backoff):
            return False
        backoff = min(backoff * 2, max_backoff_s)


class KafkaConsumer(Protocol):
    """The part of :class:`confluent_kafka.Consumer` the runtime uses (a fake one in the unit tests)."""

    def subscribe(self, topics: list[str], **callbacks: Any) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...
    def poll(self, timeout: float = ...) -> Message | None: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def store_offsets(self, *, offsets: list[TopicPartition]) -> None: ...
    def commit(self, *, asynchronous: bool = ...) -> Any: ...
    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = ...,
                              cached: bool = ...) -> tuple[int, int]: ...
    def committed(self, partitions: list[TopicPartition], timeout: float = ...) -> list[TopicPartition]: ...
    def close(self) -> None: ...


class DeadLetters(Protocol):
    def publish(self, letters: list[DeadLetter]) -> None: ...
    def close(self) -> None: ...


class ConsumeRuntime(Generic[T]):
    """Runs one processor as one consumer-group member (see the module docstring for the order)."""

    def __init__(self, settings: Settings, processor: Processor[T], metrics: Metrics, *, group_id: str,
                 topics: Sequence[str], max_messages: int | None = None, timeout_s: float | None = None,
                 consumer_options: dict[str, Any] | None = None, consumer: KafkaConsumer | None = None,
                 dead_letters: DeadLetters | None = None) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics.of(StreamMetrics)
        self.topics = list(topics)
        self.max_messages = max_messages or settings.stream.batch_size
        self.timeout_s = settings.stream.batch_timeout_s if timeout_s is None else timeout_s
        self._consumer: KafkaConsumer = consumer or cast(KafkaConsumer, Consumer(
            consumer_config(settings, group_id, **(consumer_options or {})), logger=log))
        self._dlq: DeadLetters = dead_letters or DeadLetterPublisher(settings, metrics)
        self._revoked = threading.Event()
        self._paused: list[TopicPartition] = []
        self.consumed = 0
        self.batches = 0

    # ------------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``stop`` is set, ``until()`` is true or the processor has finished; always
        drains, commits and closes."""
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        try:
            while not stop.is_set() and not (until and until()) and not self.processor.finished():
                if not self._retrying("tick", stop, lambda: self._store(self.processor.tick()), revocable=False):
                    break
                if not self.processor.accepting():
                    self._hold()
                    continue
                self._release()
                wait = self.processor.poll_wait()
                msgs = self._consumer.consume(self.max_messages, self.timeout_s if wait is None else
                                              max(0.0, min(self.timeout_s, wait)))
                if msgs:
                    self._step(msgs, stop)
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self._store(self.processor.drain())
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed: %s", exc)
        finally:
            try:
                self._consumer.close()
            finally:
                self._dlq.close()
                self.processor.close()

    # ------------------------------------------------------------------ rebalances
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            tp.offset = OFFSET_INVALID  # the committed offset, unless the processor says otherwise
        self.processor.assigned(partitions)
        log.info("assigned %s", _fmt(partitions))
        consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _fmt(partitions))
        self._revoked.set()
        self._forget(partitions)
        self._store(self.processor.revoked(partitions))
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            log.debug("commit on revoke: %s", exc)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s: their new owner replays from the committed offsets", _fmt(partitions))
        self._revoked.set()
        self._forget(partitions)
        self.processor.lost(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self._paused = [tp for tp in self._paused if (tp.topic, tp.partition) not in gone]
        for tp in partitions:
            self.metrics.lag.forget(tp.topic, tp.partition)

    # ------------------------------------------------------------------ one batch
    def _step(self, msgs: list[Message], stop: threading.Event) -> None:
        started = time.perf_counter()
        self._revoked.clear()
        # Step 1: poll (done by the caller); Step 2: decode, bad input to dead letters
        batch = self._decode(msgs)
        # Step 3: the side effect, transient errors retried while paused
        if not self._retrying(self.processor.stage, stop, lambda: self.processor.process(batch)):
            self._rewind(batch)
            return
        # Step 4: dead letters acknowledged before any offset that covers them is stored
        if not self._retrying("dead_letters", stop, lambda: self._dlq.publish(batch.dead)):
            self._rewind(batch)
            return
        # Step 5: store the offsets whose side effects are done (the processor's policy)
        self._store(self.processor.completed(batch))
        self.consumed += batch.size
        self.batches += 1
        self.metrics.batch_size.observe(batch.size)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _decode(self, msgs: list[Message]) -> Polled[T]:
        batch: Polled[T] = Polled(size=len(msgs))
        now_ms = int(time.time() * 1000)  # one clock read per batch: the contract's future-skew bound
        for msg in delivered(msgs):
            topic, partition, offset = position(msg)
            batch.first.setdefault((topic, partition), offset)
            batch.next[(topic, partition)] = offset + 1
            try:
                value = self.processor.decode(msg, now_ms)
            except InvalidEventError as exc:
                batch.dead.append(self.processor.dead_letter(DeadLetter.of(msg, exc.reason, exc.detail)))
                continue
            except Exception as exc:  # whatever a message makes the decoder raise is bad input
                detail = f"{type(exc).__name__}: {exc}"[:500]
                batch.dead.append(self.processor.dead_letter(DeadLetter.of(msg, "invalid_value", detail)))
                continue
            batch.records.append(Record(topic, partition, offset, msg.timestamp()[1], value))
        return batch

    def _rewind(self, batch: Polled[T]) -> None:
        """An abandoned batch: the partitions still owned are consumed again from its first offsets."""
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for (topic, partition), offset in batch.first.items():
            if (topic, partition) in owned:
                try:
                    self._consumer.seek(TopicPartition(topic, partition, offset))
                except KafkaException as exc:
                    log.warning("could not rewind %s[%d] to %d: %s", topic, partition, offset, exc)

    def _retrying(self, stage: str, stop: threading.Event, step: Callable[[], None], revocable: bool = True) -> bool:
        """``step`` until it succeeds, paused meanwhile; False when stopped (or, for a batch's steps,
        when partitions were revoked: the batch belongs to their new owner now)."""
        paused_here = False

        def wait(seconds: float) -> bool:
            nonlocal paused_here
            if not self._paused:
                self._hold_all()
                paused_here = True
            self._serve(seconds)
            if stop.is_set() or (revocable and self._revoked.is_set()):
                log.warning("%s abandoned (%s); the batch will be consumed again", stage,
                            "stopping" if stop.is_set() else "partitions revoked")
                return True
            return False

        try:
            return retrying(step, stage=stage, stop=stop, max_backoff_s=self.settings.stream.retry_max_backoff_s,
                            metrics=self.metrics, wait=wait)
        finally:
            if paused_here:
                self._release()

    # ------------------------------------------------------------------ pause / serve
    def _hold(self) -> None:
        """Back-pressure: the processor is full; serve the group without fetching."""
        self._hold_all()
        self._serve(0.05)

    def _hold_all(self) -> None:
        if not self._paused:
            self._paused = list(self._consumer.assignment())
            if self._paused:
                self._consumer.pause(self._paused)

    def _release(self) -> None:
        if self._paused:
            owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            self._consumer.resume([tp for tp in self._paused if (tp.topic, tp.partition) in owned])
            self._paused = []

    def _serve(self, seconds: float) -> None:
        """Sleep while serving group membership; paused partitions deliver nothing."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self._consumer.poll(min(left, 0.5))
            if msg is not None and msg.error() is None:
                # Fetched before the pause took effect: rewind so it is consumed again later.
                self._consumer.seek(TopicPartition(*position(msg)))

    # ------------------------------------------------------------------ offsets
    def _store(self, done: Offsets) -> None:
        if not done:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in done.items()]
        try:
            self._consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # Partitions revoked meanwhile: their new owner replays from the committed offset.
            log.info("could not store offsets %s: %s", _fmt(offsets), exc)
        for (t, p), o in done.items():
            _low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if high >= 0:
                self.metrics.lag.record(t, p, high, o)


def _fmt(partitions: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions)
