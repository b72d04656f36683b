"""The one read side: what Redis holds about users, as named candidate contexts.

The recommendation writer, search and the evaluator all rank from a :class:`UserContext`; this
module is the only place that reads one. Per call, one pipeline with one script call per hash-tag
bucket and source (see :data:`fusionrec.core.scripts.MULTI_ZTOP`):

1. the popular and trending lists and the number of deleted items (global);
2. per user: their stored state (:class:`~fusionrec.streams.state.UserState`), of which their
   strongest items (repeat candidates, with their purchases) and category/brand affinities, taken in
   the order ``ZRANGE … REV`` would give (:func:`strongest`);
3. per recent item: its co-visitation neighbours;
4. when item vectors exist: the user's profile vector from their strongest items' vectors, and its
   nearest items (content candidates; of a wider search, the nearest with few interactions are the
   *fresh* candidates);
5. every candidate's decayed popularity (its *support*), and, when items were ever deleted, which
   candidates are deleted (excluded from every list): one round trip.

Every reply is filed under the name of what it answers, never by its position in the pipeline.

>>> reader = CandidateReader(client, settings)                              # doctest: +SKIP
>>> [ctx] = reader.for_stored_users({"42": now_ms})                        # doctest: +SKIP
>>> ctx.items[:3], ctx.popular[:3]                                         # doctest: +SKIP
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

import numpy as np
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.scripts import MULTI_HGET, MULTI_ZTOP, register
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorLookup
from fusionrec.online.candidates.content import ContentIndex, profile_vector
from fusionrec.streams.state import Decay, UserState, user_state_or_empty

AFFINITY_TOP = 20  # strongest category/brand affinities read per user
_NO_HISTORY = "read as a user with no history"  # what a stored value that is no state is read as

Scored = list[tuple[str, float]]


@dataclass
class UserContext:
    """Everything a ranker sees about one user at decision time."""

    user_id: str
    recent: list[str]
    # the user's own decayed item weights, strongest first (repeat candidates)
    items: Scored = field(default_factory=list)
    # of those, the purchased ones: (purchases, first, last purchase event time in ms)
    bought: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # recent item -> its co-visitation neighbours with weights, strongest first
    covis: dict[str, Scored] = field(default_factory=dict)
    popular: Scored = field(default_factory=list)
    # nearest items to the user's profile vector, with similarity in [0, 1], nearest first
    content: Scored = field(default_factory=list)
    # (model version, unit vector) when the user's items have vectors
    profile: tuple[str, np.ndarray] | None = None
    excluded: frozenset[str] = frozenset()
    # globally trending items (faust hopping windows), strongest first
    trending: Scored = field(default_factory=list)
    # decayed category/brand affinity, members ``c:<category>`` / ``b:<brand>``
    affinity: dict[str, float] = field(default_factory=dict)
    # decision time (ms): event time of the newest event the user's state includes
    ts: int = 0
    # nearest items to the profile vector with few interactions (support below ``rec.fresh_below``)
    fresh: Scored = field(default_factory=list)
    # candidates' decayed popularity as stored (forward-decayed; shared by a batch's contexts): times
    # ``support_scale`` it is the item's decayed interaction weight at ``ts``; absent items have none
    support: Mapping[str, float] = field(default_factory=dict)
    support_scale: float = 0.0

    def support_at(self, item: str) -> float:
        """The item's decayed popularity at decision time, in event weights (0: none stored)."""
        return self.support.get(item, 0.0) * self.support_scale


class Anchor(Protocol):
    """Where a user's reading starts: their most recent items (newest first) and the decision time."""

    recent: list[str]
    last_ts: int


@dataclass
class StoredAnchor:
    recent: list[str]
    last_ts: int


def normalised(pairs: Scored) -> dict[str, float]:
    """Scores divided by the largest one (empty when nothing is positive)."""
    if not pairs:
        return {}
    top = max(score for _, score in pairs)
    if top <= 0:
        return {}
    return {item: score / top for item, score in pairs}


def spread(pairs: Scored) -> dict[str, float]:
    """Min-max scaled to [0, 1]; similarity scores bunch near the top, this keeps their order visible."""
    if not pairs:
        return {}
    lo, hi = min(s for _, s in pairs), max(s for _, s in pairs)
    if hi - lo <= 1e-12:
        return {item: 1.0 for item, _ in pairs}
    return {item: (s - lo) / (hi - lo) for item, s in pairs}


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _pairs(raw: Iterable[tuple[bytes | str, float]]) -> Scored:
    return [(_text(m), float(s)) for m, s in raw]


