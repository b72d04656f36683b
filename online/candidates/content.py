"""Content-based retrieval over the active model version's item vectors.

``VSIM`` on the version's Redis vector set where the server has vector sets; an exact in-process
index (:class:`fusionrec.models.vectors.LocalIndex`) otherwise (Redis 7, or ``FUSIONREC_VECTOR_INDEX=local``).
Scores follow the vector-set convention, ``(1 + cosine) / 2`` in [0, 1].

A user's *profile vector* is the weighted mean of the vectors of their strongest items, weighted by
their decayed interaction weights (which already weigh purchases over carts over clicks over views);
its nearest items are the user's content candidates. A brand-new item with no interactions at all
can be recommended this way.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, cast

import msgspec
import numpy as np
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import LocalIndex, VectorStore

Scored = list[tuple[str, float]]


def _pairs(flat: Sequence[Any]) -> Scored:
    return [(m.decode() if isinstance(m, bytes) else m, float(s)) for m, s in zip(flat[0::2], flat[1::2], strict=True)]


def profile_vector(vectors: dict[str, np.ndarray], weights: Sequence[tuple[str, float]]) -> np.ndarray | None:
    """Weighted mean of the items' vectors, unit length; None when none of the items has a vector."""
    rows = [(vectors[i], w) for i, w in weights if i in vectors and w > 0]
    if not rows:
        return None
    top = max(w for _, w in rows)
    mean = sum((v * (w / top) for v, w in rows), np.zeros_like(rows[0][0]))
    norm = float(np.linalg.norm(mean))
    return (mean / norm).astype(np.float32) if norm > 0 else None


