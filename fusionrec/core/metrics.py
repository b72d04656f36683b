"""Prometheus metrics: one registry-aware bundle per process.

Names follow ``fusionrec_<subsystem>_<name>_<unit>``; labels are low-cardinality (topic, event type,
reason, partition), never user or item ids. Tests pass a fresh ``CollectorRegistry``. The embedding
pool runs in prometheus_client's multi-process mode (:func:`enable_multiprocess`): its supervisor
serves one ``/metrics`` adding up every worker process, and each gauge says how its per-process
values combine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server, values
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000)


class ConsumerLag:
    """Consumer lag per topic/partition, from the high watermarks that come back with fetches.

    A gauge (summed over live processes in multi-process mode: a partition belongs to one consumer
    at a time, and a partition given up is set to 0 before it is dropped, so the sum stays right).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._lag: dict[tuple[str, int], int] = {}
        self.gauge = Gauge("fusionrec_stream_consumer_lag_messages",
                           "Messages behind the high watermark, per assigned partition",
                           ["topic", "partition"], registry=registry, multiprocess_mode="livesum")

    def record(self, topic: str, partition: int, high_watermark: int, next_offset: int) -> None:
        lag = max(0, high_watermark - next_offset)
        with self._lock:
            self._lag[(topic, partition)] = lag
        self.gauge.labels(topic, str(partition)).set(lag)

    def forget(self, topic: str, partition: int) -> None:
        with self._lock:
            known = self._lag.pop((topic, partition), None) is not None
        if known:
            self.gauge.labels(topic, str(partition)).set(0)
            if values.ValueClass is values.MutexValue:  # multi-process mode keeps the 0 (removal unsupported)
                self.gauge.remove(topic, str(partition))

    def total(self) -> int:
        with self._lock:
            return sum(self._lag.values())

    def collect(self) -> Iterable[Metric]:
        return self.gauge.collect()


def enable_multiprocess(directory: str) -> None:
    """Put this process and the processes it spawns from now on in prometheus_client's multi-process mode.

    Metrics created afterwards write their values to files in ``directory`` (which must be empty and
    private to one pool); :func:`serve_multiprocess` adds them up at scrape time. The environment
    variable is how prometheus_client tells spawned children; this process switches directly.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


def serve_multiprocess(host: str, port: int, directory: str) -> None:
    """Expose ``/metrics`` aggregated over every process writing to ``directory``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics (all pool processes) on http://%s:%d/metrics", host, port)


def process_exited(pid: int, directory: str) -> None:
    """Drop a dead process's live gauges from the aggregate."""
    multiprocess.mark_process_dead(pid, directory)


