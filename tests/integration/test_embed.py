"""The embedding pool on the real broker and Redis, with tiny random BERTs built in the test."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from fusionrec.apps.services import RunningServices, free_port
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import Backfill, prepare, version_info
from fusionrec.models.encoder import TextEncoder
from fusionrec.models.pool import EmbedPool, build_embedder
from fusionrec.models.vectors import VectorStore
from fusionrec.models.worker import EmbedWorker
from fusionrec.online.candidates.context import CandidateReader
from fusionrec.online.candidates.features import build_pools
from fusionrec.online.ranking.fusion import ItemInfoCache
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import (
    consume_until,
    make_settings,
    on_one_redis_and_a_cluster,
    read_topic,
    start_fusionrec,
    title,
    wait_for,
)


@pytest.fixture
def embed_settings(services: RunningServices, tiny_bert: Callable[..., Path], redis_target: dict[str, str]) -> Settings:
    s = make_settings(services, embed_model_path=str(tiny_bert()), embed_batch_size=32, embed_metrics_port=0,
                      embed_threads=1, **redis_target)
    ensure_topics(s)
    return s


def publish(settings: Settings, items: list[tuple[int, str, int]], op: str = "upsert", pace_s: float = 0.0) -> None:
    """(item id, title, ts) upserts (or deletes) to the catalog topic."""
    with EventProducer(settings) as producer:
        for n, (iid, text, ts) in enumerate(items):
            producer.catalog_event({"item_id": str(iid), "op": op, "ts": ts, "title": text, "category": "c"})
            if pace_s and n % 50 == 49:
                producer.flush()
                time.sleep(pace_s)


def entries(client: redis.Redis, keys: Keys, version: str) -> dict[str, dict[str, str]]:
    prefix = keys.item_vector(version, "")
    out = {}
    for raw in client.scan_iter(match=prefix + "*", count=1000):
        out[raw.decode()[len(prefix):]] = {k.decode(): v.decode(errors="replace")
                                            for k, v in client.hgetall(raw).items() if k != b"v"}
    return out


def worker_statuses(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    return [json.loads(client.get(k)) for k in client.scan_iter(match=keys.worker_status("*"))]


class InProcessWorker:
    """One EmbedWorker in a thread of the test process (the pool's processes are tested separately)."""

    def __init__(self, settings: Settings, encoder: TextEncoder) -> None:
        self.embedder = build_embedder(settings, encoder, Metrics(), worker="test")
        self.version = self.embedder.version
        prepare(self.embedder.store, version_info(encoder.spec, settings))
        self.worker = EmbedWorker(settings, self.embedder, Metrics())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,))
        self.thread.start()

    def until(self, consumed: int, timeout: float = 90) -> None:
        wait_for(lambda: self.worker.consumed >= consumed and self.worker.settled(), timeout, "the worker")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def encoder(embed_settings: Settings) -> TextEncoder:
    return TextEncoder.from_settings(embed_settings, device="cpu", threads=1)


@pytest.fixture
def worker(embed_settings: Settings, encoder: TextEncoder) -> Iterator[InProcessWorker]:
    w = InProcessWorker(embed_settings, encoder)
    yield w
    w.close()


def test_unchanged_text_is_not_reembedded_and_delete_removes(embed_settings: Settings, worker: InProcessWorker,
                                                             rclient: redis.Redis) -> None:
    keys, v = Keys.for_settings(embed_settings), worker.version
    publish(embed_settings, [(1, "organic whole milk", 1000), (2, "car battery charger", 1000),
                             (3, "greek yogurt", 1000)])
    worker.until(3)
    first = entries(rclient, keys, v)
    assert {i: e["n"] for i, e in first.items()} == {"1": "1", "2": "1", "3": "1"}
    publish(embed_settings, [(1, "organic whole milk", 2000), (2, "car battery charger XL", 2000),
                             (3, "stale older text", 500)])
    publish(embed_settings, [(3, "greek yogurt", 3000)], op="delete")
    with EventProducer(embed_settings) as producer:  # bad input: dead-lettered, nothing else happens
        producer.produce(embed_settings.kafka.topic_catalog, b'{"item_id": "9", "op": "upsert", "ts": 1}', key=b"9")
        producer.produce(embed_settings.kafka.topic_catalog, b'{"item_id": "9", "op": "upsert", "ts": 1, "title": "t", '
                         b'"x": ' + b"[" * 3000 + b"]" * 3000 + b"}", key=b"9")
    worker.until(9)
    now = entries(rclient, keys, v)
    assert now["1"]["n"] == "1" and now["1"]["ts"] == "2000"  # same text: event time moves, no forward pass
    assert now["2"]["n"] == "2" and now["2"]["h"] != first["2"]["h"]  # changed text: embedded again
    assert now["3"] == {"ts": "3000", "del": "1"}  # deleted; the older upsert never revived it
    store = VectorStore(rclient, embed_settings)
    assert store.count(v) == 2
    reader = RecommendationReader(rclient, embed_settings)
    assert [i for i, _ in reader.similar_items("1", 5)] == ["2"]
    assert reader.similar_items("3", 5) == []
    assert worker.worker.result.stale == 1 and worker.worker.result.unchanged == 1
    dead = read_topic(embed_settings, embed_settings.dlq_topic(embed_settings.kafka.topic_catalog),
                      until=lambda got: len(got) >= 2, timeout=30)
    assert [dict(m.headers())["fusionrec.dlq.reason"] for m in dead] == [b"missing_field", b"too_deep"]


