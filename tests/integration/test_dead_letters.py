"""Dead letters that always fit, a missing dead-letter topic, and no raw user id in dead letters under
pseudonyms, on the real broker and Redis."""

from __future__ import annotations

import hashlib
import threading

import msgspec
import pytest
from confluent_kafka import KafkaException, Producer
from prometheus_client import CollectorRegistry

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import RunningServices
from fusionrec.core.errors import MissingTopicError
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer, kafka_config
from fusionrec.streams.state import decode_user_state
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, make_settings, purchases_in, read_topic

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
    # librdkafka waits topic.metadata.propagation.max.ms (30 s by default) for a topic to appear
    absent = settings.replace(dlq_suffix=".absent", kafka_options={**settings.kafka.options,
                                                                  "topic.metadata.propagation.max.ms": 3000})
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


def test_with_pseudonyms_no_dead_letter_carries_the_raw_user_id(services: RunningServices) -> None:
    key, raw = "pseudonym-key-for-the-dead-letters", "alice-raw-42"
    s = make_settings(services, user_id_key=key)
    ensure_topics(s)
    event = {"event_id": "e", "type": "view", "user_id": raw, "item_id": "i1", "ts": NOW}
    deep = msgspec.json.encode({**event, "x": None}).replace(b"null", b"[" * 3000 + b"]" * 3000)
    with EventProducer(s) as p:
        p.user_event({**event, "type": "hover"})
        p.user_event({**event, "item_id": "bad item"})
        p.produce(s.kafka.topic_events, f"user={raw}; item=i1; not json".encode(), key=raw)
        p.produce(s.kafka.topic_events, deep, key=raw)
        p.user_event({**event, "event_id": "ok", "type": "purchase"})
    with consume_until(s, 5) as pipeline:
        letters = read_topic(s, s.dlq_topic(s.kafka.topic_events), until=lambda got: len(got) >= 4)
        stored = {k.decode() for k in pipeline.redis.scan_iter(match=f"{s.redis.prefix}:*")}
        state = Keys.for_settings(s).user_state(Pseudonyms(key)(raw))
        assert decode_user_state(pipeline.redis.hget(state, "d")).counts == {"purchase": 1}  # under the pseudonym
    assert state in stored and not any(raw in k for k in stored)
    found = {dict(m.headers())["fusionrec.dlq.reason"].decode(): m for m in letters}
    assert sorted(found) == ["invalid_id", "not_json", "too_deep", "unknown_type"]
    for m in letters:
        sent = [m.key() or b"", m.value() or b"", *(n.encode() + (v or b"") for n, v in m.headers() or [])]
        assert not any(raw.encode() in part for part in sent), sent
        assert m.key() == Pseudonyms(key)(raw).encode()
    values = {reason: dict(m.headers())["fusionrec.dlq.value"] for reason, m in found.items()}
    assert values == {"invalid_id": b"pseudonymised", "unknown_type": b"pseudonymised",
                      "not_json": b"withheld", "too_deep": b"withheld"}
    assert b"'bad item'" in dict(found["invalid_id"].headers())["fusionrec.dlq.detail"]  # item ids stay
    assert msgspec.json.decode(found["unknown_type"].value())["user_id"] == Pseudonyms(key)(raw)
