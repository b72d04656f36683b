"""``fusionrec learner``: the feedback topic → joiner → learner → checkpoints, continuously.

Offsets: the learner's position is part of each checkpoint (``topic:partition`` → next offset). On
assignment it seeks to the head checkpoint's offsets, so a restarted learner continues from exactly
the examples its model has seen, neither relearning nor skipping any; the group's committed offsets
(written after each checkpoint) only serve lag monitoring and partitions no checkpoint covers yet.
Decisions still waiting for their outcome when the process stops are not checkpointed; their users'
next decision starts a new wait.

Only one learner trains at a time: it holds ``{m}:learner:lease`` (renewed every loop) and a second
process waits as a standby until the lease expires.

Snapshots that fail to decode go to the feedback topic's dead-letter topic with reason
``undecodable``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from fusionrec.core.errors import InvalidEventError
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorStore
from fusionrec.online.learning.checkpoints import CheckpointStore
from fusionrec.online.learning.feedback import FeedbackJoiner, Snapshot, decode_snapshot
from fusionrec.online.learning.learner import Learner, LearnerMetrics
from fusionrec.online.learning.model import VectorLookup
from fusionrec.online.learning.search_feedback import (
    KIND_HEADER,
    KIND_SEARCH,
    SearchExamples,
    SearchJoiner,
    decode_search_log,
)
from fusionrec.streams.consumer import consumer_config, delivered
from fusionrec.streams.dlq import DeadLetter, DeadLetterPublisher, position

log = logging.getLogger(__name__)

LEASE_S = 15


class LearnerLoop:
    def __init__(self, settings: Settings, metrics: Metrics | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.name = name or f"learner-{uuid.uuid4().hex[:8]}"
        self.redis = connect(settings)
        self.keys = Keys.for_settings(settings)
        store = CheckpointStore(self.redis, settings, self.keys)
        lookup = VectorLookup(VectorStore(self.redis, settings, self.keys).vectors, settings.learn.vector_cache_items)
        self.learner = Learner(settings, store, lookup, self.metrics)
        self.joiner = FeedbackJoiner(settings.learn.window_s * 1000, settings.learn.sampled_negatives,
                                     seed=settings.learn.seed)
        self.searches = SearchJoiner(settings.learn.window_s * 1000)
        self.offsets: dict[str, int] = {}
        self.decisions = 0

    # ------------------------------------------------------------------ lease
    def _lease(self, stop: threading.Event) -> bool:
        """Take or renew the single-learner lease; waits as a standby while another process holds it."""
        key = self.keys.learner_lease()
        while not stop.is_set():
            if self.redis.set(key, self.name, nx=True, ex=LEASE_S) or \
                    self.redis.get(key) in (self.name.encode(), self.name):
                self.redis.expire(key, LEASE_S)
                return True
            log.info("another learner holds the lease; standing by")
            stop.wait(2.0)
        return False

    # ------------------------------------------------------------------ run
    def run(self, stop: threading.Event, until: Callable[[LearnerLoop], bool] | None = None) -> None:
        if not self._lease(stop):
            return
        ckpt = self.learner.resume()
        self.offsets = dict(ckpt.offsets) if ckpt else {}
        consumer = Consumer(consumer_config(self.settings, self.settings.learn.group), logger=log)
        dlq = DeadLetterPublisher(self.settings, self.metrics)
        consumer.subscribe([self.settings.kafka.topic_feedback], on_assign=self._on_assign)
        try:
            while not stop.is_set() and not (until and until(self)):
                msgs = consumer.consume(self.settings.stream.batch_size, self.settings.stream.batch_timeout_s)
                if msgs:
                    self._process(msgs, dlq)
                if self.learner.due():
                    self._checkpoint(consumer)
                if not self._lease(stop):
                    break
            self._checkpoint(consumer, force=True)
        finally:
            consumer.close()
            dlq.close()
            self.redis.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            saved = self.offsets.get(f"{tp.topic}:{tp.partition}")
            if saved is not None:
                tp.offset = saved
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))
        consumer.incremental_assign(partitions)  # the group uses cooperative rebalancing

    def _process(self, msgs: list[Message], dlq: DeadLetterPublisher) -> None:
        snapshots: list[Snapshot] = []
        search_examples: list[SearchExamples] = []
        dead: list[DeadLetter] = []
        for msg in delivered(msgs):
            topic, partition, offset = position(msg)
            try:
                if (KIND_HEADER, KIND_SEARCH) in (msg.headers() or []):
                    self.searches.add(decode_search_log(msg.value() or b""))
                else:
                    snap = decode_snapshot(msg.value() or b"")
                    snapshots.append(snap)
                    labelled = self.searches.observe([snap])  # in log order: a later search replaces it
                    if labelled is not None:
                        search_examples.append(labelled)
            except InvalidEventError as exc:
                log.warning("%s[%d]@%d: bad feedback message: %s", topic, partition, offset, exc)
                dead.append(DeadLetter.of(msg, exc.reason, exc.detail))
            self.offsets[f"{topic}:{partition}"] = offset + 1
        before = dict(self.joiner.outcomes)
        groups = self.joiner.add(snapshots)
        for outcome, n in self.joiner.outcomes.items():
            if n > before.get(outcome, 0):
                self.metrics.of(LearnerMetrics).learn_decisions.labels(outcome).inc(n - before.get(outcome, 0))
        self.learner.learn(groups)
        for labelled in search_examples:  # one step per result list: searches are few, each one counts
            self.learner.learn_search(labelled.M, labelled.y)
        self.decisions += len(snapshots)
        if dead:
            dlq.publish(dead)

    def _checkpoint(self, consumer: Consumer, force: bool = False) -> None:
        number = self.learner.maybe_checkpoint(self.offsets, force=force)
        if number is None:
            return
        commits = []
        for key, offset in self.offsets.items():
            topic, partition = key.rsplit(":", 1)
            commits.append(TopicPartition(topic, int(partition), offset))
        try:
            consumer.commit(offsets=commits, asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("offset commit after checkpoint %d failed: %s", number, exc)
        log.info("checkpoint %d: %d examples, prequential HitRate@10 %s", number, self.learner.model.examples,
                 "n/a" if self.learner.last is None or self.learner.last.hit_rate is None
                 else f"{self.learner.last.hit_rate:.4f}")
