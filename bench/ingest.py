"""Ingest benchmark: Kafka → user state + recommendations in Redis, on the embedded broker and Redis.

Every figure counts user events only: the catalog is written to Redis before any clock starts, and the
events are published by a producer in a process of its own.

1. throughput: N Complete Journey events are pre-loaded into a fresh 4-partition topic; the production
   user-state pipeline (``StatePipeline``, learned fusion ranker on, ranking in its own process) consumes
   them from its first batch until every event is applied and every list is written. The state is
   checked (purchases in Redis = N). ``redis_us_per_event`` is the Redis server's main-thread CPU time
   (``INFO cpu``: commands, scripts and network I/O) over the run, per event. ``INFO commandstats``
   is not used for it: it counts every command a script runs twice, once inside the script's time.
   It gives the line that says where that time went: the costliest commands per event, whether a
   script ran them or a client sent them.
2. clickstream: the same on the Taobao sample (``../shared/data``, preset ``taobao``); null when the
   file is not there.
3. baseline, same run: a naive consumer written here does the same state work (counters, recent items,
   decayed item weights, category/brand affinity, purchases, last-seen, popularity, co-visitation) with
   one Redis round trip per event (each user's state kept in process and written whole, as the pipeline
   does, with the event's popularity and co-visitation increments), over the first M events, checked
   the same way.
4. ceiling, same run: confluent-kafka batch consume plus the typed msgspec decode and validation alone,
   over the same N events.
5. freshness: a producer process publishes at ``--rate`` events/s while the pipeline consumes. Per
   event: Kafka timestamp → its state written (``freshness_state``) and → its user's next list written
   (``freshness_recs``), with the learner (``fusionrec learner``, one numeric thread) running in a
   process of its own.
   The producer is connected before its first event is stamped. The lines before the JSON give where
   the time goes (Kafka timestamp → the state handler took the event; each write-behind write's events
   and time; each ranking's users and time) and the CPU each process used while the producer sent
   (``/proc``), as a share of one core. ``kept_up``:
   every event was applied within 1 s of the producer's end.

With ``--embedded-catalog`` every run starts with the catalog's item vectors active in Redis (encoded
once, before any clock, with the configured encoder): the rankings then add content candidates and
profile vectors, as in a deployment whose embedding pool has caught up.

Final JSON line: events_per_s, clickstream_events_per_s, naive_events_per_s, ratio, ceiling_events_per_s,
pct_of_ceiling, redis_us_per_event, freshness_state_p50_ms, freshness_state_p99_ms, freshness_recs_p50_ms,
freshness_recs_p99_ms, kept_up; the lines before it give the sizes and rate used. With ``--runs`` the
throughputs are medians, and the freshness figures come from the run whose state p99 is the median.
``--freshness-only`` runs the freshness step alone and prints its keys.

    python bench/ingest.py --quick
    python bench/ingest.py --quick --embedded-catalog
    python bench/ingest.py --quick --runs 3 --freshness-only --rate 3000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from confluent_kafka import Consumer

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import EmbeddedServices
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.consumer import Batch, validator_for
from fusionrec.streams.producer import EventProducer, encode_event
from fusionrec.streams.replay import Pacer, replay
from fusionrec.streams.runtime import consumer_config
from fusionrec.streams.state import (
    EVENT_WEIGHTS,
    BatchResult,
    Decay,
    Positioned,
    StateStore,
    UserState,
    UserTouch,
    decode_user_state,
)
from fusionrec.streams.topics import ensure_topics

TAOBAO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "taobao-userbehavior-110k.csv"


def taobao(n: int | None = None) -> datasets.Dataset | None:
    """The Taobao clickstream sample (its first ``n`` events), or None where ``../shared`` is not there."""
    if not TAOBAO.is_file():
        return None
    ds = datasets.load("file", events=str(TAOBAO), preset="taobao")
    return ds if n is None else ds.head(n)


@contextlib.contextmanager
def embedded_redis() -> Iterator[Settings]:
    """Settings on an embedded, memory-only Redis (no broker) for the benches that need Redis alone."""
    with tempfile.TemporaryDirectory() as tmp:
        svc = EmbeddedServices(tmp)
        running = svc.up(kafka=False, persistence="none")
        try:
            yield Settings.from_env({}, redis_url=running.redis_url, metrics_port=0)
        finally:
            svc.down()


def fresh_settings(base: Settings, partitions: int = 4) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = base.replace(redis_prefix=f"b{tag}", topic_events=f"ev-{tag}", topic_catalog=f"cat-{tag}",
                     topic_feedback=f"fb-{tag}", topic_item_deltas=f"d-{tag}",
                     group_state=f"g-{tag}", topic_partitions=partitions)
    ensure_topics(s)
    return s


def _produce(settings: Settings, ds: datasets.Dataset, rate: float) -> None:
    if not rate:
        with EventProducer(settings, producer_options={"linger.ms": 2}) as p:
            replay(ds, p, progress=False, catalog=False)
        return
    # paced: the events are encoded before the clock, so the producer, which shares the machine with
    # what it measures, only sends them
    messages = [encode_event(ev, "user_id") for ev in ds.user_events()]
    with EventProducer(settings, producer_options={"linger.ms": 2}) as p:
        # connected, with its idempotent producer id, before the first event is stamped: the first
        # sends otherwise wait ~0.5 s for the connection to the partition leader on the embedded broker
        p.connect()
        time.sleep(1.0)
        pacer = Pacer(rate)
        for value, key in messages:
            pacer.wait(0)
            p.produce(settings.kafka.topic_events, value, key=key)


def publish(settings: Settings, ds: datasets.Dataset, rate: float = 0.0) -> BaseProcess:
    """The dataset's user events from a producer process of its own (started, not joined)."""
    proc = mp.get_context("spawn").Process(target=_produce, args=(settings, ds, rate), daemon=True)
    proc.start()
    return proc


