"""Online learners that score (user, candidate) pairs; each one is a river estimator.

* :class:`RiverScorer`: logistic regression over the sparse pool features
  (:data:`~fusionrec.online.candidates.features.SPARSE_FEATURES` in the fusion model).
* :class:`TorchScorer`: :class:`fusionrec.models.heads.InteractionHead` over the profile vector, the item vector,
  their product and the pool features, trained by one Adam step per mini-batch.
* :class:`FusionStacker`: the final score, a logistic-regression stacker over the scorers' outputs.
* :class:`SearchMix`: the search score ``α·f_item + β·f_query``, its weights learned from search feedback.

The three logistic regressions share :class:`LogisticScorer`, a :class:`river.base.MiniBatchClassifier`;
the torch head is a :class:`river.base.Classifier` (its mini-batches are vector matrices, not DataFrames).
``learn_one(x, y)`` / ``learn_many(X, y)`` return nothing; ``predict_proba_one`` returns
``{False: p0, True: p1}``. Every learner sanitises its input itself: rows with NaN/inf are skipped when
learning (and predicted as if zero), values are clipped to ``±clip``, and gradients are clipped, so no
input can make a weight non-finite. Hyper-parameters are constructor keywords, so river's ``clone()``
and ``repr()`` work, and each learner survives pickle → unpickle with identical predictions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from river import base, optim, utils

from fusionrec.models.heads import InteractionHead
from fusionrec.online.candidates.features import FEATURES, INDEX, PRIOR

Dense = Mapping[str, np.ndarray]  # "profile" (n, d), "item" (n, d), "features" (n, F)

_LOSS = optim.losses.Log()  # river's log loss: its gradient and its sigmoid (stateless)


def cleaned(M: np.ndarray, clip: float) -> np.ndarray:
    """A copy of ``M`` with NaN and ±inf at 0 and the rest clipped to ``±clip`` (same dtype)."""
    if not np.isfinite(M).all():
        M = np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(M, -clip, clip)


def finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Mask of rows that are finite in every array."""
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        mask &= np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return mask


def _clean(x: Mapping[Any, Any], names: Mapping[str, int], clip: float) -> dict[str, float] | None:
    """The known features of ``x``, in its order, clipped to ``±clip``; None when any is not finite."""
    out: dict[str, float] = {}
    for k, v in x.items():
        if k not in names:
            continue
        v = float(v)
        if not math.isfinite(v):
            return None
        out[k] = min(max(v, -clip), clip)
    return out


def _proba(p: float) -> dict[base.typing.ClfTarget, float]:
    return {False: 1.0 - p, True: p}


