"""Re-ranks the users a batch touched and writes their ``rec`` keys.

Per batch, at most one script call per hash-tag bucket in each round trip: read candidates (the
users' item weights and category/brand affinity, co-visitation of their recent items, popular and
trending items, the active model version);
when item vectors exist, read the vectors of the users' strongest items, build each user's profile
vector and find its nearest items (content candidates, one VSIM per user, pipelined); check
candidates against deleted items; rank (the learned fusion by default); write the lists and the
profile vectors; hand the ranked pools with the batch's events to the feedback ``sink`` (the
learner's training data, see :mod:`online.feedback`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import msgspec
import redis

from fusionrec.keys import Keys
from fusionrec.metrics import Metrics
from fusionrec.settings import Settings
from online.checkpoints import CheckpointStore, ServingModel
from online.content import ContentIndex, profile_vector
from online.feedback import Snapshot
from online.ranker import Ranked, Ranker, RecList, SimpleRanker, UserContext
from streams.scripts import MULTI_SETEX, MULTI_ZTOP
from streams.state import BatchResult, UserTouch

log = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
AFFINITY_TOP = 20  # strongest category/brand affinities read per user
_msgpack = msgspec.msgpack.Encoder()


def _pairs(raw: list[tuple[bytes | str, float]]) -> list[tuple[str, float]]:
    return [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in raw]


def _flatten(groups: list[list[str]], replies: list[list[list[bytes]]]) -> dict[str, list[tuple[str, float]]]:
    """Map ids to the (member, score) lists a MULTI_ZTOP call returned for them."""
    out: dict[str, list[tuple[str, float]]] = {}
    for ids, reply in zip(groups, replies, strict=True):
        for ident, flat in zip(ids, reply, strict=True):
            out[ident] = list(zip([m.decode() for m in flat[0::2]], map(float, flat[1::2]), strict=True))
    return out


FeedbackSink = Callable[[list[Snapshot]], None]


def default_ranker(client: redis.Redis, settings: Settings, metrics: Metrics | None = None,
                   keys: Keys | None = None) -> Ranker:
    """The ranker ``FUSIONREC_REC_RANKER`` names: the learned fusion (hot-reloaded) or the fixed blend."""
    if settings.rec_ranker == "simple":
        return SimpleRanker()
    from online.fusion import FusionRanker

    serving = ServingModel(CheckpointStore(client, settings, keys), settings, metrics)
    return FusionRanker(client, settings, serving, keys)


class RecommendationWriter:
    """Hook for :class:`streams.user_state.UserStateHandler`: ``writer(result)`` refreshes recs."""

    def __init__(self, client: redis.Redis, settings: Settings, ranker: Ranker | None = None,
                 metrics: Metrics | None = None, keys: Keys | None = None,
                 sink: FeedbackSink | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.metrics = metrics
        self.keys = keys or Keys.for_settings(settings)
        self.ranker = ranker or default_ranker(client, settings, metrics, self.keys)
        self.sink = sink
        self.content = ContentIndex(client, settings, self.keys)
        self._ztop = client.register_script(MULTI_ZTOP)
        self._setex = client.register_script(MULTI_SETEX)

    def __call__(self, result: BatchResult) -> None:
        if result.users:
            self.refresh(result.users)

    def contexts(self, users: dict[str, UserTouch]) -> list[UserContext]:
        """Read everything the ranker needs for these users: one pipeline, one script per bucket."""
        s = self.settings
        anchors = sorted({i for t in users.values() for i in t.recent[: s.rec_recent_items]})
        user_groups = self._by_bucket(list(users))
        item_groups = self._by_bucket(anchors)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.keys.popularity(), 0, s.rec_popular_candidates - 1, desc=True, withscores=True)
        pipe.scard(self.keys.deleted_items())
        pipe.zrange(self.keys.trending(), 0, s.rec_trending_candidates - 1, desc=True, withscores=True)
        for group in user_groups:
            self._ztop(keys=[self.keys.user_items(u) for u in group], args=[s.rec_repeat_candidates], client=pipe)
        for group in user_groups:
            self._ztop(keys=[self.keys.user_affinity(u) for u in group], args=[AFFINITY_TOP], client=pipe)
        for group in item_groups:
            self._ztop(keys=[self.keys.item_covis(i) for i in group], args=[s.rec_candidates_per_item],
                       client=pipe)
        replies = pipe.execute()
        popular, n_deleted = _pairs(replies[0]), int(replies[1])
        trending = _pairs(replies[2]) if s.rec_trending_candidates > 0 else []
        n = len(user_groups)
        tops = _flatten(user_groups + item_groups, replies[3: 3 + n] + replies[3 + 2 * n:])
        affinity = _flatten(user_groups, replies[3 + n: 3 + 2 * n])
        contexts = [UserContext(user_id=uid, recent=t.recent[: s.rec_recent_items], items=tops[uid],
                                covis={a: tops[a] for a in t.recent[: s.rec_recent_items]}, popular=popular,
                                trending=trending, affinity=dict(affinity[uid]), ts=t.last_ts)
                    for uid, t in users.items()]
        self._content(contexts)
        if n_deleted:
            self._exclude_deleted(contexts)
        return contexts

    def _content(self, contexts: list[UserContext]) -> None:
        """Profile vectors and their nearest items, for users whose items have vectors."""
        s = self.settings
        version = self.content.active()
        if version is None or s.rec_content_candidates <= 0:
            return
        strongest = {c.user_id: c.items[: s.rec_profile_items] for c in contexts}
        ids = sorted({i for items in strongest.values() for i, _ in items})
        vectors = self.content.store.vectors(version, ids)
        with_profile = []
        for ctx in contexts:
            vec = profile_vector(vectors, strongest[ctx.user_id])
            if vec is not None:
                ctx.profile = (version, vec)
                with_profile.append(ctx)
        found = self.content.nearest(version, [c.profile[1] for c in with_profile if c.profile],
                                     s.rec_content_candidates)
        for ctx, near in zip(with_profile, found, strict=True):
            ctx.content = near

    def _snapshots(self, users: dict[str, UserTouch], ranked: list[Ranked], now: int) -> list[Snapshot]:
        out = []
        for r in ranked:
            if r.pool is None or r.order is None:
                continue
            touch = users[r.pool.user_id]
            out.append(Snapshot.of(r.pool, r.order, len(r.items), touch.actions, touch.shown, r.model, now))
        return out

    def _by_bucket(self, ids: list[str]) -> list[list[str]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for i in ids:
            groups[self.keys.bucket(i)].append(i)
        return list(groups.values())

    def _exclude_deleted(self, contexts: list[UserContext]) -> None:
        candidates = sorted({i for c in contexts for i, _ in (*c.items, *c.popular, *c.content, *c.trending)}
                            | {i for c in contexts for ns in c.covis.values() for i, _ in ns})
        flags = self.redis.smismember(self.keys.deleted_items(), candidates) if candidates else []
        deleted = frozenset(i for i, f in zip(candidates, flags, strict=True) if f)
        for c in contexts:
            c.excluded = deleted

    def refresh(self, users: dict[str, UserTouch]) -> int:
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        per_bucket: dict[int, tuple[list[str], list[bytes]]] = defaultdict(lambda: ([], []))
        profiles: dict[int, tuple[list[str], list[bytes]]] = defaultdict(lambda: ([], []))
        contexts = self.contexts(users)
        ranked = self.ranker.rank_many(contexts, self.settings.rec_k)
        for ctx, r in zip(contexts, ranked, strict=True):
            if ctx.profile is not None:
                pkeys, pvalues = profiles[self.keys.bucket(ctx.user_id)]
                pkeys.append(self.keys.user_profile(ctx.user_id))
                pvalues.append(_msgpack.encode([ctx.profile[0], ctx.profile[1].astype("<f4").tobytes()]))
            model = self.ranker.name if not r.model else f"{self.ranker.name}-{r.model}"
            recs = RecList(user_id=ctx.user_id, items=r.items, model=model, generated_at=now,
                           event_ts=users[ctx.user_id].last_ts)
            keys, values = per_bucket[self.keys.bucket(ctx.user_id)]
            keys.append(self.keys.user_rec(ctx.user_id))
            values.append(_encoder.encode(recs))
        pipe = self.redis.pipeline(transaction=False)
        for keys, values in per_bucket.values():
            self._setex(keys=keys, args=[self.settings.rec_ttl_s, *values], client=pipe)
        for keys, values in profiles.values():
            self._setex(keys=keys, args=[self.settings.user_ttl_s, *values], client=pipe)
        pipe.execute()
        if self.sink is not None:
            self.sink(self._snapshots(users, ranked, now))
        if self.metrics is not None:
            self.metrics.recs_written.inc(len(users))
            self.metrics.rank_seconds.observe(time.perf_counter() - t0)
        return len(users)
