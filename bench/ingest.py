"""Ingest benchmark: Kafka → user state + recommendations in Redis, on the embedded broker and Redis.

1. throughput: N real Complete Journey purchases (plus their catalog) are pre-loaded into a fresh
   4-partition topic; the production user-state pipeline consumes them; state is verified after.
2. baseline, same run: a naive consumer written here applies each event with one Redis round trip
   (a pipeline of plain commands; recent items cached in process) over the first M events, and its
   state is verified the same way.
3. freshness: a producer publishes at a fixed rate while the pipeline consumes; for every message,
   Kafka timestamp → state and recommendations written, p50/p99.

Prints a final JSON line: events_per_s, naive_events_per_s, ratio, freshness_p50_ms, freshness_p99_ms.

    python bench/ingest.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
import uuid

import numpy as np
from confluent_kafka import Consumer

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import EmbeddedServices
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.consumer import Batch
from fusionrec.streams.producer import EventProducer, kafka_config
from fusionrec.streams.replay import replay
from fusionrec.streams.state import EVENT_WEIGHTS, Decay
from fusionrec.streams.topics import ensure_topics


def fresh_settings(base: Settings, partitions: int = 4) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = base.replace(redis_prefix=f"b{tag}", topic_events=f"ev-{tag}", topic_catalog=f"cat-{tag}",
                     group_state=f"g-{tag}", topic_partitions=partitions)
    ensure_topics(s)
    return s


def purchases(client, prefix: str) -> int:
    total = 0
    for key in client.scan_iter(match=f"{prefix}:*:s", count=2000):
        total += int(client.hget(key, "n:purchase") or 0)
    return total


def throughput(base: Settings, ds: datasets.Dataset) -> float:
    """Messages per second from the first consumed batch to the last one applied (group join excluded)."""
    s = fresh_settings(base)
    with EventProducer(s) as p:
        replay(ds, p, progress=False)
    total = len(ds.events) + len(ds.items)
    pipeline = StatePipeline(s, metrics=Metrics())
    marks: list[float] = []
    handle = pipeline.handler.handle

    def timed(batch: Batch) -> None:
        if not marks:
            marks.append(time.perf_counter())
        handle(batch)

    pipeline.handler.handle = timed  # type: ignore[method-assign]
    pipeline.consumer.run(threading.Event(), lambda: pipeline.consumer.consumed >= total)
    elapsed = time.perf_counter() - marks[0]
    got = purchases(pipeline.redis, s.redis.prefix)
    assert got == len(ds.events), f"state check failed: {got} purchases applied, {len(ds.events)} sent"
    return total / elapsed


def naive(base: Settings, ds: datasets.Dataset) -> float:
    """One Redis round trip per event: a pipeline of plain commands, no batching, no scripts."""
    s = fresh_settings(base)
    with EventProducer(s) as p:
        replay(ds, p, progress=False, catalog=False)
    client = connect(s)
    from fusionrec.core.keys import Keys

    keys = Keys.for_settings(s)
    pop_decay = Decay(s.state.decay_epoch_ms, s.state.popularity_half_life_s)
    aff_decay = Decay(s.state.decay_epoch_ms, s.state.affinity_half_life_s)
    consumer = Consumer(kafka_config(s, **{"group.id": s.stream.group, "auto.offset.reset": "earliest",
                                            "enable.auto.offset.store": False,
                                            "session.timeout.ms": s.effective_session_timeout_ms()}))
    consumer.subscribe([s.kafka.topic_events])
    recent: dict[str, list[str]] = {}
    done, t0 = 0, None
    while done < len(ds.events):
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        t0 = t0 or time.perf_counter()
        ev = json.loads(msg.value())
        uid, item, ts, w = ev["user_id"], ev["item_id"], ev["ts"], EVENT_WEIGHTS[ev["type"]]
        mine = recent.setdefault(uid, [])
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(keys.user_state(uid), f"n:{ev['type']}", 1)
        pipe.lrem(keys.user_recent(uid), 0, item)
        pipe.lpush(keys.user_recent(uid), item)
        pipe.ltrim(keys.user_recent(uid), 0, s.state.recent_items_cap - 1)
        pipe.zincrby(keys.user_items(uid), aff_decay.weight(w, ts), item)
        pipe.zincrby(keys.popularity(), pop_decay.weight(w, ts), item)
        for other in [o for o in mine if o != item][: s.state.covis_window]:
            pipe.zincrby(keys.item_covis(other), w, item)
            pipe.zremrangebyrank(keys.item_covis(other), 0, -(s.state.covis_cap + 1))
        pipe.execute()
        if item in mine:
            mine.remove(item)
        mine.insert(0, item)
        del mine[s.state.recent_items_cap:]
        consumer.store_offsets(msg)
        done += 1
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    got = purchases(client, s.redis.prefix)
    assert got == len(ds.events), f"naive state check failed: {got} != {len(ds.events)}"
    return done / elapsed


def freshness(base: Settings, ds: datasets.Dataset, rate: float) -> list[float]:
    s = fresh_settings(base)
    pipeline = StatePipeline(s, metrics=Metrics())
    lat: list[float] = []
    handle = pipeline.handler.handle

    def timed(batch: Batch) -> None:
        handle(batch)
        now = time.time() * 1000
        lat.extend(now - ts for ts in batch.timestamps)

    pipeline.handler.handle = timed  # type: ignore[method-assign]
    total = len(ds.events)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.consumer.run, args=(stop, lambda: pipeline.consumer.consumed >= total))
    worker.start()
    time.sleep(s.effective_session_timeout_ms() / 1000)  # past the first group join
    with EventProducer(s, producer_options={"linger.ms": 2}) as p:
        replay(ds, p, progress=False, catalog=False, rate=rate)
    worker.join()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    ap.add_argument("--events", type=int, help="events for the throughput run")
    ap.add_argument("--rate", type=float, default=10_000, help="producer rate for the freshness run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.events or (60_000 if args.quick else 400_000)
    n_naive = 5_000 if args.quick else 20_000
    n_fresh = int(args.rate * (5 if args.quick else 20))
    data = datasets.completejourney()
    with tempfile.TemporaryDirectory() as tmp:
        svc = EmbeddedServices(tmp)
        running = svc.up(persistence="none")
        try:
            base = Settings.from_env({}, kafka_bootstrap=running.kafka_bootstrap, redis_url=running.redis_url,
                                     session_timeout_ms=6000, metrics_port=0)
            eps = throughput(base, data.head(n))
            naive_eps = naive(base, data.head(n_naive))
            lat = freshness(base, data.events.iloc[n: n + n_fresh].pipe(lambda e: datasets.Dataset(
                "cj", e.reset_index(drop=True), data.items.iloc[:0])), args.rate)
        finally:
            svc.down()
    p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99))
    result = {"events": n, "events_per_s": round(eps), "naive_events": n_naive,
              "naive_events_per_s": round(naive_eps), "ratio": round(eps / naive_eps, 2),
              "freshness_rate": args.rate, "freshness_events": len(lat),
              "freshness_p50_ms": round(p50, 1), "freshness_p99_ms": round(p99, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