def _one_row(x: Mapping[Any, Any]) -> Dense:
    """One :data:`Dense` example as a mini-batch of one row."""
    return {str(k): np.asarray(v)[None, :] for k, v in x.items()}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class LogisticScorer(base.MiniBatchClassifier):
    """Logistic regression over a fixed list of named inputs, learned online by clipped SGD.

    The base of the three logistic scorers below; their constructors name its inputs and priors.

    The arithmetic is river's :class:`river.linear_model.LogisticRegression` with ``optim.SGD(lr)``,
    ``intercept_lr=lr``, ``l2`` and ``clip_gradient``, step for step: river's log-loss gradient per
    example, clipped; one mean-gradient step per mini-batch; ``learn_one`` touches only the inputs
    it is given. Two things differ, and are why the model is not a ``LogisticRegression``: each
    weight starts at its own ``prior`` (river's initializer is called without the feature's name, so
    it can start every weight only at one value), and the weights are one vector in ``names`` order,
    so scoring a pool of candidates is one matrix product (:meth:`proba_matrix`).

    Mini-batches come as a DataFrame with the ``names`` columns (river's protocol) or, on the hot
    path, as a numpy matrix in ``names`` order (:meth:`learn_matrix`, :meth:`proba_matrix`).
    """

    def __init__(self, names: Sequence[str], lr: float, l2: float, clip: float, clip_gradient: float,
                 prior: Mapping[str, float] | None = None) -> None:
        self.names = list(names)
        self.lr, self.l2, self.clip, self.clip_gradient = lr, l2, clip, clip_gradient
        prior = prior or {}
        self._coef = np.array([float(prior.get(n, 0.0)) for n in self.names], dtype=np.float64)
        self.intercept = 0.0
        self._index = {n: i for i, n in enumerate(self.names)}

    def weights(self) -> dict[str, float]:
        """The current weight of each input (the fused score's explanation reads them)."""
        return {n: float(w) for n, w in zip(self.names, self._coef, strict=True)}

    # -- one at a time (river's protocol)
    def learn_one(self, x: dict[base.typing.FeatureName, Any], y: base.typing.ClfTarget) -> None:
        clean = _clean(x, self._index, self.clip)
        if clean is not None:
            self._step_one(clean, bool(y))

    def predict_proba_one(self, x: dict[base.typing.FeatureName, Any],
                          **kwargs: Any) -> dict[base.typing.ClfTarget, float]:
        clean = _clean(x, self._index, self.clip) or {}
        return _proba(_LOSS.mean_func(self._raw_one(clean)))

    # -- mini-batches as DataFrames (river's protocol)
    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self.learn_matrix(X[self.names].to_numpy(dtype=np.float64), y.to_numpy())

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        p = self.proba_matrix(X[self.names].to_numpy(dtype=np.float64))
        return pd.DataFrame({False: 1.0 - p, True: p}, index=X.index)

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        return pd.Series(self.proba_matrix(X[self.names].to_numpy(dtype=np.float64)) > 0.5, index=X.index)

    # -- mini-batches as numpy matrices, columns in ``names`` order
    def learn_matrix(self, M: np.ndarray, y: np.ndarray) -> None:
        """One SGD step on the finite rows of ``M`` (clipped); rows with NaN/inf are skipped."""
        keep = finite_rows(M)
        if keep.any():
            # column-major, as river's DataFrame path lays it out: BLAS sums in layout order, and
            # this keeps the step bit-identical to ``LogisticRegression.learn_many``
            X = np.asfortranarray(np.clip(M[keep], -self.clip, self.clip))
            self._step_many(X, np.asarray(y)[keep].astype(bool))

    def proba_matrix(self, M: np.ndarray) -> np.ndarray:
        """P(True) per row; NaN/inf read as 0, values clipped, so any input gives a probability."""
        return self.proba_of_clean(self.clean(M))

    def clean(self, M: np.ndarray) -> np.ndarray:
        """A copy of ``M`` with NaN and ±inf at 0 and the rest clipped to ``±clip``: what every row is
        scored on."""
        return cleaned(M, self.clip)

    def proba_of_clean(self, M: np.ndarray) -> np.ndarray:
        """P(True) per row of an already clean matrix (:meth:`clean`)."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.raw_matrix(M), -30, 30)))

    def raw_matrix(self, M: np.ndarray) -> np.ndarray:
        """The logit per row of an already clean matrix."""
        return M @ self._coef + self.intercept

    # -- the SGD steps, in river's GLM order of operations (so results match it bit for bit)
    def _raw_one(self, x: dict[str, float]) -> float:
        dot = 0.0
        for k, v in x.items():  # summed in x's order, as river's VectorDict.dot does
            dot += float(self._coef[self._index[k]]) * v
        return dot + self.intercept

    def _step_one(self, x: dict[str, float], y: bool) -> None:
        grad = float(utils.math.clamp(_LOSS.gradient(y, self._raw_one(x)), -self.clip_gradient,
                                      self.clip_gradient))
        cols = np.array([self._index[k] for k in x], dtype=np.int64)
        step = np.fromiter(x.values(), dtype=np.float64, count=len(x)) * grad
        if self.l2:
            step += self.l2 * self._coef[cols]
        self.intercept -= self.lr * grad
        self._coef[cols] -= self.lr * step

    def _step_many(self, X: np.ndarray, y: np.ndarray) -> None:
        grad = np.clip(_LOSS.gradient(y, X @ self._coef + self.intercept), -self.clip_gradient,
                       self.clip_gradient)
        step = np.einsum("ij,i->j", X, grad) / len(X)
        if self.l2:
            step += self.l2 * self._coef
        self.intercept = float(self.intercept - self.lr * grad.mean())
        self._coef -= self.lr * step

    def _unit_test_skips(self) -> set[str]:
        # as for river's own linear models: a mini-batch is one mean-gradient step, not one step per row
        return {"check_learn_many_matches_learn_one"}

    def extend(self, names: Sequence[str]) -> list[str]:
        """Add the inputs of ``names`` it does not have, at weight 0 (as river's linear models meet a new
        feature); returns them. A checkpoint from before an input existed learns it from then on."""
        have = set(self.names)
        added = [n for n in names if n not in have]
        if added:
            self.names.extend(added)
            self._coef = np.concatenate([self._coef, np.zeros(len(added))])
            self._index = {n: i for i, n in enumerate(self.names)}
        return added

    def drop(self, names: Sequence[str]) -> list[str]:
        """Remove the inputs of ``names`` it has, with their weights; returns them."""
        gone = [n for n in self.names if n in set(names)]
        if gone:
            keep = [i for i, n in enumerate(self.names) if n not in gone]
            self.names = [self.names[i] for i in keep]
            self._coef = self._coef[keep].copy()
            self._index = {n: i for i, n in enumerate(self.names)}
        return gone

    # -- checkpoints
    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickle; one from when the scorer wrapped river's ``LogisticRegression`` is migrated."""
        legacy = state.pop("model", None)
        self.__dict__.update(state)
        for name, param in inspect.signature(type(self)).parameters.items():
            if not hasattr(self, name):  # hyper-parameters older pickles did not store: the defaults
                setattr(self, name, param.default)
        if legacy is not None:
            w = legacy.weights  # river's public weights and intercept
            self._coef = np.array([float(w.get(n, 0.0)) for n in self.names], dtype=np.float64)
            self.intercept = float(legacy.intercept)
            self._index = {n: i for i, n in enumerate(self.names)}


