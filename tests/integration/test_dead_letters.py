"""Dead letters that always fit, and a missing dead-letter topic, on the real broker and Redis."""

from __future__ import annotations

import hashlib
import threading

import pytest
from confluent_kafka import KafkaException, Producer
from prometheus_client import CollectorRegistry

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.core.errors import MissingTopicError
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer, kafka_config
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, purchases_in, read_topic

NOW = 1_700_000_000_000


def produce_largest(settings: Settings, key: bytes, headers: list[tuple[str, bytes]]) -> bytes:
    """The largest invalid event the producer accepts (librdkafka's 1,000,000-byte default), sent."""
    producer = Producer(kafka_config(settings, **{"acks": "all"}))
    for size in range(1_000_000, 900_000, -20):
        value = b'{"event_id": "e", "type": "view", "x": "' + b"a" * size + b'"'
        try:
            producer.produce(settings.kafka.topic_events, value=value, key=key, headers=headers)
        except KafkaException:
            continue
        assert producer.flush(30) == 0
        return value
    raise AssertionError("no size was accepted")


def test_an_event_at_the_size_limit_is_dead_lettered_cut_with_its_size_and_hash(settings: Settings) -> None:
    # At the source topic's limit with its one header: with the dead-letter headers added it would not fit.
    big = produce_largest(settings, b"k" * 2000, [("origin", b"fuzz")])
    with EventProducer(settings) as p:
        p.user_event({"event_id": "ok", "type": "purchase", "user_id": "u1", "item_id": "i1", "ts": NOW})
    metrics = Metrics(CollectorRegistry())
    consume_until(settings, 2, metrics=metrics)
    (letter,) = read_topic(settings, settings.dlq_topic(settings.kafka.topic_events), until=lambda got: len(got) >= 1)
    h = dict(letter.headers())
    assert h["fusionrec.dlq.reason"] and h["origin"] == b"fuzz"
    assert h["fusionrec.dlq.truncated"] == b"1" and int(h["fusionrec.dlq.value_bytes"]) == len(big)
    assert h["fusionrec.dlq.value_sha256"].decode() == hashlib.sha256(big).hexdigest()
    assert int(h["fusionrec.dlq.key_bytes"]) == 2000 and letter.key() == b"k" * 1024
    value = letter.value()
    assert 800_000 < len(value) < settings.kafka.dlq_max_bytes and big.startswith(value)
    assert purchases_in(connect(settings), settings.redis.prefix) == 1  # what follows is applied


def test_a_missing_dead_letter_topic_stops_the_consumer_by_name_and_loses_nothing(settings: Settings) -> None:
    absent = settings.replace(dlq_suffix=".absent")
    with EventProducer(settings) as p:
        p.produce(settings.kafka.topic_events, b"not json", key="k")
        p.user_event({"event_id": "ok", "type": "purchase", "user_id": "u1", "item_id": "i1", "ts": NOW})
    pipeline = StatePipeline(absent, metrics=Metrics(CollectorRegistry()))
    with pytest.raises(MissingTopicError, match=rf"{settings.kafka.topic_events}\.absent"):
        pipeline.consumer.run(threading.Event(), lambda: False)
    ensure_topics(absent)  # the operator creates it; the batch was not committed, so it comes again
    consume_until(absent, 2)
    (letter,) = read_topic(absent, absent.dlq_topic(settings.kafka.topic_events), until=lambda got: len(got) >= 1)
    assert letter.value() == b"not json" and dict(letter.headers())["fusionrec.dlq.reason"] == b"not_json"
    assert purchases_in(connect(settings), settings.redis.prefix) == 1
