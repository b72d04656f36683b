"""The fused model: river scorer + torch head + fusion stacker, scored and learned together.

:class:`FusionModel` is what the learner trains, checkpoints and the rankers load. ``predict`` gives
every scorer's output for a batch of candidate rows; ``learn`` is predict-then-learn: it returns the
fused probabilities *before* the update (the prequential prediction), then updates the stacker on
the scorers' pre-update outputs, then the scorers themselves.

>>> model = FusionModel(seed=1)
>>> pred = model.predict(Rows.of_pools([pool], vectors))   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from fusionrec.models.vectors import VectorLookup
from fusionrec.online.candidates.features import FEATURES, INDEX, SPARSE_FEATURES, VECTOR_FEATURES, CandidatePool
from fusionrec.online.learning.choice import OrderChoice
from fusionrec.online.learning.explore import ExploreShare, new_items
from fusionrec.online.learning.scorers import SCORERS, FusionStacker, RiverScorer, SearchMix, TorchScorer, scorer_inputs


@dataclass
class Rows:
    """Candidate rows of one or more pools, with the dense inputs of the torch head."""

    X: np.ndarray  # (n, F) pool features
    items: list[str]
    profile: np.ndarray  # (n, d); zeros where the user has no profile vector
    item: np.ndarray  # (n, d); zeros where the item has no vector
    version: str | None  # vector model version of the dense inputs (None: no vectors at all)

    @classmethod
    def of_pools(cls, pools: Sequence[CandidatePool], lookup: VectorLookup | None, dim: int = 0) -> Rows:
        """Stack pools; fetch item vectors of the profile's version; mark ``has_vector``."""
        X = np.concatenate([p.X for p in pools]) if pools else np.zeros((0, len(FEATURES)), np.float32)
        items = list(chain.from_iterable(p.items for p in pools))
        version = next((p.profile[0] for p in pools if p.profile is not None), None)
        vectors = lookup.get(version, items) if (lookup is not None and version is not None) else {}
        if vectors:
            dim = len(next(iter(vectors.values())))
        profile = np.zeros((len(items), dim), dtype=np.float32)
        item = np.zeros((len(items), dim), dtype=np.float32)
        start = 0
        col = FEATURES.index("has_vector")
        for p in pools:
            if p.profile is not None and p.profile[0] == version and dim:
                profile[start: start + len(p)] = p.profile[1]
            start += len(p)
        rows = [r for r, i in enumerate(items) if i in vectors] if vectors else []
        if rows:
            item[rows] = np.stack([vectors[items[r]] for r in rows])
            X[rows, col] = 1.0
        return cls(X=X, items=items, profile=profile, item=item, version=version)

    def dense(self) -> dict[str, np.ndarray]:
        return {"profile": self.profile, "item": self.item, "features": self.X}

    def take(self, rows: np.ndarray) -> Rows:
        return Rows(X=self.X[rows], items=[self.items[r] for r in rows], profile=self.profile[rows],
                    item=self.item[rows], version=self.version)


@dataclass
class Prediction:
    fused: np.ndarray  # (n,) fused probability
    scorers: dict[str, np.ndarray]  # name -> (n,) score the scorer alone ranks by
    contributions: np.ndarray  # (n, len(fusion scorers)) w_i * x_i
    names: list[str]  # fusion scorer names, columns of ``contributions``


