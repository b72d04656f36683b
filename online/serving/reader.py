"""``RecommendationReader``: how applications read recommendations straight from Redis.

One ``MGET`` reads the stored lists of the users asked for; users without a stored list (unknown, or
expired) get the currently popular items, marked ``fallback=True``.

Rank on read (``FUSIONREC_REC_RANK_ON_READ``): the stream ranks a touched user off its ingest path,
at most every ``FUSIONREC_REC_DEBOUNCE_MS``, so for a moment after an event the user's state is
newer than their stored list. With the setting on, the reader also reads the state's newest event
time (``last_seen``) and, where it is newer than the list's ``event_ts`` (or there is state but no
list yet), ranks the user itself with the served fusion model (:class:`OnReadRanker`) and answers
that list, marked ``on_read=True``. It writes nothing: the reader may hold a read-only Redis account,
and the stream's own ranking writes the list (and logs the decision for the learner) moments later.

>>> reader = RecommendationReader(redis.Redis.from_url(url), settings)   # doctest: +SKIP
>>> [r.item_id for r in reader.top_k("42", k=5).items]                    # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec
import redis
import redis.asyncio

from fusionrec.core.keys import Keys
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.content import ContentIndex
from fusionrec.online.ranking.ranker import RecList, Recommendation, model_label

_decoder = msgspec.json.Decoder(RecList)


def stored_list(raw: bytes, k: int, user_id: str) -> RecList:
    """A stored list cut to ``k``, answered under the id it was asked for (the stored one may be a pseudonym)."""
    recs = _decoder.decode(raw)
    return msgspec.structs.replace(recs, items=recs.items[:k], user_id=user_id)


def popular_list(user_id: str, ranked: list[tuple[bytes, float]], deleted: list[int], k: int) -> RecList:
    """The popular fallback from the popularity zset's head and each member's deleted flag."""
    items = [(m.decode(), float(s)) for (m, s), gone in zip(ranked, deleted, strict=True) if not gone][:k]
    top = items[0][1] if items and items[0][1] > 0 else 1.0
    return RecList(user_id=user_id, model="popular", generated_at=int(time.time() * 1000), event_ts=0,
                   fallback=True, items=[Recommendation(item_id=m, score=round(s / top, 6),
                                                        sources={"popular": round(s / top, 6)})
                                         for m, s in items])


class OnReadRanker:
    """Ranks users from their state now, with the served fusion model (see the module docstring).

    Built on first use: only then does the process load the model (and import torch). Rankings are
    serialised (the item and vector caches are shared); each takes about a millisecond.
    """

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys,
                 counted: Callable[[], None] | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys
        self.counted = counted
        self._lock = threading.Lock()
        self._ranker: Any = None
        self._candidates: Any = None

    @staticmethod
    def stale(recs: RecList | None, last_seen: bytes | str | None) -> bool:
        """Whether the state (newest event time ``last_seen``) is newer than the stored list."""
        if last_seen is None:
            return False
        try:
            seen = int(last_seen)
        except ValueError:
            return False
        return recs is None or seen > recs.event_ts

    def rank(self, user_id: str, stored_id: str, last_seen: bytes | str, k: int) -> RecList:
        """``user_id``'s list from the state stored under ``stored_id`` (its pseudonym, where used)."""
        return self.rank_many([(user_id, stored_id, last_seen)], k)[user_id]

    def rank_many(self, users: list[tuple[str, str, bytes | str]], k: int) -> dict[str, RecList]:
        """:meth:`rank` for several (user id, stored id, last seen) at once: one read, one ranking."""
        with self._lock:
            if self._ranker is None:
                from fusionrec.online.candidates.context import CandidateReader
                from fusionrec.online.learning.checkpoints import CheckpointStore, ServingModel
                from fusionrec.online.ranking.fusion import FusionRanker

                serving = ServingModel(CheckpointStore(self.redis, self.settings, self.keys), self.settings)
                self._ranker = FusionRanker(self.redis, self.settings, serving, self.keys)
                self._candidates = CandidateReader(self.redis, self.settings, self.keys)
            at = {stored: int(seen) for _, stored, seen in users}  # each stored user once
            contexts = self._candidates.for_stored_users(at)
            ranked = dict(zip(at, self._ranker.rank_many(contexts, k), strict=True))
        if self.counted is not None:
            for _ in at:  # one list ranked per user, however often it was asked for
                self.counted()
        now = int(time.time() * 1000)
        name = self._ranker.name
        return {uid: RecList(user_id=uid, items=ranked[stored].items, model=model_label(name, ranked[stored].model),
                             generated_at=now, event_ts=at[stored], on_read=True) for uid, stored, _ in users}


