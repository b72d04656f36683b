"""The learned ranker: candidate pools scored by the fused model the learner keeps training.

Per writer batch: every touched user's pool is built (:func:`~fusionrec.online.candidates.features.build_pool`),
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
from fusionrec.models.vectors import VectorStore
from fusionrec.online.candidates.context import UserContext
from fusionrec.online.candidates.features import CandidatePool, ItemInfo, build_pool
from fusionrec.online.learning.checkpoints import ServingModel
from fusionrec.online.learning.model import Rows, VectorLookup, explain
from fusionrec.online.ranking.ranker import Ranked, Recommendation
from fusionrec.streams.state import Decay


class ItemInfoCache:
    """Category, brand and price of items, read from their catalog hashes and kept ``ttl_s``."""

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
                self._hmget(keys=[self.keys.item_meta(i) for i in ids], args=["category", "brand", "price"],
                            client=pipe)
            for ids, reply in zip(missing.values(), pipe.execute(), strict=True):
                for iid, (category, brand, price) in zip(ids, reply, strict=True):
                    info = ItemInfo(_text(category), _text(brand), _price(price))
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
        self.lookup = VectorLookup(store.vectors, settings.learn.vector_cache_items)

    def pools(self, contexts: Sequence[UserContext], only: list[str] | None = None) -> list[CandidatePool]:
        """Each user's candidate pool (``only``: the user's features for exactly these items)."""
        candidates = set(only) if only is not None else {i for c in contexts for i in _candidate_ids(c)}
        info = self.info.get(sorted(candidates))
        return [build_pool(c, info, self.settings.rec.pool, decay_now=self.decay.weight(1.0, -c.ts) if c.ts else 0.0,
                           only=only)
                for c in contexts]

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
        out: list[Ranked] = []
        start = 0
        for pool in pools:
            fused = pred.fused[start: start + len(pool)]
            order = sorted(range(len(pool)), key=lambda r: (-fused[r], pool.items[r]))
            top = order[:k]
            items = [Recommendation(item_id=pool.items[r], score=round(float(fused[r]), 6), sources=sources)
                     for r, sources in zip(top, explain(pred, [start + r for r in top]), strict=True)]
            out.append(Ranked(items=items, pool=pool, order=order, model=number))
            start += len(pool)
        return out

    def rank(self, ctx: UserContext, k: int) -> list[Recommendation]:
        return self.rank_many([ctx], k)[0].items


def _candidate_ids(c: UserContext) -> list[str]:
    ids = [i for i, _ in (*c.items, *c.content, *c.popular, *c.trending)]
    ids.extend(i for ns in c.covis.values() for i, _ in ns)
    return ids


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else raw


def _price(raw: bytes | str | None) -> float | None:
    try:
        value = float(_text(raw) or "nan")
    except ValueError:
        return None
    return value if np.isfinite(value) else None
