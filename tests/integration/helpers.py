"""What integration tests share besides fixtures: settings per test, `fusionrec` subprocesses, waiting, reading back.

Fixtures (``services``, ``settings``, ``rclient``) live in ``conftest.py``; test modules import these helpers
from here and never from each other or from a conftest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import RunningServices
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.features import FEATURES, INDEX, CandidatePool
from fusionrec.online.learning.checkpoints import CheckpointStore
from fusionrec.online.learning.feedback import FeedbackPublisher, Snapshot, decode_snapshot, unseen_part
from fusionrec.streams import datasets
from fusionrec.streams.datasets import Dataset
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.producer import EventProducer, kafka_config
from fusionrec.streams.replay import replay
from fusionrec.streams.state import StateStore, decode_user_state
from fusionrec.streams.topics import ensure_topics
from fusionrec.streams.trending import ItemDelta, fresh_counts

WORDS = ["milk", "cheese", "yogurt", "butter", "bread", "battery", "charger", "cola", "soda", "pizza", "apple"]


def make_settings(services: RunningServices, partitions: int = 4, **overrides: Any) -> Settings:
    """Settings on the session's services with topics, groups and a Redis prefix of their own."""
    tag = uuid.uuid4().hex[:10]
    base = dict(kafka_bootstrap=services.kafka_bootstrap, redis_url=services.redis_url,
                redis_prefix=f"t{tag}", topic_events=f"events-{tag}", topic_catalog=f"catalog-{tag}",
                group_state=f"group-{tag}", group_embed=f"embed-{tag}", topic_partitions=partitions,
                topic_feedback=f"feedback-{tag}", topic_item_deltas=f"deltas-{tag}", group_learner=f"learner-{tag}",
                session_timeout_ms=6000,
                metrics_port=0, trending_metrics_port=0, learn_metrics_port=0, batch_size=500,
                # one ranking process per pipeline keeps the suite's spawns down; the tests of the ranking
                # processes (test_rank_process.py) run the default's two
                rec_processes=1)
    base.update(overrides)
    return Settings.from_env({}, **base)


def title(n: int) -> str:
    """A catalog title made of common product words, distinct per ``n``."""
    return f"{WORDS[n % len(WORDS)]} {WORDS[(n // len(WORDS)) % len(WORDS)]} {n}"


# --------------------------------------------------------------------------- `fusionrec` subprocesses
def env_for(settings: Settings) -> dict[str, str]:
    """Environment that makes a `fusionrec` subprocess use exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONREC_")}
    env.update(settings.to_env())
    return env


def fusionrec_cmd(*args: str) -> list[str]:
    """``python -m fusionrec ARGS`` with the interpreter running the tests."""
    return [sys.executable, "-m", "fusionrec", *args]


def run_fusionrec(settings: Settings, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``fusionrec ARGS`` run to the end with exactly these settings; stdout and stderr captured as text."""
    return subprocess.run(fusionrec_cmd(*args), env=env_for(settings), capture_output=True, text=True,
                          timeout=timeout)


