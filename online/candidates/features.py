"""Candidate pools and their features: what every scorer sees for a (user, candidate) pair.

A :class:`CandidatePool` is one user's candidates at one decision time: the union of the candidate sources
(repeat, co-visitation, content, fresh, popularity, trending), pre-ranked by a fixed blend and cut to
``size``, with one row of :data:`FEATURES` per candidate. Every feature is bounded (mostly in
[0, 1]) so no scaler is needed and one extreme value cannot dominate a linear model.

Dense inputs for the torch head (profile vector, item vectors) are not part of the row: the pool
keeps the profile vector, and item vectors are looked up by id and model version when needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fusionrec.online.candidates.context import Scored, UserContext, normalised

SOURCES = ("repeat", "covis", "content", "fresh", "popular", "trending")
PRICE_BANDS = (1.0, 3.0, 10.0, 30.0)  # upper bounds; the last band is open
DAYPARTS = ("night", "morning", "afternoon", "evening")

FEATURES: tuple[str, ...] = (
    "repeat", "repeat_rank", "repeat_strength", "recent", "covis", "covis_rank", "content", "content_sim", "popular",
    "pop_rank", "trending", "aff_category", "aff_brand", "has_vector", "fresh", "support", "item_new",
    "bought_n", "since_bought", "cycle_due",
    *(f"src_{s}" for s in SOURCES),
    "price_none", *(f"price_b{i}" for i in range(len(PRICE_BANDS) + 1)),
    *(f"hour_{d}" for d in DAYPARTS),
)
INDEX = {name: i for i, name in enumerate(FEATURES)}
# What a model without LLM vectors may not look at.
VECTOR_FEATURES = ("content", "content_sim", "has_vector", "src_content", "fresh", "src_fresh")
# What the river scorer reads (with or without vectors: see fusionrec.online.learning.model.FusionModel).
SPARSE_FEATURES = tuple(f for f in FEATURES if f not in VECTOR_FEATURES)

# Fixed pre-ranking blend used to cut a pool to size (and the fusion's prior weights).
PRIOR = {"repeat": 1.0, "covis": 0.6, "content": 0.3, "fresh": 0.3, "popular": 0.1, "trending": 0.1}


@dataclass(frozen=True)
class ItemInfo:
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    listed: int | None = None  # when the catalog first listed the item (ms), if known


@dataclass
class CandidatePool:
    user_id: str
    ts: int  # decision time (ms): event time of the newest event the state includes
    items: list[str]
    X: np.ndarray  # (len(items), len(FEATURES)) float32
    profile: tuple[str, np.ndarray] | None = None  # (vector version, unit vector)
    # the items' ranks in id order among the items of the build that made the pool: ties in a
    # ranking break by it (None: compare the ids themselves)
    codes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.items)

    def column(self, name: str) -> np.ndarray:
        return self.X[:, INDEX[name]]


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


# Item metadata: a mapping, or a function that returns it for the items asked (only the pools' items)
ItemInfos = Mapping[str, ItemInfo] | Callable[[list[str]], Mapping[str, ItemInfo]]


# the item_new feature halves every this long after the item's listing (FUSIONREC_REC_ITEM_NEW_HALF_LIFE_S)
ITEM_NEW_HALF_LIFE_S = 7 * 86_400.0
# support at or above this many purchases' weight (8 each) is 1
SUPPORT_FULL = 1_000.0
# since_bought is 1 / (1 + elapsed / SINCE_BOUGHT_MS): 0.5 a week after the last purchase
SINCE_BOUGHT_MS = 7 * 86_400_000
# bought_n is 1 at this many purchases of the item (log scale)
BOUGHT_FULL = 50


def build_pool(ctx: UserContext, info: ItemInfos, size: int,
               has_vector: frozenset[str] | set[str] = frozenset(), decay_now: float = 0.0,
               only: list[str] | None = None) -> CandidatePool:
    """One user's pool: :func:`build_pools` of one context."""
    return build_pools([ctx], info, size, has_vector, [decay_now], only)[0]