class RiverScorer(LogisticScorer):
    """Logistic regression over the sparse pool features, SGD with gradient clipping.

    ``features`` picks the columns (the fusion model leaves the vector features out).
    ``learn_many``/``predict_proba_many`` take a DataFrame with those columns, as river's own
    mini-batch learners do; :meth:`learn_pool_rows` is the path over pool matrices.
    """

    def __init__(self, features: Sequence[str] = FEATURES, lr: float = 1.0, l2: float = 1e-5,
                 clip: float = 10.0, clip_gradient: float = 1.0) -> None:
        super().__init__(features, lr, l2, clip, clip_gradient)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self.names)

    def learn_pool_rows(self, X: np.ndarray, y: np.ndarray) -> None:
        """Learn from pool feature rows (all :data:`FEATURES` columns)."""
        self.learn_matrix(self._own_columns(X), y)

    def predict_pool_rows(self, X: np.ndarray) -> np.ndarray:
        """P(True) per pool feature row."""
        return self.proba_matrix(self._own_columns(X))

    def _own_columns(self, X: np.ndarray) -> np.ndarray:
        """This model's columns of pool rows, as float64: the rows as they are when it reads every
        feature in pool order (no gather), else the columns it reads."""
        if tuple(self.names) == FEATURES:  # row-major as the gather's result: the same sums in the products
            return np.ascontiguousarray(X, dtype=np.float64)
        return X[:, [INDEX[f] for f in self.names]].astype(np.float64)