class Metrics:
    """Every metric a fusionrec process may export, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter("fusionrec_stream_events_total", "Valid events consumed",
                              ["topic", "type"], registry=r)
        self.dead_letters = Counter("fusionrec_stream_dead_letters_total",
                                    "Messages sent to a dead-letter topic", ["topic", "reason"], registry=r)
        self.batch_size = Histogram("fusionrec_stream_batch_messages", "Messages per consumed batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("fusionrec_stream_batch_seconds",
                                       "Wall time to process one batch end to end",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.redis_write_seconds = Histogram("fusionrec_state_redis_write_seconds",
                                             "Wall time of the Redis round trips applying one batch",
                                             ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.freshness_seconds = Histogram("fusionrec_state_freshness_seconds",
                                           "Kafka message timestamp to state + recommendations visible "
                                           "in Redis", buckets=_LATENCY_BUCKETS, registry=r)
        self.replay_skipped = Counter("fusionrec_state_replay_skipped_total",
                                      "Events skipped because their offset was already applied",
                                      registry=r)
        self.retries = Counter("fusionrec_stream_retries_total", "Batch retries after a transient error",
                               ["stage"], registry=r)
        self.recs_written = Counter("fusionrec_recs_written_total", "Recommendation lists written",
                                    registry=r)
        self.rank_seconds = Histogram("fusionrec_recs_rank_seconds",
                                      "Wall time to rank and write recommendations for one batch",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.delivery_failures = Counter("fusionrec_producer_delivery_failures_total",
                                         "Messages Kafka did not acknowledge", ["topic"], registry=r)
        # catalog embedding (models/)
        self.embed_items = Counter("fusionrec_embed_items_total",
                                   "Catalog events handled by the embedding workers, by outcome "
                                   "(embedded, unchanged, deleted, stale)", ["model", "outcome"], registry=r)
        self.embed_batch_size = Histogram("fusionrec_embed_batch_items", "Texts per encoder call",
                                          buckets=_BATCH_BUCKETS, registry=r)
        self.embed_encode_seconds = Histogram("fusionrec_embed_encode_seconds",
                                              "Wall time of one encoder call (tokenize, forward, pool)",
                                              ["model", "device"], buckets=_LATENCY_BUCKETS, registry=r)
        self.embed_queue_batches = Gauge("fusionrec_embed_queue_batches",
                                         "Consumed catalog batches waiting for the encoder", registry=r,
                                         multiprocess_mode="livesum")
        self.embed_paused = Gauge("fusionrec_embed_paused", "1 while the worker has paused its partitions "
                                  "because its queue is full", registry=r,
                                  multiprocess_mode="livesum")
        self.embed_visible_seconds = Histogram("fusionrec_embed_visible_seconds",
                                               "Catalog event (Kafka timestamp) to vector visible in Redis",
                                               buckets=_LATENCY_BUCKETS, registry=r)
        self.embed_backfill_items = Counter("fusionrec_embed_backfill_items_total",
                                            "Stored catalog items re-embedded for a new model version",
                                            ["model"], registry=r)
        self.embed_backfill_progress = Gauge("fusionrec_embed_backfill_progress_ratio",
                                             "Share of the stored catalog a running backfill has covered",
                                             ["model"], registry=r, multiprocess_mode="livemax")
        self.embed_worker_restarts = Counter("fusionrec_embed_worker_restarts_total",
                                             "Embedding worker processes restarted after they died", registry=r)
        # online learning (online/)
        self.learn_examples = Counter("fusionrec_learner_examples_total", "Training examples learned",
                                      registry=r)
        self.learn_search_examples = Counter("fusionrec_learner_search_examples_total",
                                             "Labelled search results the search mix learned from", registry=r)
        self.learn_decisions = Counter("fusionrec_learner_decisions_total",
                                       "Logged decisions by join outcome (labelled, no_positive, "
                                       "positive_outside_pool, expired, ...)", ["outcome"], registry=r)
        self.learn_rejected = Counter("fusionrec_learner_rejected_total",
                                      "Training rows rejected by the input guards", ["reason"], registry=r)
        self.learn_hit_rate = Gauge("fusionrec_learner_prequential_hit_rate",
                                    "Rolling prequential HitRate@10 of the fused model over its pools",
                                    registry=r, multiprocess_mode="livemax")
        self.learn_checkpoints = Counter("fusionrec_learner_checkpoints_total", "Checkpoints written",
                                         registry=r)
        self.learn_rollbacks = Counter("fusionrec_learner_rollbacks_total",
                                       "Rollbacks to the previous checkpoint after a quality drop", registry=r)
        self.learn_step_seconds = Histogram("fusionrec_learner_step_seconds",
                                            "Wall time of one predict-then-learn step", buckets=_LATENCY_BUCKETS,
                                            registry=r)
        self.model_version = Gauge("fusionrec_fusion_model_version", "Fusion checkpoint this process serves",
                                   registry=r, multiprocess_mode="livemax")
        self.model_reload_lag = Histogram("fusionrec_fusion_update_to_serving_seconds",
                                          "Oldest update in a checkpoint to the ranker serving it",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.trending_consumed = Counter("fusionrec_trending_deltas_consumed_total",
                                         "Item count deltas the trending worker added to its windows", registry=r)
        self.trending_flush_seconds = Histogram("fusionrec_trending_flush_seconds",
                                                "Wall time to query the windows and write the trending lists",
                                                buckets=_LATENCY_BUCKETS, registry=r)
        self.trending_items = Gauge("fusionrec_trending_items", "Items with interactions in the last window",
                                    registry=r, multiprocess_mode="livemax")
        self.trending_event_age = Gauge("fusionrec_trending_event_age_seconds",
                                        "Wall time minus the event time of the newest delta at the last flush",
                                        registry=r, multiprocess_mode="livemax")
        self.trending_deltas = Counter("fusionrec_trending_deltas_total",
                                       "Item count deltas published for the trending windows", registry=r)
        self.lag = ConsumerLag(r)

    def serve(self, host: str, port: int) -> None:
        """Expose ``/metrics`` over HTTP in a daemon thread (port 0 disables)."""
        if port:
            try:
                start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:  # a busy port costs the process its /metrics, not its work
                log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
                return
            log.info("metrics on http://%s:%d/metrics", host, port)