class FusionModel:
    """River scorer + torch head + fusion stacker; ``use_vectors=False`` is the model without LLM vectors.

    River reads the sparse features alone (:data:`SPARSE_FEATURES`), with or without vectors: what the
    vectors say reaches the fused score through the torch head and the vector sources' scores, each
    weighed by the stacker. With vectors it also learns ``plain``, a second stacker over the same inputs
    less the torch head and the vector sources' scores, on the same rows: the model without vectors,
    weight for weight, so serving its order (below) falls back exactly to what the vectors add nothing
    to. Lists are served in the order each segment of users has learned to prefer (:attr:`choice`,
    :mod:`fusionrec.online.learning.choice`): the stacker's, unless one of its parts (``river``,
    ``torch_head``, ``fusion_plain``) or the reciprocal rank fusion of the learned scorers' orders
    (``reciprocal_rank``, :func:`order_scores`) clearly ranks that segment better.

    It also carries the search mix (:class:`fusionrec.online.learning.scorers.SearchMix`), so one checkpoint holds
    everything a reader serves.
    """

    def __init__(self, use_vectors: bool = True, seed: int = 0, hidden: int = 64) -> None:
        self.use_vectors = use_vectors
        self.river = RiverScorer(SPARSE_FEATURES)
        self.torch = TorchScorer(hidden=hidden, seed=seed) if use_vectors else None
        self.fusion = FusionStacker(self._scorers())
        self.plain = FusionStacker(self._plain_scorers()) if use_vectors else None
        self.search = SearchMix()
        self.explore = ExploreShare()
        self.choice = OrderChoice(self._orders())
        self.examples = 0

    def _scorers(self) -> tuple[str, ...]:
        return SCORERS if self.use_vectors else self._plain_scorers()

    @staticmethod
    def _plain_scorers() -> tuple[str, ...]:
        return tuple(s for s in SCORERS if s not in ("torch_head", *VECTOR_FEATURES))

    def _orders(self) -> tuple[str, ...]:
        parts = ("river", "torch_head", "fusion_plain") if self.use_vectors else ("river",)
        return ("fusion", *parts, "reciprocal_rank")

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("search", SearchMix())  # checkpoints written before search existed
        self.__dict__.setdefault("explore", ExploreShare())  # ... and before the learned share of new items
        # ... and before the served order was chosen (the plain stacker learns from now on)
        self.__dict__.setdefault("plain", FusionStacker(self._plain_scorers()) if self.use_vectors else None)
        self.__dict__.setdefault("choice", OrderChoice(self._orders()))
        self.choice.extend(self._orders())
        # features and sources added since the checkpoint start at weight 0 and are learned from now on
        # (the torch head, whose input width changed, abstains until it has learned the new width)
        self.river.extend(SPARSE_FEATURES)
        self.river.drop(VECTOR_FEATURES)  # checkpoints from when river read the vector features as well
        self.fusion.extend(self._scorers())
        if self.plain is not None:
            self.plain.extend(self._plain_scorers())

    def served_scores(self, pools: Sequence[CandidatePool], pred: Prediction,
                      segments: Sequence[int] | None = None) -> tuple[np.ndarray, list[str]]:
        """The scores each pool's rows are served by (its segment's chosen order; ``pred`` holds the pools'
        rows one after another) and the name of each pool's order; ``segments``: the pools' segments
        (:func:`pool_segments`), if known."""
        chosen = self.choice.chosen
        names = [chosen(s) for s in (segments if segments is not None else pool_segments(pools))]
        if all(name == "fusion" for name in names):
            return pred.fused, names
        served = pred.fused.copy()
        start = 0
        for pool, name in zip(pools, names, strict=True):
            end = start + len(pool)
            scores = order_scores(name, pred, start, end) if name != "fusion" else None
            if scores is not None:
                served[start:end] = scores
            start = end
        return served, names

    def arrange(self, pool: CandidatePool, order: Sequence[int], segment: int | None = None) -> list[int]:
        """A pool's score order with the learned share of new items among its first places (``segment``:
        the pool's, if known)."""
        return self.explore.arrange(order, new_items(pool.X, INDEX["src_repeat"]), segment)

    def learn_explore(self, pools: Sequence[CandidatePool], positives: Sequence[np.ndarray],
                      lookup: VectorLookup | None) -> None:
        """Replay whole labelled pools, scored by the model as it is (call before :meth:`learn`): every
        order's list for the served-order choice, the stacker's for the share of new items."""
        if not pools:
            return
        pred = self.predict(Rows.of_pools(pools, lookup if self.use_vectors else None))
        start = 0
        for pool, positive in zip(pools, positives, strict=True):
            end = start + len(pool)
            scores = pred.fused[start:end]
            if not np.isfinite(scores).all():
                start = end
                continue
            new = new_items(pool.X, INDEX["src_repeat"])
            # every order's list as it would be served now, then the share learns on the stacker's order
            hit: dict[str, bool] = {}
            for name in self.choice.orders:
                s = order_scores(name, pred, start, end)
                if s is None or not np.isfinite(s).all():
                    continue
                order = _order(s)
                hit[name] = bool(positive[self.explore.arrange(order, new)[: self.choice.places]].any())
            self.choice.learn(ExploreShare.segment(new), hit)
            self.explore.learn(_order(scores), new, positive)
            start = end

    def predict(self, rows: Rows) -> Prediction:
        river_p = self.river.predict_pool_rows(rows.X)
        torch_p = self._torch_predict(rows)
        inputs = scorer_inputs(self.fusion.names, river_p, torch_p, rows.X)
        scorers = {"river": river_p}
        if torch_p is not None:
            scorers["torch_head"] = torch_p
        if self.plain is not None:
            scorers["fusion_plain"] = self.plain.proba_matrix(scorer_inputs(self.plain.names, river_p, None, rows.X))
        clean = self.fusion.clean(inputs)
        return Prediction(fused=self.fusion.proba_of_clean(clean), scorers=scorers,
                          contributions=self.fusion.contributions(clean, clean=True), names=list(self.fusion.names))

    def learn(self, rows: Rows, y: np.ndarray) -> np.ndarray:
        """Predict-then-learn on labelled rows; returns the fused probabilities before the update."""
        river_p = self.river.predict_pool_rows(rows.X)
        torch_p = self._torch_predict(rows)
        inputs = scorer_inputs(self.fusion.names, river_p, torch_p, rows.X)
        before = self.fusion.proba_matrix(inputs)
        self.fusion.learn_matrix(inputs, y)
        if self.plain is not None:
            self.plain.learn_matrix(scorer_inputs(self.plain.names, river_p, None, rows.X), y)
        self.river.learn_pool_rows(rows.X, y)
        if self.torch is not None and rows.version is not None and rows.profile.shape[1]:
            self.torch.learn_many(rows.dense(), y, version=rows.version)
        self.examples += len(y)
        return before

    def _torch_predict(self, rows: Rows) -> np.ndarray | None:
        if self.torch is None or rows.version is None or not rows.profile.shape[1]:
            return None
        return self.torch.predict_proba_many(rows.dense(), version=rows.version)


