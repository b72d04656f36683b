"""Prequential evaluation over time-ordered events, through the production code path.

Events are cut into *units* (a basket: consecutive events of one user in one session; without
sessions, one event). Units go to Redis in chunks in which no user appears twice. For each unit that
contains purchases, *before* its chunk is applied, the user's candidate pool is built from the
current state and ranked by every method, and the rankings are scored against the purchased items.
The chunk is then applied by the same :class:`StateStore` and :class:`RecommendationWriter` the
stream consumer runs; the writer's logged decisions go through the same
:class:`~fusionrec.online.learning.feedback.FeedbackJoiner` and
:class:`~fusionrec.online.learning.learner.Learner` as ``fusionrec learner``
(predict-then-learn). Methods:

* ``system``: the full fusion (river + torch head + stacker) the learner has trained so far, each
  pool ranked in the order its segment of users is served in (:mod:`fusionrec.online.learning.choice`);
* ``river``, ``torch_head``: one learned scorer alone over the same pool;
* ``fusion_no_llm``: a second fusion model trained on the same examples without LLM vectors, served
  the same way;
* ``covisitation``: the pool's co-visitation candidates by co-visitation strength;
* ``served``: the top-K the writer stored for the user (what readers got; ranked by the model as it
  was at the user's previous visit);
* ``popularity``: the globally most interacted-with items so far;
* ``most_bought``: the user's own most purchased items so far (empty for a first basket);
* ``content``: the items nearest to the user's profile vector (the content source alone: the same
  search the pool's content candidates come from), when the catalog has been embedded
  (:meth:`Evaluator.embed_catalog`);
* ``fresh``: the fresh source alone, in order of similarity: of the items nearest to the profile
  vector, those with few interactions (at most ``FUSIONREC_REC_FRESH_CANDIDATES``), when the catalog
  has been embedded;
* ``tifu_knn``, ``tifu_knn_dunnhumby``, ``upcf``: published next-basket methods
  (:mod:`~fusionrec.apps.evaluation.published`), the first with the paper's Complete Journey
  settings, the second with its Dunnhumby settings; ``repurchase``: a time-aware repurchase model
  (:mod:`~fusionrec.apps.evaluation.repurchase`). They keep their own state, see the same baskets
  in the same order (each unit's items, impressions aside) and are never tuned on the scored part.
  They need nothing from the system's pass, so they run beside it in a worker process
  (:mod:`~fusionrec.apps.evaluation.published_pass`), their scores collected at the end.

Without an embedded catalog, ``torch_head`` and ``fusion_no_llm`` are left out (there are no vectors).

Every method is also scored on the basket's *repeat* and *explore* parts and on its *cold-start*
items (:mod:`~fusionrec.apps.evaluation.metrics`), reported under ``methods.<name>.repeat``,
``methods.<name>.explore`` and ``cold_start``.

Metrics per unit: HitRate@10 (any purchased item in the top 10), Recall@20, NDCG@10 (binary) with
two ideal DCGs (``ndcg@10``, ``ndcg@10_basket``). ``paired.<split>.<method>``: the system against that
method basket by basket, overall and on cold start: the baskets only the system hit (``wins``), only
the method hit (``losses``), and the exact sign test's ``p`` on them
(:func:`~fusionrec.apps.evaluation.metrics.paired`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from fusionrec.apps.evaluation.metrics import RECALL_K, SplitScores, TopCounter, basket_parts, paired
from fusionrec.apps.evaluation.published_pass import Method, Observed, PublishedPass, PublishedProcess, Scored
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import version_info
from fusionrec.models.embedder import CatalogEmbedder
from fusionrec.models.encoder import TextEncoder
from fusionrec.models.vectors import VectorStore
from fusionrec.online.candidates.features import CandidatePool
from fusionrec.online.learning.feedback import FeedbackJoiner, Snapshot
from fusionrec.online.learning.learner import Learner
from fusionrec.online.learning.model import FusionModel, Rows, pool_segments
from fusionrec.online.ranking.fusion import FusionRanker
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.datasets import Dataset
from fusionrec.streams.state import Positioned, StateStore


@dataclass
class Unit:
    user: str
    start: int
    stop: int
    targets: set[str]
    ts: int


def units(ds: Dataset) -> Iterator[Unit]:
    ev = ds.events
    users = ev.user_id.to_numpy()
    sessions = ev.session_id.to_numpy() if "session_id" in ev.columns else np.arange(len(ev)).astype(str)
    types = ev.type.to_numpy()
    items = ev.item_id.to_numpy()
    ts = ev.ts.to_numpy()
    start = 0
    for i in range(1, len(ev) + 1):
        if i == len(ev) or users[i] != users[start] or sessions[i] != sessions[start]:
            targets = {items[j] for j in range(start, i) if types[j] == "purchase"}
            yield Unit(str(users[start]), start, i, targets, int(ts[start]))
            start = i


class LiveModel:
    """Serves the learner's model as it is right now (evaluation needs no checkpoint round trip)."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner

    def current(self) -> tuple[int, FusionModel]:
        return 0, self.learner.model