class TorchScorer(base.Classifier):
    """Online :class:`InteractionHead`: one Adam step per mini-batch of ``batch_size``, grads clipped.

    The head is built on first use for the vector size it sees, its initial weights drawn from
    ``seed``, and belongs to one vector model version: a different ``vector_version`` (re-embedded
    catalog) starts a fresh head. An example is a :data:`Dense` mapping of vectors, so this is a
    river ``Classifier`` whose ``learn_many``/``predict_proba_many`` take matrices, not DataFrames.
    """

    def __init__(self, hidden: int = 64, lr: float = 1e-3, weight_decay: float = 1e-5, batch_size: int = 1024,
                 clip: float = 10.0, clip_grad_norm: float = 1.0, seed: int = 0) -> None:
        self.hidden, self.lr, self.weight_decay = hidden, lr, weight_decay
        self.batch_size, self.clip, self.clip_grad_norm, self.seed = batch_size, clip, clip_grad_norm, seed
        self.vector_version: str | None = None
        self.head: InteractionHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0

    def _ensure(self, dim: int, n_features: int, version: str | None) -> InteractionHead:
        if self.head is None or self.head.dim != dim or self.head.n_features != n_features \
                or version != self.vector_version:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.head = InteractionHead(dim, n_features, self.hidden)
            self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                              foreach=True)
            self.vector_version = version
            self.steps = 0
        return self.head

    def _tensors(self, X: Dense, rows: np.ndarray | slice) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(self._clean(X[k][rows])) for k in ("profile", "item", "features"))

    # -- mini-batches
    def learn_many(self, X: Dense, y: np.ndarray, version: str | None = None) -> None:
        keep = np.flatnonzero(finite_rows(X["profile"], X["item"], X["features"]))
        if not len(keep):
            return
        head = self._ensure(X["profile"].shape[1], X["features"].shape[1], version)
        assert self.optimizer is not None
        target = torch.from_numpy(np.asarray(y, dtype=np.float32))
        head.train()
        for start in range(0, len(keep), self.batch_size):
            rows = keep[start: start + self.batch_size]
            logits = head(*self._tensors(X, rows))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[rows])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), self.clip_grad_norm)
            self.optimizer.step()
            self.steps += 1

    def predict_proba_many(self, X: Dense, version: str | None = None) -> np.ndarray:
        n = len(X["features"])
        if self.head is None or version != self.vector_version or X["profile"].shape[1] != self.head.dim \
                or X["features"].shape[1] != self.head.n_features:  # a head trained before features changed
            return np.full(n, 0.5)
        profile, item, features = (self._clean(X[k]) for k in ("profile", "item", "features"))
        logits = self.head.logits(profile, item, features)
        with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: probability 0
            return (1.0 / (1.0 + np.exp(-logits))).astype(np.float64)  # float32, as the module's sigmoid

    def _clean(self, values: np.ndarray) -> np.ndarray:
        """A float32 copy with non-finite values at 0 (learning keeps finite rows only) and the rest
        clipped to ``±clip``."""
        return cleaned(np.asarray(values, dtype=np.float32), self.clip)

    # -- one at a time (each example is its own optimiser step); ``x`` is one :data:`Dense` row
    def learn_one(self, x: dict[base.typing.FeatureName, Any], y: base.typing.ClfTarget,
                  version: str | None = None) -> None:
        self.learn_many(_one_row(x), np.array([float(y)]), version)

    def predict_proba_one(self, x: dict[base.typing.FeatureName, Any], version: str | None = None,
                          **kwargs: Any) -> dict[base.typing.ClfTarget, float]:
        return _proba(float(self.predict_proba_many(_one_row(x), version)[0]))

    def _unit_test_skips(self) -> set[str]:
        # the head reads three fixed vectors, not an open set of named features that come and go
        return {"check_emerging_features", "check_disappearing_features", "check_radically_disappearing_features"}

    # -- checkpoints: hyper-parameters + state_dicts, not the module objects
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("head", "optimizer")}
        if self.head is not None and self.optimizer is not None:
            state["_shape"] = (self.head.dim, self.head.n_features)
            state["_head"] = self.head.state_dict()
            state["_optimizer"] = self.optimizer.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        shape, head, opt = state.pop("_shape", None), state.pop("_head", None), state.pop("_optimizer", None)
        self.__dict__.update(state)
        self.head, self.optimizer = None, None
        if shape is not None:
            version, steps = self.vector_version, self.steps
            self._ensure(shape[0], shape[1], version)
            assert self.head is not None and self.optimizer is not None
            self.head.load_state_dict(head)
            self.optimizer.load_state_dict(opt)
            self.steps = steps


