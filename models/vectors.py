"""Item vectors in Redis: versioned per model, one script per batch, a vector set for retrieval.

Each model version (see :meth:`TextEncoder.version`) owns the hash slot ``{v:<version>}``: per item a
hash with the vector bytes (float32 or float16), the content hash of the text it came from, the
catalog event time, when and by which worker it was written and how often it was embedded; and a
Redis 8 vector set fed with the same vectors, so nearest-neighbour retrieval (``VSIM``) runs inside
Redis. On servers without vector sets (Redis 7) the blobs alone are written and readers search an
in-process index (:class:`LocalIndex`) instead.

``P:{m}:active`` names the version readers use. A new version is filled completely (live events plus
a backfill of the stored catalog) before it is made active, so readers never mix dimensions.

Writes are guarded by event time: an older catalog event never replaces a newer vector or revives a
deleted item, and replaying a batch changes nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import redis

from fusionrec.core.keys import Keys
from fusionrec.core.scripts import MULTI_HMGET, register
from fusionrec.core.settings import Settings

log = logging.getLogger(__name__)

# KEYS: vector set, change counter, then one entry hash per item (all in the version's slot).
# ARGV: use vector set (1/0), quantisation, worker, now (ms), then per item:
#       id, ts, op (upsert | touch | delete), content hash, stored blob, float32 blob
# Returns per item: 0 older than what is stored, 1 written, 2 touch refused (content differs: embed
# it), 3 touched (same content, event time moved on).
# The change counter moves with every write and delete. A counter that starts anew (the version's keys
# expired after retirement, or Redis lost them) starts at the server's time in microseconds, above any
# value an earlier one reached, so a reader never takes a new state for one it saw before.
VECTOR_APPLY = """
local usev = ARGV[1] == '1'
local quant, worker, now = ARGV[2], ARGV[3], ARGV[4]
local out, changed, a = {}, 0, 5
for k = 3, #KEYS do
  local e = KEYS[k]
  local id, ts, op, h = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local cur = redis.call('HMGET', e, 'ts', 'h', 'del')
  if cur[1] and tonumber(ts) < tonumber(cur[1]) then
    out[k - 2] = 0
  elseif op == 'delete' then
    redis.call('DEL', e)
    redis.call('HSET', e, 'ts', ts, 'del', '1')
    if usev then redis.call('VREM', KEYS[1], id) end
    changed = changed + 1
    out[k - 2] = 1
  elseif op == 'touch' then
    if cur[2] == h and not cur[3] then
      redis.call('HSET', e, 'ts', ts)
      out[k - 2] = 3
    else
      out[k - 2] = 2
    end
  else
    redis.call('HSET', e, 'v', ARGV[a + 4], 'h', h, 'ts', ts, 'at', now, 'w', worker)
    redis.call('HDEL', e, 'del')
    redis.call('HINCRBY', e, 'n', 1)
    if usev then redis.call('VADD', KEYS[1], 'FP32', ARGV[a + 5], id, quant) end
    changed = changed + 1
    out[k - 2] = 1
  end
  a = a + 6
end
if changed > 0 then
  if redis.call('EXISTS', KEYS[2]) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
  end
  redis.call('INCRBY', KEYS[2], changed)
