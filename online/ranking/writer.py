"""Re-ranks the users a batch touched and writes their ``rec`` keys.

Per batch: read the touched users' candidate contexts (:class:`~fusionrec.online.candidates.context.CandidateReader`,
the one read side); rank (the learned fusion by default); write the lists (a list is kept where the
stored one was ranked from newer events: another process ranked after this one read) and the
profile vectors; hand the ranked pools with the batch's events to the feedback ``sink`` (the
learner's training data, see :mod:`fusionrec.online.learning.feedback`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import msgspec
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics, MetricSet, counter, histogram
from fusionrec.core.scripts import MULTI_SETEX, NEWER_RECS, register
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.context import CandidateReader
from fusionrec.online.learning.checkpoints import CheckpointStore, ServingModel
from fusionrec.online.learning.feedback import Snapshot, ordered_features
from fusionrec.online.ranking.ranker import Ranked, Ranker, RecList, SimpleRanker, model_label
from fusionrec.streams.state import BatchResult, UserTouch

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


class RecMetrics(MetricSet):
    component = "recommendation writer (fusionrec.online.ranking)"
    recs_written = counter("fusionrec_recs_written_total", "Recommendation lists written")
    rank_seconds = histogram("fusionrec_recs_rank_seconds", "Wall time to rank and write recommendations for one batch")


FeedbackSink = Callable[[list[Snapshot]], None]


def default_ranker(client: redis.Redis, settings: Settings, metrics: Metrics | None = None,
                   keys: Keys | None = None) -> Ranker:
    """The ranker ``FUSIONREC_REC_RANKER`` names: the learned fusion (hot-reloaded) or the fixed blend."""
    if settings.rec.ranker == "simple":
        return SimpleRanker()
    from fusionrec.online.ranking.fusion import FusionRanker

    serving = ServingModel(CheckpointStore(client, settings, keys), settings, metrics)
    return FusionRanker(client, settings, serving, keys)


class RecommendationWriter:
    """Hook for :class:`fusionrec.streams.user_state.UserStateHandler`: ``writer(result)`` refreshes recs."""

    def __init__(self, client: redis.Redis, settings: Settings, ranker: Ranker | None = None,
                 metrics: Metrics | None = None, keys: Keys | None = None,
                 sink: FeedbackSink | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.metrics = metrics.of(RecMetrics) if metrics is not None else None
        self.keys = keys or Keys.for_settings(settings)
        self.ranker = ranker or default_ranker(client, settings, metrics, self.keys)
        self.sink = sink
        # the ranker's item vectors, where it keeps them, serve the profile vectors too: one cache
        self.candidates = CandidateReader(client, settings, self.keys, vectors=getattr(self.ranker, "lookup", None))
        self._setex = register(client, MULTI_SETEX)
        self._newer = register(client, NEWER_RECS)

    def __call__(self, result: BatchResult) -> None:
        if result.users:
            self.refresh(result.users)

    def _snapshots(self, users: dict[str, UserTouch], ranked: list[Ranked], now: int) -> list[Snapshot]:
        logged = [r for r in ranked if r.pool is not None and r.order is not None]
        features = ordered_features([r.pool for r in logged], [r.order for r in logged if r.order is not None])
        out = []
        for r, X in zip(logged, features, strict=True):
            touch = users[r.pool.user_id]
            out.append(Snapshot.of(r.pool, r.order or [], len(r.items), touch.actions, touch.shown, r.model, now,
                                   positions=touch.positions, upto=touch.upto, features=X))
        return out

    def refresh(self, users: dict[str, UserTouch]) -> int:
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        per_bucket: dict[int, tuple[list[str], list[bytes | int]]] = defaultdict(lambda: ([], []))
        profiles: dict[int, tuple[list[str], list[bytes]]] = defaultdict(lambda: ([], []))
        contexts = self.candidates.for_users(users)
        ranked = self.ranker.rank_many(contexts, self.settings.rec.k)
        for ctx, r in zip(contexts, ranked, strict=True):
            bucket = self.keys.bucket(ctx.user_id)
            if ctx.profile is not None:
                pkeys, pvalues = profiles[bucket]
                pkeys.append(self.keys.user_profile(ctx.user_id))
                pvalues.append(_msgpack.encode([ctx.profile[0], ctx.profile[1].astype("<f4").tobytes()]))
            recs = RecList(user_id=ctx.user_id, items=r.items, model=model_label(self.ranker.name, r.model),
                           generated_at=now, event_ts=users[ctx.user_id].last_ts)
            keys, values = per_bucket[bucket]
            keys.append(self.keys.user_rec(ctx.user_id))
            values.extend((recs.event_ts, _encoder.encode(recs)))
        pipe = self.redis.pipeline(transaction=False)
        for keys, values in per_bucket.values():
            self._newer(keys=keys, args=[self.settings.rec.ttl_s, *values], client=pipe)
        for pkeys, pvalues in profiles.values():
            self._setex(keys=pkeys, args=[self.settings.state.user_ttl_s, *pvalues], client=pipe)
        pipe.execute()
        if self.sink is not None:
            self.sink(self._snapshots(users, ranked, now))
        if self.metrics is not None:
            self.metrics.recs_written.inc(len(users))
            self.metrics.rank_seconds.observe(time.perf_counter() - t0)
        return len(users)