class CatalogVectors:
    """The catalog's item vectors, encoded once per item, written active under any prefix."""

    def __init__(self, base: Settings) -> None:
        from fusionrec.models.backfill import version_info
        from fusionrec.models.encoder import TextEncoder

        self.encoder = TextEncoder.from_settings(base)
        self.info = version_info(self.encoder.spec, base)
        self.vectors: dict[str, tuple[str, np.ndarray]] = {}

    def encode(self, ds: datasets.Dataset) -> None:
        from fusionrec.models.text import item_text, text_hash

        texts = {str(ev.item_id): item_text(ev.title, brand=ev.brand, category=ev.category,
                                            description=ev.description)
                 for ev in ds.catalog() if ev.title and str(ev.item_id) not in self.vectors}
        ids = list(texts)
        for start in range(0, len(ids), 4096):
            chunk = ids[start: start + 4096]
            vecs = self.encoder.encode([texts[i] for i in chunk])
            self.vectors.update({i: (text_hash(texts[i]), v) for i, v in zip(chunk, vecs, strict=True)})

    def write(self, s: Settings, ds: datasets.Dataset) -> int:
        from fusionrec.models.vectors import VectorOp, VectorStore

        client = connect(s)
        store = VectorStore(client, s, worker="bench")
        store.register(self.info)
        ops = [VectorOp(str(ev.item_id), ev.ts, "upsert", *self.vectors[str(ev.item_id)])
               for ev in ds.catalog() if str(ev.item_id) in self.vectors]
        for start in range(0, len(ops), 1000):
            store.apply(self.info.version, ops[start: start + 1000])
        store.activate(self.info.version)
        client.close()
        return len(ops)


VECTORS: CatalogVectors | None = None  # set by --embedded-catalog


def prepare(base: Settings, ds: datasets.Dataset, *, preload: bool = True) -> Settings:
    """Fresh topics and prefix; the catalog (and with ``--embedded-catalog`` its vectors) in Redis; with
    ``preload`` the events in the topic."""
    s = fresh_settings(base)
    client = connect(s)
    StateStore(client, s).apply_catalog(ds.catalog())
    client.close()
    if VECTORS is not None:
        VECTORS.write(s, ds)
    if preload:
        proc = publish(s, ds)
        proc.join()
        assert proc.exitcode == 0, "the producer process failed"
    return s


