"""Search: a text query ranked for one user by a learned mix of query similarity and personal score.

``score(item) = α·f_item + β·f_query + b`` where

* ``f_query`` is the cosine similarity of the query to the item: the query is encoded by the same
  text encoder as the catalog (it must produce the active vector version) and the
  ``search_candidates`` nearest items come from the vector set (``VSIM``);
* ``f_item`` is the served fusion model's probability that this user acts on the item, from the
  user's live state (repeat, co-visitation, affinities, popularity, profile vector), exactly as the
  writer scores its own candidates; an unknown user gets the features of a user with no history;
* α, β and b are :class:`online.learners.SearchMix`, learned online. Each served result list is
  logged to the feedback topic (header ``kind: search``); the learner labels it with the user's
  next clicks, carts and purchases of the shown items within the learning window (a list nobody
  acted on says nothing and is dropped) and checkpoints the mix with the fusion model, which
  readers hot-reload.

>>> searcher = Searcher(client, settings, ranker, encoder)                  # doctest: +SKIP
>>> [h.item_id for h in searcher.search("organic milk", user_id="42", k=5).items]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import msgspec
import numpy as np
import redis

from fusionrec.errors import FusionrecError
from fusionrec.keys import Keys
from fusionrec.pseudonyms import Pseudonyms
from fusionrec.settings import Settings
from models.backfill import version_info
from models.encoder import TextEncoder
from online.content import ContentIndex
from online.feedback import POSITIVE_TYPES, Snapshot
from online.fusion import FusionRanker
from online.writer import RecommendationWriter
from streams.producer import EventProducer
from streams.state import UserTouch

log = logging.getLogger(__name__)

KIND_HEADER = "kind"
KIND_SEARCH = b"search"


class SearchUnavailableError(FusionrecError):
    """Search cannot answer now: no active item vectors, or the query encoder does not match them."""


class SearchLog(msgspec.Struct, frozen=True, array_like=True):
    """One served search result list (msgpack on the feedback topic, header ``kind: search``)."""

    user_id: str
    ts: int  # wall ms when served
    items: list[str]  # shown, in ranked order
    f_item: list[float]
    f_query: list[float]
    model: int  # checkpoint whose mix ranked


encode_search_log = msgspec.msgpack.Encoder().encode
_log_decoder = msgspec.msgpack.Decoder(SearchLog)


def decode_search_log(raw: bytes) -> SearchLog:
    return _log_decoder.decode(raw)


@dataclass
class SearchExamples:
    """Labelled rows for :class:`SearchMix`: columns (f_item, f_query), labels 0/1."""

    M: np.ndarray
    y: np.ndarray


class SearchJoiner:
    """Labels each user's latest search with the positives that user's next decisions carry."""

    def __init__(self, window_ms: int, max_users: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_users = max_users
        self.pending: dict[str, SearchLog] = {}
        self.outcomes: Counter[str] = Counter()

    def add(self, entry: SearchLog) -> None:
        if self.pending.pop(entry.user_id, None) is not None:
            self.outcomes["replaced"] += 1
        self.pending[entry.user_id] = entry
        while len(self.pending) > self.max_users:
            self.pending.pop(next(iter(self.pending)))
            self.outcomes["evicted"] += 1

    def observe(self, snapshots: list[Snapshot]) -> SearchExamples | None:
        """Label pending searches from these decisions' actions; returns the examples (or None)."""
        rows: list[tuple[float, float]] = []
        labels: list[float] = []
        for snap in snapshots:
            entry = self.pending.get(snap.user_id)
            if entry is None:
                continue
            if snap.ts > entry.ts + self.window_ms:
                del self.pending[snap.user_id]
                self.outcomes["expired"] += 1
                continue
            acted = {item for kind, item, ts in snap.actions
                     if kind in POSITIVE_TYPES and entry.ts <= ts <= entry.ts + self.window_ms}
            hits = acted.intersection(entry.items)
            if not hits:
                continue
            del self.pending[snap.user_id]
            self.outcomes["labelled"] += 1
            for item, fi, fq in zip(entry.items, entry.f_item, entry.f_query, strict=True):
                rows.append((fi, fq))
                labels.append(1.0 if item in hits else 0.0)
        if not rows:
            return None
        return SearchExamples(M=np.array(rows, dtype=np.float64), y=np.array(labels))


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    score: float
    f_item: float
    f_query: float


