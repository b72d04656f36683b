"""Wiring of the user-state process: consumer → state store → ranking scheduler (its own thread) →
recommendation writer (in a process of its own by default), and item deltas, with metrics."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fusionrec.core.collector import fewer_collections
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.redis_memory import RedisMemoryMonitor
from fusionrec.core.settings import Settings
from fusionrec.online.learning.feedback import FeedbackPublisher
from fusionrec.online.ranking.process import RankProcess
from fusionrec.online.ranking.scheduler import RankScheduler
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.streams.consumer import BatchConsumer
from fusionrec.streams.state import StateStore
from fusionrec.streams.trending import ItemDeltaPublisher
from fusionrec.streams.user_state import UserStateHandler

log = logging.getLogger(__name__)


class StatePipeline:
    """Builds every part of ``fusionrec consume``; a context manager that closes the Redis pool."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None, serve_metrics: bool = False,
                 group_id: str | None = None, consumer_options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._collections = contextlib.ExitStack()
        self.redis = connect(settings)
        keys = Keys.for_settings(settings)
        self.store = StateStore(self.redis, settings, keys)
        # The learned ranker logs what it ranked for the learner (fusionrec.online.learning.feedback).
        self.feedback = FeedbackPublisher(settings) if settings.rec.ranker == "fusion" else None
        self.writer: RecommendationWriter | RankProcess
        if settings.rec.process:  # ranking in a child process: ingest keeps this interpreter
            self.writer = RankProcess(settings, self.metrics, sink=self.feedback.publish if self.feedback else None)
        else:
            self.writer = RecommendationWriter(self.redis, settings, metrics=self.metrics, keys=keys,
                                               sink=self.feedback)
        # ranking leaves the ingest path: touched users are ranked by the scheduler's thread
        self.ranking = RankScheduler(self.writer, settings, self.metrics,
                                     outputs=[self.feedback] if self.feedback is not None else [])
        self.deltas = ItemDeltaPublisher(settings, self.metrics)
        self.handler = UserStateHandler(self.store, self.metrics, after_apply=[self.ranking, self.deltas])
        self.consumer = BatchConsumer(settings, self.handler, self.metrics, group_id=group_id,
                                      positions=self.store.positions,
                                      consumer_options=consumer_options)
        # Redis memory against maxmemory, for the alert before writes are refused: only where it is scraped
        self.redis_memory = RedisMemoryMonitor(self.redis, self.metrics, settings.redis.memory_poll_s)
        if serve_metrics:
            self.metrics.serve(settings.ops.metrics_host, settings.ops.metrics_port)
            self.redis_memory.start()
        masked = settings.masked()
        log.info("user-state pipeline: kafka %s, redis %s, group %s, topic %s, batch %d",
                 masked["kafka"]["bootstrap"], masked["redis"]["url"], settings.stream.group,
                 settings.kafka.topic_events, settings.stream.batch_size)

    def __enter__(self) -> StatePipeline:
        # The store keeps many users' states in process: long-lived containers the collector would
        # rescan at every full collection. Measured on the state store alone, the default thresholds
        # cost 17 % of its Python time (fusionrec.core.collector).
        self._collections.enter_context(fewer_collections())
        return self

    def __exit__(self, *exc: object) -> None:
        self._collections.close()
        try:
            self.redis_memory.close()
            self.ranking.close()
            if isinstance(self.writer, RankProcess):
                self.writer.close()
            for producer in (self.feedback, self.deltas):
                if producer is not None:
                    producer.close()
        finally:
            self.redis.close()
