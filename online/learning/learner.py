"""The learner: labelled decisions in, predict-then-learn, guarded checkpoints out.

:meth:`Learner.learn` takes the groups :class:`fusionrec.online.learning.feedback.FeedbackJoiner` produced. For each
mini-batch it drops rows with non-finite inputs (counted), asks the model for its prediction, scores
that prediction (HitRate@10 of each decision's positives among its rows: the prequential metric),
and only then updates the model. :meth:`Learner.maybe_checkpoint` writes a checkpoint every
``learn_checkpoint_s`` or ``learn_checkpoint_examples``, unless the metric since the last checkpoint
fell below ``learn_rollback_ratio`` of the last checkpoint's: then the model goes back to that
checkpoint, a rollback is counted and logged as an error, and learning continues from there.

``fusionrec evaluate`` drives the same class in process; :mod:`fusionrec.online.learning.loop` drives it from Kafka.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from fusionrec.core.metrics import Metrics, MetricSet, counter, gauge, histogram
from fusionrec.core.settings import Settings
from fusionrec.online.learning.checkpoints import Checkpoint, CheckpointRefused, CheckpointStore, ModelMetrics
from fusionrec.online.learning.feedback import Group
from fusionrec.online.learning.model import FusionModel, Rows, VectorLookup
from fusionrec.online.learning.scorers import finite_rows

log = logging.getLogger(__name__)

HIT_K = 10


class LearnerMetrics(MetricSet):
    component = "learner (fusionrec.online.learning)"
    learn_examples = counter("fusionrec_learner_examples_total", "Training examples learned")
    learn_search_examples = counter("fusionrec_learner_search_examples_total",
                                    "Labelled search results the search mix learned from")
    learn_decisions = counter("fusionrec_learner_decisions_total", "Logged decisions by join outcome (labelled, "
                              "labelled_views, no_positive, positive_outside_pool, expired, duplicate, ...)",
                              ("outcome",))
    learn_rejected = counter("fusionrec_learner_rejected_total", "Training rows rejected by the input guards",
                             ("reason",))
    learn_hit_rate = gauge("fusionrec_learner_prequential_hit_rate",
                           "Rolling prequential HitRate@10 of the fused model over its pools",
                           multiprocess_mode="livemax")
    learn_checkpoints = counter("fusionrec_learner_checkpoints_total", "Checkpoints written")
    learn_rollbacks = counter("fusionrec_learner_rollbacks_total",
                              "Rollbacks to the previous checkpoint after a quality drop")
    learn_step_seconds = histogram("fusionrec_learner_step_seconds", "Wall time of one predict-then-learn step")
    learn_explore_share = gauge("fusionrec_learner_explore_share",
                                "Places of the first 10 the fused model gives items new to the user, at least, "
                                "by segment (own items in the pool)", ("segment",), multiprocess_mode="livemax")
    learn_served_order = gauge("fusionrec_learner_served_order",
                               "1 for the order each segment of users is served in (the stacker's, or another "
                               "order that ranks the segment clearly better), 0 for the others", ("segment", "order"),
                               multiprocess_mode="livemax")


def group_hits(groups: Sequence[Group], fused: np.ndarray) -> list[int]:
    """Per group: 1 when a positive is among its ``HIT_K`` best-scored rows."""
    out, start = [], 0
    for g in groups:
        scores = fused[start: start + len(g.y)]
        top = np.argsort(-scores, kind="stable")[:HIT_K]
        out.append(int(g.y[top].max() > 0) if len(top) else 0)
        start += len(g.y)
    return out


class Learner:
    def __init__(self, settings: Settings, store: CheckpointStore | None, lookup: VectorLookup | None,
                 metrics: Metrics | None = None, model: FusionModel | None = None) -> None:
        self.settings = settings
        self.store = store
        self.lookup = lookup
        registry = metrics or Metrics()
        self.metrics = registry.of(LearnerMetrics)
        self.model_metrics = registry.of(ModelMetrics)
        self.model = model or FusionModel(use_vectors=settings.learn.vectors, seed=settings.learn.seed)
        self.last: Checkpoint | None = None  # the checkpoint the head points at
        self.rollbacks = 0
        self._since_hits: list[int] = []
        self._since_examples = 0
        self._since_wall = time.monotonic()
        self._first_update_ms = 0
        self._last_update_ms = 0

    # ------------------------------------------------------------------ resume
    def resume(self) -> Checkpoint | None:
        """Continue from the head checkpoint (the newest one that verifies), if there is one."""
        ckpt = self.store.newest_valid() if self.store is not None else None
        if ckpt is not None:
            self.model, self.last = ckpt.model, ckpt
            log.info("resumed from checkpoint %d (%d examples)", ckpt.number, ckpt.model.examples)
        return ckpt

    # ------------------------------------------------------------------ learning
    def learn(self, groups: Sequence[Group]) -> list[int]:
        """Predict-then-learn over the groups; returns each kept group's prequential hit."""
        if not groups:
            return []
        t0 = time.perf_counter()
        rows = Rows.of_pools([g.pool for g in groups], self.lookup if self.model.use_vectors else None)
        y = np.concatenate([g.y for g in groups])
        ok = finite_rows(rows.X, rows.profile, rows.item)
        kept = list(groups)
        if not ok.all():
            self.metrics.learn_rejected.labels("non_finite").inc(int((~ok).sum()))
            keep_rows: list[int] = []
            kept, start = [], 0
            for g in groups:
                mask = ok[start: start + len(g.y)]
                if mask.all():
                    kept.append(g)
                    keep_rows.extend(range(start, start + len(g.y)))
                start += len(g.y)
            rows, y = rows.take(np.array(keep_rows, dtype=np.int64)), y[keep_rows]
        if not kept:
            return []
        whole = [g for g in kept if g.full is not None and g.positive is not None]
        self.model.learn_explore([g.full for g in whole], [g.positive for g in whole], self.lookup)  # type: ignore[misc]
        before = self.model.learn(rows, y)
        for segment, chosen in self.model.explore.report().items():
            self.metrics.learn_explore_share.labels(segment).set(chosen["share"])
        for segment, served in self.model.choice.report().items():
            for order in self.model.choice.orders:
                self.metrics.learn_served_order.labels(segment, order).set(float(served["order"] == order))
        hits = group_hits(kept, before)
        self._record(hits, len(y))
        self.metrics.learn_step_seconds.observe(time.perf_counter() - t0)
        return hits

    def learn_search(self, M: np.ndarray, y: np.ndarray) -> None:
        """Update the search mix on labelled search results (columns f_item, f_query)."""
        self.model.search.learn_matrix(M, y)
        self._since_examples += len(y)
        self.metrics.learn_search_examples.inc(len(y))
        if not self._first_update_ms:
            self._first_update_ms = int(time.time() * 1000)
        self._last_update_ms = int(time.time() * 1000)

    def _record(self, hits: list[int], examples: int) -> None:
        now_ms = int(time.time() * 1000)
        self._first_update_ms = self._first_update_ms or now_ms
        self._last_update_ms = now_ms
        self._since_hits.extend(hits)
        self._since_examples += examples
        self.metrics.learn_examples.inc(examples)
        window = self._since_hits[-self.settings.learn.rollback_min_groups * 10:]
        if window:
            self.metrics.learn_hit_rate.set(sum(window) / len(window))

    # ------------------------------------------------------------------ checkpoints
    def due(self) -> bool:
        s = self.settings
        return self._since_examples > 0 and (self._since_examples >= s.learn.checkpoint_examples
                                             or time.monotonic() - self._since_wall >= s.learn.checkpoint_s)

    def maybe_checkpoint(self, offsets: dict[str, int] | None = None, force: bool = False) -> int | None:
        """Checkpoint if due (or ``force``); returns the new number, or None (not due, or rolled back)."""
        if self.store is None or not (self.due() or (force and self._since_examples)):
            return None
        hit_rate = self.hit_rate_since()
        if self._degraded(hit_rate):
            self.rollback(hit_rate)
            return None
        ckpt = Checkpoint(model=self.model, learned_from_ms=self._first_update_ms,
                          learned_to_ms=self._last_update_ms, examples=self.model.examples,
                          hit_rate=hit_rate, offsets=dict(offsets or {}))
        number = self.store.save(ckpt)
        self.last = ckpt
        self.metrics.learn_checkpoints.inc()
        self.model_metrics.model_version.set(number)
        self._reset_interval()
        return number

    def hit_rate_since(self) -> float | None:
        if len(self._since_hits) < self.settings.learn.rollback_min_groups:
            return None
        return sum(self._since_hits) / len(self._since_hits)

    def _degraded(self, hit_rate: float | None) -> bool:
        prev = self.last.hit_rate if self.last is not None else None
        return hit_rate is not None and prev is not None and hit_rate < self.settings.learn.rollback_ratio * prev

    def rollback(self, hit_rate: float | None) -> None:
        assert self.store is not None and self.last is not None
        try:
            restored = self.store.load(self.last.number)
        except CheckpointRefused as exc:
            log.error("rollback wanted but %s; keeping the current model", exc)
            return
        if restored is None:
            log.error("rollback wanted but checkpoint %d is gone; keeping the current model", self.last.number)
            return
        log.error("prequential HitRate@10 fell to %.4f (checkpoint %d had %.4f, ratio %.2f): rolled back to it",
                  hit_rate or 0.0, self.last.number, self.last.hit_rate or 0.0, self.settings.learn.rollback_ratio)
        self.model = restored.model
        self.store.set_head(restored.number)
        self.rollbacks += 1
        self.metrics.learn_rollbacks.inc()
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._since_hits = []
        self._since_examples = 0
        self._since_wall = time.monotonic()
        self._first_update_ms = 0
        self._last_update_ms = 0
