"""Real embedded broker + Redis for the whole session; a fresh topic set, group and key prefix per test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import EmbeddedServices, RunningServices
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServices]:
    svc = EmbeddedServices(tmp_path_factory.mktemp("services"))
    running = svc.up(persistence="none")
    try:
        yield running
    finally:
        svc.down()


def make_settings(services: RunningServices, partitions: int = 4, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:10]
    base = dict(kafka_bootstrap=services.kafka_bootstrap, redis_url=services.redis_url,
                redis_prefix=f"t{tag}", topic_events=f"events-{tag}", topic_catalog=f"catalog-{tag}",
                group_state=f"group-{tag}", group_embed=f"embed-{tag}", topic_partitions=partitions,
                topic_feedback=f"feedback-{tag}", topic_item_deltas=f"deltas-{tag}", group_learner=f"learner-{tag}",
                session_timeout_ms=6000,
                metrics_port=0, trending_metrics_port=0, learn_metrics_port=0, batch_size=500)
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings(services: RunningServices) -> Settings:
    s = make_settings(services)
    ensure_topics(s)
    return s


@pytest.fixture
def rclient(settings: Settings) -> Iterator[redis.Redis]:
    client = connect(settings)
    yield client
    client.close()


def consume_until(settings: Settings, total: int, *, group_id: str | None = None, timeout: float = 120.0,
                  metrics: Metrics | None = None, lag_at_end: dict[str, Any] | None = None) -> StatePipeline:
    """Run the real user-state pipeline in a thread until ``total`` messages were consumed.

    ``lag_at_end`` receives the lag samples as the last batch completes (before partitions are revoked).
    """
    pipeline = StatePipeline(settings, metrics=metrics or Metrics(), group_id=group_id)
    stop = threading.Event()

    def done() -> bool:
        if pipeline.consumer.consumed < total:
            return False
        if lag_at_end is not None:
            lag_at_end.update({s.labels["partition"] + "@" + s.labels["topic"]: s.value
                               for m in pipeline.metrics.lag.collect() for s in m.samples})
        return True

    worker = threading.Thread(target=pipeline.consumer.run, args=(stop, done))
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stop.set()
        worker.join(30)
        raise AssertionError(f"consumed only {pipeline.consumer.consumed} of {total} within {timeout}s")
    return pipeline


def dump_state(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under a prefix with its value, floats rounded to 9 significant digits.

    Decayed scores are sums of floats whose order of addition depends on batch boundaries; counters,
    lists, sets and co-visitation weights (integers) compare exactly. A ``rec`` list is a snapshot of
    the ranking at the end of the last batch that touched its user, so it depends on what else was in
    that batch: only its presence, model and length are compared.
    """
    import msgspec

    out: dict[str, Any] = {}
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode()
        kind = client.type(key).decode()
        if kind == "hash":
            value: Any = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        elif kind == "list":
            value = [v.decode() for v in client.lrange(key, 0, -1)]
        elif kind == "set":
            value = sorted(v.decode() for v in client.smembers(key))
        elif kind == "zset":
            value = {m.decode(): float(f"{s:.9g}") for m, s in client.zrange(key, 0, -1, withscores=True)}
        else:
            value = client.get(key)
            if key.endswith(":rec"):
                recs = msgspec.json.decode(value)
                value = (recs["model"], len(recs["items"]))
        out[key] = value
    return out


def env_for(settings: Settings) -> dict[str, str]:
    """Environment that makes a `fusionrec` subprocess use exactly these settings."""
    import dataclasses
    import json
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONREC_")}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env["FUSIONREC_" + f.name.upper()] = json.dumps(dict(value)) if f.name == "kafka_options" else str(value)
    return env


def purchases_in(client: redis.Redis, prefix: str) -> int:
    return sum(int(v.get("n:purchase", 0)) for k, v in dump_state(client, prefix).items() if k.endswith(":s"))