def start_fusionrec(settings: Settings, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    """``fusionrec ARGS`` started in the background with exactly these settings (``popen``: stdout, stderr)."""
    return subprocess.Popen(fusionrec_cmd(*args), env=env_for(settings), **popen)


# --------------------------------------------------------------------------- waiting and reading back
def wait_for(cond: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.2) -> None:
    """Poll ``cond`` every ``interval`` seconds until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def preloaded(settings: Settings, households: int = 40, events: int = 5_000) -> Dataset:
    """A Complete Journey slice with its catalog in Redis and its events in the (created) topics."""
    ensure_topics(settings)
    ds = datasets.completejourney(households=households).head(events)
    store_catalog(settings, ds)
    with EventProducer(settings) as p:
        replay(ds, p, progress=False, catalog=False)
    return ds


def drive(pipeline: StatePipeline, total: int, timeout: float = 240.0) -> None:
    """Run a built pipeline's consumer in a thread until ``total`` messages were consumed; close it."""
    stop = threading.Event()
    with pipeline:
        run = threading.Thread(target=pipeline.consumer.run, args=(stop, lambda: pipeline.consumer.consumed >= total))
        run.start()
        run.join(timeout)
        stop.set()
        run.join(30)
    assert pipeline.consumer.consumed >= total, f"consumed {pipeline.consumer.consumed} of {total} within {timeout}s"


def consume_until(settings: Settings, total: int, *, group_id: str | None = None, timeout: float = 120.0,
                  metrics: Metrics | None = None, lag_at_end: dict[str, Any] | None = None) -> StatePipeline:
    """Run the real user-state pipeline in a thread until ``total`` messages were consumed.

    ``lag_at_end`` receives the lag samples once every one is 0, before partitions are revoked: offsets
    are stored only after the write-behind flush that follows the last batch, so the lag reaches 0 a
    flush after the consumption does (the run times out if it never does).
    """
    pipeline = StatePipeline(settings, metrics=metrics or Metrics(), group_id=group_id)
    stop = threading.Event()

    def done() -> bool:
        if pipeline.consumer.consumed < total:
            return False
        if lag_at_end is not None:
            lag_at_end.clear()
            lag_at_end.update({s.labels["partition"] + "@" + s.labels["topic"]: s.value
                               for m in pipeline.metrics.of(StreamMetrics).lag.collect() for s in m.samples})
            return bool(lag_at_end) and all(v == 0 for v in lag_at_end.values())
        return True

    worker = threading.Thread(target=pipeline.consumer.run, args=(stop, done))
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stop.set()
        worker.join(30)
        lags = f"; lag {lag_at_end}" if lag_at_end else ""
        raise AssertionError(f"consumed {pipeline.consumer.consumed} of {total} within {timeout}s{lags}")
    return pipeline


def read_topic(settings: Settings, topic: str, *, until: Callable[[list[Message]], bool],
               timeout: float = 60.0) -> list[Message]:
    """The messages of ``topic`` from its start, read by a fresh group until ``until(messages)`` or ``timeout``."""
    consumer = Consumer(kafka_config(settings, **{"group.id": f"probe-{uuid.uuid4().hex}",
                                                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000}))
    consumer.subscribe([topic])
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(got) and time.monotonic() < deadline:
            got += [m for m in consumer.consume(500, 1.0) if m.error() is None]
    finally:
        consumer.close()
    return got


def dump_state(client: redis.Redis, prefix: str, event_ids: bool = False) -> dict[str, Any]:
    """Every key under a prefix with its value, floats rounded to 9 significant digits.

    Decayed scores are sums of floats whose order of addition can depend on batch boundaries (the
    sorted sets'); counters, lists, sets and co-visitation weights (integers) compare exactly. A user's
    state hash is decoded, without its version (which counts writes). A ``rec`` list is a snapshot of
    the ranking at the end of the last batch that touched its user, so it depends on what else was in
    that batch: only its presence, model and length are compared. The users' remembered event ids
    (their state's ``seen``) are left out unless asked for: which ids older than the duplicate window
    are still remembered depends on when the consumer recorded its offsets as done (docs/state.md).
    """
    out: dict[str, Any] = {}
    for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode()
        kind = client.type(key).decode()
        if kind == "hash" and key.endswith(":s"):
            value: Any = _user_state(client.hgetall(key), event_ids)
        elif kind == "hash":
            value = {k.decode(): _text(v) for k, v in client.hgetall(key).items()}
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


def _user_state(fields: dict[bytes, bytes], event_ids: bool) -> dict[str, Any]:
    """A user's state hash as comparable values: the state decoded, floats rounded as in sorted sets; not
    its version (which counts writes), nor its remembered event ids unless asked for."""
    state = decode_user_state(fields.get(b"d"))
    out = msgspec.structs.asdict(state)
    out["items"] = {k: float(f"{v:.9g}") for k, v in state.items.items()}
    out["affinity"] = {k: float(f"{v:.9g}") for k, v in state.affinity.items()}
    if not event_ids:
        del out["seen"]
    return {"last_seen": _text(fields[b"last_seen"]), "state": out}


def _text(value: bytes) -> str | bytes:
    """A stored value as text, or its bytes where it is binary (an item vector)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def store_catalog(settings: Settings, ds: Dataset) -> None:
    """Item metadata before any event, for tests that compare two passes' state: an event's category/brand
    affinity needs its item's metadata when it is applied, and the catalog and events topics have no
    order between them. Consuming the catalog topic afterwards changes nothing (event-time guarded)."""
    client = connect(settings)
    StateStore(client, settings).apply_catalog(ds.catalog())
    client.close()


def purchases_in(client: redis.Redis, prefix: str) -> int:
    """Purchases counted in the user-state hashes under a prefix."""
    return sum(decode_user_state(client.hget(key, "d")).counts.get("purchase", 0)
               for key in client.scan_iter(match=f"{prefix}:*:s", count=1000))


# Runs a test that takes the ``redis_target`` fixture on one Redis and on a 3-master Redis Cluster.
on_one_redis_and_a_cluster = pytest.mark.parametrize("redis_target", ["redis", "redis_cluster"], indirect=True)


def read_all(settings: Settings, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every message of ``topic`` now: read from the start until each partition reports its end.

    Not until the count its end offsets give: the embedded broker answers an end offset (ListOffsets)
    of the last record batch's base offset plus one, which undercounts a batch of several records;
    the end a fetch reports is right."""
    probe = Consumer(kafka_config(settings, **{"group.id": f"probe-{uuid.uuid4().hex}",
                                               "enable.partition.eof": True}))
    got: list[Message] = []
    try:
        partitions = list(probe.list_topics(topic, timeout=10).topics[topic].partitions)
        probe.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        ended: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ended) < len(partitions) and time.monotonic() < deadline:
            for msg in probe.consume(500, 1.0):
                err = msg.error()
                if err is None:
                    got.append(msg)
                    ended.discard(msg.partition())
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.add(msg.partition())
        assert len(ended) == len(partitions), f"{topic}: read {len(got)} messages, not to the end, in {timeout}s"
    finally:
        probe.close()
    return got