def build_pools(contexts: Sequence[UserContext], info: ItemInfos, size: int,
                has_vector: frozenset[str] | set[str] = frozenset(), decay_now: Sequence[float] | None = None,
                only: list[str] | None = None,
                item_new_half_life_s: float = ITEM_NEW_HALF_LIFE_S) -> list[CandidatePool]:
    """Each user's candidates with their features, the ``size`` best by the prior blend.

    ``decay_now[u]`` turns user u's forward-decayed item weights into their value at decision time
    (``exp(-rate * (ts - epoch))``); 0 leaves ``repeat_strength`` out. ``only`` gives the rows
    instead (search results, say): the users' features for exactly those items, in that order.
    ``info`` is the items' catalog metadata, or a function giving it for the items the pools hold.

    Per candidate source: every score is ``normalised`` (divided by the user's largest) except
    content and fresh similarity, which are ``spread`` (min-max); co-visitation is each recent item's
    normalised neighbours weighted ``1 / (1 + position)``, summed, normalised. The prior is the
    :data:`PRIOR`-weighted sum; a pool is its user's candidates by (-prior, item id).

    All users are built at once, as flat (user, item) columns: the Python work is one pass over
    the entries the contexts hold, the rest is numpy. The shared lists of a batch (popular,
    trending, a recent item's neighbours) are normalised once.

    ``support`` is the item's decayed popularity at decision time, ``log1p(s / 8) / log1p(SUPPORT_FULL)``
    capped at 1 (0: nobody has touched it lately); ``item_new`` is ``2 ** (-age / half_life)`` of the
    time since the catalog listed the item (0 when the listing time is unknown or after the decision).

    The user's purchases of the item: ``bought_n`` (``log1p(n) / log1p(BOUGHT_FULL)``, capped at 1),
    ``since_bought`` (``1 / (1 + elapsed / SINCE_BOUGHT_MS)`` since the last purchase) and ``cycle_due``:
    with two purchases or more, the user's own cycle is ``(last - first) / (n - 1)`` and
    ``cycle_due = exp(-ln(elapsed / cycle) ** 2 / 2)``, 1 when the elapsed time is one cycle (0 with
    fewer purchases or no time between them). Items never bought have 0 in all three.
    """
    if not contexts:
        return []
    return _PoolBuilder(contexts, info, has_vector, list(decay_now or [0.0] * len(contexts)),
                        item_new_half_life_s).build(size, only)


class _Entries:
    """Flat (user, item id, value) entries of one source, in the order the contexts hold them."""

    __slots__ = ("users", "items", "values")

    def __init__(self, users: list[int], items: list[int], values: list[float]) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.float64)