def test_vectors_without_vector_sets_use_the_local_index(services: RunningServices, tiny_bert: Callable[..., Path],
                                                         ) -> None:
    s = make_settings(services, embed_model_path=str(tiny_bert()), vector_index="local", vector_dtype="float16")
    ensure_topics(s)
    w = InProcessWorker(s, TextEncoder.from_settings(s, device="cpu", threads=1))
    try:
        publish(s, [(n, title(n), 1000) for n in range(40)])
        w.until(40)
    finally:
        w.close()
    client = connect(s)
    keys = Keys.for_settings(s)
    assert client.exists(keys.vector_set(w.version)) == 0  # blobs only, as on Redis 7
    store = VectorStore(client, s)
    vecs = dict(store.iter_vectors(w.version))
    assert len(vecs) == 40 and next(iter(vecs.values())).shape == (32,)
    ids = sorted(vecs)
    matrix = np.stack([vecs[i] / np.linalg.norm(vecs[i]) for i in ids])
    sims = matrix @ matrix[ids.index("7")]
    expected = [ids[j] for j in np.argsort(-sims) if ids[j] != "7"][:5]
    assert [i for i, _ in RecommendationReader(client, s).similar_items("7", 5)] == expected


@pytest.mark.parametrize("index", ["redis", "local"])
def test_similar_items_leave_out_exact_text_twins(services: RunningServices, tiny_bert: Callable[..., Path],
                                                  index: str) -> None:
    s = make_settings(services, embed_model_path=str(tiny_bert()), vector_index=index)
    ensure_topics(s)
    w = InProcessWorker(s, TextEncoder.from_settings(s, device="cpu", threads=1))
    texts = ["bananas 40 lb", "bananas 40 lb", "bananas 40 lb", "organic bananas", "car battery", "car battery",
             "greek yogurt"]
    try:
        publish(s, [(n + 1, text, 1000) for n, text in enumerate(texts)])
        w.until(len(texts))
    finally:
        w.close()
    similar = [i for i, _ in RecommendationReader(connect(s), s).similar_items("1", 5)]
    assert not {"1", "2", "3"} & set(similar)  # the item and its twins: same text, similarity 1.0
    assert len(similar) == 3 and {"4", "7"} <= set(similar)  # and only one of the two car batteries
    assert len({"5", "6"} & set(similar)) == 1


def _started(pool: EmbedPool) -> tuple[threading.Event, threading.Thread, list[BaseException]]:
    """The pool running in a thread: its stop event, the thread, and what it raised."""
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            pool.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return stop, thread, errors


