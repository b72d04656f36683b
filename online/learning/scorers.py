"""Online learners that score (user, candidate) pairs; all speak river's protocol.

* :class:`RiverScorer`: logistic regression over the sparse pool features
  (:data:`~fusionrec.online.candidates.features.FEATURES`).
* :class:`TorchScorer`: :class:`fusionrec.models.heads.InteractionHead` over the profile vector, the item vector,
  their product and the pool features, trained by one Adam step per mini-batch.
* :class:`FusionStacker`: the final score, a logistic-regression stacker over the scorers' outputs.
* :class:`SearchMix`: the search score ``α·f_item + β·f_query``, its weights learned from search feedback.

``learn_one(x, y)`` / ``learn_many(X, y)`` return nothing; ``predict_proba_one`` returns
``{False: p0, True: p1}``, ``predict_proba_many`` one row per example. Every learner sanitises its
input itself: rows with NaN/inf are skipped when learning (and predicted as if zero), values are
clipped to ``±clip``, and gradients are clipped, so no input can make a weight non-finite. Each
survives pickle → unpickle with identical predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from river import linear_model, optim

from fusionrec.models.heads import InteractionHead
from fusionrec.online.candidates.features import FEATURES, INDEX, PRIOR

Dense = Mapping[str, np.ndarray]  # "profile" (n, d), "item" (n, d), "features" (n, F)


def finite_rows(*arrays: np.ndarray) -> np.ndarray:
    """Mask of rows that are finite in every array."""
    mask = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        mask &= np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return mask


def _clean(x: Mapping[str, float], clip: float) -> dict[str, float] | None:
    """A dict with values clipped; None when any value is not finite."""
    out: dict[str, float] = {}
    for k, v in x.items():
        v = float(v)
        if not math.isfinite(v):
            return None
        out[k] = min(max(v, -clip), clip)
    return out


def _proba(p: float) -> dict[bool, float]:
    return {False: 1.0 - p, True: p}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class _RiverLR:
    """Shared river logistic-regression plumbing: sanitised one/many learning, numpy prediction."""

    def __init__(self, names: Sequence[str], lr: float, l2: float, clip: float, clip_gradient: float) -> None:
        self.names = list(names)
        self.lr, self.l2, self.clip, self.clip_gradient = lr, l2, clip, clip_gradient
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(lr), l2=l2, intercept_lr=lr,
                                                     clip_gradient=clip_gradient)

    # -- one at a time
    def learn_one(self, x: Mapping[str, float], y: bool) -> None:
        clean = _clean({k: v for k, v in x.items() if k in self.names}, self.clip)
        if clean is not None:
            self.model.learn_one(clean, bool(y))

    def predict_proba_one(self, x: Mapping[str, float]) -> dict[bool, float]:
        clean = _clean({k: v for k, v in x.items() if k in self.names}, self.clip) or {}
        return self.model.predict_proba_one(clean)

    def predict_one(self, x: Mapping[str, float]) -> bool:
        return self.predict_proba_one(x)[True] > 0.5

    # -- mini-batches (rows are numpy arrays in ``self.names`` order)
    def learn_matrix(self, M: np.ndarray, y: np.ndarray) -> None:
        keep = finite_rows(M)
        if keep.any():
            X = pd.DataFrame(np.clip(M[keep], -self.clip, self.clip), columns=self.names)
            self.model.learn_many(X, pd.Series(np.asarray(y)[keep].astype(bool)))

    def proba_matrix(self, M: np.ndarray) -> np.ndarray:
        M = np.clip(np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0), -self.clip, self.clip)
        return 1.0 / (1.0 + np.exp(-np.clip(self.raw_matrix(M), -30, 30)))

    def raw_matrix(self, M: np.ndarray) -> np.ndarray:
        w = self.weights()
        return M @ np.array([w[n] for n in self.names], dtype=np.float64) + float(self.model.intercept)

    def weights(self) -> dict[str, float]:
        w = dict(self.model._weights)  # river keeps weights in a VectorDict
        return {n: float(w.get(n, 0.0)) for n in self.names}


class RiverScorer(_RiverLR):
    """Logistic regression (river) over the sparse pool features, SGD with gradient clipping.

    ``features`` picks the columns (a model without LLM vectors leaves the vector features out).
    ``learn_many``/``predict_proba_many`` take a DataFrame with those columns, as river's own
    mini-batch learners do; :meth:`learn_pool_rows` is the zero-copy path over pool matrices.
    """

    def __init__(self, features: Sequence[str] = FEATURES, lr: float = 1.0, l2: float = 1e-5,
                 clip: float = 10.0, clip_gradient: float = 1.0) -> None:
        super().__init__(features, lr, l2, clip, clip_gradient)
        self._cols = np.array([INDEX[f] for f in features])

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self.learn_matrix(X[self.names].to_numpy(dtype=np.float64), y.to_numpy())

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        p = self.proba_matrix(X[self.names].to_numpy(dtype=np.float64))
        return pd.DataFrame({False: 1.0 - p, True: p}, index=X.index)

    def learn_pool_rows(self, X: np.ndarray, y: np.ndarray) -> None:
        self.learn_matrix(X[:, self._cols].astype(np.float64), y)

    def predict_pool_rows(self, X: np.ndarray) -> np.ndarray:
        return self.proba_matrix(X[:, self._cols].astype(np.float64))


class TorchScorer:
    """Online :class:`InteractionHead`: one Adam step per mini-batch of ``batch_size``, grads clipped.

    The head is built on first use for the vector size it sees and belongs to one vector model
    version: a different ``vector_version`` (re-embedded catalog) starts a fresh head.
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
        return tuple(torch.from_numpy(np.clip(np.asarray(X[k][rows], dtype=np.float32), -self.clip, self.clip))
                     for k in ("profile", "item", "features"))

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
        if self.head is None or version != self.vector_version or X["profile"].shape[1] != self.head.dim:
            return np.full(n, 0.5)
        clean = {k: np.nan_to_num(np.asarray(v, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                 for k, v in X.items()}
        self.head.eval()
        with torch.inference_mode():
            logits = self.head(*self._tensors(clean, slice(None)))
        return torch.sigmoid(logits).double().numpy()

    # -- one at a time (each example is its own optimiser step)
    def learn_one(self, x: Dense, y: bool, version: str | None = None) -> None:
        self.learn_many({k: np.asarray(v)[None, :] for k, v in x.items()}, np.array([float(y)]), version)

    def predict_proba_one(self, x: Dense, version: str | None = None) -> dict[bool, float]:
        p = self.predict_proba_many({k: np.asarray(v)[None, :] for k, v in x.items()}, version)
        return _proba(float(p[0]))

    def predict_one(self, x: Dense, version: str | None = None) -> bool:
        return self.predict_proba_one(x, version)[True] > 0.5

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
SCORERS = ("river", "torch_head", "repeat", "covis", "content", "popular", "trending")


class FusionStacker(_RiverLR):
    """The final score: logistic regression over the scorers' outputs, learned online (river).

    Why a stacker and not Hedge weights: the scorers are on different scales (logits of two learned
    models next to [0, 1] source scores) and are complementary rather than competing experts, so
    the fusion must learn a scale per scorer, not a convex mixture; its output is a calibrated
    probability, which the learner's rollback guard compares across checkpoints; and ``w_i * x_i``
    is an additive explanation of each score. Weights start at the fixed blend (:data:`PRIOR`),
    so an untrained model ranks like the simple blend and learning moves it from there.
    """

    def __init__(self, scorers: Sequence[str] = SCORERS, lr: float = 0.1, l2: float = 0.0,
                 clip: float = 10.0, clip_gradient: float = 1.0, prior_scale: float = 4.0) -> None:
        super().__init__(scorers, lr, l2, clip, clip_gradient)
        for name in scorers:
            if name in PRIOR:
                self.model._weights[name] = PRIOR[name] * prior_scale

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self.learn_matrix(X[self.names].to_numpy(dtype=np.float64), y.to_numpy())

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        p = self.proba_matrix(X[self.names].to_numpy(dtype=np.float64))
        return pd.DataFrame({False: 1.0 - p, True: p}, index=X.index)

    def contributions(self, M: np.ndarray) -> np.ndarray:
        """Per-row ``w_i * x_i`` for each scorer (the explanation of the fused score)."""
        M = np.clip(np.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0), -self.clip, self.clip)
        w = self.weights()
        return M * np.array([w[n] for n in self.names])


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


class SearchMix(_RiverLR):
    """The search score ``α·f_item + β·f_query + b``: a river logistic regression over two inputs.

    ``f_query`` is the query's cosine similarity to the item, ``f_item`` the fused model's
    probability that the user acts on the item. Weights start at α = β = 1 (an even mix) and learn
    from search feedback: which of the shown results the user then clicked, carted or bought.
    """

    def __init__(self, lr: float = 0.5, alpha: float = 1.0, beta: float = 1.0, clip: float = 1.0,
                 clip_gradient: float = 1.0) -> None:
        super().__init__(("item", "query"), lr, 0.0, clip, clip_gradient)
        self.model._weights["item"] = alpha
        self.model._weights["query"] = beta
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
        super().learn_matrix(M, y)
        self.examples += int(finite_rows(M).sum())

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        self.learn_matrix(X[self.names].to_numpy(dtype=np.float64), y.to_numpy())

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        p = self.proba_matrix(X[self.names].to_numpy(dtype=np.float64))
        return pd.DataFrame({False: 1.0 - p, True: p}, index=X.index)
