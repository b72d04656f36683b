"""``fusionrec learner``: the feedback topic → joiner → learner → checkpoints, continuously.

Offsets: the learner's position is part of each checkpoint (``topic:partition`` → next offset). On
assignment it seeks to the head checkpoint's offsets, so a restarted learner continues from exactly
the examples its model has seen, neither relearning nor skipping any; the group's committed offsets
(written after each checkpoint) only serve lag monitoring and partitions no checkpoint covers yet.
Decisions still waiting for their outcome when the process stops are not checkpointed; their users'
next decision starts a new wait.

Only one learner trains at a time: it holds ``{m}:learner:lease`` (renewed at every tick) and a
second process waits as a standby until the lease expires. Taking the lease draws a fencing token
that every checkpoint write checks (:class:`~fusionrec.online.learning.checkpoints.LearnerLease`): a
learner that finds its lease lapsed or taken (it was paused past it, or Redis was away longer than
the lease) writes nothing more, since another learner may own the head now: it drops what it learned
since its last checkpoint and stands by again, and when it next holds the lease it resumes from the
head checkpoint, whoever wrote it.

It runs on the consume runtime (:mod:`fusionrec.streams.runtime`) with the *checkpoint* offset
policy: nothing is stored per batch; after each checkpoint its offsets are stored for the group
(lag monitoring). Transient Redis errors (a vector lookup, the lease, a checkpoint write) and
dead-letter delivery failures are retried with back-off like in every other stage (a lost lease is
not); a checkpoint that cannot be written at shutdown loses nothing, since the next learner resumes
from the previous checkpoint's offsets.

Messages that fail to decode go to the feedback topic's dead-letter topic with their reason
(``empty``, ``undecodable``, ``too_deep``, ``invalid_value``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Message, TopicPartition

from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorStore
from fusionrec.online.learning.checkpoints import CheckpointStore, LearnerLease, LeaseLostError
from fusionrec.online.learning.feedback import FeedbackJoiner, Group, Snapshot, decode_snapshot
from fusionrec.online.learning.learner import Learner, LearnerMetrics
from fusionrec.online.learning.model import VectorLookup
from fusionrec.online.learning.search_feedback import (
    KIND_HEADER,
    KIND_SEARCH,
    SearchExamples,
    SearchJoiner,
    SearchLog,
    decode_search_log,
)
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import TRANSIENT, BaseProcessor, ConsumeRuntime, Offsets, Polled, retrying

log = logging.getLogger(__name__)

LEASE_S = 15

Feedback = Snapshot | SearchLog


@dataclass
class Joined:
    """A batch joined in memory: what a retry of the learning step must not join again."""

    groups: list[Group] = field(default_factory=list)
    searches: list[SearchExamples] = field(default_factory=list)
    decisions: int = 0


class LearnerLoop(BaseProcessor[Feedback]):
    """The learner's processor on the consume runtime; :meth:`run` is ``fusionrec learner``."""

    stage = "learn"

    def __init__(self, settings: Settings, metrics: Metrics | None = None, name: str | None = None,
                 lease_s: float = LEASE_S) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.name = name or f"learner-{uuid.uuid4().hex[:8]}"
        self.redis = connect(settings)
        self.keys = Keys.for_settings(settings)
        self.lease = LearnerLease(self.redis, self.keys, self.name, lease_s)
        self.store = CheckpointStore(self.redis, settings, self.keys, lease=self.lease)
        vectors = VectorStore(self.redis, settings, self.keys)
        self.lookup = VectorLookup(vectors.vectors, settings.learn.vector_cache_items, seq=vectors.seq)
        self.decisions = 0
        self._start_over()

    def _start_over(self) -> None:
        """A fresh model and joins: what the next lease resumes from is the head checkpoint alone."""
        s = self.settings
        self.learner = Learner(s, self.store, self.lookup, self.metrics)
        self.joiner = FeedbackJoiner.of(s)
        self.searches = SearchJoiner(s.learn.window_s * 1000)
        self.offsets: dict[str, int] = {}
        self._lost_lease = False

    # ------------------------------------------------------------------ lease
    def _take_lease(self, stop: threading.Event) -> bool:
        """Take the single-learner lease; waits as a standby while another process holds it, and
        while Redis is unreachable or loading (transient errors retried like every other loop's)."""
        took: list[bool] = []
        while not stop.is_set():
            if not retrying(lambda: took.append(self.lease.take()), stage="lease", stop=stop,
                            max_backoff_s=self.settings.stream.retry_max_backoff_s,
                            metrics=self.metrics.of(StreamMetrics)):
                return False
            if took[-1]:
                log.info("took the learner lease as %s (fencing token %d)", self.name, self.lease.token)
                return True
            log.info("%s holds the learner lease; standing by", self.lease.holder)
            stop.wait(2.0)
        return False

    def _resume(self, stop: threading.Event) -> bool:
        """The head checkpoint (or a fresh model), read with transient errors retried; False if stopped."""
        def step() -> None:
            ckpt = self.learner.resume()
            self.offsets = dict(ckpt.offsets) if ckpt else {}

        return retrying(step, stage="resume", stop=stop, max_backoff_s=self.settings.stream.retry_max_backoff_s,
                        metrics=self.metrics.of(StreamMetrics))

    def _lose_lease(self, why: str) -> None:
        """Another learner may own the head now: stop, and never retry a write."""
        log.error("%s; dropping what was learned since the last checkpoint and standing by", why)
        self._lost_lease = True

    # ------------------------------------------------------------------ run
    def run(self, stop: threading.Event, until: Callable[[LearnerLoop], bool] | None = None) -> None:
        """Learn while holding the lease; a lost lease (a long pause, a Redis outage past the lease)
        drops everything learned since the last checkpoint and goes back to standing by."""
        while self._take_lease(stop):
            if not self._resume(stop):
                return
            runtime = ConsumeRuntime(self.settings, self, self.metrics, group_id=self.settings.learn.group,
                                     topics=[self.settings.kafka.topic_feedback])
            runtime.run(stop, until=(lambda: until(self)) if until else None)
            if not self._lost_lease or stop.is_set() or (until is not None and until(self)):
                return
            self._start_over()

    # ------------------------------------------------------------------ runtime hooks
    def decode(self, msg: Message, now_ms: int) -> Feedback:
        if (KIND_HEADER, KIND_SEARCH) in (msg.headers() or []):
            return decode_search_log(msg.value() or b"")
        return decode_snapshot(msg.value() or b"")

    def process(self, batch: Polled[Feedback]) -> None:
        if batch.scratch is None:  # joining is in memory and happens once; learning may be retried
            batch.scratch = self._join(batch)
        joined: Joined = batch.scratch
        self.learner.learn(joined.groups)
        for labelled in joined.searches:  # one step per result list: searches are few, each one counts
            self.learner.learn_search(labelled.M, labelled.y)
        self.decisions += joined.decisions
        for (topic, partition), offset in batch.next.items():
            self.offsets[f"{topic}:{partition}"] = offset

    def _join(self, batch: Polled[Feedback]) -> Joined:
        joined = Joined()
        snapshots: list[Snapshot] = []
        for rec in batch.records:
            if isinstance(rec.value, SearchLog):
                self.searches.add(rec.value)
            else:
                snapshots.append(rec.value)
                labelled = self.searches.observe([rec.value])  # in log order: a later search replaces it
                if labelled is not None:
                    joined.searches.append(labelled)
        before = dict(self.joiner.outcomes)
        joined.groups = self.joiner.add(snapshots)
        for outcome, n in self.joiner.outcomes.items():
            if n > before.get(outcome, 0):
                self.metrics.of(LearnerMetrics).learn_decisions.labels(outcome).inc(n - before.get(outcome, 0))
        joined.decisions = len(snapshots)
        return joined

    def completed(self, batch: Polled[Feedback]) -> Offsets:
        return {}  # the checkpoint holds the position (see tick)

    def tick(self) -> Offsets:
        if not self.lease.renew():
            self._lose_lease(f"the learner lease is {self.lease.holder or 'free'}, no longer {self.name}'s")
            return {}
        try:
            return self._checkpoint() if self.learner.due() else {}
        except LeaseLostError as exc:  # it lapsed after the renewal (a pause between the two)
            self._lose_lease(str(exc))
            return {}

    def finished(self) -> bool:
        return self._lost_lease

    def assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            saved = self.offsets.get(f"{tp.topic}:{tp.partition}")
            if saved is not None:
                tp.offset = saved

    def drain(self) -> Offsets:
        if self._lost_lease:
            return {}
        try:
            return self._checkpoint(force=True)
        except LeaseLostError as exc:
            self._lose_lease(str(exc))
            return {}
        except TRANSIENT as exc:
            log.error("final checkpoint failed (%s: %s); the next learner resumes from the previous one",
                      type(exc).__name__, exc)
            return {}

    def close(self) -> None:
        self.redis.close()

    def _checkpoint(self, force: bool = False) -> Offsets:
        number = self.learner.maybe_checkpoint(self.offsets, force=force)
        if number is None:
            return {}
        log.info("checkpoint %d: %d examples, prequential HitRate@10 %s", number, self.learner.model.examples,
                 "n/a" if self.learner.last is None or self.learner.last.hit_rate is None
                 else f"{self.learner.last.hit_rate:.4f}")
        done: Offsets = {}
        for key, offset in self.offsets.items():
            topic, partition = key.rsplit(":", 1)
            done[(topic, int(partition))] = offset
        return done