def test_pool_of_two_splits_partitions_and_embeds_each_item_once(embed_settings: Settings,
                                                                rclient: redis.Redis) -> None:
    keys = Keys.for_settings(embed_settings)
    pool = EmbedPool(embed_settings, 2, progress=False)
    stop, thread, errors = _started(pool)
    try:
        wait_for(lambda: sum(1 for st in worker_statuses(rclient, keys) if st["partitions"]) == 2, 120,
                 "two workers holding partitions")
        publish(embed_settings, [(n, title(n), 1000) for n in range(300)])
        version = VectorStore(rclient, embed_settings).active()
        assert version is not None
        wait_for(lambda: VectorStore(rclient, embed_settings).count(version) == 300, 120, "300 vectors")
        got = entries(rclient, keys, version)
        assert sorted(got, key=int) == [str(n) for n in range(300)]
        assert {e["n"] for e in got.values()} == {"1"}  # every item embedded exactly once
        assert len({e["w"] for e in got.values()}) == 2  # by both workers
        held = [set(st["partitions"]) for st in worker_statuses(rclient, keys)]
        assert len(held) == 2 and not held[0] & held[1] and held[0] | held[1] == {0, 1, 2, 3}
    finally:
        stop.set()
        thread.join(60)
    assert not errors and pool.restarts == 0


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as resp:  # noqa: S310 (a loopback URL built by the test)
        text = resp.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_worker_killed_mid_stream_loses_nothing(embed_settings: Settings, rclient: redis.Redis,
                                                tmp_path: Path) -> None:
    s = embed_settings.replace(embed_metrics_port=free_port())
    keys = Keys.for_settings(s)
    log_path = tmp_path / "pool.log"
    log_file = log_path.open("wb")
    proc = start_fusionrec(s, "embed-workers", "--workers", "2", "--no-progress", stdout=log_file,
                           stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sum(1 for st in worker_statuses(rclient, keys) if st["partitions"]) == 2, 120,
                 "two workers holding partitions")
        version = VectorStore(rclient, s).active()
        assert version is not None
        producer = threading.Thread(target=publish, args=(s, [(n, title(n), 1000) for n in range(1500)]),
                                    kwargs={"pace_s": 0.1})
        producer.start()
        store = VectorStore(rclient, s)
        wait_for(lambda: store.count(version) >= 150, 120, "the first vectors")
        workers = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        producer.join(120)
        wait_for(lambda: store.count(version) == 1500, 180, "all 1500 vectors after the kill")
        assert proc.poll() is None  # the supervisor restarted the worker and kept going
        got = entries(rclient, keys, version)
        assert len(got) == 1500 and all(e.get("h") for e in got.values())
        # one /metrics for the pool: the supervisor's restart plus every worker's (the dead one's too) counts
        metrics = _scrape(f"http://127.0.0.1:{s.embed.metrics_port}/metrics")
        assert metrics[("fusionrec_embed_worker_restarts_total", ())] == 1.0
        embedded = sum(v for (name, labels), v in metrics.items()
                       if name == "fusionrec_embed_items_total" and ("outcome", "embedded") in labels)
        assert embedded >= 1500
        lag = [v for (name, labels), v in metrics.items() if name == "fusionrec_stream_consumer_lag_messages"]
        assert len(lag) == s.kafka.partitions and sum(lag) == 0  # each partition once, caught up
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log_file.close()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "exited with -9" in out


@on_one_redis_and_a_cluster
def test_model_switch_flips_atomically(embed_settings: Settings, tiny_bert: Callable[..., Path]) -> None:
    s_old = embed_settings
    rclient = connect(s_old)
    w = InProcessWorker(s_old, TextEncoder.from_settings(s_old, device="cpu", threads=1))
    try:
        publish(s_old, [(n, title(n), 1000) for n in range(200)])
        w.until(200)
    finally:
        w.close()
    consume_until(s_old, 200).redis.close()  # the user-state stream stores the catalog the backfill reads
    store = VectorStore(rclient, s_old)
    old = w.version
    assert store.active() == old and store.count(old) == 200
    s_new = s_old.replace(embed_model_path=str(tiny_bert(hidden=48, seed=1)))
    new_encoder = TextEncoder.from_settings(s_new, device="cpu", threads=1)
    embedder = build_embedder(s_new, new_encoder, None, worker="backfill")
    assert prepare(store, version_info(new_encoder.spec, s_new))  # active is the old model: fill first
    seen: list[tuple[str | None, int, int]] = []
    stop = threading.Event()
    reader = RecommendationReader(connect(s_old), s_old)
    reader.content.active_ttl_s = 0.0

    def watch() -> None:
        while not stop.is_set():
            active = store.active()
            similar = reader.similar_items("5", 10)
            dim = int(rclient.execute_command("VDIM", Keys.for_settings(s_old).vector_set(active)))
            seen.append((active, len(similar), dim))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert Backfill(embedder, s_new, progress=False).run(threading.Event())
        time.sleep(0.3)
    finally:
        stop.set()
        watcher.join(10)
    assert store.active() == embedder.version and store.count(embedder.version) == 200
    actives = [a for a, _, _ in seen]
    flip = actives.index(embedder.version)
    assert set(actives[:flip]) == {old} and set(actives[flip:]) == {embedder.version}  # one flip, no mixing
    assert all(n == 10 for _, n, _ in seen)  # readers always had a complete index
    assert {d for a, _, d in seen if a == old} == {32} and {d for a, _, d in seen if a != old} == {48}
    info = store.versions()
    assert info[old].status == "retired" and info[embedder.version].status == "complete"
    assert 0 < rclient.ttl(Keys.for_settings(s_old).vector_set(old)) <= s_old.vectors.retire_s