@dataclass
class DerivedOutputs:
    """What the user-state stream derived, as its consumers see it after de-duplication."""

    actions: dict[str, list[tuple[int, int]]]  # user -> positions of the actions the learner joins, in order
    item_counts: dict[str, int]  # item -> interactions the trending windows count
    logged_actions: int  # actions in the feedback log before de-duplication
    logged_counts: int  # item counts in the deltas before de-duplication


def derived_outputs(settings: Settings) -> DerivedOutputs:
    """Reads the feedback and item-delta topics and de-duplicates them as the learner and trending do."""
    seen: dict[str, dict[int, int]] = {}
    actions: dict[str, list[tuple[int, int]]] = defaultdict(list)
    logged = 0
    for msg in read_all(settings, settings.kafka.topic_feedback):
        snap = decode_snapshot(msg.value())
        logged += len(snap.positions)
        part = unseen_part(snap, seen[snap.user_id]) if snap.user_id in seen else snap
        if part is not None:  # the joiner's rule, against everything the user's decisions covered
            actions[snap.user_id].extend(part.positions)
            seen[snap.user_id] = part.upto
    counts: dict[str, int] = defaultdict(int)
    counted: dict[tuple[int, int], int] = defaultdict(int)
    logged_counts = 0
    for msg in read_all(settings, settings.kafka.topic_item_deltas):
        delta = msgspec.json.decode(msg.value(), type=ItemDelta)
        logged_counts += sum(delta.items.values())
        key = (delta.target, delta.source)
        fresh, counted[key] = fresh_counts(delta.offsets, counted[key])
        for item, n in fresh.items():
            counts[item] += n
    return DerivedOutputs(dict(actions), dict(counts), logged, logged_counts)


def assert_outputs_exactly_once(settings: Settings, client: redis.Redis, ds: Dataset) -> DerivedOutputs:
    """Feedback actions and item counts, de-duplicated, are the dataset's interactions each once, and
    every user's list was ranked after their last event."""
    interactions = ds.events[ds.events.type != "impression"]
    per_user = Counter(interactions.user_id.astype(str))
    per_item = Counter(interactions.item_id.astype(str))
    out = derived_outputs(settings)
    got = {u: len(positions) for u, positions in out.actions.items()}
    wrong = {u: (got.get(u, 0), n) for u, n in per_user.items() if got.get(u, 0) != n}
    assert not wrong and got.keys() == per_user.keys(), f"(joined, events) per user: {dict(list(wrong.items())[:10])}"
    assert all(len(set(p)) == len(p) for p in out.actions.values())
    assert out.item_counts == dict(per_item)
    keys = Keys.for_settings(settings)
    for user, ts in ds.events.groupby("user_id").ts.max().items():
        recs = msgspec.json.decode(client.get(keys.user_rec(str(user))))
        assert recs["event_ts"] == int(ts), user
    return out


# --------------------------------------------------------------------------- learner feedback
def pool_with_best(rng: np.random.Generator, user: str, ts: int, n: int = 30) -> tuple[CandidatePool, int]:
    """A pool whose positive is the item with the highest repeat feature (a learnable rule)."""
    X = (rng.random((n, len(FEATURES))) * (rng.random((n, len(FEATURES))) < 0.3)).astype(np.float32)
    best = int(np.argmax(X[:, INDEX["repeat"]]))
    return CandidatePool(user_id=user, ts=ts, items=[f"{user}-{ts}-{i}" for i in range(n)], X=X), best


class SnapshotLog:
    """Decisions whose next decision purchases the previous pool's best item, published in rounds."""

    def __init__(self, settings: Settings, users: int, seed: int = 0) -> None:
        self.settings, self.users = settings, users
        self.rng = np.random.default_rng(seed)
        self.pending: dict[str, str] = {}
        self.rounds = 0

    def publish(self, rounds: int) -> None:
        publisher = FeedbackPublisher(self.settings)
        for _ in range(rounds):
            batch = []
            for u in range(self.users):
                user, ts = f"u{u}", 1_000_000 + self.rounds * 1000
                pool, best = pool_with_best(self.rng, user, ts)
                item = self.pending.get(user)
                actions = [("purchase", item, ts - 1)] if item else []
                batch.append(Snapshot.of(pool, list(range(len(pool))), 20, actions, [], 0, 0))
                self.pending[user] = pool.items[best]
            publisher(batch)
            self.rounds += 1
        publisher.close()


def covers(s: Settings, rclient: redis.Redis, messages: int) -> bool:
    """The head checkpoint has consumed at least ``messages`` feedback messages."""
    ckpt = CheckpointStore(rclient, s).load()
    return ckpt is not None and sum(ckpt.offsets.values()) >= messages


