"""``fusionrec demo``: the whole path on real data in a few minutes on two cores.

Starts the embedded broker and Redis (unless external ones are configured) and the catalog embedding
pool; publishes a slice of Complete Journey's catalog and waits until every product has a vector;
replays the slice's purchases at a fixed rate (3,000 events/s by default) while the user-state
consumer streams them into Redis (ranking in a process of its own), says whether it kept up, and the learner
trains the fusion model from the feedback the recommendation writer logs, with live progress; then
prints the learner's summary, fused recommendations with the scorers that explain them, items
similar to one product, and a prequential table of the fusion against its parts and baselines.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from fusionrec.apps.evaluation.runner import delete_prefix, run_evaluation
from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import EmbeddedServices, resolve_endpoints
from fusionrec.core.errors import FusionrecError
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings, masked_url
from fusionrec.online.learning.loop import LearnerLoop
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics

log = logging.getLogger(__name__)


def _ensure_services(settings: Settings, stack: contextlib.ExitStack, keep: bool) -> Settings:
    if settings.embedded_kafka or settings.embedded_redis:
        services = EmbeddedServices(settings.ops.run_dir)
        before = services.status()
        started_any = before is None or before.broker is None or before.redis is None
        services.up(kafka=settings.embedded_kafka, redis=settings.embedded_redis,
                    persistence=settings.redis.persistence)
        if started_any and not keep:
            stack.callback(services.down)
        if settings.embedded_kafka and (before is None or before.broker is None):
            _reset_state(resolve_endpoints(settings))
    return resolve_endpoints(settings)


def _reset_state(settings: Settings) -> None:
    """A fresh embedded broker holds no topics or offsets (it keeps data in memory), so state a
    persistent Redis kept from an earlier run would carry offset guards for offsets that no longer
    exist: start that state over."""
    client = connect(settings)
    try:
        if next(iter(client.scan_iter(match=f"{settings.redis.prefix}:*", count=100)), None) is not None:
            print(f"new embedded broker: clearing the previous run's state under {settings.redis.prefix}:*")
            delete_prefix(client, settings.redis.prefix)
    finally:
        client.close()


class Progress:
    """Prints published, consumed, rate and lag every 2 s; samples the lag every 0.1 s for its peak.

    The lag is what was published and not consumed yet: the consumer's lag gauge only knows the
    high watermarks its last fetch saw."""

    def __init__(self, pipeline: StatePipeline, total: int, published: int) -> None:
        self.pipeline, self.total, self.published = pipeline, total, published
        self.peak_lag, self.peak_at = 0, 0.0
        self.done = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_n, last_t = self.pipeline.consumer.consumed, self._t0
        printed = last_t
        while not self.done.wait(0.1):
            t, n = time.monotonic(), self.pipeline.consumer.consumed
            if self.published - n > self.peak_lag:
                self.peak_lag, self.peak_at = self.published - n, t - self._t0
            if t - printed < 2.0:
                continue
            print(f"  published {self.published:>8d}/{self.total}  consumed {n:>8d}  "
                  f"{(n - last_n) / (t - last_t):8.0f} ev/s  lag {max(0, self.published - n):>7d}", flush=True)
            last_n, last_t, printed = n, t, t


def run_demo(settings: Settings, *, events: int, households: int, keep: bool, rate: float = 3_000.0) -> int:
    with contextlib.ExitStack() as stack:
        s = _ensure_services(settings, stack, keep)
        ensure_topics(s)
        print(f"Kafka {s.kafka.bootstrap}   Redis {masked_url(s.redis.url or '')}")
        ds = datasets.completejourney(households=households).head(events)
        total = len(ds.events) + len(ds.items)
        print(f"Complete Journey slice: {len(ds.events)} purchases by {ds.events.user_id.nunique()} households, "
              f"{len(ds.items)} products")
        _embed_catalog(s, ds, stack)
        pipeline = stack.enter_context(StatePipeline(s, serve_metrics=_port_free(s)))
        if s.ops.metrics_port:
            print(f"metrics: http://{s.ops.metrics_host}:{s.ops.metrics_port}/metrics (the user-state consumer). "
                  "To watch:\n"
                  f"  prometheus --config.file=deploy/prometheus/prometheus.yml   # scrapes {s.ops.metrics_host}:"
                  f"{s.ops.metrics_port} and the other components' default ports, with the alert rules\n"
                  f"  then Grafana: add that Prometheus (localhost:9090) as a datasource and import "
                  f"deploy/grafana/dashboards/fusionrec.json\n"
                  f"  with --keep, `fusionrec serve` answers http://127.0.0.1:{s.serve.port}/v1/users/<id>/recommendations")
        stop = threading.Event()
        caught_up = lambda: pipeline.consumer.consumed >= total  # noqa: E731  (catalog + purchases)
        consumer = threading.Thread(target=pipeline.consumer.run, args=(stop, caught_up), name="consumer",
                                    daemon=True)
        consumer.start()
        learner = _start_learner(s, stack)
        # the catalog went out first: once the consumer has it, it has joined the group and the
        # replay's lag measures keeping up, not the join
        deadline = time.monotonic() + 120
        while pipeline.consumer.consumed < len(ds.items) and consumer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        progress = Progress(pipeline, total, published=len(ds.items))
        pace = f"{rate:,.0f} events/s" if rate else "as fast as the broker takes them"
        print(f"replaying {len(ds.events)} purchases at {pace}, with the learner and the embedding pool running")
        t0 = time.monotonic()

        def sent(_ev: object) -> None:
            progress.published += 1

        with EventProducer(s) as producer:
            replay(ds, producer, progress=False, catalog=False, rate=rate, on_event=sent)
        replayed = time.monotonic()
        while not caught_up() and consumer.is_alive() and time.monotonic() - replayed < 600:
            time.sleep(0.01)
        behind_s = time.monotonic() - replayed
        consumer.join(timeout=max(1.0, 600 - behind_s))
        progress.done.set()
        elapsed = time.monotonic() - t0
        if consumer.is_alive():
            stop.set()
            raise FusionrecError("the consumer did not catch up within 10 minutes")
        print(f"streamed {pipeline.consumer.consumed} messages in {elapsed:.1f}s "
              f"({pipeline.consumer.consumed / elapsed:.0f} msg/s end to end)")
        if rate:
            kept = "kept up with" if behind_s <= 1.0 else "fell behind"
            print(f"the consumer {kept} the replay: lag peaked at {progress.peak_lag} events "
                  f"({progress.peak_at:.1f}s into it), and every event was consumed {behind_s:.2f}s after the last "
                  f"one was published")
        _finish_learner(learner, pipeline)
        _show_samples(pipeline, ds)
        _show_similar(pipeline, ds)
        print("\nprequential check on the first 40,000 events (the fusion, its parts and baselines):")
        report = run_evaluation(s, source="completejourney", households=households, limit=40_000, progress=False,
                                content=False)
        for name, m in report["methods"].items():
            print(f"  {name:19s} HitRate@10 {m['hit_rate@10']:.3f}  Recall@20 {m['recall@20']:.3f}  "
                  f"NDCG@10 {m['ndcg@10']:.3f}")
        if keep:
            print("\nservices left running: try `fusionrec recommend <household>`; stop with `fusionrec down`")
    return 0


def _start_learner(s: Settings, stack: contextlib.ExitStack) -> tuple[LearnerLoop, threading.Thread, threading.Event]:
    """``fusionrec learner`` in a thread: learns from the feedback the writer logs while we stream."""
    loop = LearnerLoop(s, Metrics())
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="learner", daemon=True)
    thread.start()
    stack.callback(thread.join, 30)
    stack.callback(stop.set)
    return loop, thread, stop


def _finish_learner(learner: tuple[LearnerLoop, threading.Thread, threading.Event], pipeline: StatePipeline) -> None:
    """Let the learner read the whole feedback log, checkpoint, and the writer serve that checkpoint."""
    loop, thread, stop = learner
    logged = pipeline.feedback.delivered if pipeline.feedback else 0
    deadline = time.monotonic() + 60
    while loop.decisions < logged and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    stop.set()
    thread.join(30)
    ckpt = loop.learner.last
    outcomes = dict(loop.joiner.outcomes)
    print(f"\nlearner: {loop.decisions} logged decisions, {outcomes.get('labelled', 0)} labelled by what the "
          f"household bought next, {loop.learner.model.examples} examples learned; checkpoint "
          f"{ckpt.number if ckpt else '-'} (prequential HitRate@10 over its pools "
          f"{'n/a' if not ckpt or ckpt.hit_rate is None else f'{ckpt.hit_rate:.3f}'}), "
          f"{loop.learner.rollbacks} rollbacks")
    if ckpt is not None:
        weights = loop.learner.model.fusion.weights()
        print("fusion weights: " + ", ".join(f"{k} {v:+.2f}" for k, v in weights.items()))


def _show_samples(pipeline: StatePipeline, ds: datasets.Dataset, n: int = 3) -> None:
    reader = RecommendationReader(pipeline.redis, pipeline.settings)
    busiest = ds.events.user_id.value_counts().index[:n]
    for uid in busiest:
        recs = reader.top_k(uid)
        titles = reader.titles([r.item_id for r in recs.items])
        by_content = sum(1 for r in recs.items if "content" in r.sources)
        print(f"\nhousehold {uid} ({recs.model}; {by_content} of its top {len(recs.items)} come with content "
              f"similarity):")
        shown = recs.items[:5] + [r for r in recs.items[5:] if "content" in r.sources][:2]
        for r in shown:
            why = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(r.sources.items(), key=lambda x: -x[1]))
            print(f"  {r.score:6.3f}  {titles.get(r.item_id, r.item_id)[:70]:70s}  [{why}]")


def _embed_catalog(s: Settings, ds: datasets.Dataset, stack: contextlib.ExitStack) -> None:
    """Start the embedding pool, publish the catalog, wait until every product has a vector."""
    from fusionrec.models.pool import EmbedPool
    from fusionrec.models.vectors import VectorStore

    pool = EmbedPool(s, progress=False)
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            pool.run(stop)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run, name="embed-pool", daemon=True)
    thread.start()
    stack.callback(thread.join, 60)
    stack.callback(stop.set)
    with EventProducer(s) as producer:
        replay(ds, producer, progress=False, events=False)
    store = VectorStore(connect(s), s)
    texts = ds.items.title.nunique()
    print(f"embedding {len(ds.items)} products ({texts} distinct texts) with {pool.slots[0].device} "
          f"worker(s): {len(pool.slots)}")
    t0 = time.monotonic()
    while True:
        version = store.active()
        done = store.count(version) if version else 0
        if done >= len(ds.items):
            break
        if failed or not thread.is_alive():
            raise FusionrecError(f"the embedding pool stopped: {failed[0] if failed else 'no error'}")
        print(f"  vectors {done:>7d}/{len(ds.items)}  {done / max(time.monotonic() - t0, 1e-9):6.0f} items/s",
              flush=True)
        time.sleep(5.0)
    print(f"catalog embedded in {time.monotonic() - t0:.0f}s (model version {version})")


def _show_similar(pipeline: StatePipeline, ds: datasets.Dataset) -> None:
    reader = RecommendationReader(pipeline.redis, pipeline.settings)
    item = str(ds.events.item_id.value_counts().index[0])
    similar = reader.similar_items(item, 5)
    titles = reader.titles([item, *(i for i, _ in similar)])
    print(f"\nitems like {item} ({titles.get(item, '?')[:60]}):")
    for iid, score in similar:
        print(f"  {score:6.3f}  {titles.get(iid, iid)[:70]}")


def _port_free(s: Settings) -> bool:
    import socket

    if not s.ops.metrics_port:
        return False
    with socket.socket() as sock:
        try:
            sock.bind((s.ops.metrics_host, s.ops.metrics_port))
        except OSError:
            log.warning("metrics port %d is busy; not serving metrics", s.ops.metrics_port)
            return False
    return True
