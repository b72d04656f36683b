"""Catalog events → item vectors of one model version: the step the workers and the backfill share.

Per batch: keep each item's newest event; read the stored content hashes; embed only items whose
text changed (identical texts once per batch, and from a bounded per-process cache by text hash);
write vectors and deletes in one script call. An item whose entry changed between the read and the
write is embedded on a second pass, so a concurrent writer can never leave a stale vector behind.
Item metadata has one writer, the user-state stream
(:meth:`fusionrec.streams.state.StateStore.apply_catalog`); the workers only write vectors.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusionrec.core.metrics import BATCH_BUCKETS, Metrics, MetricSet, counter, gauge, histogram
from fusionrec.models.encoder import TextEncoder
from fusionrec.models.text import item_text, text_hash
from fusionrec.models.vectors import CHANGED, STALE, WRITTEN, VectorOp, VectorStore
from fusionrec.streams.contract import CatalogEvent

log = logging.getLogger(__name__)


class EmbedMetrics(MetricSet):
    component = "embedding pool (fusionrec.models)"
    embed_items = counter("fusionrec_embed_items_total", "Catalog events handled by the embedding workers, by "
                          "outcome (embedded, unchanged, deleted, stale)", ("model", "outcome"))
    embed_batch_size = histogram("fusionrec_embed_batch_items", "Texts per encoder call", buckets=BATCH_BUCKETS)
    embed_encode_seconds = histogram("fusionrec_embed_encode_seconds",
                                     "Wall time of one encoder call (tokenize, forward, pool)", ("model", "device"))
    embed_queue_batches = gauge("fusionrec_embed_queue_batches", "Consumed catalog batches waiting for the encoder",
                                multiprocess_mode="livesum")
    embed_paused = gauge("fusionrec_embed_paused",
                         "1 while the worker has paused its partitions because its queue is full",
                         multiprocess_mode="livesum")
    embed_visible_seconds = histogram("fusionrec_embed_visible_seconds",
                                      "Catalog event (Kafka timestamp) to vector visible in Redis")
    embed_backfill_items = counter("fusionrec_embed_backfill_items_total",
                                   "Stored catalog items re-embedded for a new model version", ("model",))
    embed_backfill_progress = gauge("fusionrec_embed_backfill_progress_ratio",
                                    "Share of the stored catalog a running backfill has covered", ("model",),
                                    multiprocess_mode="livemax")
    embed_worker_restarts = counter("fusionrec_embed_worker_restarts_total",
                                    "Embedding worker processes restarted after they died")


@dataclass
class EmbedResult:
    embedded: int = 0  # vectors written
    encoded: int = 0  # texts that went through the model (cache misses)
    unchanged: int = 0
    deleted: int = 0
    stale: int = 0

    def add(self, other: EmbedResult) -> None:
        for name in ("embedded", "encoded", "unchanged", "deleted", "stale"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def text_of(ev: CatalogEvent) -> str:
    return item_text(ev.title or "", description=ev.description, category=ev.category, brand=ev.brand)


def latest_per_item(events: Sequence[CatalogEvent]) -> list[CatalogEvent]:
    """Each item's newest event (ties: the later one in the batch, i.e. the higher offset)."""
    newest: dict[str, CatalogEvent] = {}
    for ev in events:
        iid = str(ev.item_id)
        if iid not in newest or ev.ts >= newest[iid].ts:
            newest[iid] = ev
    return list(newest.values())


