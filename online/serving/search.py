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
  readers hot-reload. Logging is best-effort and off the request path (:class:`SearchLogQueue`).

>>> searcher = Searcher(client, settings, ranker, encoder)                  # doctest: +SKIP
>>> [h.item_id for h in searcher.search("organic milk", user_id="42", k=5).items]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import redis
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fusionrec.core.errors import FusionrecError
from fusionrec.core.keys import Keys
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.content import ContentIndex
from fusionrec.online.candidates.context import CandidateReader
from fusionrec.online.learning.search_feedback import KIND_HEADER, KIND_SEARCH, SearchLog, encode_search_log
from fusionrec.streams.producer import kafka_config

if TYPE_CHECKING:  # both import torch; a search server has them loaded by the time it searches
    from fusionrec.models.encoder import TextEncoder
    from fusionrec.online.ranking.fusion import FusionRanker

log = logging.getLogger(__name__)

_DROP_LOG_EVERY_S = 10.0  # at most one warning this often while search lists are being dropped


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
                 search_log: SearchLogQueue | None = None) -> None:
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
        self.search_log = search_log
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
        if stored_id and self.search_log is not None:
            self.search_log.log(SearchLog(user_id=stored_id, ts=int(time.time() * 1000),
                                          items=[h.item_id for h in hits], f_item=[h.f_item for h in hits],
                                          f_query=[h.f_query for h in hits], model=number))
        return SearchResult(query, user_id, number, model.search.alpha, model.search.beta, hits)

    def _not_deleted(self, found: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if not found:
            return found
        flags = cast(list[int], self.redis.smismember(self.keys.deleted_items(), [i for i, _ in found]))
        return [pair for pair, gone in zip(found, flags, strict=True) if not gone]


class SearchLogQueue:
    """Served search lists on their way to the feedback topic, never on a request's path.

    A request only enqueues (:meth:`log` is a ``put_nowait`` on a bounded queue); one thread hands the
    lists to a producer of its own, whose buffer batches and retries. The lists are training data
    for the search mix, not records anyone waits for, so nothing here blocks: a list that finds the
    queue full, the producer's buffer full (``BufferError``, which elsewhere means poll and retry) or
    the broker unreachable for ``search_log_timeout_s`` is dropped and counted in ``dropped`` by
    reason, with one warning every ``_DROP_LOG_EVERY_S`` at most. :meth:`close` flushes for a bounded
    time and counts what is left.

    >>> logs = SearchLogQueue.from_settings(settings, dropped=counter)          # doctest: +SKIP
    >>> logs.log(SearchLog(user_id="u1", ts=0, items=["7"], f_item=[0.1], f_query=[0.9], model=3))  # doctest: +SKIP
    >>> logs.close(5.0)                                                         # doctest: +SKIP
    """

    def __init__(self, producer: Producer, topic: str, dropped: Any, *, maxsize: int) -> None:
        self.producer = producer
        self.topic = topic
        self.dropped = dropped  # a Counter labelled by reason
        self._queue: queue.Queue[SearchLog] = queue.Queue(maxsize)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._unreported = 0
        self._reported_at = -math.inf
        self._thread = threading.Thread(target=self._run, name="search-log", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, dropped: Any) -> SearchLogQueue:
        conf = kafka_config(settings, **{"linger.ms": 50, "compression.type": "lz4",
                                         "message.timeout.ms": int(settings.serve.search_log_timeout_s * 1000)})
        return cls(Producer(conf), settings.kafka.topic_feedback, dropped, maxsize=settings.serve.search_log_queue)

    def log(self, entry: SearchLog) -> None:
        """Queue one served list for the feedback topic; never blocks (a full queue drops it)."""
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._drop("queue_full")

    def close(self, timeout: float) -> None:
        """Hand over what is queued and wait at most ``timeout`` seconds for the broker to take it."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join(timeout)
        left = self.producer.flush(max(0.0, deadline - time.monotonic())) + self._queue.qsize()
        if left:
            self._drop("shutdown", left)

    def _run(self) -> None:
        while not (self._closing.is_set() and self._queue.empty()):
            try:
                entry = self._queue.get(timeout=0.1)
            except queue.Empty:
                self.producer.poll(0)  # delivery reports
                continue
            self._produce(entry)

    def _produce(self, entry: SearchLog) -> None:
        try:
            self.producer.produce(self.topic, encode_search_log(entry), key=entry.user_id,
                                  headers=[(KIND_HEADER, KIND_SEARCH)], on_delivery=self._delivered)
        except BufferError:
            self._drop("buffer_full")
        except KafkaException as exc:
            log.debug("search list not produced: %s", exc)
            self._drop("produce_error")
        self.producer.poll(0)

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            log.debug("search list not delivered: %s", err)
            self._drop("delivery_failed")

    def _drop(self, reason: str, n: int = 1) -> None:
        self.dropped.labels(reason).inc(n)
        with self._lock:
            self._unreported += n
            now = time.monotonic()
            if now - self._reported_at < _DROP_LOG_EVERY_S:
                return
            n, self._unreported, self._reported_at = self._unreported, 0, now
        log.warning("dropped %d served search lists since the last warning (latest: %s); searches are still "
                    "answered, the search mix learns from fewer lists until the feedback topic takes them", n, reason)