class RecommendationReader:
    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 on_read: OnReadRanker | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.pseudonyms = Pseudonyms.for_settings(settings)
        self.content = ContentIndex(client, settings, self.keys)
        self.on_read = on_read or (OnReadRanker(client, settings, self.keys) if settings.rec.rank_on_read else None)

    def top_k(self, user_id: str | int, k: int | None = None) -> RecList:
        uid = str(user_id)
        return self.many([uid], k)[uid]

    def many(self, user_ids: list[str], k: int | None = None) -> dict[str, RecList]:
        """Each user's list in one round trip (plus one for the fallback if needed; with rank on read,
        the users whose state is newer than their list are ranked together)."""
        k = self.settings.rec.k if k is None else k
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if not user_ids:
            return {}
        stored_ids = [self.pseudonyms(u) for u in user_ids]
        if self.on_read is None:
            raws = self.redis.mget([self.keys.user_rec(u) for u in stored_ids])
            seen: list[bytes | None] = [None] * len(user_ids)
        else:
            pipe = self.redis.pipeline(transaction=False)
            for u in stored_ids:
                pipe.get(self.keys.user_rec(u))
                pipe.hget(self.keys.user_state(u), "last_seen")
            replies = pipe.execute()
            raws, seen = replies[0::2], replies[1::2]
        out: dict[str, RecList] = {}
        stale: list[tuple[str, str, bytes | str]] = []
        fallback: RecList | None = None
        for uid, stored_id, raw, last_seen in zip(user_ids, stored_ids, raws, seen, strict=True):
            recs = stored_list(cast(bytes, raw), k, uid) if raw is not None else None
            if self.on_read is not None and last_seen is not None and self.on_read.stale(recs, last_seen):
                stale.append((uid, stored_id, last_seen))
            elif recs is not None:
                out[uid] = recs
            else:
                fallback = fallback or self.popular("", k)
                out[uid] = msgspec.structs.replace(fallback, user_id=uid)
        if stale and self.on_read is not None:
            out.update(self.on_read.rank_many(stale, k))
        return {uid: out[uid] for uid in user_ids}

    def popular(self, user_id: str, k: int) -> RecList:
        """Most popular items right now, skipping deleted ones."""
        ranked = cast(list[tuple[bytes, float]],
                      self.redis.zrange(self.keys.popularity(), 0, 2 * k - 1, desc=True, withscores=True))
        flags = self.redis.smismember(self.keys.deleted_items(), [m for m, _ in ranked]) if ranked else []
        return popular_list(user_id, ranked, cast(list[int], flags), k)

    def similar_items(self, item_id: str | int, k: int = 10) -> list[tuple[str, float]]:
        """Items most similar to ``item_id`` by content (deleted ones left out), similarity in [0, 1].

        Empty while the item has no vector (unknown, deleted, or not embedded yet).
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        found = self.content.similar_items(str(item_id), 2 * k)
        if found:
            flags = self.redis.smismember(self.keys.deleted_items(), [i for i, _ in found])
            found = [pair for pair, gone in zip(found, flags, strict=True) if not gone]
        return found[:k]

    def titles(self, item_ids: list[str]) -> dict[str, str]:
        """Catalog titles for display (ids without a catalog entry are left out)."""
        pipe = self.redis.pipeline(transaction=False)
        for iid in item_ids:
            pipe.hget(self.keys.item_meta(iid), "title")
        return {i: (t.decode() if isinstance(t, bytes) else t)
                for i, t in zip(item_ids, pipe.execute(), strict=True) if t is not None}


class AsyncRecommendationReader:
    """``top_k`` on an asyncio Redis client, for the HTTP API (same keys, same fallback).

    Concurrent reads coalesce: the GETs that arrive within one event-loop turn go to Redis as one
    MGET (one round trip and one client-side command for all of them, which is where an asyncio
    client spends its time). The popular fallback is shared for ``popular_ttl_s``.
    """

    def __init__(self, client: redis.asyncio.Redis, keys: Keys, popular_ttl_s: float = 1.0,
                 max_batch: int = 256, pseudonyms: Pseudonyms | None = None,
                 on_read: OnReadRanker | None = None) -> None:
        self.redis = client
        self.keys = keys
        self.pseudonyms = pseudonyms or Pseudonyms(None)
        self.on_read = on_read  # ranks in a worker thread; one more round trip per read (last_seen)
        self.popular_ttl_s = popular_ttl_s
        self.max_batch = max_batch
        self._pending: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._popular: dict[int, tuple[float, RecList]] = {}
        self.batches = 0

    async def top_k(self, user_id: str, k: int) -> RecList:
        stored_id = self.pseudonyms(user_id)
        raw = await self._get(self.keys.user_rec(stored_id))
        recs = stored_list(raw, k, user_id) if raw is not None else None
        if self.on_read is not None:
            last_seen = await self.redis.hget(self.keys.user_state(stored_id), "last_seen")
            if last_seen is not None and self.on_read.stale(recs, last_seen):
                return await asyncio.to_thread(self.on_read.rank, user_id, stored_id, last_seen, k)
        if recs is not None:
            return recs
        return msgspec.structs.replace(await self.popular(k), user_id=user_id)

    async def popular(self, k: int) -> RecList:
        hit = self._popular.get(k)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.popular_ttl_s:
            return hit[1]
        ranked = cast(list[tuple[bytes, float]],
                      await self.redis.zrange(self.keys.popularity(), 0, 2 * k - 1, desc=True, withscores=True))
        flags = await self.redis.smismember(self.keys.deleted_items(), [m for m, _ in ranked]) if ranked else []
        recs = popular_list("", ranked, cast(list[int], flags), k)
        self._popular[k] = (now, recs)
        return recs

    def _get(self, key: str) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes | None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.setdefault(key, []).append(fut)
        if len(self._pending) >= self.max_batch:
            self._flush()
        return fut

    def _flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, {}
            asyncio.ensure_future(self._mget(batch))

    async def _mget(self, batch: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        self.batches += 1
        try:
            keys = list(batch)
            values = await (self.redis.mget_nonatomic(keys) if hasattr(self.redis, "mget_nonatomic")
                            else self.redis.mget(keys))
        except Exception as exc:  # every waiter sees the error (RedisError → 503 in the API)
            for futures in batch.values():
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(exc)
            return
        for key, value in zip(keys, values, strict=True):
            for fut in batch[key]:
                if not fut.done():
                    fut.set_result(cast(bytes | None, value))