def strongest(weights: Mapping[str, float], n: int) -> Scored:
    """The ``n`` largest weights, largest first; ties in reverse item order, as ``ZRANGE … REV`` reads a
    sorted set."""
    if n <= 0 or not weights:
        return []
    if len(weights) <= n:
        return sorted(weights.items(), key=_by_weight, reverse=True)
    return heapq.nlargest(n, weights.items(), key=_by_weight)


def _by_weight(pair: tuple[str, float]) -> tuple[float, str]:
    return pair[1], pair[0]


class _Replies:
    """A pipeline whose replies are filed by name: ``(name, id) -> reply``."""

    def __init__(self, client: redis.Redis) -> None:
        self.pipe = client.pipeline(transaction=False)
        self._tags: list[tuple[str, list[str] | None]] = []

    def add(self, name: str, ids: list[str] | None = None) -> Any:
        """Tag the next queued command; ``ids`` when its reply has one entry per id (a MULTI_ZTOP call)."""
        self._tags.append((name, ids))
        return self.pipe

    def execute(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Global replies by name, and per-id replies by name (scored lists as ``Scored``)."""
        single: dict[str, Any] = {}
        per_id: dict[str, dict[str, Any]] = defaultdict(dict)
        for (name, ids), reply in zip(self._tags, self.pipe.execute(), strict=True):
            if ids is None:
                single[name] = reply
            elif name == "state":
                per_id[name].update(zip(ids, reply, strict=True))
            else:
                for ident, flat in zip(ids, reply, strict=True):
                    per_id[name][ident] = list(zip(map(_text, flat[0::2]), map(float, flat[1::2]), strict=True))
        return single, per_id


class CandidateReader:
    """Reads users' candidate contexts from Redis (thread-safe; share one per process)."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 content: ContentIndex | None = None, vectors: VectorLookup | None = None) -> None:
        """``vectors``: where the profile vectors' item vectors are read (a ranker's lookup, to share its
        cache); by default a lookup of its own."""
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.content = content or ContentIndex(client, settings, self.keys)
        store = self.content.store
        self.vectors = vectors or VectorLookup(store.vectors, settings.learn.vector_cache_items, seq=store.seq)
        self._ztop = register(client, MULTI_ZTOP)
        self._states = register(client, MULTI_HGET)
        # stored popularity is forward-decayed: weight(1, -ts) = exp(-rate * (ts - epoch)) brings it to ts
        self._popularity_now = Decay(-settings.state.decay_epoch_ms, settings.state.popularity_half_life_s)

    def for_users(self, users: Mapping[str, Anchor], states: Mapping[str, UserState] | None = None
                  ) -> list[UserContext]:
        """Contexts for users whose recent items the caller knows (the writer: from the batch just applied);
        their stored states are read unless given."""
        s = self.settings
        recent = {uid: a.recent[: s.rec.recent_items] for uid, a in users.items()}
        anchors = sorted({i for items in recent.values() for i in items})
        q = _Replies(self.redis)
        q.add("popular").zrange(self.keys.popularity(), 0, s.rec.popular_candidates - 1, desc=True,
                                withscores=True)
        q.add("deleted").scard(self.keys.deleted_items())
        q.add("trending").zrange(self.keys.trending(), 0, s.rec.trending_candidates - 1, desc=True,
                                 withscores=True)
        if states is None:
            for group in self._by_bucket(list(users)):
                self._states(keys=[self.keys.user_state(u) for u in group], args=["d"], client=q.add("state", group))
        for group in self._by_bucket(anchors):
            self._ztop(keys=[self.keys.item_covis(i) for i in group], args=[s.rec.candidates_per_item],
                       client=q.add("covis", group))
        single, per_id = q.execute()
        if states is None:
            states = {uid: user_state_or_empty(uid, raw, _NO_HISTORY) for uid, raw in per_id["state"].items()}
        popular = _pairs(single["popular"])
        trending = _pairs(single["trending"]) if s.rec.trending_candidates > 0 else []
        contexts = []
        for uid, a in users.items():
            state = states[uid]
            items = strongest(state.items, s.rec.repeat_candidates)
            contexts.append(UserContext(
                user_id=uid, recent=recent[uid], items=items,
                bought={i: state.buys[i] for i, _ in items if i in state.buys},
                covis={a: per_id["covis"][a] for a in recent[uid]}, popular=popular, trending=trending,
                affinity=dict(strongest(state.affinity, AFFINITY_TOP)), ts=a.last_ts))
        scanned = self._add_content(contexts)
        self._add_support(contexts, scanned, deleted=int(single["deleted"]) > 0)
        return contexts

    def for_stored_users(self, at: Mapping[str, int]) -> list[UserContext]:
        """Contexts for users as stored, decided at ``at[user]`` ms (or their newest event, if later).

        Search and the evaluator use this; an unknown user gets the context of a user with no history.
        """
        states = self.states(list(at))
        anchors = {uid: StoredAnchor(recent=states[uid].recent[: self.settings.rec.recent_items],
                                     last_ts=max(ts, states[uid].last_seen, 0))
                   for uid, ts in at.items()}
        return self.for_users(anchors, states)

    def states(self, uids: list[str]) -> dict[str, UserState]:
        """The users' stored states (empty for a user with none): one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        groups = self._by_bucket(uids)
        for group in groups:
            self._states(keys=[self.keys.user_state(u) for u in group], args=["d"], client=pipe)
        return {uid: user_state_or_empty(uid, raw, _NO_HISTORY)
                for group, reply in zip(groups, pipe.execute(), strict=True)
                for uid, raw in zip(group, reply, strict=True)}

    def _add_content(self, contexts: list[UserContext]) -> dict[str, Scored]:
        """Profile vectors and their nearest items, for users whose items have vectors; returns each such
        user's wider search for the fresh source (:meth:`_add_support` picks from it)."""
        s = self.settings
        version = self.content.active()
        if version is None or s.rec.content_candidates <= 0:
            return {}
        top_items = {c.user_id: c.items[: s.rec.profile_items] for c in contexts}
        ids = sorted({i for items in top_items.values() for i, _ in items})
        vectors = self.vectors.get(version, ids)
        with_profile = []
        for ctx in contexts:
            vec = profile_vector(vectors, top_items[ctx.user_id])
            if vec is not None:
                ctx.profile = (version, vec)
                with_profile.append(ctx)
        scan = max(s.rec.content_candidates, s.rec.fresh_scan if s.rec.fresh_candidates > 0 else 0)
        found = self.content.nearest(version, [c.profile[1] for c in with_profile if c.profile], scan)
        for ctx, near in zip(with_profile, found, strict=True):
            ctx.content = near[: s.rec.content_candidates]
        return {ctx.user_id: near for ctx, near in zip(with_profile, found, strict=True)} \
            if s.rec.fresh_candidates > 0 else {}

    def _add_support(self, contexts: list[UserContext], scanned: dict[str, Scored], deleted: bool) -> None:
        """Every candidate's support, the fresh candidates, and (``deleted``) the deleted ones: one round trip.

        A user's fresh candidates are the nearest of their wider content search whose support at the
        decision time is below ``rec.fresh_below``: items few people have touched yet, which popularity
        and co-visitation cannot propose, in order of similarity."""
        # every candidate once: a batch's contexts share their popular and trending lists and each recent
        # item's neighbours, so each list is read once
        lists: dict[int, Scored] = {}
        for c in contexts:
            for pairs in (c.items, c.popular, c.content, c.trending, *c.covis.values()):
                lists[id(pairs)] = pairs
        lists.update((id(near), near) for near in scanned.values())
        candidates = list({i for pairs in lists.values() for i, _ in pairs})
        if not candidates:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zmscore(self.keys.popularity(), candidates)
        if deleted:
            pipe.smismember(self.keys.deleted_items(), candidates)
        replies = pipe.execute()
        support = {i: v for i, v in zip(candidates, replies[0], strict=True) if v is not None}
        excluded = frozenset(i for i, f in zip(candidates, replies[1], strict=True) if f) if deleted \
            else frozenset()
        s = self.settings.rec
        stored = support.get
        for c in contexts:
            c.support = support
            c.support_scale = scale = self._popularity_now.weight(1.0, -c.ts) if c.ts else 0.0
            c.excluded = excluded
            near = scanned.get(c.user_id)
            if near:  # the first of the nearest whose support (UserContext.support_at) is below the bound
                c.fresh = list(islice(((i, sim) for i, sim in near if stored(i, 0.0) * scale < s.fresh_below),
                                      s.fresh_candidates))

    def _by_bucket(self, ids: list[str]) -> list[list[str]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for i in ids:
            groups[self.keys.bucket(i)].append(i)
        return list(groups.values())
