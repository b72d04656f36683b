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
from typing import Any

import msgspec
from confluent_kafka import KafkaError, Message, Producer

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
        value, uid = _encode(event, "user_id")
        self.produce(self.settings.kafka.topic_events, value, key=uid)

    def catalog_event(self, event: CatalogEvent | Mapping[str, Any]) -> None:
        value, iid = _encode(event, "item_id")
        self.produce(self.settings.kafka.topic_catalog, value, key=iid)

    def poll(self, timeout: float = 0) -> int:
        return int(self._producer.poll(timeout))

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


def _both(first: Callable[[KafkaError | None, Message], None],
          then: Callable[[KafkaError | None, Message], None]) -> Callable[[KafkaError | None, Message], None]:
    def report(err: KafkaError | None, msg: Message) -> None:
        first(err, msg)
        then(err, msg)
    return report


def _encode(event: msgspec.Struct | Mapping[str, Any], key_field: str) -> tuple[bytes, str]:
    if isinstance(event, msgspec.Struct):
        return encoder.encode(event), str(getattr(event, key_field))
    return encoder.encode(event), str(event[key_field])
