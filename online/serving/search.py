"""Search: a text query ranked for one user by a learned mix of query similarity and personal score.

``score(item) = α·f_item + β·f_query + b`` where

* ``f_query`` is the cosine similarity of the query to the item: the query is encoded by the same
  text encoder as the catalog (it must produce the active vector version) and the
  ``search_candidates`` nearest items come from the vector set (``VSIM``);
* ``f_item`` is the served fusion model's probability that this user acts on the item, from the
  user's live state (repeat, co-visitation, affinities, popularity, profile vector), exactly as the
  writer scores its own candidates; an unknown user gets the features of a user with no history;
* α, β and b are :class:`~fusionrec.online.learning.scorers.SearchMix`, learned online. Each served result list is
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import redis

from fusionrec.core.errors import FusionrecError
from fusionrec.core.keys import Keys
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.content import ContentIndex
from fusionrec.online.candidates.context import CandidateReader
from fusionrec.online.learning.search_feedback import KIND_HEADER, KIND_SEARCH, SearchLog, encode_search_log
from fusionrec.streams.producer import EventProducer

if TYPE_CHECKING:  # both import torch; a search server has them loaded by the time it searches
    from fusionrec.models.encoder import TextEncoder
    from fusionrec.online.ranking.fusion import FusionRanker

log = logging.getLogger(__name__)

class SearchUnavailableError(FusionrecError):
    """Search cannot answer now: no active item vectors, or the query encoder does not match them."""


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
                 encoder: TextEncoder | Callable[[str], TextEncoder], keys: Keys | None = None,
                 log_producer: EventProducer | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.ranker = ranker
        self.content = ContentIndex(client, settings, self.keys)
        self.candidates = CandidateReader(client, settings, self.keys, content=self.content)
        self._factory = None if hasattr(encoder, "encode") else cast("Callable[[str], TextEncoder]", encoder)
        self._encoder: TextEncoder | None = None if self._factory else cast("TextEncoder", encoder)
        self._encoder_for = ""  # the active version the factory was last asked for
        self._encoder_lock = threading.Lock()
        self.producer = log_producer
        self.pseudonyms = Pseudonyms.for_settings(settings)

    def encoder(self, version: str) -> TextEncoder:
        """The query encoder for the active ``version``: built on first use (a server without search
        traffic never loads one), and again once each time the active version changes."""
        with self._encoder_lock:
            if self._factory is not None and version != self._encoder_for:
                self._encoder, self._encoder_for = self._factory(version), version
            assert self._encoder is not None
            return self._encoder

    def search(self, query: str, user_id: str | None, k: int) -> SearchResult:
        version = self.content.active()
        if version is None:
            raise SearchUnavailableError("no item vectors are active yet (start the embedding workers)")
        from fusionrec.models.backfill import version_info

        encoder = self.encoder(version)
        mine = version_info(encoder.spec, self.settings).version
        if mine != version:
            raise SearchUnavailableError(f"the query encoder makes vectors of version {mine}, "
                                         f"but readers use {version}")
        qvec = encoder.encode([query])[0]
        stored_id = self.pseudonyms(user_id) if user_id else None  # how state and feedback know the user
        found = self.content.nearest(version, [qvec], self.settings.serve.search_candidates)[0]
        found = self._not_deleted(found)
        number, model = self.ranker.serving.current()
        if not found:
            return SearchResult(query, user_id, number, model.search.alpha, model.search.beta, [])
        items = [i for i, _ in found]
        f_query = np.clip(np.array([s for _, s in found], dtype=np.float64), 0.0, 1.0)
        ctx = self.candidates.for_stored_users({stored_id or "": int(time.time() * 1000)})[0]
        _, f_item = self.ranker.personal_scores(ctx, items)
        scores = model.search.score(f_item, f_query)
        order = sorted(range(len(items)), key=lambda r: (-scores[r], items[r]))[:k]
        hits = [SearchHit(items[r], round(float(scores[r]), 6), round(float(f_item[r]), 6),
                          round(float(f_query[r]), 6)) for r in order]
        if stored_id and self.producer is not None:
            self._log(stored_id, hits, number)
        return SearchResult(query, user_id, number, model.search.alpha, model.search.beta, hits)

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
            self.producer.produce(self.settings.kafka.topic_feedback, encode_search_log(entry), key=user_id,
                                  headers=[(KIND_HEADER, KIND_SEARCH)])
        except Exception as exc:  # a search is answered even when its feedback cannot be logged
            log.warning("could not log search feedback: %s", exc)