def test_real_minilm_puts_related_products_nearer() -> None:
    s = Settings.from_env({})
    enc = TextEncoder.from_settings(s, device="cpu")
    assert enc.dim == 384 and enc.spec.model_id.endswith("all-MiniLM-L6-v2")
    milk, cheese, charger, yogurt = enc.encode(["organic whole milk, 1 gallon", "sharp cheddar cheese block",
                                                "usb car phone charger", "plain greek yogurt"])
    assert milk @ yogurt > milk @ charger and cheese @ yogurt > cheese @ charger
    assert milk @ cheese > milk @ charger


def test_real_minilm_int8_keeps_the_fp32_vectors_and_neighbours() -> None:
    """The CPU default (int8 on ONNX Runtime) against fp32 torch on real product titles."""
    s = Settings.from_env({})
    int8 = TextEncoder.from_settings(s, device="cpu")
    assert int8.runtime == "onnx-int8"
    fp32 = TextEncoder(dataclasses.replace(int8.spec, runtime="torch"), device="cpu", dtype="float32")
    products = datasets._cj_items(pd.read_parquet(datasets._cj_file("products.parquet")))
    texts = products.title.drop_duplicates().sample(n=600, random_state=3).tolist()
    a, b = int8.encode(texts), fp32.encode(texts)
    cos = (a * b).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())

    def top10(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :10]

    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(top10(a), top10(b), strict=True)])
    assert overlap >= 0.85, overlap


def test_brand_new_item_is_recommended_through_content(embed_settings: Settings, worker: InProcessWorker,
                                                       rclient: redis.Redis) -> None:
    s = embed_settings
    items = [(n, title(n), 1000) for n in range(40)] + [(999, title(1), 1000)]  # 999: same text as 1, never seen
    publish(s, items)
    worker.until(len(items))
    with EventProducer(s) as producer:
        for n, item in enumerate((1, 2, 1)):
            producer.user_event({"event_id": f"e{n}", "type": "purchase", "user_id": "u1", "item_id": str(item),
                                 "ts": 2000 + n})
    consume_until(s, len(items) + 3).redis.close()
    recs = RecommendationReader(rclient, s).top_k("u1", 20)
    new = next((r for r in recs.items if r.item_id == "999"), None)
    # explained by what reaches an item nobody has touched: content (the fresh source's weight starts at 0)
    assert new is not None and set(new.sources) == {"content"}, recs
    assert rclient.zscore(Keys.for_settings(s).popularity(), "999") is None  # no interaction at all
    profile = RecommendationReader(rclient, s).content.profile("u1")
    assert profile is not None and profile[0] == worker.version and profile[1].shape == (32,)


def test_fresh_source_takes_nearest_items_with_few_interactions(embed_settings: Settings, worker: InProcessWorker,
                                                                 rclient: redis.Redis) -> None:
    """Items under ``rec.fresh_below`` (here 10: one purchase is 8, two are 16) among the nearest to the
    profile vector are the user's fresh candidates, with every candidate's support read beside them."""
    s = embed_settings.replace(rec_fresh_below=10.0, rec_fresh_candidates=50)
    t0 = s.state.decay_epoch_ms  # popularity decays from here: 1970 times would underflow it
    items = [(n, title(n), t0) for n in range(40)] + [(999, title(1), t0)]  # 999: same text as 1, never seen
    publish(s, items)
    worker.until(len(items))
    with EventProducer(s) as producer:
        for n, item in enumerate((1, 2, 1)):
            producer.user_event({"event_id": f"e{n}", "type": "purchase", "user_id": "u1", "item_id": str(item),
                                 "ts": t0 + 1000 + n})
    consume_until(s, len(items) + 3).redis.close()
    [ctx] = CandidateReader(rclient, s).for_stored_users({"u1": 0})
    fresh = dict(ctx.fresh)
    assert "999" in fresh and "2" in fresh and "1" not in fresh, ctx.fresh
    assert ctx.support_at("1") == pytest.approx(16.0, rel=1e-6) and ctx.support_at("2") == pytest.approx(8.0, rel=1e-6)
    assert ctx.support_at("999") == 0.0
    assert list(fresh.values()) == sorted(fresh.values(), reverse=True)
    assert set(fresh) == {str(n) for n in range(40) if n != 1} | {"999"}  # every item but the one bought twice
    near = dict(ctx.content)
    assert all(fresh[i] == pytest.approx(near[i]) for i in fresh if i in near)  # the same similarity
    [pool] = build_pools([ctx], ItemInfoCache(rclient, Keys.for_settings(s)).get, s.rec.pool)
    row = pool.items.index("999")
    assert pool.column("src_fresh")[row] == 1.0 and pool.column("support")[row] == 0.0
    assert pool.column("item_new")[row] == pytest.approx(1.0, abs=1e-3)  # decided 1,002 ms after its listing


