"""Rankers turn one user's candidates into a scored, explained top-K.

A ranker sees a :class:`UserContext` (what Redis holds about the user and the candidate sources) and
returns :class:`Recommendation` s whose ``sources`` say how much each candidate source contributed.
:class:`SimpleRanker` is a fixed-weight blend; the learned fusion ranker implements the same protocol.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from fusionrec.online.candidates.context import UserContext, normalised, spread
from fusionrec.online.candidates.features import covis_scores

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
    on_read: bool = False  # ranked by the reader that answers, from state newer than the stored list


@dataclass
class Ranked:
    """One user's ranking: the stored top-K and, for learned rankers, the scored pool in ranked order."""

    items: list[Recommendation]
    pool: Any = None  # fusionrec.online.candidates.features.CandidatePool
    order: list[int] | None = None
    model: int = 0  # fusion checkpoint number that ranked (0: none)


def model_label(ranker: str, checkpoint: int) -> str:
    """What a list's ``model`` says: the ranker, and the fusion checkpoint that ranked (when one did)."""
    return f"{ranker}-{checkpoint}" if checkpoint else ranker


class Ranker(Protocol):
    name: str

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]: ...

    def rank_many(self, contexts: Sequence[UserContext], k: int) -> list[Ranked]: ...


class SimpleRanker:
    """Fixed-weight blend of repeat, co-visitation, content similarity and popularity, each in [0, 1].

    Co-visitation neighbours of more recent items weigh more (1 / (1 + position)).
    """

    name = "simple-v2"

    def __init__(self, repeat: float = 1.0, covis: float = 0.6, content: float = 0.3, popular: float = 0.1) -> None:
        self.weights = {"repeat": repeat, "covis": covis, "content": content, "popular": popular}
        self._popular_cache: tuple[list[tuple[str, float]], dict[str, float]] | None = None

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]:
        per_source = {
            "repeat": normalised(ctx.items),
            "covis": covis_scores(ctx),
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
            self._popular_cache = (popular, normalised(popular))
        return self._popular_cache[1]
