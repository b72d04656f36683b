"""The one read side: what Redis holds about users, as named candidate contexts.

The recommendation writer, search and the evaluator all rank from a :class:`UserContext`; this
module is the only place that reads one. Per call, one pipeline with one script call per hash-tag
bucket and source (see :data:`fusionrec.core.scripts.MULTI_ZTOP`):

1. the popular and trending lists and the number of deleted items (global);
2. per user: their strongest items (repeat candidates) and category/brand affinities;
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

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.scripts import MULTI_ZTOP, USER_ITEMS_READ, register
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.content import ContentIndex, profile_vector
from fusionrec.streams.state import Decay

AFFINITY_TOP = 20  # strongest category/brand affinities read per user

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


def _bought(items: Scored, raw: list[bytes | str | None]) -> dict[str, tuple[int, int, int]]:
    """``buys`` values (``<purchases>:<first>:<last>``) of the items that have one."""
    out: dict[str, tuple[int, int, int]] = {}
    for (item, _), value in zip(items, raw, strict=True):
        if value is not None:
            try:
                n, first, last = _text(value).split(":")
                out[item] = (int(n), int(first), int(last))
            except ValueError:  # not what USER_APPLY writes: the item counts as never bought
                continue
    return out


class _Replies:
    """A pipeline whose replies are filed by name: ``(name, id) -> reply``."""

    def __init__(self, client: redis.Redis) -> None:
        self.pipe = client.pipeline(transaction=False)
        self._tags: list[tuple[str, list[str] | None, bool]] = []
        self.bought: dict[str, dict[str, tuple[int, int, int]]] = {}

    def add(self, name: str, ids: list[str] | None = None, with_buys: bool = False) -> Any:
        """Tag the next queued command; ``ids`` when its reply has one entry per id (a MULTI_ZTOP call).
        ``with_buys``: two entries per id, the scored list and its ``buys`` (a USER_ITEMS_READ call),
        the purchases filed in :attr:`bought`."""
        self._tags.append((name, ids, with_buys))
        return self.pipe

    def execute(self) -> tuple[dict[str, Any], dict[str, dict[str, Scored]]]:
        """Global replies by name, and per-id scored lists by name (the purchases in ``bought``)."""
        single: dict[str, Any] = {}
        per_id: dict[str, dict[str, Scored]] = defaultdict(dict)
        for (name, ids, with_buys), reply in zip(self._tags, self.pipe.execute(), strict=True):
            if ids is None:
                single[name] = reply
                continue
            flats = reply[0::2] if with_buys else reply
            for ident, flat in zip(ids, flats, strict=True):
                per_id[name][ident] = list(zip(map(_text, flat[0::2]), map(float, flat[1::2]), strict=True))
            if with_buys:
                for ident, raw in zip(ids, reply[1::2], strict=True):
                    self.bought[ident] = _bought(per_id[name][ident], raw)
        return single, per_id


class CandidateReader:
    """Reads users' candidate contexts from Redis (thread-safe; share one per process)."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 content: ContentIndex | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.content = content or ContentIndex(client, settings, self.keys)
        self._ztop = register(client, MULTI_ZTOP)
        self._items = register(client, USER_ITEMS_READ)
        # stored popularity is forward-decayed: weight(1, -ts) = exp(-rate * (ts - epoch)) brings it to ts
        self._popularity_now = Decay(-settings.state.decay_epoch_ms, settings.state.popularity_half_life_s)

    def for_users(self, users: Mapping[str, Anchor]) -> list[UserContext]:
        """Contexts for users whose recent items the caller knows (the writer: from the batch just applied)."""
        s = self.settings
        recent = {uid: a.recent[: s.rec.recent_items] for uid, a in users.items()}
        anchors = sorted({i for items in recent.values() for i in items})
        q = _Replies(self.redis)
        q.add("popular").zrange(self.keys.popularity(), 0, s.rec.popular_candidates - 1, desc=True,
                                withscores=True)
        q.add("deleted").scard(self.keys.deleted_items())
        q.add("trending").zrange(self.keys.trending(), 0, s.rec.trending_candidates - 1, desc=True,
                                 withscores=True)
        for group in self._by_bucket(list(users)):
            self._items(keys=[k for u in group for k in (self.keys.user_items(u), self.keys.user_buys(u))],
                        args=[s.rec.repeat_candidates], client=q.add("items", group, with_buys=True))
            self._ztop(keys=[self.keys.user_affinity(u) for u in group], args=[AFFINITY_TOP],
                       client=q.add("affinity", group))
        for group in self._by_bucket(anchors):
            self._ztop(keys=[self.keys.item_covis(i) for i in group], args=[s.rec.candidates_per_item],
                       client=q.add("covis", group))
        single, per_id = q.execute()
        popular = _pairs(single["popular"])
        trending = _pairs(single["trending"]) if s.rec.trending_candidates > 0 else []
        contexts = [UserContext(user_id=uid, recent=recent[uid], items=per_id["items"][uid], bought=q.bought[uid],
                                covis={a: per_id["covis"][a] for a in recent[uid]}, popular=popular,
                                trending=trending, affinity=dict(per_id["affinity"][uid]), ts=a.last_ts)
                    for uid, a in users.items()]
        scanned = self._add_content(contexts)
        self._add_support(contexts, scanned, deleted=int(single["deleted"]) > 0)
        return contexts

    def for_stored_users(self, at: Mapping[str, int]) -> list[UserContext]:
        """Contexts for users as stored, decided at ``at[user]`` ms (or their newest event, if later).

        Search and the evaluator use this; an unknown user gets the context of a user with no history.
        """
        pipe = self.redis.pipeline(transaction=False)
        for uid in at:
            pipe.lrange(self.keys.user_recent(uid), 0, self.settings.rec.recent_items - 1)
            pipe.hget(self.keys.user_state(uid), "last_seen")
        replies = pipe.execute()
        anchors = {uid: StoredAnchor(recent=[_text(r) for r in recent], last_ts=max(ts, int(last_seen or 0)))
                   for (uid, ts), recent, last_seen in zip(at.items(), replies[0::2], replies[1::2], strict=True)}
        return self.for_users(anchors)

    def _add_content(self, contexts: list[UserContext]) -> dict[str, Scored]:
        """Profile vectors and their nearest items, for users whose items have vectors; returns each such
        user's wider search for the fresh source (:meth:`_add_support` picks from it)."""
        s = self.settings
        version = self.content.active()
        if version is None or s.rec.content_candidates <= 0:
            return {}
        strongest = {c.user_id: c.items[: s.rec.profile_items] for c in contexts}
        ids = sorted({i for items in strongest.values() for i, _ in items})
        vectors = self.content.store.vectors(version, ids)
        with_profile = []
        for ctx in contexts:
            vec = profile_vector(vectors, strongest[ctx.user_id])
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
        candidates = sorted({i for c in contexts for i, _ in (*c.items, *c.popular, *c.content, *c.trending)}
                            | {i for c in contexts for ns in c.covis.values() for i, _ in ns}
                            | {i for near in scanned.values() for i, _ in near})
        if not candidates:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zmscore(self.keys.popularity(), candidates)
        if deleted:
            pipe.smismember(self.keys.deleted_items(), candidates)
        replies = pipe.execute()
        support = {i: float(v) for i, v in zip(candidates, replies[0], strict=True) if v is not None}
        excluded = frozenset(i for i, f in zip(candidates, replies[1], strict=True) if f) if deleted \
            else frozenset()
        s = self.settings.rec
        for c in contexts:
            c.support = support
            c.support_scale = self._popularity_now.weight(1.0, -c.ts) if c.ts else 0.0
            c.excluded = excluded
            near = scanned.get(c.user_id)
            if near:
                c.fresh = [(i, sim) for i, sim in near if c.support_at(i) < s.fresh_below][: s.fresh_candidates]

    def _by_bucket(self, ids: list[str]) -> list[list[str]]:
        groups: dict[int, list[str]] = defaultdict(list)
        for i in ids:
            groups[self.keys.bucket(i)].append(i)
        return list(groups.values())