def pool_segments(pools: Sequence[CandidatePool]) -> list[int]:
    """Each pool's segment of users (:meth:`ExploreShare.segment`: how many of its rows are the user's
    own items), for all the pools at once."""
    if not pools:
        return []
    own = ~(np.concatenate([p.X[:, INDEX["src_repeat"]] for p in pools]) <= 0.0)  # not new_items
    owner = np.repeat(np.arange(len(pools)), [len(p) for p in pools])
    return ExploreShare.segments(np.bincount(owner, weights=own, minlength=len(pools)))


# Reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009): a row scores sum(1 / (k + rank))
# over the learned scorers' orders, rank 1 the best; k = 60 as in the paper.
RRF_K = 60.0
RRF_OF = ("fusion", "river", "torch_head")


def order_scores(name: str, pred: Prediction, start: int, end: int) -> np.ndarray | None:
    """Rows ``start:end`` (one pool) scored for the order ``name``: the fused score (``fusion``), a part's
    score, or ``reciprocal_rank`` over the stacker's, river's and the torch head's orders (those the
    prediction has and that tell rows apart); None for a part the prediction lacks."""
    if name == "fusion":
        return pred.fused[start:end]
    if name != "reciprocal_rank":
        scores = pred.scorers.get(name)
        return None if scores is None else scores[start:end]
    total = np.zeros(end - start)
    if end <= start:
        return total
    for part in RRF_OF:
        scores = pred.fused[start:end] if part == "fusion" else pred.scorers.get(part, np.empty(0))[start:end]
        if len(scores) != end - start or not np.isfinite(scores).all() or np.ptp(scores) == 0:
            continue  # missing, broken, or abstaining (one score for every row says nothing of order)
        ranks = np.empty(end - start)
        ranks[_order(scores)] = np.arange(1, end - start + 1)
        total += 1.0 / (RRF_K + ranks)
    return total


def _order(scores: np.ndarray) -> list[int]:
    """Rows by descending score, ties in row order."""
    return np.lexsort((np.arange(len(scores)), -scores.astype(np.float64))).tolist()


def explain(pred: Prediction, rows: Sequence[int], top: int = 3) -> list[dict[str, float]]:
    """For each row, the scorers that pushed its score up most, with their contributions (one sort
    for all the rows)."""
    if not len(rows):
        return []
    contrib = pred.contributions[np.asarray(rows)]
    order = np.argsort(-contrib, axis=1, kind="stable")[:, :top]
    values = np.take_along_axis(contrib, order, axis=1)
    # each row's values descend, so the positive ones lead it: a row keeps its first ``shown``
    shown = np.count_nonzero(values > 0, axis=1).tolist()
    names = np.asarray(pred.names, dtype=object)[order].tolist()
    rounded = values.round(6).tolist()
    # the rows are equally long by construction: unchecked zips (a third of the time of checked ones), and
    # for the default three a dict display for rows that keep all of them (another 2x)
    if order.shape[1] == 3:
        return [{n[0]: v[0], n[1]: v[1], n[2]: v[2]} if c == 3 else dict(zip(n[:c], v[:c], strict=False))
                for n, v, c in zip(names, rounded, shown, strict=False)]
    return [dict(zip(n[:c], v[:c], strict=False)) for n, v, c in zip(names, rounded, shown, strict=False)]
