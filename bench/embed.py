"""Embedding benchmark: catalog events → item vectors in Redis, on the embedded broker and Redis.

1. pool throughput: N distinct real product texts (Complete Journey) are published to a fresh
   catalog topic once the pool's workers hold its partitions, by a producer already connected; items/s
   from the first publish to the last vector visible (VCARD of the version's vector set).
2. baseline, same run, same model and device: a loop that encodes one item and writes it with one
   Redis call, over the first M texts.
3. latency: items published at a steady rate (half the measured pool throughput) and, for each,
   publish time → vector written (the ``at`` field of its entry), p50/p99.

4. quality, same run: the configured encoder's vectors against fp32 torch's on the same titles — mean
   cosine, and how many of each item's 10 nearest neighbours (cosine, among those titles) both share.

Prints a final JSON line: items_per_s, baseline_items_per_s, ratio, latency_p50_ms, latency_p99_ms,
device, runtime, mean_cosine_vs_fp32, neighbour_overlap_at_10 (plus the settings used).

``--encoder-only`` measures the encoder alone — no broker, no Redis — so it runs on any machine with
torch and transformers (a GPU box included): items/s per batch size over the titles (one call per batch
of texts, as a worker makes it), one call per batch p50/p99, the same one-at-a-time fp32 baseline and
the same quality figures. ``--random-weights`` builds the model from the shipped config with random
weights instead, for machines without the weights: the speed is the same, the quality figures are not
meaningful.

    python bench/embed.py --quick
    python bench/embed.py --batch-sizes 64,128,256,512      # sweep (GPU)
    python bench/embed.py --encoder-only --batch-sizes 64,256,1024 [--random-weights]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
import threading
import time
import uuid

import numpy as np
import pandas as pd

from fusionrec.apps.services import EmbeddedServices
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import version_info
from fusionrec.models.encoder import ModelSpec, TextEncoder, default_model_path
from fusionrec.models.pool import EmbedPool
from fusionrec.models.text import text_hash
from fusionrec.models.vectors import VectorOp, VectorStore
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.topics import ensure_topics


def product_texts(n: int) -> list[str]:
    products = pd.read_parquet(datasets._cj_file("products.parquet"))
    titles = datasets._cj_items(products).title.drop_duplicates().sample(frac=1.0, random_state=7).tolist()
    # past the ~20,800 distinct titles, numbered variants: still distinct texts, nearly the same lengths
    return [titles[i % len(titles)] + (f" #{i // len(titles)}" if i >= len(titles) else "") for i in range(n)]


def fresh(base: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = base.replace(redis_prefix=f"b{tag}", topic_catalog=f"cat-{tag}", topic_events=f"ev-{tag}",
                     group_embed=f"emb-{tag}")
    ensure_topics(s)
    return s


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class RunningPool:
    def __init__(self, s: Settings, workers: int | None) -> None:
        self.pool = EmbedPool(s, workers, progress=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.pool.run, args=(self.stop,), daemon=True)
        self.thread.start()
        client = connect(s)
        keys = VectorStore(client, s).keys
        wait(lambda: sum(1 for k in client.scan_iter(match=keys.worker_status("*"))
                         if json.loads(client.get(k))["partitions"]) == len(self.pool.slots), 300, "workers")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def warm_up(producer: EventProducer, s: Settings) -> None:
    """Connect the producer and get its idempotent producer id before any clock: a shop's producer is
    long-lived, so its start-up (about 0.5 s against the embedded broker) is no part of the pool's
    throughput. It warms up on the events topic, which the pool does not read."""
    producer.produce(s.kafka.topic_events, b"warm-up", key="warm-up")
    producer.flush(30)


def publish(producer: EventProducer, texts: list[str], offset: int, rate: float = 0.0) -> dict[str, float]:
    """Publish upserts; returns item id -> publish time (ms)."""
    sent: dict[str, float] = {}
    t0 = time.monotonic()
    for n, text in enumerate(texts):
        if rate:
            delay = t0 + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        iid = str(offset + n)
        sent[iid] = time.time() * 1000
        producer.catalog_event({"item_id": iid, "op": "upsert", "ts": 1_700_000_000_000, "title": text})
        producer.poll(0)
    producer.flush(60)
    return sent


def pool_run(s: Settings, texts: list[str], workers: int | None, rate: float = 0.0) -> tuple[float, list[float]]:
    running = RunningPool(s, workers)
    try:
        client = connect(s)
        store = VectorStore(client, s)
        version = store.active()
        with EventProducer(s) as producer:
            warm_up(producer, s)
            t0 = time.perf_counter()
            sent = publish(producer, texts, 0, rate)
        wait(lambda: store.count(version) >= len(texts), 3600, "vectors")
        elapsed = time.perf_counter() - t0
        pipe = client.pipeline(transaction=False)
        for iid in sent:
            pipe.hget(store.keys.item_vector(version, iid), "at")
        latencies = [float(at) - sent[iid] for iid, at in zip(sent, pipe.execute(), strict=True)]
        return len(texts) / elapsed, latencies
    finally:
        running.close()


def fp32_encoder(s: Settings) -> TextEncoder:
    """The reference: the same checkpoint on torch in fp32, on the configured device."""
    spec = dataclasses.replace(ModelSpec.from_settings(s), runtime="torch")
    return TextEncoder(spec, device=s.embed.device, dtype="float32", threads=s.embed.threads)


def baseline(s: Settings, texts: list[str]) -> float:
    """One item at a time: fp32 torch encode, then one Redis call."""
    encoder = fp32_encoder(s)
    encoder.warmup()
    store = VectorStore(connect(s), s, worker="baseline")
    version = version_info(encoder.spec, s).version
    t0 = time.perf_counter()
    for n, text in enumerate(texts):
        vec = encoder.encode([text])[0]
        store.apply(version, [VectorOp(str(n), 1, "upsert", text_hash(text), vec)])
    return len(texts) / (time.perf_counter() - t0)


def quality(s: Settings, encoder: TextEncoder, texts: list[str]) -> dict[str, float]:
    """Mean cosine with fp32 torch's vectors, and the mean overlap of each item's 10 nearest neighbours."""
    fast = encoder.encode(texts, batch_size=s.embed.batch_size)
    reference = fp32_encoder(s).encode(texts, batch_size=s.embed.batch_size)
    cos = (fast * reference).sum(1)

    def neighbours(v: np.ndarray) -> np.ndarray:
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return np.argpartition(-sim, 10, axis=1)[:, :10]

    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(neighbours(fast), neighbours(reference), strict=True)]
    return {"mean_cosine_vs_fp32": round(float(cos.mean()), 4), "min_cosine_vs_fp32": round(float(cos.min()), 4),
            "neighbour_overlap_at_10": round(float(np.mean(overlap)), 4), "quality_items": len(texts)}


def random_weights(folder: str) -> str:
    """The shipped model's config and tokenizer with randomly initialised weights (speed runs only)."""
    from transformers import AutoConfig, AutoModel

    source = default_model_path()
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, folder)
    AutoModel.from_config(AutoConfig.from_pretrained(source, local_files_only=True)).save_pretrained(folder)
    return folder