log = logging.getLogger(__name__)

CONTENT_CACHE_MAX = 100_000  # content searches remembered at most (users), about 3.5 kB each
BASE_METHODS = ("system", "river", "covisitation", "served", "popularity", "most_bought")


class Evaluator:
    """Runs one prequential pass of the system and the baselines over a dataset."""

    def __init__(self, client: redis.Redis, settings: Settings, *, published_worker: bool = True,
                 published: dict[str, Method] | None = None) -> None:
        """``published`` replaces the published methods (variants of them, say); they run in this process."""
        # every unit's events get distinct ids (their row numbers): nothing to drop as a producer's copy
        settings = settings.replace(dedupe_ids=0)
        self.settings = settings
        self.store = StateStore(client, settings)
        self.learner = Learner(settings, None, None)
        self.no_llm = Learner(settings, None, None, model=FusionModel(use_vectors=False, seed=settings.learn.seed))
        self.joiner = FeedbackJoiner.of(settings)
        self.ranker = FusionRanker(client, settings, LiveModel(self.learner))  # type: ignore[arg-type]
        self.learner.lookup = self.ranker.lookup
        self._logged: list[Snapshot] = []
        self.writer = RecommendationWriter(client, settings, ranker=self.ranker, sink=self._logged.extend)
        self.reader = RecommendationReader(client, settings)
        # the published methods run beside the system's pass, in a worker process unless told otherwise
        self.published: PublishedPass | PublishedProcess = (
            PublishedPass(published) if published is not None or not published_worker else PublishedProcess())
        self.scores = {name: SplitScores() for name in BASE_METHODS}
        self.popular = TopCounter(RECALL_K)
        self.bought: dict[str, Counter[str]] = defaultdict(Counter)
        self.seen: dict[str, set[str]] = defaultdict(set)  # items each user interacted with so far

    def run(self, ds: Dataset, *, chunk_events: int = 2000, progress: bool = True,
            on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
        self._load_catalog(ds)
        # a user's profile vector moves only with their own events: the search that ranked them after one
        # basket answers the scoring of their next: one remembered search per user
        content = self.writer.candidates.content
        content.cache_size = max(content.cache_size, min(int(ds.events["user_id"].nunique()), CONTENT_CACHE_MAX))
        rows = ds.events.to_dict("records")
        chunk: list[Unit] = []
        users: set[str] = set()
        size = 0
        bar = tqdm(total=len(rows), desc="evaluate", unit="ev", disable=not progress, mininterval=0.5)
        # without a bar (--json into a file, say), a log line a minute says how far the run is
        started = last_log = time.monotonic()
        for unit in units(ds):
            if unit.user in users or size >= chunk_events:
                self._flush(chunk, rows)
                bar.update(size)
                if on_chunk:
                    on_chunk(size)
                chunk, users, size = [], set(), 0
                if not progress and time.monotonic() - last_log >= self.settings.ops.progress_log_s:
                    last_log = time.monotonic()
                    done = unit.start
                    rate = done / max(last_log - started, 1e-9)
                    log.info("evaluate: %d of %d events (%.0f %%), %.0f events/s, about %.0f min left", done,
                             len(rows), 100 * done / len(rows), rate, (len(rows) - done) / max(rate, 1e-9) / 60)
            chunk.append(unit)
            users.add(unit.user)
            size += unit.stop - unit.start
        self._flush(chunk, rows)
        bar.update(size)
        bar.close()
        self.scores.update(self.published.results())
        return self.report(ds.name, len(rows))

    def embed_catalog(self, ds: Dataset, encoder: TextEncoder, progress: bool = True) -> str:
        """Embed the dataset's catalog into this run's namespace and make it the active version."""
        self._load_catalog(ds)
        store = VectorStore(self.store.redis, self.settings)
        info = store.register(version_info(encoder.spec, self.settings))
        embedder = CatalogEmbedder(encoder, store, info.version, batch_size=self.settings.embed.batch_size,
                                   cache_items=max(self.settings.embed.cache_items, len(ds.items)))
        events = ds.catalog()
        chunk = self.settings.embed.batch_size * 8
        for i in tqdm(range(0, len(events), chunk), desc="embed catalog", unit="chunk", disable=not progress):
            embedder.process(events[i: i + chunk])
        store.activate(info.version)
        for name in ("content", "fresh", "torch_head", "fusion_no_llm"):
            self.scores[name] = SplitScores()
        return info.version

    def _load_catalog(self, ds: Dataset, batch: int = 5000) -> None:
        events = ds.catalog()
        for i in range(0, len(events), batch):
            self.store.apply_catalog(events[i: i + batch])

    def _rankings(self, scored: list[Unit]) -> dict[str, dict[str, list[str]]]:
        """Every method's top items for each scored unit's user, from the state before the unit."""
        contexts = self.writer.candidates.for_stored_users({u.user: u.ts for u in scored})
        pools = self.ranker.pools(contexts)
        pred = self.learner.model.predict(Rows.of_pools(pools, self.ranker.lookup))
        # the fused models rank as they serve: each pool in its segment's chosen order
        segments = pool_segments(pools)
        scores = {"system": self.learner.model.served_scores(pools, pred, segments)[0], "river": pred.scorers["river"]}
        if "torch_head" in self.scores:
            scores["torch_head"] = pred.scorers.get("torch_head", np.full(len(pred.fused), 0.5))
            plain = self.no_llm.model.predict(Rows.of_pools(pools, None))
            scores["fusion_no_llm"] = self.no_llm.model.served_scores(pools, plain, segments)[0]
        served = self.reader.many([u.user for u in scored], k=RECALL_K)
        # the fused models serve their lists with the share of new items they learned, as the ranker does
        fused = {"system": self.learner.model, "fusion_no_llm": self.no_llm.model}
        out: dict[str, dict[str, list[str]]] = {}
        start = 0
        for u, ctx, pool, segment in zip(scored, contexts, pools, segments, strict=True):
            end = start + len(pool)
            ranked = {name: _top(pool, s[start:end], fused.get(name), segment) for name, s in scores.items()}
            covis = pool.column("covis")
            ranked["covisitation"] = [pool.items[r] for r in np.argsort(-covis, kind="stable")[:RECALL_K]
                                      if covis[r] > 0]
            ranked["served"] = [r.item_id for r in served[u.user].items]
            ranked["popularity"] = self.popular.ranked()
            ranked["most_bought"] = [i for i, _ in self.bought[u.user].most_common(RECALL_K)]
            if "content" in self.scores:  # the catalog is embedded: the pool's own content search
                ranked["content"] = [i for i, _ in ctx.content[:RECALL_K]]
                ranked["fresh"] = [i for i, _ in ctx.fresh]
            out[u.user] = ranked
            start = end
        return out

    def _learn(self) -> None:
        groups = self.joiner.add(self._logged)
        self._logged.clear()
        self.learner.learn(groups)
        if "fusion_no_llm" in self.scores:
            self.no_llm.learn(groups)

    def _flush(self, chunk: list[Unit], rows: list[dict[str, Any]]) -> None:
        scored = [u for u in chunk if u.targets]
        parts = {u.user: basket_parts(u.targets, self.seen[u.user], self.popular.counts) for u in scored}
        if scored:
            rankings = self._rankings(scored)
            for u in scored:
                for name, items in rankings[u.user].items():
                    self.scores[name].add(items, parts[u.user], u.ts)
        observed: list[Observed] = []
        batch: list[Positioned] = []
        for u in chunk:
            basket = set()
            for j in range(u.start, u.stop):
                row = rows[j]
                if row["type"] != "impression":
                    self.popular.add(row["item_id"])
                    basket.add(row["item_id"])
                if row["type"] == "purchase":
                    self.bought[u.user][row["item_id"]] += 1
                batch.append(Positioned(0, j, _event(row, j)))
            self.seen[u.user] |= basket
            observed.append(Observed(u.user, basket, u.targets, u.ts))
        self.published.step([Scored(u.user, u.ts, parts[u.user]) for u in scored], observed)
        result = self.store.apply(batch)
        self.writer(result)
        self._learn()

    def close(self) -> None:
        """Stop the published methods' worker (it has stopped already after :meth:`run`)."""
        self.published.close()

    def report(self, name: str, n_events: int) -> dict[str, Any]:
        overall = {m: s.splits["overall"] for m, s in self.scores.items()}
        cold = {m: s.splits["cold_start"] for m, s in self.scores.items()}
        return {"dataset": name, "events": n_events, "evaluated": overall["system"].n,
                "methods": {m: s.report() for m, s in self.scores.items()},
                "cold_start_evaluated": cold["system"].n,
                "cold_start": {m: s.summary() for m, s in cold.items()},
                # the system against each other method on the same baskets (HitRate@10)
                "paired": {split: {m: paired(by["system"], s) for m, s in by.items() if m != "system"}
                           for split, by in (("overall", overall), ("cold_start", cold))},
                "learner": {"examples": self.learner.model.examples,
                            "explore_share": self.learner.model.explore.report(),
                            "served_order": self.learner.model.choice.report(),
                            "decisions": dict(sorted(self.joiner.outcomes.items()))}}


def _top(pool: CandidatePool, scores: np.ndarray, model: FusionModel | None = None,
         segment: int | None = None) -> list[str]:
    """The pool's best ``RECALL_K`` items by score, ties in pool order (the fixed blend); a fused
    ``model`` arranges them with its learned share of new items (``segment``: the pool's, if known)."""
    order = np.argsort(-scores, kind="stable").tolist()
    if model is not None:
        order = model.arrange(pool, order, segment)
    return [pool.items[r] for r in order[:RECALL_K]]


def _event(row: dict[str, Any], n: int) -> UserEvent:
    return UserEvent(event_id=str(n), type=row["type"], user_id=row["user_id"], item_id=row["item_id"],
                     ts=int(row["ts"]))
