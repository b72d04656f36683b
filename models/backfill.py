"""Model versions: registering the configured model, and filling a new version before readers flip.

When the configured model (id, weights, pooling, length, vector format) differs from the active
version, the pool re-embeds the whole stored catalog (the ``meta`` hashes the consumers keep) into
the new version in the background, while its workers already write live catalog events there. Only
when every stored item was covered does one SET make the new version active; readers never see a
mix of dimensions. One process at a time fills a version (a renewed lock key); a crashed backfill
is resumed by the next one, and items already embedded are skipped by their content hash.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import cast

import redis
from tqdm import tqdm

from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.scripts import register
from fusionrec.core.settings import Settings
from fusionrec.models.embedder import CatalogEmbedder, EmbedMetrics
from fusionrec.models.encoder import RECIPES, ModelSpec, TextEncoder
from fusionrec.models.text import TEMPLATE_VERSION
from fusionrec.models.vectors import ModelVersion, VectorStore
from fusionrec.streams.contract import CatalogEvent

log = logging.getLogger(__name__)

# Renew the lock only while we still own it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
LOCK_MS = 30_000


def version_info(spec: ModelSpec, settings: Settings) -> ModelVersion:
    version = spec.version(settings.vectors.dtype, settings.vectors.quant, TEMPLATE_VERSION)
    return ModelVersion(version=version, model_id=spec.model_id, revision=spec.revision, dim=spec.dim,
                        pooling=spec.pooling, normalize=spec.normalize, max_length=spec.max_length,
                        vector_dtype=settings.vectors.dtype)


def encoder_for_version(settings: Settings, version: str) -> TextEncoder:
    """The configured encoder, on whichever runtime makes ``version``'s vectors when the runtime is ``auto``.

    A query encoder on a CPU host reading vectors a GPU pool wrote (torch) uses torch rather than its
    own default (int8 ONNX), and the other way round. An explicit runtime is kept as configured.
    """
    spec = ModelSpec.from_settings(settings)
    if settings.embed.runtime == "auto":
        for runtime in (spec.runtime, *RECIPES):
            candidate = dataclasses.replace(spec, runtime=runtime)
            if version_info(candidate, settings).version == version:
                spec = candidate
                break
    return TextEncoder.from_settings(settings, spec=spec, device=None if spec.runtime == "torch" else "cpu")


def live_versions(store: VectorStore) -> list[str]:
    """Versions a reader may still use (deletes go to all of them)."""
    return [v for v, info in store.versions().items() if info.status != "retired"]


def catalog_events(client: redis.Redis, keys: Keys, chunk: int = 256) -> Iterator[list[CatalogEvent]]:
    """The stored catalog (live items only) as upsert events carrying their stored event time."""
    batch: list[str] = []
    for raw in client.scan_iter(match=keys.item_meta_pattern(), count=1000):
        batch.append(raw.decode())
        if len(batch) >= chunk:
            yield _events(client, keys, batch)
            batch = []
    if batch:
        yield _events(client, keys, batch)


def _events(client: redis.Redis, keys: Keys, meta_keys: list[str]) -> list[CatalogEvent]:
    pipe = client.pipeline(transaction=False)
    for key in meta_keys:
        pipe.hgetall(key)
    out = []
    for key, raw in zip(meta_keys, pipe.execute(), strict=True):
        meta = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], raw).items()}
        if meta.get("deleted") or not meta.get("title"):
            continue
        out.append(CatalogEvent(item_id=keys.item_id_from_meta(key), op="upsert", ts=int(meta["ts"]),
                                title=meta["title"], description=meta.get("description"),
                                category=meta.get("category"), brand=meta.get("brand"),
                                price=float(meta["price"]) if meta.get("price") else None))
    return out


def count_catalog(client: redis.Redis, keys: Keys) -> int:
    return sum(1 for _ in client.scan_iter(match=keys.item_meta_pattern(), count=1000))


def prepare(store: VectorStore, info: ModelVersion) -> bool:
    """Register ``info``; True when its version must be filled by a backfill before it can be active."""
    store.register(info)
    active = store.active()
    if active == info.version:
        return False
    if active is None and next(store.redis.scan_iter(match=store.keys.item_meta_pattern(), count=1000), None) is None:
        store.activate(info.version)  # nothing stored yet: the live stream fills it from the start
        return False
    return True


class Backfill:
    """Fills one version from the stored catalog, then activates it."""

    def __init__(self, embedder: CatalogEmbedder, settings: Settings, metrics: Metrics | None = None,
                 progress: bool = True) -> None:
        self.embedder = embedder
        self.store = embedder.store
        self.redis = embedder.store.redis
        self.keys = embedder.store.keys
        self.version = embedder.version
        self.settings = settings
        self.metrics = metrics.of(EmbedMetrics) if metrics is not None else None
        self.progress = progress
        self.token = uuid.uuid4().hex
        self._renew = register(self.redis, _RENEW)

    def run(self, stop: threading.Event) -> bool:
        """Fill and activate; False when stopped first. Waits while another process holds the lock."""
        lock = self.keys.backfill_lock(self.version)
        while not stop.is_set():
            if self.store.active() == self.version:
                return True
            # (or still ours: a fill interrupted by a Redis restart that kept the lock resumes at once)
            if self.redis.set(lock, self.token, nx=True, px=LOCK_MS) or self.redis.get(lock) == self.token.encode():
                try:
                    return self._fill(stop)
                finally:
                    if self.redis.get(lock) == self.token.encode():
                        self.redis.delete(lock)
            log.info("another process is filling %s; waiting", self.version)
            stop.wait(LOCK_MS / 1000 / 3)
        return False

    def _fill(self, stop: threading.Event) -> bool:
        total = count_catalog(self.redis, self.keys)
        model = self.embedder.encoder.spec.model_id
        log.info("re-embedding %d stored catalog items into %s", total, self.version)
        bar = tqdm(total=total, desc=f"backfill {self.version}", unit="item", disable=not self.progress,
                   mininterval=1.0)
        done = 0
        for events in catalog_events(self.redis, self.keys, chunk=self.settings.embed.batch_size * 4):
            if stop.is_set():
                bar.close()
                return False
            self.embedder.process(events)
            self._renew(keys=[self.keys.backfill_lock(self.version)], args=[self.token, LOCK_MS])
            done += len(events)
            bar.update(len(events))
            if self.metrics is not None:
                self.metrics.embed_backfill_items.labels(model).inc(len(events))
                self.metrics.embed_backfill_progress.labels(model).set(done / max(total, 1))
        bar.close()
        self.store.activate(self.version)
        if self.metrics is not None:
            self.metrics.embed_backfill_progress.labels(model).set(1.0)
        return True
