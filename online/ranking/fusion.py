"""The learned ranker: candidate pools scored by the fused model the learner keeps training.

Per writer batch: every touched user's pool is built (:func:`~fusionrec.online.candidates.features.build_pools`),
all pools are scored in one go by the served checkpoint
(:class:`~fusionrec.online.learning.checkpoints.ServingModel`), and each user's top-K is stored
with the scorers that contributed most to each item's score. The pool, in ranked order, is what the
writer logs for the learner.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.scripts import MULTI_HMGET, register
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorLookup, VectorStore
from fusionrec.online.candidates.context import UserContext
from fusionrec.online.candidates.features import CandidatePool, ItemInfo, build_pools
from fusionrec.online.learning.checkpoints import ServingModel
from fusionrec.online.learning.model import Rows, explain, pool_segments
from fusionrec.online.ranking.ranker import Ranked, Recommendation
from fusionrec.streams.state import Decay


class ItemInfoCache:
    """Category, brand, price and listing time of items, read from their catalog hashes and kept ``ttl_s``."""

    def __init__(self, client: redis.Redis, keys: Keys, capacity: int = 200_000, ttl_s: float = 60.0) -> None:
        self.redis = client
        self.keys = keys
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._hmget = register(client, MULTI_HMGET)
        self._cache: OrderedDict[str, tuple[float, ItemInfo]] = OrderedDict()

    def get(self, item_ids: Sequence[str]) -> dict[str, ItemInfo]:
        now = time.monotonic()
        out: dict[str, ItemInfo] = {}
        missing: dict[int, list[str]] = {}
        for iid in set(item_ids):
            hit = self._cache.get(iid)
            if hit is not None and now - hit[0] < self.ttl_s:
                out[iid] = hit[1]
            else:
                missing.setdefault(self.keys.bucket(iid), []).append(iid)
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for ids in missing.values():
                self._hmget(keys=[self.keys.item_meta(i) for i in ids], args=["category", "brand", "price", "listed"],
                            client=pipe)
            for ids, reply in zip(missing.values(), pipe.execute(), strict=True):
                for iid, (category, brand, price, listed) in zip(ids, reply, strict=True):
                    info = ItemInfo(_text(category), _text(brand), _price(price), _listed(listed))
                    out[iid] = info
                    self._cache[iid] = (now, info)
                    self._cache.move_to_end(iid)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return out


class FusionRanker:
    """Ranks with the learned fusion; ``rank_many`` scores all of a batch's users at once."""

    name = "fusion"

    def __init__(self, client: redis.Redis, settings: Settings, serving: ServingModel,
                 keys: Keys | None = None) -> None:
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.serving = serving
        self.info = ItemInfoCache(client, self.keys)
        # user item weights are forward-decayed; weight(1, -ts) = exp(-rate * (ts - epoch)) brings them to ts
        self.decay = Decay(-settings.state.decay_epoch_ms, settings.state.affinity_half_life_s)
        store = VectorStore(client, settings, self.keys)
        self.lookup = VectorLookup(store.vectors, settings.learn.vector_cache_items, seq=store.seq)

    def pools(self, contexts: Sequence[UserContext], only: list[str] | None = None) -> list[CandidatePool]:
        """Each user's candidate pool (``only``: the user's features for exactly these items)."""
        return build_pools(contexts, self.info.get, self.settings.rec.pool,
                           decay_now=[self.decay.weight(1.0, -c.ts) if c.ts else 0.0 for c in contexts], only=only,
                           item_new_half_life_s=self.settings.rec.item_new_half_life_s)

    def personal_scores(self, ctx: UserContext, items: list[str]) -> tuple[int, np.ndarray]:
        """The served model's fused probability of each item for this user (checkpoint number, scores)."""
        number, model = self.serving.current()
        pool = self.pools([ctx], only=items)[0]
        rows = Rows.of_pools([pool], self.lookup if model.use_vectors else None)
        return number, model.predict(rows).fused

    def rank_many(self, contexts: Sequence[UserContext], k: int) -> list[Ranked]:
        number, model = self.serving.current()
        pools = self.pools(contexts)
        rows = Rows.of_pools(pools, self.lookup if model.use_vectors else None)
        pred = model.predict(rows)
        segments = pool_segments(pools)
        served, names = model.served_scores(pools, pred, segments)
        orders = [model.arrange(pool, order, segment)
                  for pool, order, segment in zip(pools, ranked_orders(pools, served), segments, strict=True)]
        tops = [order[:k] for order in orders]
        starts = np.cumsum([0, *(len(p) for p in pools)]).tolist()
        # every listed row's fused score, and the served score of rows listed in a part's order, at once
        listed = np.fromiter((start + r for start, top in zip(starts, tops, strict=False) for r in top),
                             dtype=np.int64)
        scores = pred.fused[listed].round(6).tolist()
        by_part = served[listed].round(6).tolist() if any(name != "fusion" for name in names) else []
        # a list served in another order than the stacker's is explained by that order, not the stacker
        explained = explain(pred, [start + r for start, top, name in zip(starts, tops, names, strict=False)
                                   if name == "fusion" for r in top])
        out: list[Ranked] = []
        at = done = 0
        for pool, order, top, name in zip(pools, orders, tops, names, strict=True):
            n = len(top)
            if name == "fusion":
                sources = explained[done: done + n]
                done += n
            else:
                sources = [{name: v} for v in by_part[at: at + n]]
            ids = pool.items
            items = [Recommendation(ids[r], score, why)
                     for r, score, why in zip(top, scores[at: at + n], sources, strict=True)]
            at += n
            out.append(Ranked(items=items, pool=pool, order=order, model=number))
        return out

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]:
        return self.rank_many([ctx], k)[0].items


def ranked_orders(pools: Sequence[CandidatePool], fused: np.ndarray) -> list[list[int]]:
    """Each pool's rows by (-score, item id): ``fused`` holds the pools' scores one after another."""
    if not any(len(p) for p in pools):
        return [[] for _ in pools]
    if all(p.codes is not None for p in pools):
        codes = np.concatenate([p.codes for p in pools if p.codes is not None])
    else:
        items = [i for p in pools for i in p.items]
        rank = {name: r for r, name in enumerate(sorted(set(items)))}
        codes = np.fromiter((rank[i] for i in items), dtype=np.int64, count=len(items))
    owner = np.repeat(np.arange(len(pools)), [len(p) for p in pools])
    order = np.lexsort((codes, -np.asarray(fused, dtype=np.float64), owner))
    starts = np.cumsum([0, *(len(p) for p in pools)])
    return [(order[lo:hi] - lo).tolist() for lo, hi in zip(starts[:-1], starts[1:], strict=True)]


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _listed(raw: bytes | str | None) -> int | None:
    try:
        return int(_text(raw) or "")
    except ValueError:
        return None


def _price(raw: bytes | str | None) -> float | None:
    try:
        value = float(_text(raw) or "nan")
    except ValueError:
        return None
    return value if np.isfinite(value) else None
