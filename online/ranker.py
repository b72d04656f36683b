"""Rankers turn one user's candidates into a scored, explained top-K.

A ranker sees a :class:`UserContext` (what Redis holds about the user and the candidate sources) and
returns :class:`Recommendation` s whose ``sources`` say how much each candidate source contributed.
:class:`SimpleRanker` is a fixed-weight blend; the learned fusion ranker implements the same protocol.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

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
    excluded: frozenset[str] = frozenset()


class Ranker(Protocol):
    name: str

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]: ...


def _normalised(pairs: list[tuple[str, float]]) -> dict[str, float]:
    if not pairs:
        return {}
    top = max(score for _, score in pairs)
    if top <= 0:
        return {}
    return {item: score / top for item, score in pairs}


class SimpleRanker:
    """Fixed-weight blend of repeat, co-visitation and popularity, each scaled to [0, 1].

    Co-visitation neighbours of more recent items weigh more (1 / (1 + position)).
    """

    name = "simple-v1"

    def __init__(self, repeat: float = 1.0, covis: float = 0.6, popular: float = 0.1) -> None:
        self.weights = {"repeat": repeat, "covis": covis, "popular": popular}
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

    def _popular(self, popular: list[tuple[str, float]]) -> dict[str, float]:
        # The popular list is shared by every user of a batch: normalise it once.
        if self._popular_cache is None or self._popular_cache[0] is not popular:
            self._popular_cache = (popular, _normalised(popular))
        return self._popular_cache[1]