def counted(client: Any, prefix: str) -> int:
    """Events counted in the users' stored states."""
    total = 0
    for key in client.scan_iter(match=f"{prefix}:*:s", count=2000):
        total += sum(decode_user_state(client.hget(key, "d")).counts.values())
    return total


def redis_usec(client: Any) -> float:
    """The Redis server's main-thread CPU time so far, µs (``INFO cpu``): every command, script and the
    network I/O of the thread that caps one Redis. ``INFO commandstats`` would count each command a
    script runs twice (in the script's time and on its own line)."""
    cpu = client.info("cpu")
    return (float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])) * 1e6


def commands_per_event(client: Any, n: int, top: int = 8) -> str:
    """Where Redis's time went since the last ``CONFIG RESETSTAT``: per event, the calls and µs of the
    costliest commands, whether a script ran them or a client sent them; the scripts' line counts
    their own overhead and, again, the commands they ran."""
    stats = client.info("commandstats")
    rows = sorted(((v["usec"] / n, v["calls"] / n, k.removeprefix("cmdstat_")) for k, v in stats.items()),
                  reverse=True)
    scripts = [r for r in rows if r[2] in ("evalsha", "eval")]
    commands = [r for r in rows if r[2] not in ("evalsha", "eval")][:top]
    return ("; ".join(f"{name} {calls:.2f} calls {us:.2f} µs" for us, calls, name in commands)
            + "; scripts (their commands included) " + ", ".join(f"{us:.2f} µs" for us, _c, _n in scripts))


def throughput(base: Settings, ds: datasets.Dataset) -> tuple[float, float, str]:
    """(events/s from the first batch until every event is applied and every list written, Redis µs/event,
    the costliest Redis commands per event)."""
    s = prepare(base, ds)
    pipeline = StatePipeline(s, metrics=Metrics())
    marks: list[float] = []
    handle = pipeline.handler.handle

    def timed(batch: Batch) -> None:
        if not marks:
            marks.append(time.perf_counter())
            marks.append(redis_usec(pipeline.redis))
            pipeline.redis.config_resetstat()
        handle(batch)

    pipeline.handler.handle = timed  # type: ignore[method-assign]
    with pipeline:
        pipeline.consumer.run(threading.Event(), lambda: pipeline.consumer.consumed >= len(ds.events))
        elapsed = time.perf_counter() - marks[0]  # run() returns after the last lists are written
        usec = redis_usec(pipeline.redis) - marks[1]
        spent = commands_per_event(pipeline.redis, len(ds.events))
        got = counted(pipeline.redis, s.redis.prefix)
    assert got == len(ds.events), f"state check failed: {got} events applied, {len(ds.events)} sent"
    return len(ds.events) / elapsed, usec / len(ds.events), spent


