"""Any producer: the user state does not depend on how a producer spreads users over partitions.

Producers keyed by user id with librdkafka's default partitioner (CRC32) or Java's (murmur2) keep
each user's events in one partition in the order they were produced, so the state equals a clean
pass in producer order (one partition) exactly. An unkeyed producer spreads a user's events over
every partition, and Kafka defines no order across partitions: what depends only on *which* events
a user had (counters, decayed item weights, category/brand affinity, last-seen, popularity) is still
exact, and no event is lost; what depends on their *sequence* (the order of the recent-items list,
co-visitation) follows the order the consumer happened to read them in.

Co-visitation sets are capped (``FUSIONREC_COVIS_CAP``): which neighbours an over-full set evicts
depends on when each contribution arrived, so these tests lift the cap to compare the sets exactly.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import Producer

from fusionrec.apps.services import RunningServices
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.producer import kafka_config
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, dump_state, make_settings, store_catalog

DS = datasets.completejourney(households=40).head(4000)
UNCAPPED = {"covis_cap": 1_000_000}


def _publish(settings: Settings, partitioner: str) -> None:
    """The dataset's user events, as a non-fusionrec producer configured with ``partitioner`` sends them."""
    keyed = partitioner != "unkeyed"
    producer = Producer(kafka_config(settings, **{
        "partitioner": partitioner if keyed else "consistent_random", "linger.ms": 5,
        # null keys: a random partition per message, not sticky batches
        "sticky.partitioning.linger.ms": 0}))
    for ev in DS.user_events():
        value = json.dumps(ev).encode()
        while True:
            try:
                producer.produce(settings.kafka.topic_events, value, key=str(ev["user_id"]) if keyed else None)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def _state(settings: Settings, partitioner: str) -> dict[str, Any]:
    ensure_topics(settings)
    store_catalog(settings, DS)
    _publish(settings, partitioner)
    consume_until(settings, len(DS.events), timeout=180).redis.close()
    client = connect(settings)
    try:
        prefix = settings.redis.prefix
        # offset guards and applied positions name partitions, so they differ by construction
        return {k.removeprefix(prefix): v for k, v in dump_state(client, prefix).items()
                if not k.endswith((":o", ":applied"))}
    finally:
        client.close()


@pytest.fixture(scope="module")
def clean(services: RunningServices) -> dict[str, Any]:
    """One partition: every event in the order it was produced."""
    return _state(make_settings(services, partitions=1, **UNCAPPED), "consistent_random")


@pytest.mark.parametrize("partitioner", ["murmur2_random", "consistent_random"])
def test_keyed_producers_with_any_partitioner_give_the_clean_state(services, clean, partitioner):
    spread = _state(make_settings(services, partitions=4, **UNCAPPED), partitioner)
    assert len(spread) > 500 and spread == clean


def _order_free(key: str, value: Any) -> Any:
    """What of a key's value does not depend on the order of a user's events: a user's state but its
    recent items."""
    if key.endswith(":s"):
        return {**value, "state": {k: v for k, v in value["state"].items() if k != "recent"}}
    return value


def test_an_unkeyed_producer_loses_no_event(services, clean):
    spread = _state(make_settings(services, partitions=4, **UNCAPPED), "unkeyed")
    order_free = (":s", ":pop", ":meta")
    exact = {k: _order_free(k, v) for k, v in clean.items() if k.endswith(order_free)}
    assert len(exact) > 300
    assert {k: _order_free(k, v) for k, v in spread.items() if k.endswith(order_free)} == exact
    # every user has a state and recommendations, with every recent item known
    assert {k for k in spread if not k.endswith(":covis")} == {k for k in clean if not k.endswith(":covis")}
    for key, value in spread.items():
        if key.endswith(":s"):
            assert set(value["state"]["recent"]) <= set(DS.events.item_id.astype(str))