# The fusion's inputs: the two learned scorers (as logits) and the candidate sources' scores.
SCORERS = ("river", "torch_head", "repeat", "covis", "content", "fresh", "popular", "trending")
# Where the stacker's weights start: the fixed blend's, but the fresh source's at 0. The fixed blend
# gives it a place in the pool; in the fused score it counts only as far as feedback shows it pays
# (few interactions is exactly what makes an item unlikely, so a prior weight would push such items
# up before anything was learned).
STACKER_PRIOR = {name: w for name, w in PRIOR.items() if name != "fresh"}


class FusionStacker(LogisticScorer):
    """The final score: logistic regression over the scorers' outputs, learned online (river).

    Why a stacker and not Hedge weights: the scorers are on different scales (logits of two learned
    models next to [0, 1] source scores) and are complementary rather than competing experts, so
    the fusion must learn a scale per scorer, not a convex mixture; its output is a calibrated
    probability, which the learner's rollback guard compares across checkpoints; and ``w_i * x_i``
    is an additive explanation of each score. Weights start at the fixed blend (:data:`STACKER_PRIOR`),
    so an untrained model ranks like the simple blend and learning moves it from there.
    """

    def __init__(self, scorers: Sequence[str] = SCORERS, lr: float = 0.1, l2: float = 0.0,
                 clip: float = 10.0, clip_gradient: float = 1.0, prior_scale: float = 4.0) -> None:
        prior = {name: STACKER_PRIOR[name] * prior_scale for name in scorers if name in STACKER_PRIOR}
        super().__init__(scorers, lr, l2, clip, clip_gradient, prior=prior)
        self.prior_scale = prior_scale

    @property
    def scorers(self) -> tuple[str, ...]:
        return tuple(self.names)

    def contributions(self, M: np.ndarray, *, clean: bool = False) -> np.ndarray:
        """Per-row ``w_i * x_i`` for each scorer (the explanation of the fused score); ``clean``: ``M``
        is already clean (:meth:`clean`)."""
        return (M if clean else self.clean(M)) * self._coef


def scorer_inputs(names: Sequence[str], river_p: np.ndarray, torch_p: np.ndarray | None,
                  X: np.ndarray) -> np.ndarray:
    """The fusion's input matrix from the scorers' probabilities and the pool feature rows."""
    cols = []
    for name in names:
        if name == "river":
            cols.append(_logit(river_p))
        elif name == "torch_head":
            cols.append(_logit(torch_p) if torch_p is not None else np.zeros(len(X)))
        else:
            cols.append(X[:, INDEX[name]].astype(np.float64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(X), 0))


class SearchMix(LogisticScorer):
    """The search score ``α·f_item + β·f_query + b``: a river logistic regression over two inputs.

    ``f_query`` is the query's cosine similarity to the item, ``f_item`` the fused model's
    probability that the user acts on the item. Weights start at α = ``alpha_init``, β = ``beta_init``
    (by default 1, an even mix) and learn from search feedback: which of the shown results the user
    then clicked, carted or bought. :attr:`alpha` and :attr:`beta` are the learned values.
    """

    def __init__(self, lr: float = 0.5, alpha_init: float = 1.0, beta_init: float = 1.0, clip: float = 1.0,
                 clip_gradient: float = 1.0) -> None:
        prior = {"item": alpha_init, "query": beta_init}
        super().__init__(("item", "query"), lr, 0.0, clip, clip_gradient, prior=prior)
        self.alpha_init, self.beta_init = alpha_init, beta_init
        self.examples = 0

    @property
    def alpha(self) -> float:
        return self.weights()["item"]

    @property
    def beta(self) -> float:
        return self.weights()["query"]

    def score(self, f_item: np.ndarray, f_query: np.ndarray) -> np.ndarray:
        """``α·f_item + β·f_query + b`` per row (the logit; ranking by it ranks by probability)."""
        M = np.clip(np.nan_to_num(np.stack([f_item, f_query], axis=1).astype(np.float64)), -self.clip, self.clip)
        return self.raw_matrix(M)

    def learn_matrix(self, M: np.ndarray, y: np.ndarray) -> None:
        """Learn as the base does and count the (finite) search results learned from."""
        super().learn_matrix(M, y)
        self.examples += int(finite_rows(M).sum())