def ceiling(base: Settings, ds: datasets.Dataset) -> float:
    """Consume and decode only: confluent-kafka batch consume plus the contract's typed decode."""
    s = prepare(base, ds)
    validator = validator_for(s)
    consumer = Consumer(consumer_config(s, f"ceiling-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe([s.kafka.topic_events])
    done, t0 = 0, 0.0
    while done < len(ds.events):
        msgs = consumer.consume(s.stream.batch_size, 1.0)
        if msgs and not t0:
            t0 = time.perf_counter()
        now_ms = int(time.time() * 1000)  # one clock read per batch, as the runtime decodes
        for msg in msgs:
            if msg.error() is None:
                validator.user_event(msg.value(), now_ms)
                done += 1
    elapsed = time.perf_counter() - t0
    consumer.close()
    return done / elapsed


def naive(base: Settings, ds: datasets.Dataset) -> float:
    """The same state work, one Redis round trip (a pipeline of plain commands) per event."""
    s = prepare(base, ds)
    client = connect(s)
    keys = Keys.for_settings(s)
    pop_decay = Decay(s.state.decay_epoch_ms, s.state.popularity_half_life_s)
    aff_decay = Decay(s.state.decay_epoch_ms, s.state.affinity_half_life_s)
    meta = {str(i.item_id): (i.category, i.brand) for i in ds.catalog()}  # cached like the pipeline's reads
    consumer = Consumer(consumer_config(s, s.stream.group))
    consumer.subscribe([s.kafka.topic_events])
    validator = validator_for(s)
    states: dict[str, UserState] = {}  # each user's state, kept in process like the pipeline's
    encoder = msgspec.msgpack.Encoder()
    done, t0 = 0, 0.0
    while done < len(ds.events):
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        t0 = t0 or time.perf_counter()
        ev = validator.user_event(msg.value())
        uid, item, w = str(ev.user_id), str(ev.item_id), EVENT_WEIGHTS[ev.type]
        state = states.setdefault(uid, UserState())
        mine = state.recent
        pipe = client.pipeline(transaction=False)
        for other in [o for o in mine if o != item][: s.state.covis_window]:
            pipe.zincrby(keys.item_covis(other), w, item)
            pipe.zremrangebyrank(keys.item_covis(other), 0, -(s.state.covis_cap + 1))
        pipe.zincrby(keys.popularity(), pop_decay.weight(w, ev.ts), item)
        state.counts[ev.type] = state.counts.get(ev.type, 0) + 1
        state.last_seen = max(state.last_seen, ev.ts)
        if item in mine:
            mine.remove(item)
        mine.insert(0, item)
        del mine[s.state.recent_items_cap:]
        aw = aff_decay.weight(w, ev.ts)
        state.items[item] = state.items.get(item, 0.0) + aw
        category, brand = meta.get(item, (None, None))
        for key in (f"c:{category}" if category else None, f"b:{brand}" if brand else None):
            if key:
                state.affinity[key] = state.affinity.get(key, 0.0) + aw
        if ev.type == "purchase":
            n, first, last = state.buys.get(item, (0, ev.ts, ev.ts))
            state.buys[item] = (n + 1, min(first, ev.ts), max(last, ev.ts))
        pipe.hset(keys.user_state(uid), mapping={"last_seen": state.last_seen, "d": encoder.encode(state)})
        pipe.execute()
        consumer.store_offsets(msg)
        done += 1
    elapsed = time.perf_counter() - t0
    consumer.close()
    got = counted(client, s.redis.prefix)
    assert got == len(ds.events), f"naive state check failed: {got} != {len(ds.events)}"
    return done / elapsed


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from ``/proc/<pid>/stat`` (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples the CPU time of named processes every ``every_s`` in a thread; :meth:`shares` gives each
    one's CPU over a window as a percentage of one core."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.pids: dict[str, int] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            found = {name: cpu for name, pid in list(self.pids.items()) if (cpu := _cpu_s(pid)) is not None}
            self.samples.append((now, found))
            self._stop.wait(self.every_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def shares(self, start: float, name_alive: str) -> dict[str, float]:
        """% of one core per process from the first sample at or after ``start`` to the last one in which
        ``name_alive`` was still running."""
        window = [(t, found) for t, found in self.samples if t >= start and name_alive in found]
        if len(window) < 2:
            return {}
        (t0, first), (t1, last) = window[0], window[-1]
        return {name: round(100 * (last[name] - first[name]) / (t1 - t0), 1)
                for name in last if name in first}


def freshness(base: Settings, ds: datasets.Dataset, rate: float,
              services: dict[str, int] | None = None) -> dict[str, Any]:
    """Kafka timestamp → state, and → the user's next list, per event, with a producer at ``rate``; and
    the CPU each process used while the producer sent (``services``: other processes to include)."""
    s = prepare(base, ds, preload=False)
    pipeline = StatePipeline(s, metrics=Metrics())
    first_event: list[float] = []
    state_ms: list[float] = []
    recs_ms: list[float] = []
    received_ms: list[float] = []  # Kafka timestamp → the state handler took the event
    writes: list[tuple[int, float]] = []  # per write-behind write: events, ms
    rankings: list[tuple[int, float]] = []  # per ranking: users, ms
    waiting: dict[str, list[int]] = {}
    lock = threading.Lock()
    applied_at = [0.0]
    stamps: dict[tuple[int, int], int] = {}  # (partition, offset) -> Kafka timestamp, until applied
    handle, apply, refresh = pipeline.handler.handle, pipeline.store.apply, pipeline.writer.refresh

    def taken(batch: Batch) -> None:
        if not first_event and batch.events:
            first_event.append(time.monotonic())
        if not batch.taken:
            now = time.time() * 1000
            for pe, ts in zip(batch.events, batch.timestamps, strict=True):
                stamps[(pe.partition, pe.offset)] = ts
                received_ms.append(now - ts)
        handle(batch)

    def timed(events: Sequence[Positioned]) -> BatchResult:
        t0 = time.perf_counter()
        result = apply(events)  # the state is in Redis when this returns (write-behind: several batches)
        writes.append((len(events), (time.perf_counter() - t0) * 1000))
        now = time.time() * 1000
        with lock:
            for pe in events:
                ts = stamps.pop((pe.partition, pe.offset))
                state_ms.append(now - ts)
                waiting.setdefault(str(pe.event.user_id), []).append(ts)
        applied_at[0] = time.time()
        return result

    def written(users: dict[str, UserTouch]) -> int:
        with lock:  # what waited for these users before this ranking started
            mine = {u: waiting.pop(u, []) for u in users}
        t0 = time.perf_counter()
        n = refresh(users)
        rankings.append((len(users), (time.perf_counter() - t0) * 1000))
        now = time.time() * 1000
        with lock:
            recs_ms.extend(now - ts for stamps in mine.values() for ts in stamps)
        return n

    pipeline.handler.handle = taken  # type: ignore[method-assign]
    pipeline.store.apply = timed  # type: ignore[method-assign, assignment]
    pipeline.writer.refresh = written  # type: ignore[method-assign]
    stop = threading.Event()
    # the learner in a process of its own, as deployed, learning from the decisions the ranking logs;
    # one numeric thread (FUSIONREC_LEARN_THREADS=1): it shares the machine's cores with everything here
    env = {**os.environ, **s.replace(learn_threads=1).to_env()}
    learner = subprocess.Popen([sys.executable, "-m", "fusionrec", "learner"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pipeline, _stopped(learner), CpuSampler() as cpu:
        worker = threading.Thread(target=pipeline.consumer.run,
                                  args=(stop, lambda: pipeline.consumer.consumed >= len(ds.events)))
        worker.start()
        time.sleep(s.effective_session_timeout_ms() / 1000)  # past the first group join
        producer = publish(s, ds, rate)
        rankers = [pid for pid in getattr(pipeline.writer, "pids", []) if pid]
        cpu.pids.update({"consumer": os.getpid(), "learner": learner.pid, "producer": producer.pid or 0,
                         **({"ranking": rankers[0]} if len(rankers) == 1 else
                            {f"ranking-{i}": pid for i, pid in enumerate(rankers)}), **(services or {})})
        producer.join()
        ended = time.time()
        worker.join()
    shares = cpu.shares(first_event[0], "producer") if first_event else {}
    return {"state": state_ms, "recs": recs_ms, "caught_up_s": applied_at[0] - ended, "cpu": shares,
            "received": received_ms, "writes": writes, "rankings": rankings}


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Stop ``proc`` (SIGTERM, then SIGKILL after 30 s) when the block ends; fail if it ended on its own
    before (figures measured beside it would not be what they say)."""
    try:
        yield
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode} before the run ended")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def median_of(runs: int, fn: Any, *args: Any) -> Any:
    results = [fn(*args) for _ in range(runs)]
    return sorted(results, key=lambda r: r[0] if isinstance(r, tuple) else r)[len(results) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    ap.add_argument("--events", type=int, help="events for the throughput runs")
    ap.add_argument("--rate", type=float, default=10_000, help="producer rate for the freshness run")
    ap.add_argument("--runs", type=int, default=1, help="throughput runs; the median is reported")
    ap.add_argument("--freshness-only", action="store_true",
                    help="only the freshness run(s) at --rate: the final line has the freshness keys alone")
    ap.add_argument("--embedded-catalog", action="store_true",
                    help="item vectors active before every run: content candidates and profiles on")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.events or (60_000 if args.quick else 400_000)
    n_naive = 5_000 if args.quick else 20_000
    n_fresh = int(args.rate * (5 if args.quick else 20))
    data = datasets.completejourney()
    clicks = taobao()
    with tempfile.TemporaryDirectory() as tmp:
        svc = EmbeddedServices(tmp)
        running = svc.up(persistence="none")
        try:
            base = Settings.from_env({}, kafka_bootstrap=running.kafka_bootstrap, redis_url=running.redis_url,
                                     session_timeout_ms=6000, metrics_port=0)
            if args.embedded_catalog:
                global VECTORS
                VECTORS = CatalogVectors(base)
                t0 = time.perf_counter()
                for part in (data.head(n + n_fresh), clicks.head(n) if clicks is not None else None):
                    if part is not None:
                        VECTORS.encode(part)
                print(f"catalog embedded: {len(VECTORS.vectors)} items in {time.perf_counter() - t0:.0f} s "
                      f"({VECTORS.encoder.runtime}, version {VECTORS.info.version})", flush=True)
            if not args.freshness_only:
                eps, us_per_event, spent = median_of(args.runs, throughput, base, data.head(n))
                print(f"Redis per Complete Journey event (median run): {spent}", flush=True)
                click_eps = median_of(args.runs, throughput, base, clicks.head(n))[0] if clicks is not None else None
                naive_eps = naive(base, data.head(n_naive))
                ceiling_eps = ceiling(base, data.head(n))
            later = datasets.Dataset("cj", data.events.iloc[n: n + n_fresh].reset_index(drop=True), data.items)
            # the run whose state p99 is the median of --runs
            services = {name: info.pid for name, info in (("redis", running.redis), ("broker", running.broker))
                        if info is not None}
            runs = sorted((freshness(base, later, args.rate, services) for _ in range(args.runs)),
                          key=lambda f: float(np.percentile(f["state"], 99)))
            fresh = runs[len(runs) // 2]
        finally:
            svc.down()

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 1)

    freshness_keys = {
        "freshness_state_p50_ms": pct(fresh["state"], 50), "freshness_state_p99_ms": pct(fresh["state"], 99),
        "freshness_recs_p50_ms": pct(fresh["recs"], 50), "freshness_recs_p99_ms": pct(fresh["recs"], 99),
        "kept_up": bool(fresh["caught_up_s"] <= 1.0)}
    print(f"freshness: {len(fresh['state'])} events at {args.rate:.0f}/s, {args.runs} run(s), the one with the "
          f"median state p99 reported (state p99 of each: "
          f"{', '.join(str(pct(f['state'], 99)) for f in runs)} ms); caught up {fresh['caught_up_s']:.2f} s after "
          f"the producer's end; item vectors active: {len(VECTORS.vectors) if VECTORS else 0}")
    if fresh["writes"] and fresh["rankings"]:
        w, r = np.array(fresh["writes"]), np.array(fresh["rankings"])
        print(f"where the freshness goes: an event reaches the state handler {pct(fresh['received'], 50)} / "
              f"{pct(fresh['received'], 99)} ms (p50 / p99) after its Kafka timestamp; {len(w)} state writes of "
              f"{pct(w[:, 0], 50):.0f} events (p50) taking {pct(w[:, 1], 50)} / {pct(w[:, 1], 99)} ms; "
              f"{len(r)} rankings of {pct(r[:, 0], 50):.0f} users (p50) taking {pct(r[:, 1], 50)} / "
              f"{pct(r[:, 1], 90)} ms (p50 / p90)")
    if fresh["cpu"]:
        used = sorted(fresh["cpu"].items(), key=lambda kv: -kv[1])
        cores = os.cpu_count() or 1
        print("CPU while the producer sent, % of one core: " + ", ".join(f"{name} {share}" for name, share in used)
              + f"; together {sum(fresh['cpu'].values()):.0f} of {100 * cores} ({cores} cores)")
    if args.freshness_only:
        print(json.dumps(freshness_keys))
        return
    print(f"sizes: {n} events per throughput run ({args.runs} runs, median), {n_naive} naive")
    # exactly the keys the ingest issue names
    result = {"events_per_s": round(eps),
              "clickstream_events_per_s": round(click_eps) if click_eps is not None else None,
              "naive_events_per_s": round(naive_eps), "ratio": round(eps / naive_eps, 2),
              "ceiling_events_per_s": round(ceiling_eps), "pct_of_ceiling": round(100 * eps / ceiling_eps, 1),
              "redis_us_per_event": round(us_per_event, 2), **freshness_keys}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
