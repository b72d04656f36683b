"""Kafka's committed offsets and Redis' applied positions reconciled on assignment, on the real broker
and Redis: a broker that lost its topic, and a Redis that lost acknowledged writes."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import _stop, start_broker
from fusionrec.core.errors import OffsetMismatchError
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, dump_state, make_settings

T0 = 1_700_000_000_000


def _publish(settings, first: int, count: int) -> None:
    with EventProducer(settings) as producer:
        for n in range(first, first + count):
            producer.user_event({"event_id": f"e{n}", "type": "purchase", "user_id": f"u{n % 6}",
                                 "item_id": f"i{n % 9}", "ts": T0 + n})


def _purchases(client, prefix: str) -> int:
    return sum(v["state"]["counts"].get("purchase", 0) for k, v in dump_state(client, prefix).items()
               if k.endswith(":s"))


def _run_until(settings, total: int, timeout: float = 60.0) -> tuple[StatePipeline, BaseException | None]:
    """The pipeline in a thread until ``total`` messages were consumed; what it raised, if anything."""
    pipeline = StatePipeline(settings, metrics=Metrics())
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.consumer.run(stop, lambda: pipeline.consumer.consumed >= total)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stop.set()
        worker.join(30)
    return pipeline, failure[0] if failure else None


def _reconciled(pipeline: StatePipeline, outcome: str) -> float:
    return pipeline.metrics.registry.get_sample_value("fusionrec_stream_reconciled_partitions_total",
                                                      {"outcome": outcome}) or 0.0


def test_a_broker_that_lost_the_topic_stops_the_consumer_or_resets_by_policy(services, tmp_path):
    (tmp_path / "first").mkdir()
    broker = start_broker(tmp_path / "first")
    s = make_settings(services, partitions=1, kafka_bootstrap=f"127.0.0.1:{broker.port}")
    try:
        ensure_topics(s)
        _publish(s, 0, 40)
        consume_until(s, 40).__exit__()
    finally:
        _stop(broker)
    # The memory-only broker restarts empty: the topic starts again at offset 0.
    (tmp_path / "second").mkdir()
    broker = start_broker(tmp_path / "second")
    s = s.replace(kafka_bootstrap=f"127.0.0.1:{broker.port}")
    try:
        ensure_topics(s)
        _publish(s, 100, 5)
        client = connect(s)
        pipeline, failure = _run_until(s, 5, timeout=30)
        pipeline.__exit__()
        assert isinstance(failure, OffsetMismatchError), failure
        text = str(failure)
        assert re.search(rf"{s.kafka.topic_events}\[0\] ends at offset \d+, but Redis already applied offset 39", text)
        assert "FUSIONREC_OFFSET_MISMATCH=reset" in str(failure)
        assert _purchases(client, s.redis.prefix) == 40  # the new events were not skipped as replays ...

        pipeline, failure = _run_until(s.replace(offset_mismatch="reset"), 5)
        pipeline.__exit__()
        assert failure is None
        assert _purchases(client, s.redis.prefix) == 45  # ... and with `reset` they are applied
        assert _reconciled(pipeline, "topic_reset") == 1
        assert int(client.hget(pipeline.store.keys.applied_positions(), f"{s.kafka.topic_events}:0")) == 4
    finally:
        _stop(broker)


def test_state_redis_lost_after_kafka_committed_is_replayed(services):
    s = make_settings(services, partitions=2)
    ensure_topics(s)
    client = connect(s)
    _publish(s, 0, 30)
    consume_until(s, 30).__exit__()
    snapshot = _snapshot(client, s.redis.prefix)  # what a replica that falls behind here will hold
    _publish(s, 30, 30)
    consume_until(s, 30).__exit__()
    before = dump_state(client, s.redis.prefix)
    assert _purchases(client, s.redis.prefix) == 60

    # A failover to that replica: Redis lost the writes of the last 30 events, Kafka committed them.
    _restore(client, s.redis.prefix, snapshot)
    assert _purchases(client, s.redis.prefix) == 30
    with consume_until(s, 30) as pipeline:  # the 30 lost events are consumed again ...
        assert _reconciled(pipeline, "redis_behind") == 2
    assert dump_state(client, s.redis.prefix) == before  # ... and every key is as before the loss

    # Redis lost everything: the whole topic is replayed
    client.delete(*client.keys(f"{s.redis.prefix}:*"))
    with consume_until(s, 60) as pipeline:
        assert _reconciled(pipeline, "redis_empty") == 2
        assert pipeline.metrics.registry.get_sample_value("fusionrec_stream_unrecoverable_events_total") == 0
    assert dump_state(client, s.redis.prefix) == before


def test_positions_never_move_back(services):
    s = make_settings(services)
    client = connect(s)
    from fusionrec.streams.state import StateStore

    positions = StateStore(client, s).positions
    positions.mark({0: 10, 1: 5})
    positions.mark({0: 7, 1: 6})  # a late writer that lost partition 0 meanwhile
    assert positions.read([0, 1, 2])[0] == {0: 10, 1: 6, 2: None}


def _snapshot(client, prefix: str) -> dict[bytes, Any]:
    return {k: (client.dump(k), client.pttl(k)) for k in client.keys(f"{prefix}:*")}


def _restore(client, prefix: str, snapshot: dict[bytes, Any]) -> None:
    client.delete(*client.keys(f"{prefix}:*"))
    for key, (value, ttl) in snapshot.items():
        client.restore(key, max(ttl, 0), value)


@pytest.fixture(autouse=True)
def _quiet_librdkafka(caplog):
    """The stopped broker makes librdkafka log connection errors: expected here."""
    caplog.set_level("CRITICAL", logger="fusionrec.streams.runtime")