end
return out
"""

STALE, WRITTEN, CHANGED, TOUCHED = 0, 1, 2, 3


@dataclass(frozen=True)
class VectorOp:
    item_id: str
    ts: int
    op: str  # upsert | touch | delete
    content_hash: str = ""
    vector: np.ndarray | None = None


@dataclass
class ModelVersion:
    """What the registry (``P:{m}:versions``) records about one model version."""

    version: str
    model_id: str
    revision: str
    dim: int
    pooling: str
    normalize: bool
    max_length: int
    vector_dtype: str
    status: str = "building"  # building | complete | retired
    created_at: int = field(default_factory=lambda: int(time.time() * 1000))
    completed_at: int | None = None
    items: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelVersion:
        return cls(**json.loads(raw))


def supports_vector_sets(client: redis.Redis, probe_key: str) -> bool:
    """True when the server has Redis 8 vector sets (VADD/VSIM): ``VCARD`` of ``probe_key``, a key never
    written (:meth:`Keys.probe`), which an ACL user limited to fusionrec's keys may read. A refusal
    (``NOPERM``) is raised, not taken for "no vector sets": that would switch a reader to a full SCAN."""
    try:
        client.execute_command("VCARD", probe_key)
        return True
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        return False


class VectorStore:
    """Reads and writes the vectors of model versions, and the registry of versions."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 worker: str = "") -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.worker = worker
        self.dtype = np.float16 if settings.vectors.dtype == "float16" else np.float32
        self._apply = register(client, VECTOR_APPLY)
        self._hmget = register(client, MULTI_HMGET)
        self._vsets: bool | None = None

    @property
    def use_vector_sets(self) -> bool:
        if self._vsets is None:
            self._vsets = self.settings.vectors.index != "local" and supports_vector_sets(self.redis, self.keys.probe())
            if not self._vsets:
                log.info("vector sets %s: writing vector blobs only",
                         "disabled" if self.settings.vectors.index == "local" else "not supported by this server")
        return self._vsets

    # ------------------------------------------------------------------ entries
    def entries(self, version: str, item_ids: Sequence[str]) -> dict[str, tuple[str | None, int | None, bool]]:
        """(content hash, event ts, deleted) per item; (None, None, False) where nothing is stored."""
        if not item_ids:
            return {}
        reply = self._hmget(keys=[self.keys.item_vector(version, i) for i in item_ids], args=["h", "ts", "del"])
        out: dict[str, tuple[str | None, int | None, bool]] = {}
        for iid, (h, ts, deleted) in zip(item_ids, reply, strict=True):
            out[iid] = (h.decode() if h else None, int(ts) if ts else None, bool(deleted))
        return out

    def apply(self, version: str, ops: Sequence[VectorOp]) -> list[int]:
        """Apply ops in one script call; one status per op (``STALE``, ``WRITTEN``, ``CHANGED``, ``TOUCHED``)."""
        if not ops:
            return []
        args: list[Any] = ["1" if self.use_vector_sets else "0", self.settings.vectors.quant.upper(),
                           self.worker, int(time.time() * 1000)]
        for op in ops:
            f32 = b"" if op.vector is None else np.ascontiguousarray(op.vector, dtype="<f4").tobytes()
            stored = b"" if op.vector is None else np.ascontiguousarray(op.vector, dtype=self.dtype).tobytes()
            args.extend((op.item_id, op.ts, op.op, op.content_hash, stored, f32))
        keys = [self.keys.vector_set(version), self.keys.vector_seq(version),
                *(self.keys.item_vector(version, op.item_id) for op in ops)]
        return [int(x) for x in self._apply(keys=keys, args=args)]

    def vectors(self, version: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors (float32) of the items that have one."""
        if not item_ids:
            return {}
        reply = self._hmget(keys=[self.keys.item_vector(version, i) for i in item_ids], args=["v"])
        return {iid: self.decode(blob[0]) for iid, blob in zip(item_ids, reply, strict=True) if blob[0]}

    def decode(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype=self.dtype).astype(np.float32)

    def count(self, version: str) -> int:
        """Items with a vector in ``version``."""
        if self.use_vector_sets:
            return int(self.redis.execute_command("VCARD", self.keys.vector_set(version)))
        return sum(1 for _ in self.iter_vectors(version))

    def iter_vectors(self, version: str, chunk: int = 500) -> Iterable[tuple[str, np.ndarray]]:
        """Every (item id, vector) of a version, by SCAN over its slot."""
        prefix = self.keys.item_vector(version, "")
        batch: list[str] = []
        for raw in self.redis.scan_iter(match=prefix + "*", count=chunk):
            batch.append(raw.decode()[len(prefix):])
            if len(batch) >= chunk:
                yield from self.vectors(version, batch).items()
                batch = []
        if batch:
            yield from self.vectors(version, batch).items()

    def seq(self, version: str) -> int:
        return int(self.redis.get(self.keys.vector_seq(version)) or 0)

    # ------------------------------------------------------------------ registry
    def active(self) -> str | None:
        raw = cast(bytes | None, self.redis.get(self.keys.active_model()))
        return raw.decode() if raw else None

    def versions(self) -> dict[str, ModelVersion]:
        raw = cast(dict[bytes, bytes], self.redis.hgetall(self.keys.model_versions()))
        return {k.decode(): ModelVersion.from_json(v) for k, v in raw.items()}

    def register(self, info: ModelVersion) -> ModelVersion:
        """Record ``info`` unless the version is known already; returns what the registry holds."""
        self.redis.hsetnx(self.keys.model_versions(), info.version, info.to_json())
        return self.versions()[info.version]

    def activate(self, version: str) -> str | None:
        """Point readers at ``version`` (one SET: the flip is atomic); retire the one it replaces.

        The replaced version's keys expire after ``vector_retire_s``, so readers that looked up the
        old version a moment earlier still find its vectors.
        """
        versions = self.versions()
        info = versions[version]
        info.status, info.completed_at, info.items = "complete", int(time.time() * 1000), self.count(version)
        previous = cast(bytes | None, self.redis.set(self.keys.active_model(), version, get=True))
        old = previous.decode() if previous else None
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.model_versions(), version, info.to_json())
        if old and old != version and old in versions:
            retired = versions[old]
            retired.status = "retired"
            pipe.hset(self.keys.model_versions(), old, retired.to_json())
        pipe.execute()
        if old and old != version:
            self.retire(old)
        log.info("active model version: %s (was %s), %d items", version, old, info.items)
        return old

    def retire(self, version: str) -> None:
        ttl = self.settings.vectors.retire_s
        pipe = self.redis.pipeline(transaction=False)
        for raw in self.redis.scan_iter(match=self.keys.vector_pattern(version), count=1000):
            pipe.expire(raw, ttl)
            if len(pipe) >= 1000:
                pipe.execute()
        pipe.execute()


_ABSENT = object()  # not cached (a cached None: the item has no vector)


class VectorLookup:
    """Item vectors by (version, id), with an LRU of ``capacity`` items per version in front of Redis.

    ``fetch(version, ids)`` reads the vectors of the items that have one (:meth:`VectorStore.vectors`).
    With ``seq`` (the version's change counter, :meth:`VectorStore.seq`, one ``GET`` per call) a
    version's cached vectors are dropped whenever its counter has moved since they were read, so an
    item re-embedded in place is never served with its old vector; with a catalog that keeps changing
    the cache then holds little, and every call reads what it needs. The vectors of at most
    :attr:`VERSIONS` versions are kept (the last ones asked for). Thread-safe.
    """

    VERSIONS = 2

    def __init__(self, fetch: Callable[[str, Sequence[str]], dict[str, np.ndarray]], capacity: int = 50_000,
                 seq: Callable[[str], int] | None = None) -> None:
        self.fetch = fetch
        self.capacity = capacity
        self.seq = seq
        self._cache: dict[str, OrderedDict[str, np.ndarray | None]] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, version: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The vectors of those of ``ids`` that have one."""
        now = self.seq(version) if self.seq is not None else None
        out: dict[str, np.ndarray] = {}
        missing = []
        with self._lock:
            cache = self._version(version, now)
            for i in dict.fromkeys(ids):
                vec = cache.get(i, _ABSENT)
                if vec is _ABSENT:
                    missing.append(i)
                    continue
                cache.move_to_end(i)
                if vec is not None:
                    out[i] = vec  # type: ignore[assignment]
        if missing:
            found = self.fetch(version, missing)
            with self._lock:
                cache = self._version(version, now)
                for i in missing:
                    vec = found.get(i)
                    cache[i] = vec
                    if vec is not None:
                        out[i] = vec
                while len(cache) > self.capacity:
                    cache.popitem(last=False)
        return out

    def _version(self, version: str, seq: int | None) -> OrderedDict[str, np.ndarray | None]:
        """The version's cache, emptied if its change counter is not the one its vectors were read at."""
        if seq is not None and self._seen.get(version) != seq:
            self._cache.pop(version, None)
            self._seen[version] = seq
        cache = self._cache.pop(version, None)  # re-inserted last: the versions in the order last asked
        if cache is None:
            cache = OrderedDict()
            while len(self._cache) >= self.VERSIONS:
                dropped = next(iter(self._cache))
                del self._cache[dropped]
                self._seen.pop(dropped, None)
        self._cache[version] = cache
        return cache


class LocalIndex:
    """Exact cosine search over one version's vectors, held in process memory.

    For servers without vector sets. Reloads (a full SCAN) when the version's change counter moved
    and at least ``min_reload_s`` passed; fine for catalogs of up to a few hundred thousand items.
    Scores use the vector-set convention: ``(1 + cosine) / 2``.
    """

    def __init__(self, store: VectorStore, min_reload_s: float = 1.0) -> None:
        self.store = store
        self.min_reload_s = min_reload_s
        self._lock = threading.Lock()
        self._state: tuple[str, int, float] | None = None  # version, seq, loaded at
        self.ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._matrix = np.zeros((0, 0), dtype=np.float32)

    def _refresh(self, version: str) -> None:
        now = time.monotonic()
        if self._state and self._state[0] == version and now - self._state[2] < self.min_reload_s:
            return
        seq = self.store.seq(version)
        if self._state and self._state[:2] == (version, seq):
            self._state = (version, seq, now)
            return
        pairs = list(self.store.iter_vectors(version))
        self.ids = [i for i, _ in pairs]
        self._pos = {i: n for n, i in enumerate(self.ids)}
        matrix = np.stack([v for _, v in pairs]) if pairs else np.zeros((0, 1), dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self._matrix = matrix / np.maximum(norms, 1e-12)
        self._state = (version, seq, now)

    def vector(self, version: str, item_id: str) -> np.ndarray | None:
        with self._lock:
            self._refresh(version)
            pos = self._pos.get(item_id)
            return None if pos is None else self._matrix[pos]

    def search(self, version: str, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        with self._lock:
            self._refresh(version)
            if not self.ids or k <= 0:
                return []
            q = query / max(float(np.linalg.norm(query)), 1e-12)
            sims = self._matrix @ q.astype(np.float32)
            k = min(k, len(sims))
            top = np.argpartition(-sims, k - 1)[:k]
            top = top[np.argsort(-sims[top], kind="stable")]
            return [(self.ids[i], float((1.0 + sims[i]) / 2.0)) for i in top]