class ContentIndex:
    """Nearest items by content in the active version; thread-safe, cheap to share.

    With ``rec.content_cache`` > 0 and vector sets, :meth:`nearest` remembers that many searches, keyed
    by the version, its change counter (``P:{v:<ver>}:seq``: moved by every vector written or removed,
    and never back to a value it had, see :data:`fusionrec.models.vectors.VECTOR_APPLY`), the query
    vector's bytes and the count. A search is kept only when the counter read after it is the one read
    before it, and answers from memory only while the counter stays there: a hit is what searching
    again would return. About 3.5 kB a search of 200 items. A user's profile vector
    changes only with their own events, so a process that ranks the same unchanged user again (the
    evaluator: once to score a basket, once after the user's previous one) searches once.
    """

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 active_ttl_s: float = 1.0) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.store = VectorStore(client, settings, self.keys)
        self.local = LocalIndex(self.store)
        self.active_ttl_s = active_ttl_s
        self._active: tuple[str | None, float] = (None, 0.0)
        self._lock = threading.Lock()
        self.cache_size = settings.rec.content_cache
        # (version, seq, count, query digest) -> (item ids, scores); ids interned: a catalog's worth at most
        self._found: OrderedDict[tuple[str, int, int, bytes], tuple[tuple[str, ...], np.ndarray]] = OrderedDict()
        self.searches = 0  # searches sent to Redis or the local index (cache hits excluded)

    def active(self) -> str | None:
        """The version readers use, re-read at most every ``active_ttl_s``."""
        with self._lock:
            version, at = self._active
            if time.monotonic() - at >= self.active_ttl_s:
                version = self.store.active()
                self._active = (version, time.monotonic())
            return version

    def similar_items(self, item_id: str, k: int) -> Scored:
        """The ``k`` items nearest to ``item_id``; [] when it has no vector.

        The item itself and its exact-text twins (items embedded from the same text, which sit at
        similarity 1.0) are left out, and of several twins among the results only the nearest stays:
        a list of four identical catalog entries tells the reader nothing.
        """
        version = self.active()
        if version is None or k <= 0:
            return []
        want = 2 * k + 1
        if self.store.use_vector_sets:
            try:
                flat = self.redis.execute_command("VSIM", self.keys.vector_set(version), "ELE", item_id,
                                                  "COUNT", want, "WITHSCORES")
            except redis.exceptions.NoPermissionError:  # an ACL refusal is an error, not a missing item
                raise
            except redis.ResponseError:  # element not in the set
                return []
            found = _pairs(flat)
        else:
            vec = self.local.vector(version, item_id)
            if vec is None:
                return []
            found = self.local.search(version, vec, want)
        return self._distinct_texts(version, item_id, found)[:k]

    def _distinct_texts(self, version: str, item_id: str, found: Scored) -> Scored:
        found = [p for p in found if p[0] != item_id]
        entries = self.store.entries(version, [item_id, *(i for i, _ in found)])
        texts = {entries[item_id][0]} - {None}
        out: Scored = []
        for iid, score in found:
            text = entries[iid][0]
            if text is not None and text in texts:
                continue
            if text is not None:
                texts.add(text)
            out.append((iid, score))
        return out

    def nearest(self, version: str, queries: Sequence[np.ndarray], k: int) -> list[Scored]:
        """The ``k`` nearest items to each query vector (one pipelined round trip with vector sets)."""
        if not queries or k <= 0:
            return [[] for _ in queries]
        blobs = [np.ascontiguousarray(q, dtype="<f4").tobytes() for q in queries]
        if self.cache_size <= 0 or not self.store.use_vector_sets:  # the local index reloads on its own clock
            return self._search(version, blobs, k)[0]
        seq = self.store.seq(version)
        keys = [(version, seq, k, hashlib.blake2b(b, digest_size=16).digest()) for b in blobs]
        out: list[Scored | None] = []
        with self._lock:
            for key in keys:
                hit = self._found.get(key)
                if hit is not None:
                    self._found.move_to_end(key)
                out.append(None if hit is None else list(zip(hit[0], hit[1].tolist(), strict=True)))
        missing = [n for n, found in enumerate(out) if found is None]
        if missing:
            fresh, after = self._search(version, [blobs[n] for n in missing], k, seq_after=True)
            with self._lock:
                for n, found in zip(missing, fresh, strict=True):
                    out[n] = found
                    if after == seq:  # no write landed between the counter's read and the searches
                        self._found[keys[n]] = (tuple(sys.intern(i) for i, _ in found),
                                                np.array([s for _, s in found], dtype=np.float64))
                while len(self._found) > self.cache_size:
                    self._found.popitem(last=False)
        return [found or [] for found in out]

    def _search(self, version: str, blobs: Sequence[bytes], k: int,
                seq_after: bool = False) -> tuple[list[Scored], int | None]:
        """The searches, and (``seq_after``) the version's change counter read right after them."""
        with self._lock:
            self.searches += len(blobs)
        if not self.store.use_vector_sets:
            return [self.local.search(version, np.frombuffer(b, dtype="<f4"), k) for b in blobs], None
        pipe = self.redis.pipeline(transaction=False)
        for b in blobs:
            pipe.execute_command("VSIM", self.keys.vector_set(version), "FP32", b, "COUNT", k, "WITHSCORES")
        if seq_after:
            pipe.get(self.keys.vector_seq(version))
        replies = pipe.execute()
        after = int(replies.pop() or 0) if seq_after else None
        return [_pairs(flat) for flat in replies], after

    def profile(self, user_id: str) -> tuple[str, np.ndarray] | None:
        """The stored profile vector of a user with its version, if it is of the active version."""
        raw = cast(bytes | None, self.redis.get(self.keys.user_profile(user_id)))
        if raw is None:
            return None
        version, blob = msgspec.msgpack.decode(raw)
        if version != self.active():
            return None
        return version, np.frombuffer(blob, dtype="<f4")

    def for_user(self, user_id: str, k: int) -> Scored:
        """Content candidates of a user from the stored profile vector; [] without one."""
        found = self.profile(user_id)
        if found is None:
            return []
        return self.nearest(found[0], [found[1]], k)[0]