class VectorCache:
    """Most recently used vectors by text hash, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        vec = self._data.get(key)
        if vec is not None:
            self._data.move_to_end(key)
        return vec

    def put(self, key: str, vec: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = vec
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)


class CatalogEmbedder:
    """Applies catalog events to one model version's vectors."""

    def __init__(self, encoder: TextEncoder, store: VectorStore, version: str, *, batch_size: int = 64,
                 metrics: Metrics | None = None, cache_items: int = 20_000,
                 delete_versions: Callable[[], list[str]] | None = None) -> None:
        self.encoder = encoder
        self.store = store
        self.version = version
        self.batch_size = batch_size
        self.metrics = metrics.of(EmbedMetrics) if metrics is not None else None
        self.cache = VectorCache(cache_items)
        self._delete_versions = delete_versions

    def process(self, events: Sequence[CatalogEvent]) -> EmbedResult:
        latest = latest_per_item(events)
        result = EmbedResult()
        upserts = [ev for ev in latest if ev.op == "upsert"]
        deletes = [ev for ev in latest if ev.op == "delete"]
        if upserts:
            result.add(self._upserts(upserts))
        if deletes:
            result.add(self._deletes(deletes))
        if self.metrics is not None:
            model = self.encoder.spec.model_id
            for outcome in ("embedded", "unchanged", "deleted", "stale"):
                if getattr(result, outcome):
                    self.metrics.embed_items.labels(model, outcome).inc(getattr(result, outcome))
        return result

    def _upserts(self, upserts: list[CatalogEvent]) -> EmbedResult:
        result = EmbedResult()
        texts = {str(ev.item_id): text_of(ev) for ev in upserts}
        hashes = {iid: text_hash(t) for iid, t in texts.items()}
        stored = self.store.entries(self.version, list(texts))
        ops: list[VectorOp] = []
        embed: list[CatalogEvent] = []
        for ev in upserts:
            iid = str(ev.item_id)
            h, ts, deleted = stored[iid]
            if ts is not None and ev.ts < ts:
                result.stale += 1
            elif h == hashes[iid] and not deleted:
                ops.append(VectorOp(iid, ev.ts, "touch", hashes[iid]))
            else:
                embed.append(ev)
        for _attempt in range(3):
            ops.extend(self._embedded_ops(embed, texts, hashes, result))
            statuses = self.store.apply(self.version, ops)
            embed = []
            for op, status in zip(ops, statuses, strict=True):
                if status == STALE:
                    result.stale += 1
                elif status == WRITTEN:
                    result.embedded += 1
                elif status == CHANGED:  # stored text changed since the read: embed after all
                    embed.append(next(ev for ev in upserts if str(ev.item_id) == op.item_id))
                else:
                    result.unchanged += 1
            if not embed:
                return result
            ops = []
        raise RuntimeError(f"{len(embed)} items kept changing while being embedded")

    def _embedded_ops(self, events: list[CatalogEvent], texts: dict[str, str], hashes: dict[str, str],
                      result: EmbedResult) -> list[VectorOp]:
        if not events:
            return []
        missing = sorted({hashes[str(ev.item_id)] for ev in events
                          if self.cache.get(hashes[str(ev.item_id)]) is None})
        if missing:
            by_hash = {hashes[str(ev.item_id)]: texts[str(ev.item_id)] for ev in events}
            vectors = self._encode([by_hash[h] for h in missing])
            for h, vec in zip(missing, vectors, strict=True):
                self.cache.put(h, vec)
            result.encoded += len(missing)
        ops = []
        for ev in events:
            iid = str(ev.item_id)
            vec = self.cache.get(hashes[iid])
            if vec is None:  # evicted by this very batch (a batch larger than the cache)
                vec = self._encode([texts[iid]])[0]
            ops.append(VectorOp(iid, ev.ts, "upsert", hashes[iid], vec))
        return ops

    def _encode(self, texts: list[str]) -> np.ndarray:
        t0 = time.perf_counter()
        vectors = self.encoder.encode(texts, batch_size=self.batch_size)
        if self.metrics is not None:
            self.metrics.embed_batch_size.observe(len(texts))
            self.metrics.embed_encode_seconds.labels(self.encoder.spec.model_id,
                                                     self.encoder.device.type).observe(time.perf_counter() - t0)
        return vectors

    def _deletes(self, deletes: list[CatalogEvent]) -> EmbedResult:
        """A delete removes the item's vector from every version readers might use."""
        result = EmbedResult()
        versions = {self.version, *(self._delete_versions() if self._delete_versions else [])}
        ops = [VectorOp(str(ev.item_id), ev.ts, "delete") for ev in deletes]
        for version in sorted(versions):
            statuses = self.store.apply(version, ops)
            if version == self.version:
                result.deleted = sum(1 for s in statuses if s == WRITTEN)
                result.stale += sum(1 for s in statuses if s == STALE)
        return result
