"""Dead-letter publishing: bad input goes to ``<topic>.dlq`` with its original bytes and a reason.

Headers added to the original ones:

=============================  ====================================================
``fusionrec.dlq.reason``       low-cardinality reason (``not_json``, ``missing_field`` …)
``fusionrec.dlq.detail``       the validator's message (truncated to 500 bytes)
``fusionrec.source.topic``     topic the message was read from
``fusionrec.source.partition`` its partition
``fusionrec.source.offset``    its offset
``fusionrec.dlq.ts``           when it was dead-lettered (ms)
=============================  ====================================================

Delivery is at-least-once: the consumer flushes the DLQ before it stores the batch's offsets, so a
crash may repeat a dead letter but never loses one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

from fusionrec.core.errors import DeliveryError
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.producer import kafka_config

log = logging.getLogger(__name__)


def position(msg: Message) -> tuple[str, int, int]:
    """topic, partition, offset of a consumed message (always set on messages without error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("message has no position")
    return topic, partition, offset


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str
    detail: str

    @classmethod
    def of(cls, msg: Message, reason: str, detail: str) -> DeadLetter:
        topic, partition, offset = position(msg)
        headers = msg.headers() or []
        items = headers.items() if isinstance(headers, dict) else headers
        return cls(topic=topic, partition=partition, offset=offset, key=msg.key(), value=msg.value(),
                   headers=[(k, v if isinstance(v, bytes) else str(v or "").encode()) for k, v in items],
                   reason=reason, detail=detail)

    def dlq_headers(self) -> list[tuple[str, str | bytes | None]]:
        return [*self.headers,
                ("fusionrec.dlq.reason", self.reason.encode()),
                ("fusionrec.dlq.detail", self.detail.encode()[:500]),
                ("fusionrec.source.topic", self.topic.encode()),
                ("fusionrec.source.partition", str(self.partition).encode()),
                ("fusionrec.source.offset", str(self.offset).encode()),
                ("fusionrec.dlq.ts", str(int(time.time() * 1000)).encode())]


class DeadLetterPublisher:
    """Produces dead letters and confirms their delivery before the caller commits."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics.of(StreamMetrics)
        self._producer = Producer(kafka_config(settings, **{"enable.idempotence": True, "acks": "all",
                                                            "linger.ms": 5}))
        self._failed: list[DeadLetter] = []

    def publish(self, letters: list[DeadLetter], timeout: float = 30.0) -> None:
        """Send and wait for acknowledgement of every letter; raises DeliveryError otherwise."""
        if not letters:
            return
        self._failed = []
        for letter in letters:
            log.warning("dead letter %s[%d]@%d: %s (%s)", letter.topic, letter.partition, letter.offset,
                        letter.reason, letter.detail[:200])
            self._produce(letter)
        remaining = self._producer.flush(timeout)
        if remaining or self._failed:
            raise DeliveryError(f"{len(self._failed)} dead letters failed, {remaining} undelivered")
        for letter in letters:
            self.metrics.dead_letters.labels(letter.topic, letter.reason).inc()

    def _produce(self, letter: DeadLetter) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._failed.append(letter)
                self.metrics.delivery_failures.labels(self.settings.dlq_topic(letter.topic)).inc()

        while True:
            try:
                self._producer.produce(self.settings.dlq_topic(letter.topic), value=letter.value,
                                       key=letter.key, headers=letter.dlq_headers(), on_delivery=on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(10)
