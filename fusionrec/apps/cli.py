"""``fusionrec`` command line: services, streams, recommendations, evaluation and the demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from fusionrec.core.errors import FusionrecError
from fusionrec.core.settings import Settings

log = logging.getLogger("fusionrec")


def _settings() -> Settings:
    return Settings.from_env()


def _resolved() -> Settings:
    from fusionrec.apps.services import resolve_endpoints

    return resolve_endpoints(_settings())


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received signal %d: draining", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# --------------------------------------------------------------------------- services
def cmd_up(args: argparse.Namespace) -> int:
    from fusionrec.apps.services import EmbeddedServices

    s = _settings()
    if not s.embedded_kafka and not s.embedded_redis:
        print("FUSIONREC_KAFKA_BOOTSTRAP and FUSIONREC_REDIS_URL are set: nothing to start")
        return 0
    running = EmbeddedServices(s.ops.run_dir).up(kafka=s.embedded_kafka, redis=s.embedded_redis,
                                            persistence=args.persistence or s.redis.persistence)
    _print_status(running)
    if running.kafka_bootstrap:
        from fusionrec.streams.topics import ensure_topics

        ensure_topics(s.replace(kafka_bootstrap=running.kafka_bootstrap))
    return 0


def cmd_down(_args: argparse.Namespace) -> int:
    from fusionrec.apps.services import EmbeddedServices

    stopped = EmbeddedServices(_settings().ops.run_dir).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    from fusionrec.apps.services import EmbeddedServices

    running = EmbeddedServices(_settings().ops.run_dir).status()
    if running is None or (running.broker is None and running.redis is None):
        print("no embedded services running")
        return 1
    _print_status(running)
    return 0


def _print_status(running: Any) -> None:
    from fusionrec.core.settings import masked_url

    for info, url in ((running.broker, running.kafka_bootstrap), (running.redis, running.redis_url)):
        if info is not None:
            print(f"{info.name:7s} pid={info.pid:<8d} {masked_url(url or '')}")
    print(f"run dir: {running.run_dir}")


# --------------------------------------------------------------------------- streams
def cmd_consume(args: argparse.Namespace) -> int:
    from fusionrec.apps.pipeline import StatePipeline

    s = _resolved()
    stop = _stop_on_signals()
    with StatePipeline(s, serve_metrics=not args.no_metrics) as pipeline:
        pipeline.consumer.run(stop)
    return 0


def cmd_learner(args: argparse.Namespace) -> int:
    from fusionrec.core.metrics import Metrics
    from fusionrec.core.threads import limit_threads
    from fusionrec.online.learning.loop import LearnerLoop
    from fusionrec.streams.topics import ensure_topics

    s = _resolved()
    limit_threads(s.learn.threads)
    ensure_topics(s)
    metrics = Metrics()
    if not args.no_metrics:
        metrics.serve(s.ops.metrics_host, s.learn.metrics_port)
    LearnerLoop(s, metrics).run(_stop_on_signals())
    return 0


def cmd_trending(args: argparse.Namespace) -> int:
    from fusionrec.core.metrics import Metrics
    from fusionrec.streams.topics import ensure_topics
    from fusionrec.streams.trending import run_worker

    s = _resolved()
    ensure_topics(s)
    assert s.kafka.bootstrap is not None
    metrics = Metrics()
    if not args.no_metrics:
        metrics.serve(s.ops.metrics_host, s.trending.metrics_port)
    run_worker(s, s.kafka.bootstrap, metrics)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from fusionrec.streams import datasets
    from fusionrec.streams.producer import EventProducer
    from fusionrec.streams.replay import replay
    from fusionrec.streams.topics import ensure_topics

    s = _resolved()
    ds = datasets.load(args.source, events=args.events, items=args.items, preset=args.preset,
                       households=args.households)
    ensure_topics(s)
    with EventProducer(s) as producer:
        n_cat, n_ev = replay(ds, producer, limit=args.limit, rate=args.rate, speedup=args.speedup,
                             catalog=not args.no_catalog)
    print(f"published {n_cat} catalog events and {n_ev} user events from {ds.name}")
    return 0


def cmd_embed_workers(args: argparse.Namespace) -> int:
    from fusionrec.models.pool import EmbedPool

    s = _resolved()
    stop = _stop_on_signals()
    EmbedPool(s, args.workers, progress=not args.no_progress).run(stop)
    return 0


# --------------------------------------------------------------------------- recommendations
def cmd_serve(args: argparse.Namespace) -> int:
    from fusionrec.apps.services import resolve_endpoints
    from fusionrec.online.serving.api import serve

    s = _settings()
    s = resolve_endpoints(s, kafka=s.serve.search_log and not args.no_search_log)
    overrides = {k: v for k, v in (("serve_host", args.host), ("serve_port", args.port)) if v is not None}
    serve(s.replace(**overrides) if overrides else s, log_searches=False if args.no_search_log else None)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from fusionrec.core.redis_client import connect
    from fusionrec.online.serving.reader import RecommendationReader

    s = _resolved()
    recs = RecommendationReader(connect(s), s).top_k(args.user, args.k)
    if args.json:
        import msgspec

        print(msgspec.json.encode(recs).decode())
        return 0
    print(format_recs(recs))
    return 0


def format_recs(recs: Any) -> str:
    head = f"user {recs.user_id}: {len(recs.items)} items from {recs.model}"
    lines = [head + (" (fallback: no history)" if recs.fallback else "")]
    for n, r in enumerate(recs.items, 1):
        why = ", ".join(f"{src} {v:.2f}" for src, v in sorted(r.sources.items(), key=lambda x: -x[1]))
        lines.append(f"{n:3d}. {r.item_id:<14s} {r.score:7.3f}  [{why}]")
    return "\n".join(lines)


def cmd_similar(args: argparse.Namespace) -> int:
    from fusionrec.core.redis_client import connect
    from fusionrec.online.serving.reader import RecommendationReader

    s = _resolved()
    reader = RecommendationReader(connect(s), s)
    similar = reader.similar_items(args.item, args.k)
    if args.json:
        print(json.dumps({"item_id": args.item, "version": reader.content.active(),
                          "similar": [{"item_id": i, "score": round(sc, 6)} for i, sc in similar]}))
        return 0
    titles = reader.titles([args.item, *(i for i, _ in similar)])
    print(f"items like {args.item} {titles.get(args.item, '')}".rstrip() + f" (model {reader.content.active()}):")
    for n, (iid, score) in enumerate(similar, 1):
        print(f"{n:3d}. {iid:<14s} {score:6.3f}  {titles.get(iid, '')[:80]}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fusionrec.apps.evaluation.runner import run_evaluation

    report = run_evaluation(_settings(), source=args.dataset or "files", events=args.events, items=args.items,
                            preset=args.preset, limit=args.limit, households=args.households,
                            plot_path=args.plot, progress=not args.json or sys.stderr.isatty(),
                            content=not args.no_content)
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    return 0


def _table(report: dict[str, Any]) -> str:
    head = (f"{'method':19s} {'HitRate@10':>10s} {'Recall@20':>10s} {'NDCG@10':>10s} {'NDCG@10b':>10s}"
            f" {'HR@10 rep':>10s} {'HR@10 exp':>10s}")
    lines = [f"{report['dataset']}: {report['events']} events, {report['evaluated']} evaluated baskets "
             "(NDCG@10b: ideal DCG over the whole basket; rep/exp: the basket's repeat and explore items)", head]
    for name, m in report["methods"].items():
        lines.append(f"{name:19s} {m['hit_rate@10']:10.4f} {m['recall@20']:10.4f} {m['ndcg@10']:10.4f}"
                     f" {m['ndcg@10_basket']:10.4f} {m['repeat']['hit_rate@10']:10.4f}"
                     f" {m['explore']['hit_rate@10']:10.4f}")
    lines.append(f"cold start (items with < 5 prior interactions): {report['cold_start_evaluated']} baskets")
    for name, m in report["cold_start"].items():
        lines.append(f"{name:19s} {m['hit_rate@10']:10.4f} {m['recall@20']:10.4f} {m['ndcg@10']:10.4f}"
                     f" {m['ndcg@10_basket']:10.4f}")
    lines.append("the system against each method on the same baskets (HitRate@10): baskets only the system hit, "
                 "only the method hit, exact sign test p; overall, then cold start")
    cold = report["paired"]["cold_start"]
    for name, m in report["paired"]["overall"].items():
        c = cold[name]
        lines.append(f"{name:19s} {m['wins']:7d} {m['losses']:7d} {m['p']:8.2g}   {c['wins']:7d} {c['losses']:7d}"
                     f" {c['p']:8.2g}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from fusionrec.apps.demo import run_demo

    return run_demo(_settings(), events=args.events, households=args.households, keep=args.keep, rate=args.rate)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionrec", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    up = add("up", cmd_up, "start the embedded broker and Redis (unless external ones are configured)")
    up.add_argument("--persistence", choices=["aof", "none"], help="Redis persistence (default: aof)")
    add("down", cmd_down, "stop the embedded services started by `up`")
    add("status", cmd_status, "show the embedded services")
    c = add("consume", cmd_consume, "run the user-state stream consumer (Kafka -> Redis state + recs)")
    c.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")

    ln = add("learner", cmd_learner, "learn the fusion model from the feedback topic; checkpoint it to Redis")
    ln.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    tr = add("trending", cmd_trending, "run the faust worker keeping trending items (hopping windows) in Redis")
    tr.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")

    sv = add("serve", cmd_serve, "run the reader HTTP API (recommendations, similar items, search, /metrics)")
    sv.add_argument("--host", help="bind address (default FUSIONREC_SERVE_HOST, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default FUSIONREC_SERVE_PORT, 8080)")
    sv.add_argument("--no-search-log", action="store_true",
                    help="do not log search results to the feedback topic (the search mix then stays as it is)")

    r = add("replay", cmd_replay, "publish a dataset as events in time order")
    _dataset_args(r, positional=True)
    r.add_argument("--limit", type=int, help="publish at most N user events")
    r.add_argument("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
    r.add_argument("--speedup", type=float, default=0.0, help="replay event time N times faster (0 = ignore)")
    r.add_argument("--no-catalog", action="store_true", help="skip the catalog upserts")

    ew = add("embed-workers", cmd_embed_workers,
             "run the catalog embedding pool (one worker per GPU, else --workers CPU processes)")
    ew.add_argument("--workers", type=int, help="worker processes (default: GPUs, or FUSIONREC_EMBED_WORKERS/1)")
    ew.add_argument("--no-progress", action="store_true", help="no progress bar for a backfill")

    sim = add("similar", cmd_similar, "print the items most similar to ITEM by content")
    sim.add_argument("item")
    sim.add_argument("--k", type=int, default=10)
    sim.add_argument("--json", action="store_true")

    rec = add("recommend", cmd_recommend, "print a user's recommendations with their explanation")
    rec.add_argument("user")
    rec.add_argument("--k", type=int, default=10)
    rec.add_argument("--json", action="store_true")

    e = add("evaluate", cmd_evaluate, "prequential evaluation of the system's ranker against baselines")
    e.add_argument("--dataset", choices=["completejourney"], help="the Complete Journey data")
    _dataset_args(e, positional=False)
    e.add_argument("--limit", type=int, help="first N events in time order")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.add_argument("--plot", metavar="FILE", help="write HitRate@10 over time as a PNG")
    e.add_argument("--no-content", action="store_true", help="skip embedding the catalog (no content source)")

    d = add("demo", cmd_demo, "start services, replay Complete Journey, stream it, show recommendations")
    d.add_argument("--events", type=int, default=40_000, help="user events to replay (default 40000)")
    d.add_argument("--households", type=int, default=600, help="households to include (default 600)")
    d.add_argument("--rate", type=float, default=3_000.0,
                   help="events/s the purchases are replayed at (default 3000; 0: as fast as the broker takes them)")
    d.add_argument("--keep", action="store_true", help="leave the embedded services running afterwards")
    return p


def _dataset_args(p: argparse.ArgumentParser, positional: bool) -> None:
    if positional:
        p.add_argument("source", nargs="?", default="completejourney", choices=["completejourney", "files"],
                       help="completejourney, or files (with --events/--items)")
    p.add_argument("--events", metavar="FILE", help="CSV/Parquet of user events")
    p.add_argument("--items", metavar="FILE", help="CSV/Parquet of items")
    p.add_argument("--preset", choices=["rees46", "taobao"], help="column mapping of a known clickstream")
    p.add_argument("--households", type=int, help="Complete Journey: only the first N households")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else _settings_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args))
    except FusionrecError as exc:
        print(f"fusionrec: {exc}", file=sys.stderr)
        return 2


def _settings_level() -> str:
    try:
        return _settings().ops.log_level.upper()
    except FusionrecError:
        return "INFO"


if __name__ == "__main__":
    sys.exit(main())
