"""Learners: river protocol, pickle round trips, guards against non-finite and extreme input."""

import pickle

import numpy as np
import pandas as pd
import pytest

from fusionrec.online.candidates.features import FEATURES, Pool
from fusionrec.online.learning.model import FusionModel, Rows
from fusionrec.online.learning.scorers import FusionStacker, RiverScorer, SearchMix, TorchScorer

DIM = 8
rng = np.random.default_rng(0)


def _dense(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"profile": r.normal(size=(n, DIM)).astype(np.float32), "item": r.normal(size=(n, DIM)).astype(np.float32),
            "features": r.random((n, len(FEATURES))).astype(np.float32)}


def _labels(d: dict[str, np.ndarray]) -> np.ndarray:
    # a learnable signal: alignment of profile and item plus the repeat feature
    return ((d["profile"] * d["item"]).sum(1) + 2 * d["features"][:, 0] > 1.0).astype(float)


def _frame(n: int, seed: int = 2) -> tuple[pd.DataFrame, pd.Series]:
    r = np.random.default_rng(seed)
    X = pd.DataFrame(r.random((n, len(FEATURES))), columns=list(FEATURES))
    return X, pd.Series(X["repeat"] + 0.5 * X["covis"] > 0.8)


def _trained(name: str):
    if name == "river":
        m = RiverScorer()
        X, y = _frame(400)
        m.learn_many(X, y)
        return m, lambda model: model.predict_proba_many(_frame(50, seed=9)[0])[True].to_numpy()
    if name == "torch":
        m = TorchScorer(seed=3)
        d = _dense(400)
        m.learn_many(d, _labels(d), version="v1")
        return m, lambda model: model.predict_proba_many(_dense(50, seed=9), version="v1")
    if name == "fusion":
        m = FusionStacker()
        X = pd.DataFrame(rng.random((400, len(m.names))), columns=m.names)
        m.learn_many(X, X["repeat"] > 0.5)
        probe = pd.DataFrame(np.random.default_rng(9).random((50, len(m.names))), columns=m.names)
        return m, lambda model: model.predict_proba_many(probe)[True].to_numpy()
    if name == "search":
        m = SearchMix()
        M = rng.random((400, 2))
        m.learn_matrix(M, M[:, 1] > 0.6)
        probe = np.random.default_rng(9).random((50, 2))
        return m, lambda model: model.score(probe[:, 0], probe[:, 1])
    m = FusionModel(seed=4)
    rows = _rows(300)
    m.learn(rows, _labels(rows.dense()))
    return m, lambda model: model.predict(_rows(40, seed=9)).fused


def _rows(n: int, seed: int = 1) -> Rows:
    d = _dense(n, seed)
    return Rows(X=d["features"], items=[str(i) for i in range(n)], profile=d["profile"], item=d["item"], version="v1")


@pytest.mark.parametrize("name", ["river", "torch", "fusion", "search", "fusion_model"])
def test_every_learner_survives_pickle_with_identical_predictions(name):
    model, predict = _trained(name)
    clone = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(predict(model), predict(clone))
    # and both keep learning identically afterwards (optimiser state came along)
    if name == "torch":
        d = _dense(64, seed=5)
        for m in (model, clone):
            m.learn_many(d, _labels(d), version="v1")
        np.testing.assert_array_equal(predict(model), predict(clone))


def test_learn_returns_nothing_and_one_at_a_time_matches_the_protocol():
    river, torch_head = RiverScorer(), TorchScorer()
    x = dict(zip(FEATURES, rng.random(len(FEATURES)), strict=True))
    assert river.learn_one(x, True) is None
    p = river.predict_proba_one(x)
    assert set(p) == {False, True} and abs(sum(p.values()) - 1) < 1e-9
    d = {k: v[0] for k, v in _dense(1).items()}
    assert torch_head.learn_one(d, True, version="v") is None
    assert 0 < torch_head.predict_proba_one(d, version="v")[True] < 1


def test_torch_head_learns_a_signal_from_mini_batches():
    m = TorchScorer(seed=0, lr=3e-3)
    test = _dense(500, seed=99)
    y_test = _labels(test)
    before = np.mean((m.predict_proba_many(test, version="v") > 0.5) == y_test)
    for s in range(30):
        d = _dense(512, seed=s)
        m.learn_many(d, _labels(d), version="v")
    after = np.mean((m.predict_proba_many(test, version="v") > 0.5) == y_test)
    assert after > 0.8 and after > before + 0.1


def test_a_new_vector_version_starts_a_fresh_head():
    m = TorchScorer(seed=0)
    d = _dense(64)
    m.learn_many(d, _labels(d), version="a")
    assert m.vector_version == "a" and m.steps > 0
    np.testing.assert_allclose(m.predict_proba_many(d, version="b"), 0.5)  # not trained for "b"
    m.learn_many(d, _labels(d), version="b")
    assert m.vector_version == "b" and m.steps == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e30, -1e30])
def test_weights_stay_finite_under_non_finite_and_extreme_input(bad):
    model = FusionModel(seed=0)
    rows = _rows(128)
    rows.X[::3, 0] = bad
    rows.profile[1::5, 2] = bad
    rows.item[2::7, 1] = bad
    for _ in range(5):
        model.learn(rows, np.ones(128))
    weights = list(model.river.weights().values()) + list(model.fusion.weights().values())
    assert np.all(np.isfinite(weights)) and np.isfinite(float(model.river.model.intercept))
    assert model.torch is not None and model.torch.head is not None
    assert all(bool(torch_all_finite(p)) for p in model.torch.head.parameters())
    assert np.all(np.isfinite(model.predict(rows).fused))


def torch_all_finite(p):
    return p.detach().isfinite().all()


def test_untrained_fusion_ranks_like_the_fixed_blend():
    model = FusionModel()
    X = np.zeros((3, len(FEATURES)), dtype=np.float32)
    X[0, FEATURES.index("repeat")] = 1.0
    X[1, FEATURES.index("covis")] = 1.0
    X[2, FEATURES.index("popular")] = 1.0
    pool = Pool(user_id="u", ts=0, items=["r", "c", "p"], X=X)
    fused = model.predict(Rows.of_pools([pool], None)).fused
    assert list(np.argsort(-fused)) == [0, 1, 2]
