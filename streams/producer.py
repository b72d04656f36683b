"""``EventProducer``: how applications publish user actions and catalog changes.

Idempotent librdkafka producer (no duplicates or reordering from its own retries), a delivery callback
that counts failures, back-pressure on a full local queue (``BufferError`` -> poll and retry, for at
most ``max_block_s``: a broker that takes nothing ends in :class:`DeliveryError`, which the consume
runtime retries like any transient error, instead of a caller blocked for ever), and a flush on close.

>>> with EventProducer(settings) as producer:                         # doctest: +SKIP
...     producer.user_event({"event_id": "e1", "type": "view", "user_id": "u1",
...                          "item_id": "i1", "ts": 1700000000000})
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fusionrec.core.errors import DeliveryError
from fusionrec.core.settings import Settings
from fusionrec.streams.contract import CatalogEvent, UserEvent, encoder

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]


def kafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Base librdkafka config: bootstrap + pass-through options + call-site extras (extras win)."""
    if not settings.kafka.bootstrap:
        raise DeliveryError("no Kafka bootstrap configured (FUSIONREC_KAFKA_BOOTSTRAP or `fusionrec up`)")
    # Idle connections closed by brokers are routine; librdkafka would log each one.
    return {"bootstrap.servers": settings.kafka.bootstrap, "log.connection.close": False,
            **settings.kafka.options, **extra}