def test_backfill_reads_back_ids_that_hold_colons(embed_settings: Settings, rclient: redis.Redis) -> None:
    from fusionrec.models.backfill import catalog_events
    from fusionrec.streams.contract import CatalogEvent
    from fusionrec.streams.state import StateStore

    ids = ["sku:1", "a:b:meta", "plain", "x}:y"]
    StateStore(rclient, embed_settings).apply_catalog(
        [CatalogEvent(item_id=i, op="upsert", ts=1000, title=f"title of {i}") for i in ids])
    got = [ev for chunk in catalog_events(rclient, Keys.for_settings(embed_settings)) for ev in chunk]
    assert sorted(ev.item_id for ev in got) == sorted(ids)  # `sku:1` was read back as `1`
    assert {ev.item_id: ev.title for ev in got}["sku:1"] == "title of sku:1"


def test_a_backfill_interrupted_by_redis_resumes_instead_of_giving_up(embed_settings: Settings,
                                                                      rclient: redis.Redis, monkeypatch) -> None:
    """A Redis restart in the middle of a model-switch backfill: the pool's backfill thread waits it
    out and finishes, instead of leaving the new version inactive until the pool restarts."""
    from fusionrec.models.embedder import CatalogEmbedder
    from fusionrec.models.encoder import ModelSpec
    from fusionrec.streams.contract import CatalogEvent
    from fusionrec.streams.state import StateStore

    StateStore(rclient, embed_settings).apply_catalog(
        [CatalogEvent(item_id=str(n), op="upsert", ts=1000, title=title(n)) for n in range(300)])
    store = VectorStore(rclient, embed_settings)
    assert prepare(store, version_info(ModelSpec.from_settings(embed_settings), embed_settings))
    process, calls = CatalogEmbedder.process, []

    def flaky(self, events):
        calls.append(len(events))
        if len(calls) == 2:
            raise redis.ConnectionError("Redis is restarting")
        return process(self, events)

    monkeypatch.setattr(CatalogEmbedder, "process", flaky)
    pool = EmbedPool(embed_settings.replace(retry_max_backoff_s=0.2), 1, progress=False)
    pool._backfill(threading.Event())
    assert pool.backfill_done is True and len(calls) > 2
    version = store.active()
    assert version is not None and store.count(version) == 300


def test_a_pool_starting_while_redis_is_down_waits_for_it(services: RunningServices, tiny_bert: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    """The pool registers its model version in Redis before it starts workers: started during a Redis
    restart, it waits instead of exiting (found by bench/chaos.py)."""
    from fusionrec.apps.services import _stop, redis_url, start_redis

    info = start_redis(tmp_path, "aof")
    s = make_settings(services, redis_url=redis_url(info), embed_model_path=str(tiny_bert()), embed_threads=1,
                      embed_metrics_port=0, retry_max_backoff_s=0.5)
    ensure_topics(s)
    _stop(info)
    stop, thread, errors = _started(EmbedPool(s, 1, progress=False))
    try:
        time.sleep(2)
        assert thread.is_alive() and not errors, errors
        info = start_redis(tmp_path, "aof", port=info.port)
        client = connect(s)
        wait_for(lambda: VectorStore(client, s).active() is not None, 60, "the model version registered")
        wait_for(lambda: bool(worker_statuses(client, Keys.for_settings(s))), 120, "a worker up")
    finally:
        stop.set()
        thread.join(60)
        _stop(info)
    assert not errors, errors