def encoder_only(args: argparse.Namespace) -> dict[str, object]:
    """The encoder alone, on this process: no broker, no Redis."""
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as tmp:
        overrides: dict[str, object] = {}  # exports are cached in the run dir, as a worker's are
        if args.random_weights:  # a model of its own each run: its export is not worth keeping either
            overrides["embed_model_path"] = random_weights(tempfile.mkdtemp(dir=tmp))
            overrides["embed_export_dir"] = f"{tmp}/encoders"
        s = Settings.from_env(**overrides)
        n_items, n_base = (1000, 100) if args.quick else (args.items, args.baseline_items)
        texts = product_texts(n_items + n_base)
        encoder = TextEncoder.from_settings(s)
        encoder.warmup()
        sweep = [int(b) for b in args.batch_sizes.split(",") if b] or [s.embed.batch_size]
        results: dict[int, tuple[float, list[float]]] = {}
        for bs in sweep:
            encoder.encode(texts[:bs], batch_size=bs)
            calls, t0 = [], time.perf_counter()
            for start in range(0, n_items, bs):
                t1 = time.perf_counter()
                encoder.encode(texts[start: min(start + bs, n_items)], batch_size=bs)
                calls.append((time.perf_counter() - t1) * 1000)
            results[bs] = (n_items / (time.perf_counter() - t0), calls)
            print(f"batch size {bs}: {results[bs][0]:.1f} items/s", flush=True)
        best = max(results, key=lambda b: results[b][0])
        reference = fp32_encoder(s)
        reference.warmup()
        t0 = time.perf_counter()
        for text in texts[n_items:]:
            reference.encode([text])
        base_rate = n_base / (time.perf_counter() - t0)
        quality_figures = quality(s.replace(embed_batch_size=best), encoder, texts[:n_items])
        calls = results[best][1]
        return {"items_per_s": round(results[best][0], 1), "baseline_items_per_s": round(base_rate, 1),
                "ratio": round(results[best][0] / base_rate, 2),
                "batch_latency_p50_ms": round(float(np.percentile(calls, 50)), 1),
                "batch_latency_p99_ms": round(float(np.percentile(calls, 99)), 1), **quality_figures,
                "device": str(encoder.device), "runtime": encoder.runtime, "batch_size": best, "items": n_items,
                "mode": "encoder-only", "random_weights": bool(args.random_weights),
                "sweep": {str(b): round(r[0], 1) for b, r in results.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 items, 60 for the baseline")
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--baseline-items", type=int, default=200)
    ap.add_argument("--workers", type=int, help="pool size (default: one per GPU, else 1)")
    ap.add_argument("--batch-sizes", default="", help="comma-separated embed batch sizes to sweep")
    ap.add_argument("--quality-items", type=int, default=2000, help="titles the quality figures are computed on")
    ap.add_argument("--encoder-only", action="store_true", help="the encoder alone: no broker, no Redis")
    ap.add_argument("--random-weights", action="store_true", help="with --encoder-only: random weights")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.encoder_only:
        print(json.dumps(encoder_only(args)))
        return
    n_items, n_base = (400, 60) if args.quick else (args.items, args.baseline_items)
    with tempfile.TemporaryDirectory(prefix="fusionrec-bench-") as tmp:
        services = EmbeddedServices(tmp)
        running = services.up(persistence="none")
        try:
            base = Settings.from_env(kafka_bootstrap=running.kafka_bootstrap, redis_url=running.redis_url,
                                     embed_metrics_port=0, metrics_port=0)
            texts = product_texts(n_items + n_base + n_items // 4)
            sweep = [int(b) for b in args.batch_sizes.split(",") if b] or [base.embed.batch_size]
            results = {}
            for bs in sweep:
                rate, burst = pool_run(fresh(base.replace(embed_batch_size=bs)), texts[:n_items], args.workers)
                results[bs] = (rate, burst)
                print(f"batch size {bs}: {rate:.1f} items/s (burst latency p50 {np.median(burst):.0f} ms)", flush=True)
            best = max(results, key=lambda b: results[b][0])
            items_per_s = results[best][0]
            steady = texts[n_items: n_items + n_items // 4]
            _, lat = pool_run(fresh(base.replace(embed_batch_size=best)), steady, args.workers, rate=items_per_s / 2)
            base_rate = baseline(fresh(base), texts[n_items + n_items // 4:][:n_base])
            encoder = TextEncoder.from_settings(base)
            device, runtime = str(encoder.device), encoder.runtime
            quality_figures = quality(base.replace(embed_batch_size=best), encoder,
                                      product_texts(args.quality_items))
        finally:
            services.down()
    out = {"items_per_s": round(items_per_s, 1), "baseline_items_per_s": round(base_rate, 1),
           "ratio": round(items_per_s / base_rate, 2), "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
           "latency_p99_ms": round(float(np.percentile(lat, 99)), 1), "latency_rate_items_per_s":
           round(items_per_s / 2, 1), **quality_figures, "device": device, "runtime": runtime,
           "batch_size": best, "items": n_items,
           "sweep": {str(b): round(r[0], 1) for b, r in results.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