@dataclass(frozen=True)
class SearchResult:
    query: str
    user_id: str | None
    model: int
    alpha: float
    beta: float
    items: list[SearchHit]


class Searcher:
    """Encodes queries, finds their nearest items and re-ranks them with the learned mix."""

    def __init__(self, client: redis.Redis, settings: Settings, ranker: FusionRanker,
                 encoder: TextEncoder | Callable[[], TextEncoder], keys: Keys | None = None,
                 log_producer: EventProducer | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.ranker = ranker
        self.content = ContentIndex(client, settings, self.keys)
        self.writer = RecommendationWriter(client, settings, ranker=ranker, keys=self.keys)
        self._encoder = encoder
        self._encoder_lock = threading.Lock()
        self.producer = log_producer
        self.pseudonyms = Pseudonyms.for_settings(settings)

    def encoder(self) -> TextEncoder:
        """The query encoder (loaded on first use: a server without search traffic never loads it)."""
        with self._encoder_lock:
            if not isinstance(self._encoder, TextEncoder):
                self._encoder = self._encoder()
            return self._encoder

    def search(self, query: str, user_id: str | None, k: int) -> SearchResult:
        version = self.content.active()
        if version is None:
            raise SearchUnavailableError("no item vectors are active yet (start the embedding workers)")
        encoder = self.encoder()
        mine = version_info(encoder.spec, self.settings).version
        if mine != version:
            raise SearchUnavailableError(f"the query encoder makes vectors of version {mine}, "
                                         f"but readers use {version}")
        qvec = encoder.encode([query])[0]
        stored_id = self.pseudonyms(user_id) if user_id else None  # how state and feedback know the user
        found = self.content.nearest(version, [qvec], self.settings.search_candidates)[0]
        found = self._not_deleted(found)
        number, model = self.ranker.serving.current()
        if not found:
            return SearchResult(query, user_id, number, model.search.alpha, model.search.beta, [])
        items = [i for i, _ in found]
        f_query = np.clip(np.array([s for _, s in found], dtype=np.float64), 0.0, 1.0)
        ctx = self.writer.contexts({stored_id or "": self._touch(stored_id)})[0]
        _, f_item = self.ranker.personal_scores(ctx, items)
        scores = model.search.score(f_item, f_query)
        order = sorted(range(len(items)), key=lambda r: (-scores[r], items[r]))[:k]
        hits = [SearchHit(items[r], round(float(scores[r]), 6), round(float(f_item[r]), 6),
                          round(float(f_query[r]), 6)) for r in order]
        if stored_id and self.producer is not None:
            self._log(stored_id, hits, number)
        return SearchResult(query, user_id, number, model.search.alpha, model.search.beta, hits)

    def _touch(self, user_id: str | None) -> UserTouch:
        now = int(time.time() * 1000)
        if not user_id:
            return UserTouch(recent=[], last_ts=now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(self.keys.user_recent(user_id), 0, self.settings.rec_recent_items - 1)
        pipe.hget(self.keys.user_state(user_id), "last_seen")
        recent, last_seen = pipe.execute()
        return UserTouch(recent=[r.decode() if isinstance(r, bytes) else r for r in recent],
                         last_ts=max(now, int(last_seen or 0)))

    def _not_deleted(self, found: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if not found:
            return found
        flags = cast(list[int], self.redis.smismember(self.keys.deleted_items(), [i for i, _ in found]))
        return [pair for pair, gone in zip(found, flags, strict=True) if not gone]

    def _log(self, user_id: str, hits: list[SearchHit], model: int) -> None:
        assert self.producer is not None
        entry = SearchLog(user_id=user_id, ts=int(time.time() * 1000), items=[h.item_id for h in hits],
                          f_item=[h.f_item for h in hits], f_query=[h.f_query for h in hits], model=model)
        try:
            self.producer.produce(self.settings.topic_feedback, encode_search_log(entry), key=user_id,
                                  headers=[(KIND_HEADER, KIND_SEARCH)])
        except Exception as exc:  # a search is answered even when its feedback cannot be logged
            log.warning("could not log search feedback: %s", exc)