class _PoolBuilder:
    """The flat-column build behind :func:`build_pools`; item ids are given in first-seen order."""

    def __init__(self, contexts: Sequence[UserContext], info: ItemInfos,
                 has_vector: frozenset[str] | set[str], decay_now: list[float], item_new_half_life_s: float) -> None:
        self.contexts = contexts
        self.info = info
        self.has_vector = has_vector
        self.decay_now = decay_now
        self.item_new_rate = math.log(2) / (item_new_half_life_s * 1000.0)
        self.vocab: dict[str, int] = {}

    def _ids(self, items: Sequence[str]) -> list[int]:
        vocab = self.vocab
        return [vocab.setdefault(i, len(vocab)) for i in items]

    def _per_user(self, lists: list[Scored]) -> _Entries:
        """Entries of a per-user scored list; one shared list object is read once."""
        users: list[int] = []
        items: list[int] = []
        values: list[float] = []
        done: dict[int, tuple[list[int], list[float]]] = {}
        for u, pairs in enumerate(lists):
            if not pairs:
                continue
            known = done.get(id(pairs))
            if known is None:
                known = done[id(pairs)] = (self._ids([i for i, _ in pairs]), [float(v) for _, v in pairs])
            users.extend([u] * len(pairs))
            items.extend(known[0])
            values.extend(known[1])
        return _Entries(users, items, values)

    def build(self, size: int, only: list[str] | None) -> list[CandidatePool]:
        ctxs = self.contexts
        n_users = len(ctxs)
        repeat = self._per_user([c.items for c in ctxs])
        content = self._per_user([c.content for c in ctxs])
        fresh = self._per_user([c.fresh for c in ctxs])
        popular = self._per_user([c.popular for c in ctxs])
        trending = self._per_user([c.trending for c in ctxs])
        covis_raw = self._covis_entries()
        recent = self._per_user([[(i, 1.0 / (1.0 + p)) for p, i in enumerate(c.recent)] for c in ctxs])
        only_ids = self._ids(list(dict.fromkeys(only))) if only is not None else None
        n_items = max(1, len(self.vocab))

        def key(e: _Entries) -> np.ndarray:
            return e.users * n_items + e.items

        scores = {
            "repeat": _normalised(*_last(key(repeat), repeat.values), n_items),
            "covis": _normalised(*_summed(key(covis_raw), covis_raw.values), n_items),
            "content": _spread(*_last(key(content), content.values), n_items),
            "fresh": _spread(*_last(key(fresh), fresh.values), n_items),
            "popular": _normalised(*_last(key(popular), popular.values), n_items),
            "trending": _normalised(*_last(key(trending), trending.values), n_items),
        }
        names = [""] * len(self.vocab)
        for item, i in self.vocab.items():
            names[i] = item
        order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, np.int64)
        by_name = np.empty(len(names), dtype=np.int64)
        by_name[order] = np.arange(len(names))  # item id -> its rank in string order (the tie-break)
        if only_ids is None:
            rows = self._select(scores, size, n_items, by_name)
        else:
            rows = (np.repeat(np.arange(n_users, dtype=np.int64), len(only_ids)) * n_items
                    + np.tile(np.asarray(only_ids, dtype=np.int64), n_users))
        X = np.zeros((len(rows), len(FEATURES)), dtype=np.float32)
        row_users = rows // n_items
        row_items = rows % n_items
        look = _Lookup(rows)
        for source, (k, v) in scores.items():
            look.fill(X, INDEX[source], k, v)
            look.fill(X, INDEX[f"src_{source}"], k, np.ones(len(k)))
        look.fill(X, INDEX["repeat_rank"], *_last(key(repeat), 1.0 / (1.0 + _positions(repeat.users))))
        look.fill(X, INDEX["pop_rank"], *_last(key(popular), 1.0 / (1.0 + _positions(popular.users))))
        look.fill(X, INDEX["content_sim"], *_last(key(content), content.values))
        look.fill(X, INDEX["recent"], *_first(key(recent), recent.values))
        k, v = scores["covis"]
        look.fill(X, INDEX["covis_rank"], k, 1.0 / (1.0 + _covis_ranks(k, v, key(covis_raw), n_items)))
        decay = np.asarray(self.decay_now, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rk, rw = _last(key(repeat), repeat.values * decay[repeat.users])
            strength = np.minimum(1.0, np.log1p(rw / 8.0) / math.log1p(50.0))
        live = decay[rk // n_items] > 0
        look.fill(X, INDEX["repeat_strength"], rk[live], strength[live])
        hours = np.asarray([INDEX[f"hour_{DAYPARTS[daypart(c.ts)]}"] for c in ctxs], dtype=np.int64)
        X[np.arange(len(rows)), hours[row_users]] = 1.0
        self._fill_items(X, row_users, row_items, names)
        self._fill_bought(X, look, n_items)
        bounds = np.searchsorted(row_users, np.arange(n_users + 1))
        codes = by_name[row_items]
        items = np.asarray(names, dtype=object)[row_items].tolist() if names else []
        return [CandidatePool(user_id=c.user_id, ts=c.ts, items=items[lo:hi], X=X[lo:hi], profile=c.profile,
                              codes=codes[lo:hi])
                for c, lo, hi in zip(ctxs, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]

    def _covis_entries(self) -> _Entries:
        """Each user's recent items' normalised neighbours, weighted ``1 / (1 + position)``."""
        users: list[int] = []
        items: list[int] = []
        values: list[float] = []
        done: dict[int, tuple[list[int], list[float]]] = {}
        for u, c in enumerate(self.contexts):
            for pos, anchor in enumerate(c.recent):
                pairs = c.covis.get(anchor)
                if not pairs:
                    continue
                known = done.get(id(pairs))
                if known is None:
                    normal = normalised(pairs)
                    known = done[id(pairs)] = (self._ids(list(normal)), list(normal.values()))
                users.extend([u] * len(known[0]))
                items.extend(known[0])
                w = 1.0 + pos
                values.extend([x / w for x in known[1]])
        return _Entries(users, items, values)

    def _select(self, scores: dict[str, tuple[np.ndarray, np.ndarray]], size: int, n_items: int,
                by_name: np.ndarray) -> np.ndarray:
        """Row keys of each user's ``size`` best candidates by (-prior, item), users in order."""
        keys = np.concatenate([k for k, _ in scores.values()])
        weighted = np.concatenate([PRIOR[s] * v for s, (_, v) in scores.items()])
        pairs, inverse = np.unique(keys, return_inverse=True)
        prior = np.bincount(inverse, weights=weighted, minlength=len(pairs))
        excluded = self._excluded(pairs, n_items)
        pairs, prior = pairs[~excluded], prior[~excluded]
        users = pairs // n_items
        ranked = np.lexsort((by_name[pairs % n_items], -prior, users))
        pairs, users = pairs[ranked], users[ranked]
        return pairs[_positions(users) < size]

    def _excluded(self, pairs: np.ndarray, n_items: int) -> np.ndarray:
        out = np.zeros(len(pairs), dtype=bool)
        groups: dict[int, tuple[frozenset[str], list[int]]] = {}
        for u, c in enumerate(self.contexts):
            if c.excluded:
                groups.setdefault(id(c.excluded), (c.excluded, []))[1].append(u)
        for excluded, users in groups.values():
            ids = [self.vocab[i] for i in excluded if i in self.vocab]
            if ids:
                out |= np.isin(pairs // n_items, users) & np.isin(pairs % n_items, ids)
        return out

    def _fill_items(self, X: np.ndarray, row_users: np.ndarray, row_items: np.ndarray, names: list[str]) -> None:
        """Category/brand affinity (the user's, relative to their strongest), price band, has_vector."""
        aff_ids: dict[str, int] = {}
        a_users: list[int] = []
        a_ids: list[int] = []
        a_values: list[float] = []
        for u, c in enumerate(self.contexts):
            top = max(c.affinity.values(), default=0.0)
            if top > 0:
                for member, v in c.affinity.items():
                    a_users.append(u)
                    a_ids.append(aff_ids.setdefault(member, len(aff_ids)))
                    a_values.append(v / top)
        distinct = np.unique(row_items).tolist()
        wanted = [names[i] for i in distinct]
        info = self.info(wanted) if callable(self.info) else self.info
        categories = {m[2:]: a for m, a in aff_ids.items() if m.startswith("c:")}
        brands = {m[2:]: a for m, a in aff_ids.items() if m.startswith("b:")}
        bands: dict[float | None, int] = {}
        n_aff = len(aff_ids) + 1
        cat = np.full(len(names), -1, dtype=np.int64)
        brand = np.full(len(names), -1, dtype=np.int64)
        band = np.full(len(names), -1, dtype=np.int64)
        listed = np.full(len(names), np.nan)
        for i, name in zip(distinct, wanted, strict=True):
            meta = info.get(name)
            if meta is None:
                continue
            if meta.listed is not None:
                listed[i] = meta.listed
            if meta.category:
                cat[i] = categories.get(meta.category, -1)
            if meta.brand:
                brand[i] = brands.get(meta.brand, -1)
            b = bands.get(meta.price)
            if b is None:
                b = bands[meta.price] = price_band(meta.price)
            band[i] = b
        vec = np.zeros(len(names), dtype=np.float32)
        if self.has_vector:
            vec[[i for i, name in zip(distinct, wanted, strict=True) if name in self.has_vector]] = 1.0
        aff = _Lookup(np.asarray(a_users, dtype=np.int64) * n_aff + np.asarray(a_ids, dtype=np.int64))
        values = np.asarray(a_values, dtype=np.float32)
        for col, codes in ((INDEX["aff_category"], cat), (INDEX["aff_brand"], brand)):
            m = codes[row_items]
            known = m >= 0
            hit, at = aff.find(row_users[known] * n_aff + m[known])
            X[np.flatnonzero(known)[hit], col] = values[at]
        X[np.arange(len(row_items)), INDEX["price_none"] + 1 + band[row_items]] = 1.0  # band -1 lands on price_none
        X[:, INDEX["has_vector"]] = vec[row_items]
        ts = np.asarray([c.ts for c in self.contexts], dtype=np.float64)[row_users]
        with np.errstate(invalid="ignore"):
            age = ts - listed[row_items]
            X[:, INDEX["item_new"]] = np.where(age >= 0, np.exp(-self.item_new_rate * np.maximum(age, 0.0)), 0.0)
        X[:, INDEX["support"]] = self._support(row_users, row_items, distinct, wanted, len(names))

    def _fill_bought(self, X: np.ndarray, look: _Lookup, n_items: int) -> None:
        """``bought_n``, ``since_bought`` and ``cycle_due`` (see :func:`build_pools`); ``look`` finds rows."""
        users: list[int] = []
        items: list[int] = []
        stats: list[tuple[int, int, int]] = []
        vocab = self.vocab
        for u, c in enumerate(self.contexts):
            for item, bought in c.bought.items():
                i = vocab.get(item)
                if i is not None:
                    users.append(u)
                    items.append(i)
                    stats.append(bought)
        if not stats:
            return
        hit, at = look.find(np.asarray(users, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64))
        if not hit.any():
            return
        n, first, last = (np.asarray(col, dtype=np.float64)[hit] for col in zip(*stats, strict=True))
        ts = np.asarray([c.ts for c in self.contexts], dtype=np.float64)[np.asarray(users)[hit]]
        elapsed = np.maximum(ts - last, 0.0)
        X[at, INDEX["bought_n"]] = np.minimum(1.0, np.log1p(n) / math.log1p(BOUGHT_FULL))
        X[at, INDEX["since_bought"]] = 1.0 / (1.0 + elapsed / SINCE_BOUGHT_MS)
        cycle = np.where(n >= 2, (last - first) / np.maximum(n - 1, 1.0), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            phase = np.log(np.maximum(elapsed, 1.0) / cycle)
            X[at, INDEX["cycle_due"]] = np.where(cycle > 0, np.exp(-0.5 * phase ** 2), 0.0)

    def _support(self, row_users: np.ndarray, row_items: np.ndarray, distinct: list[int], wanted: list[str],
                 n_names: int) -> np.ndarray:
        """Each row's ``support`` feature (see :func:`build_pools`)."""
        groups: dict[int, tuple[Mapping[str, float], list[int]]] = {}
        for u, c in enumerate(self.contexts):
            if c.support:  # a batch's contexts share one read: looked up once
                groups.setdefault(id(c.support), (c.support, []))[1].append(u)
        weight = np.zeros(len(row_items))
        for support, users in groups.values():
            stored = np.zeros(n_names)
            stored[distinct] = [support.get(name, 0.0) for name in wanted]
            rows = np.isin(row_users, users)
            weight[rows] = stored[row_items[rows]]
        weight *= np.asarray([c.support_scale for c in self.contexts], dtype=np.float64)[row_users]
        return np.minimum(1.0, np.log1p(weight / 8.0) / math.log1p(SUPPORT_FULL))


class _Lookup:
    """Positions of keys among sorted-or-not ``keys`` (unique), by binary search."""

    def __init__(self, keys: np.ndarray) -> None:
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of ``keys`` found, their positions in the original ``keys``)."""
        if not len(self.sorted):
            return np.zeros(len(keys), dtype=bool), np.zeros(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        hit = self.sorted[pos] == keys
        return hit, self.order[pos[hit]]

    def fill(self, X: np.ndarray, col: int, keys: np.ndarray, values: np.ndarray) -> None:
        hit, rows = self.find(keys)
        X[rows, col] = values[hit]


def _positions(users: np.ndarray) -> np.ndarray:
    """Each entry's position within its run of equal (sorted or grouped) users."""
    if not len(users):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, len(users)])
    return np.arange(len(users)) - np.repeat(starts, lengths)


def _last(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys with the value of their last entry (a dict built from the entries)."""
    uniq, idx = np.unique(keys[::-1], return_index=True)
    return uniq, values[::-1][idx]


def _first(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, idx = np.unique(keys, return_index=True)
    return uniq, values[idx]


def _summed(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse, weights=values, minlength=len(uniq))


def _normalised(keys: np.ndarray, values: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user, values over the user's largest; a user whose largest is not positive has none."""
    if not len(keys):
        return keys, values
    users = keys // n_items
    top = np.full(int(users.max()) + 1, -np.inf)
    np.maximum.at(top, users, values)
    t = top[users]
    keep = t > 0
    return keys[keep], values[keep] / t[keep]


def _spread(keys: np.ndarray, values: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user, min-max scaled to [0, 1]; all 1.0 where the user's values are (nearly) equal."""
    if not len(keys):
        return keys, values
    users = keys // n_items
    n = int(users.max()) + 1
    lo, hi = np.full(n, np.inf), np.full(n, -np.inf)
    np.minimum.at(lo, users, values)
    np.maximum.at(hi, users, values)
    width = (hi - lo)[users]
    flat = width <= 1e-12
    out = np.ones(len(values))
    out[~flat] = (values[~flat] - lo[users][~flat]) / width[~flat]
    return keys, out


def _covis_ranks(keys: np.ndarray, values: np.ndarray, raw_keys: np.ndarray, n_items: int) -> np.ndarray:
    """Rank of each user's co-visitation candidate by score, ties in order of first appearance."""
    if not len(keys):
        return np.zeros(0)
    first_keys, first_at = _first(raw_keys, np.arange(len(raw_keys)))
    appeared = first_at[np.searchsorted(first_keys, keys)]
    order = np.lexsort((appeared, -values, keys // n_items))
    ranks = np.empty(len(keys))
    ranks[order] = _positions((keys // n_items)[order])
    return ranks
