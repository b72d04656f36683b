"""Rankers turn one user's candidates into a scored, explained top-K.

A ranker sees a :class:`UserContext` (what Redis holds about the user and the candidate sources) and
returns :class:`Recommendation` s whose ``sources`` say how much each candidate source contributed.
:class:`SimpleRanker` is a fixed-weight blend; the learned fusion ranker implements the same protocol.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np

REC_SCHEMA_VERSION = 1


class Recommendation(msgspec.Struct, frozen=True):
    item_id: str
    score: float
    # candidate source -> its contribution to ``score``
    sources: dict[str, float]


class RecList(msgspec.Struct, frozen=True):
    """What is stored under a user's ``rec`` key (JSON)."""

    user_id: str
    items: list[Recommendation]
    model: str
    generated_at: int  # ms, wall clock
    event_ts: int  # ms, event time of the newest event applied for this user
    fallback: bool = False
    v: int = REC_SCHEMA_VERSION


@dataclass
class UserContext:
    user_id: str
    recent: list[str]
    # the user's own decayed item weights, strongest first (repeat candidates)
    items: list[tuple[str, float]] = field(default_factory=list)
    # recent item -> its co-visitation neighbours with weights, strongest first
    covis: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    popular: list[tuple[str, float]] = field(default_factory=list)
    # nearest items to the user's profile vector, with similarity in [0, 1], nearest first
    content: list[tuple[str, float]] = field(default_factory=list)
    # (model version, unit vector) when the user's items have vectors
    profile: tuple[str, np.ndarray] | None = None
    excluded: frozenset[str] = frozenset()
    # globally trending items (faust hopping windows), strongest first
    trending: list[tuple[str, float]] = field(default_factory=list)
    # decayed category/brand affinity, members ``c:<category>`` / ``b:<brand>``
    affinity: dict[str, float] = field(default_factory=dict)
    # decision time (ms): event time of the newest event the user's state includes
    ts: int = 0


@dataclass
class Ranked:
    """One user's ranking: the stored top-K and, for learned rankers, the scored pool in ranked order."""

    items: list[Recommendation]
    pool: Any = None  # online.features.Pool
    order: list[int] | None = None
    model: int = 0  # fusion checkpoint number that ranked (0: none)


class Ranker(Protocol):
    name: str

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]: ...

    def rank_many(self, contexts: Sequence[UserContext], k: int) -> list[Ranked]: ...


def _normalised(pairs: list[tuple[str, float]]) -> dict[str, float]:
    if not pairs:
        return {}
    top = max(score for _, score in pairs)
    if top <= 0:
        return {}
    return {item: score / top for item, score in pairs}


def spread(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """Min-max scaled to [0, 1]; similarity scores bunch near the top, this keeps their order visible."""
    if not pairs:
        return {}
    lo, hi = min(s for _, s in pairs), max(s for _, s in pairs)
    if hi - lo <= 1e-12:
        return {item: 1.0 for item, _ in pairs}
    return {item: (s - lo) / (hi - lo) for item, s in pairs}


class SimpleRanker:
    """Fixed-weight blend of repeat, co-visitation, content similarity and popularity, each in [0, 1].

    Co-visitation neighbours of more recent items weigh more (1 / (1 + position)).
    """

    name = "simple-v2"

    def __init__(self, repeat: float = 1.0, covis: float = 0.6, content: float = 0.3, popular: float = 0.1) -> None:
        self.weights = {"repeat": repeat, "covis": covis, "content": content, "popular": popular}
        self._popular_cache: tuple[list[tuple[str, float]], dict[str, float]] | None = None

    def covis_scores(self, ctx: UserContext) -> dict[str, float]:
        raw: dict[str, float] = defaultdict(float)
        for pos, anchor in enumerate(ctx.recent):
            neighbours = _normalised(ctx.covis.get(anchor, []))
            for item, w in neighbours.items():
                raw[item] += w / (1.0 + pos)
        return _normalised(list(raw.items()))

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]:
        per_source = {
            "repeat": _normalised(ctx.items),
            "covis": self.covis_scores(ctx),
            "content": spread(ctx.content),
            "popular": self._popular(ctx.popular),
        }
        totals: dict[str, float] = defaultdict(float)
        for source, scores in per_source.items():
            weight = self.weights[source]
            for item, s in scores.items():
                totals[item] += weight * s
        for item in ctx.excluded:
            totals.pop(item, None)
        top = heapq.nlargest(k, totals.items(), key=lambda kv: kv[1])
        return [Recommendation(item_id=item, score=round(score, 6),
                               sources={src: round(self.weights[src] * scores[item], 6)
                                        for src, scores in per_source.items() if item in scores})
                for item, score in top]

    def rank_many(self, contexts: Sequence[UserContext], k: int) -> list[Ranked]:
        return [Ranked(items=self.rank(ctx, k)) for ctx in contexts]

    def _popular(self, popular: list[tuple[str, float]]) -> dict[str, float]:
        # The popular list is shared by every user of a batch: normalise it once.
        if self._popular_cache is None or self._popular_cache[0] is not popular:
            self._popular_cache = (popular, _normalised(popular))
        return self._popular_cache[1]