class EventProducer:
    """Publishes contract events (dicts or structs) as JSON, keyed by user id / item id."""

    def __init__(self, settings: Settings, *, producer_options: Mapping[str, Any] | None = None,
                 on_delivery_failure: Any = None, max_block_s: float = 60.0) -> None:
        conf = kafka_config(
            settings,
            **{"enable.idempotence": True, "acks": "all", "linger.ms": 20, "compression.type": "lz4",
               "batch.num.messages": 10_000, "queue.buffering.max.messages": 200_000,
               **(producer_options or {})},
        )
        self.settings = settings
        self._producer = Producer(conf)
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.last_error: KafkaError | None = None
        self._failed_at_flush = 0
        self._on_failure = on_delivery_failure
        self.max_block_s = max_block_s

    # ------------------------------------------------------------------ delivery
    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is None:
                self.delivered += 1
                return
            self.failed += 1
            self.last_error = err
        log.error("delivery failed for %s[%s]: %s", msg.topic(), msg.partition(), err)
        if self._on_failure is not None:
            self._on_failure(err, msg)

    # ------------------------------------------------------------------ produce
    def produce(self, topic: str, value: bytes, key: bytes | str | None = None,
                headers: Headers | None = None, timestamp: int = 0,
                on_delivery: Callable[[KafkaError | None, Message], None] | None = None) -> None:
        """Queue one message (``timestamp`` ms, 0: now); blocks while the local queue is full, for at
        most ``max_block_s`` (then :class:`DeliveryError`). ``on_delivery`` is also told its outcome."""
        deadline = None
        report = self._on_delivery if on_delivery is None else _both(self._on_delivery, on_delivery)
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, timestamp=timestamp,
                                       on_delivery=report)
                break
            except BufferError as exc:
                now = time.monotonic()
                deadline = deadline or now + self.max_block_s
                if now >= deadline:
                    raise DeliveryError(f"the local queue for {topic} stayed full for {self.max_block_s:g}s: "
                                        f"the broker is not taking messages ({len(self._producer)} queued)") from exc
                self._producer.poll(0.05)
        self._producer.poll(0)

    def user_event(self, event: UserEvent | Mapping[str, Any]) -> None:
        value, uid = encode_event(event, "user_id")
        self.produce(self.settings.kafka.topic_events, value, key=uid)

    def catalog_event(self, event: CatalogEvent | Mapping[str, Any]) -> None:
        value, iid = encode_event(event, "item_id")
        self.produce(self.settings.kafka.topic_catalog, value, key=iid)

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

    def connect(self, timeout: float = 30.0) -> None:
        """Reach the cluster now (one metadata request, which creates no topic), so a paced replay's
        first events are not stamped while the connection is still being made."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise DeliveryError(f"could not reach Kafka at {self.settings.kafka.bootstrap}: {exc}") from exc

    def drain(self, timeout: float = 30.0) -> int:
        """Wait up to ``timeout`` for the queued messages' outcomes; how many are still queued."""
        return int(self._producer.flush(timeout))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait for every queued message; raise if any is still undelivered or failed since last flush."""
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryError(f"{remaining} messages still undelivered after {timeout}s")
        with self._lock:
            failed, self._failed_at_flush = self.failed - self._failed_at_flush, self.failed
        if failed:
            raise DeliveryError(f"{failed} messages failed since the last flush: {self.last_error}")

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sent(NamedTuple):
    """A message produced and not yet acknowledged: enough to produce it again."""

    first: dict[int, int]  # source partition -> the smallest source offset it derives from
    value: bytes
    key: str | None
    timestamp: int


class AcknowledgedOutput:
    """Messages derived from source offsets, produced without waiting; each holds its source offsets
    back until the broker acknowledges it.

    What a stream needs to produce an output off its ingest path and still store offsets only past
    outputs that are durable: :meth:`send` returns at once, :meth:`floor` is the first source offset
    per partition whose output is not acknowledged yet (the stream stores no offset past it),
    :meth:`flush` waits for all of them (a revocation, shutdown), :meth:`drop` forgets them (lost
    partitions: their new owner derives them again).

    Consumers that count each source partition's offsets in order (trending) or join a user's
    decisions in order (the learner) need the messages of one key to arrive in order and without
    gaps. The producer is idempotent with librdkafka's gapless guarantee, so a message that fails
    fails those queued behind it too; after a failure, once every outcome is in, every message still
    unacknowledged is produced again, in its order, by a new producer (an idempotent producer's
    failure may be fatal to it).
    """

    def __init__(self, settings: Settings, topic: str, *, producer_options: Mapping[str, Any] | None = None,
                 producer: EventProducer | None = None, max_pending: int = 10_000) -> None:
        self.settings = settings
        self.topic = topic
        self.max_pending = max_pending
        self._options = {**(producer_options or {}), "enable.gapless.guarantee": True}
        self._own_producer = producer is None
        self.producer = producer or EventProducer(settings, producer_options=self._options)
        self._lock = threading.RLock()  # delivery reports arrive in whichever thread polls
        self._pending: dict[int, _Sent] = {}  # produce sequence -> message, in produce order
        self._seq = 0
        self._failed: KafkaError | str | None = None
        self.delivered = 0  # messages acknowledged (a message produced again counts once)

    def send(self, value: bytes, key: str | None, first: Mapping[int, int], timestamp: int = 0) -> None:
        """Produce one message derived from source offsets ``first`` (partition -> smallest offset) on
        (callers :meth:`recover` once per batch of sends)."""
        self._send(_Sent(dict(first), value, key, timestamp))

    def _send(self, sent: _Sent) -> None:
        with self._lock:  # produce order is sequence order, and no send goes to a replaced producer
            seq = self._seq
            self._seq += 1
            self._pending[seq] = sent
            self.producer.produce(self.topic, sent.value, key=sent.key, timestamp=sent.timestamp,
                                  on_delivery=lambda err, _msg: self._delivered(seq, err))

    def _delivered(self, seq: int, err: KafkaError | None) -> None:
        with self._lock:
            if err is None:
                if self._pending.pop(seq, None) is not None:
                    self.delivered += 1
            elif self._failed is None:
                self._failed = err

    def recover(self, timeout_s: float = 30.0, strict: bool = True) -> None:
        """After a failed delivery: once every outcome is in (waiting up to ``timeout_s``), produce the
        unacknowledged messages again, in order. ``strict``: raise :class:`DeliveryError` when the
        outcomes are not all in yet; otherwise try again at the next call."""
        with self._lock:
            self.producer.poll(0)
            if self._failed is None:
                return
            if self.producer.drain(timeout_s):
                if strict:
                    raise DeliveryError(f"{self.topic}: a delivery failed ({self._failed}) and others are "
                                        f"still undelivered after {timeout_s:g}s")
                return
            log.warning("%s: a delivery failed (%s); producing the %d unacknowledged messages again",
                        self.topic, self._failed, len(self._pending))
            if self._own_producer:
                self.producer = EventProducer(self.settings, producer_options=self._options)
            again = list(self._pending.values())
            self._pending.clear()
            self._failed = None
            for sent in again:
                self._send(sent)

    def floor(self) -> dict[int, int]:
        """First source offset per partition that an unacknowledged message derives from."""
        self.recover(timeout_s=0, strict=False)
        out: dict[int, int] = {}
        with self._lock:
            for sent in self._pending.values():
                for p, offset in sent.first.items():
                    if offset < out.get(p, offset + 1):
                        out[p] = offset
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    def accepting(self) -> bool:
        return len(self._pending) < self.max_pending

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every message is acknowledged (producing failed ones again); raise if not in time."""
        timeout = 30.0 if timeout_s is None else timeout_s
        self.recover(timeout)
        self.producer.drain(timeout)
        self.recover(timeout)
        if self._pending:
            raise DeliveryError(f"{len(self._pending)} messages to {self.topic} still unacknowledged "
                                f"after {timeout:g}s")

    def drop(self) -> None:
        """Forget every pending message: the source partitions were lost, their new owner derives them
        again (the consumers count them once)."""
        with self._lock:
            self._pending.clear()
            self._failed = None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.drain(0)


class AcknowledgedPublisher:
    """Base of the hooks that publish through an :class:`AcknowledgedOutput` (``self.output``): what
    the stream asks of a deferred output, passed on to it."""

    output: AcknowledgedOutput

    def floor(self) -> dict[int, int]:
        return self.output.floor()

    def accepting(self) -> bool:
        return self.output.accepting()

    def flush(self, timeout_s: float | None = None) -> None:
        self.output.flush(timeout_s)

    def drop(self) -> None:
        self.output.drop()

    def close(self) -> None:
        self.output.close()

    @property
    def delivered(self) -> int:
        return self.output.delivered


def _both(first: Callable[[KafkaError | None, Message], None],
          then: Callable[[KafkaError | None, Message], None]) -> Callable[[KafkaError | None, Message], None]:
    def report(err: KafkaError | None, msg: Message) -> None:
        first(err, msg)
        then(err, msg)
    return report


def encode_event(event: msgspec.Struct | Mapping[str, Any], key_field: str) -> tuple[bytes, str]:
    """A contract event as the producer sends it: (JSON value, the key: its ``key_field``)."""
    if isinstance(event, msgspec.Struct):
        return encoder.encode(event), str(getattr(event, key_field))
    return encoder.encode(event), str(event[key_field])
