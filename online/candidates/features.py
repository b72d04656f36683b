"""Candidate pools and their features: what every scorer sees for a (user, candidate) pair.

A :class:`CandidatePool` is one user's candidates at one decision time: the union of the candidate sources
(repeat, co-visitation, content, popularity, trending), pre-ranked by a fixed blend and cut to
``size``, with one row of :data:`FEATURES` per candidate. Every feature is bounded (mostly in
[0, 1]) so no scaler is needed and one extreme value cannot dominate a linear model.

Dense inputs for the torch head (profile vector, item vectors) are not part of the row: the pool
keeps the profile vector, and item vectors are looked up by id and model version when needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fusionrec.online.candidates.context import UserContext, normalised, spread

SOURCES = ("repeat", "covis", "content", "popular", "trending")
PRICE_BANDS = (1.0, 3.0, 10.0, 30.0)  # upper bounds; the last band is open
DAYPARTS = ("night", "morning", "afternoon", "evening")

FEATURES: tuple[str, ...] = (
    "repeat", "repeat_rank", "repeat_strength", "recent", "covis", "covis_rank", "content", "content_sim", "popular",
    "pop_rank", "trending", "aff_category", "aff_brand", "has_vector",
    *(f"src_{s}" for s in SOURCES),
    "price_none", *(f"price_b{i}" for i in range(len(PRICE_BANDS) + 1)),
    *(f"hour_{d}" for d in DAYPARTS),
)
INDEX = {name: i for i, name in enumerate(FEATURES)}
# What a model without LLM vectors may not look at.
VECTOR_FEATURES = ("content", "content_sim", "has_vector", "src_content")

# Fixed pre-ranking blend used to cut a pool to size (and the fusion's prior weights).
PRIOR = {"repeat": 1.0, "covis": 0.6, "content": 0.3, "popular": 0.1, "trending": 0.1}


@dataclass(frozen=True)
class ItemInfo:
    category: str | None = None
    brand: str | None = None
    price: float | None = None


@dataclass
class CandidatePool:
    user_id: str
    ts: int  # decision time (ms): event time of the newest event the state includes
    items: list[str]
    X: np.ndarray  # (len(items), len(FEATURES)) float32
    profile: tuple[str, np.ndarray] | None = None  # (vector version, unit vector)

    def __len__(self) -> int:
        return len(self.items)

    def column(self, name: str) -> np.ndarray:
        return self.X[:, INDEX[name]]


def _ranks(pairs: list[tuple[str, float]]) -> dict[str, float]:
    return {item: 1.0 / (1.0 + r) for r, (item, _) in enumerate(pairs)}


def covis_scores(ctx: UserContext) -> dict[str, float]:
    """Co-visitation neighbours of the user's recent items; neighbours of newer items weigh more."""
    raw: dict[str, float] = defaultdict(float)
    for pos, anchor in enumerate(ctx.recent):
        for item, w in normalised(ctx.covis.get(anchor, [])).items():
            raw[item] += w / (1.0 + pos)
    return normalised(list(raw.items()))


def price_band(price: float | None) -> int:
    """-1 for a missing price, else the index of the first band bound above it."""
    if price is None or not math.isfinite(price) or price < 0:
        return -1
    for i, bound in enumerate(PRICE_BANDS):
        if price < bound:
            return i
    return len(PRICE_BANDS)


def daypart(ts_ms: int) -> int:
    return int((ts_ms // 3_600_000) % 24) // 6


def build_pool(ctx: UserContext, info: Mapping[str, ItemInfo], size: int,
               has_vector: frozenset[str] | set[str] = frozenset(), decay_now: float = 0.0,
               only: list[str] | None = None) -> CandidatePool:
    """Candidates of one user with their features, the ``size`` best by the prior blend.

    ``decay_now`` turns the user's forward-decayed item weights into their value at decision time
    (``exp(-rate * (ts - epoch))``); 0 leaves ``repeat_strength`` out. ``only`` gives the rows
    instead (search results, say): the user's features for exactly those items, in that order.
    """
    scores = {
        "repeat": normalised(ctx.items),
        "covis": covis_scores(ctx),
        "content": spread(ctx.content),
        "popular": normalised(ctx.popular),
        "trending": normalised(ctx.trending),
    }
    prior: dict[str, float] = defaultdict(float)
    for source, per_item in scores.items():
        for item, s in per_item.items():
            prior[item] += PRIOR[source] * s
    for item in ctx.excluded:
        prior.pop(item, None)
    items = list(dict.fromkeys(only)) if only is not None else sorted(prior, key=lambda i: (-prior[i], i))[:size]
    X = np.zeros((len(items), len(FEATURES)), dtype=np.float32)
    row = {item: r for r, item in enumerate(items)}
    _fill(X, row, scores, ctx, decay_now)
    _fill_item(X, items, ctx, info, has_vector)
    return CandidatePool(user_id=ctx.user_id, ts=ctx.ts, items=items, X=X, profile=ctx.profile)


def _fill(X: np.ndarray, row: dict[str, int], scores: dict[str, dict[str, float]], ctx: UserContext,
          decay_now: float) -> None:
    columns = {
        # absolute interest: decayed weight now, on a log scale where 1.0 is ~50 purchases' worth
        "repeat_strength": {i: min(1.0, math.log1p(w * decay_now / 8.0) / math.log1p(50.0))
                            for i, w in ctx.items} if decay_now > 0 else {},
        "repeat": scores["repeat"], "covis": scores["covis"], "content": scores["content"],
        "popular": scores["popular"], "trending": scores["trending"],
        "repeat_rank": _ranks(ctx.items), "pop_rank": _ranks(ctx.popular),
        "covis_rank": _ranks(sorted(scores["covis"].items(), key=lambda kv: -kv[1])),
        "content_sim": dict(ctx.content),
        "recent": {item: 1.0 / (1.0 + p) for p, item in reversed(list(enumerate(ctx.recent)))},
    }
    for name, values in columns.items():
        col = INDEX[name]
        for item, v in values.items():
            r = row.get(item)
            if r is not None:
                X[r, col] = v
    for source in SOURCES:
        col = INDEX[f"src_{source}"]
        for item in scores[source]:
            r = row.get(item)
            if r is not None:
                X[r, col] = 1.0
    X[:, INDEX[f"hour_{DAYPARTS[daypart(ctx.ts)]}"]] = 1.0


def _fill_item(X: np.ndarray, items: list[str], ctx: UserContext, info: Mapping[str, ItemInfo],
               has_vector: frozenset[str] | set[str]) -> None:
    top_aff = max(ctx.affinity.values(), default=0.0)
    aff = {k: v / top_aff for k, v in ctx.affinity.items()} if top_aff > 0 else {}
    c_cat, c_brand, c_vec, c_none = INDEX["aff_category"], INDEX["aff_brand"], INDEX["has_vector"], INDEX["price_none"]
    for r, item in enumerate(items):
        meta = info.get(item)
        if meta is not None:
            if meta.category:
                X[r, c_cat] = aff.get(f"c:{meta.category}", 0.0)
            if meta.brand:
                X[r, c_brand] = aff.get(f"b:{meta.brand}", 0.0)
        band = price_band(meta.price if meta else None)
        X[r, c_none + 1 + band] = 1.0  # band -1 lands on price_none
        if item in has_vector:
            X[r, c_vec] = 1.0
