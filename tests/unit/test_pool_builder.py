"""The batch pool builder against a per-user reference written the plain way (one dict per source).

The reference below is the definition the fused model's features were designed with; the batch
builder must give the same pools, row for row and feature for feature, for any mix of users.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import pytest

from fusionrec.online.candidates.context import UserContext, normalised, spread
from fusionrec.online.candidates.features import (
    DAYPARTS,
    FEATURES,
    INDEX,
    PRIOR,
    SOURCES,
    CandidatePool,
    ItemInfo,
    build_pool,
    build_pools,
    covis_scores,
    daypart,
    price_band,
)


def _ranks(pairs: list[tuple[str, float]]) -> dict[str, float]:
    return {item: 1.0 / (1.0 + r) for r, (item, _) in enumerate(pairs)}


def reference_pool(ctx: UserContext, info: Mapping[str, ItemInfo], size: int,
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
        "fresh": spread(ctx.fresh),
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
        "fresh": scores["fresh"], "popular": scores["popular"], "trending": scores["trending"],
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
        # the item's decayed popularity at decision time: 1.0 is 1,000 purchases' worth
        X[r, INDEX["support"]] = min(1.0, math.log1p(ctx.support_at(item) / 8.0) / math.log1p(1000.0))
        if meta is not None and meta.listed is not None and ctx.ts >= meta.listed:
            X[r, INDEX["item_new"]] = 0.5 ** ((ctx.ts - meta.listed) / (7 * 86_400_000))
        if item in ctx.bought:
            n, first, last = ctx.bought[item]
            elapsed = max(ctx.ts - last, 0)
            X[r, INDEX["bought_n"]] = min(1.0, math.log1p(n) / math.log1p(50))
            X[r, INDEX["since_bought"]] = 1.0 / (1.0 + elapsed / (7 * 86_400_000))
            if n >= 2 and last > first:
                cycle = (last - first) / (n - 1)
                X[r, INDEX["cycle_due"]] = math.exp(-0.5 * math.log(max(elapsed, 1) / cycle) ** 2)


ITEMS = [f"i{n}" for n in range(60)]
CATS = ["dairy", "bakery", "produce", None]


def _bought(rng: random.Random) -> tuple[int, int, int]:
    """(purchases, first, last) around the batch's decision times: one purchase, several on one day,
    cycles of days, a last purchase after the decision (a late event)."""
    day = 86_400_000
    n = rng.choice([1, 1, 2, 3, 7])
    last = 1_700_000_000_000 - rng.choice([0, day // 2, 3 * day, 20 * day, -2 * day])
    return n, last - (0 if n == 1 else rng.choice([0, n * day, 9 * n * day])), last


def _random_batch(rng: random.Random, n_users: int) -> tuple[list[UserContext], dict[str, ItemInfo]]:
    """Users as a batch reads them: one popular and trending list and one neighbour list per item,
    shared; small integer weights, so ties are common."""
    popular = [(i, float(rng.randint(0, 5))) for i in rng.sample(ITEMS, 15)]
    trending = [(i, float(rng.randint(1, 3))) for i in rng.sample(ITEMS, rng.choice([0, 5]))]
    neighbours = {i: [(j, float(rng.randint(0, 4))) for j in rng.sample(ITEMS, rng.randint(0, 8))] for i in ITEMS}
    excluded = frozenset(rng.sample(ITEMS, 3))
    support = {i: rng.choice([0.5, 8.0, 40.0, 1e4]) * 1e6 for i in rng.sample(ITEMS, 40)}
    other_read = {i: 16.0 * 1e6 for i in ITEMS}  # a context from another read
    contexts = []
    for u in range(n_users):
        recent = rng.sample(ITEMS, rng.randint(0, 5))
        if recent and rng.random() < 0.2:
            recent.append(recent[0])  # a list written by two processes at once may hold an item twice
        contexts.append(UserContext(
            user_id=f"u{u}", recent=recent,
            items=[(i, float(rng.randint(1, 6)) * 1e3) for i in rng.sample(ITEMS, rng.randint(0, 12))],
            covis={a: neighbours[a] for a in recent}, popular=popular, trending=trending,
            content=[(i, rng.choice([0.5, 0.7, 0.9])) for i in rng.sample(ITEMS, rng.randint(0, 6))],
            bought={i: _bought(rng) for i in rng.sample(ITEMS, rng.randint(0, 8))},
            fresh=[(i, rng.choice([0.6, 0.8])) for i in rng.sample(ITEMS, rng.choice([0, 0, 3]))],
            support=other_read if rng.random() < 0.1 else support, support_scale=rng.choice([0.0, 1e-6, 2e-6]),
            excluded=excluded if rng.random() < 0.5 else frozenset(),
            affinity={f"c:{c}": float(rng.randint(0, 4)) for c in CATS if c} | {"b:acme": 2.0},
            ts=1_700_000_000_000 + rng.randint(0, 86_400_000)))
    info = {i: ItemInfo(rng.choice(CATS), rng.choice(["acme", None]), rng.choice([None, 0.5, 2.0, 15.0, 99.0]),
                        rng.choice([None, 1_700_000_000_000 - 3 * 86_400_000, 1_700_000_000_000 + 43_200_000]))
            for i in ITEMS if rng.random() < 0.8}
    return contexts, info


@pytest.mark.parametrize("seed", range(12))
def test_batch_pools_equal_the_reference_row_for_row(seed):
    rng = random.Random(seed)
    contexts, info = _random_batch(rng, rng.randint(1, 40))
    decay = [rng.choice([0.0, 1e-3, 2e-3]) for _ in contexts]
    vectors = frozenset(rng.sample(ITEMS, 20))
    size = rng.choice([5, 10, 30])
    pools = build_pools(contexts, info, size, vectors, decay)
    assert [p.user_id for p in pools] == [c.user_id for c in contexts]
    for ctx, pool, d in zip(contexts, pools, decay, strict=True):
        ref = reference_pool(ctx, info, size, vectors, d)
        assert pool.items == ref.items
        np.testing.assert_array_equal(pool.X, ref.X)
        assert (pool.ts, pool.profile) == (ref.ts, ref.profile)
        assert pool.codes is not None and np.argsort(pool.codes).tolist() == np.argsort(pool.items).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_given_rows_equal_the_reference(seed):
    rng = random.Random(100 + seed)
    contexts, info = _random_batch(rng, 6)
    only = [*rng.sample(ITEMS, 8), "never-seen", ITEMS[0], ITEMS[0]]
    for ctx, pool in zip(contexts, build_pools(contexts, info, 10, only=only), strict=True):
        ref = reference_pool(ctx, info, 10, only=only)
        assert pool.items == ref.items == list(dict.fromkeys(only))
        np.testing.assert_array_equal(pool.X, ref.X)


def test_users_without_candidates_get_empty_pools():
    empty = UserContext(user_id="nobody", recent=[])
    pools = build_pools([empty, empty], {}, 10)
    assert [len(p) for p in pools] == [0, 0] and pools[0].X.shape == (0, len(FEATURES))
    assert build_pools([], {}, 10) == []
    assert build_pool(empty, {}, 10).items == []


def test_ranked_orders_break_ties_by_item_id():
    from fusionrec.online.ranking.fusion import ranked_orders

    rng = random.Random(7)
    contexts, info = _random_batch(rng, 25)
    pools = build_pools(contexts[:12], info, 30) + build_pools(contexts[12:], info, 30)  # two builds' codes
    fused = np.array([rng.choice([0.1, 0.2, 0.3]) for p in pools for _ in p.items], dtype=np.float32)
    orders = ranked_orders(pools, fused)
    start = 0
    for pool, order in zip(pools, orders, strict=True):
        scores = fused[start: start + len(pool)]
        assert order == sorted(range(len(pool)), key=lambda r: (-scores[r], pool.items[r]))
        start += len(pool)
    # pools without codes (a logged decision's pool, say) are ordered by the ids themselves
    assert ranked_orders([dataclasses.replace(p, codes=None) for p in pools], fused) == orders
    assert ranked_orders([build_pool(UserContext(user_id="x", recent=[]), {}, 5)], np.zeros(0)) == [[]]
