"""Every scorer against one check suite: river's protocol, pickles, bad input, learning, river's own checks.

Each scorer takes its own kind of input (named floats for the logistic scorers, vectors for the torch
head), so a :class:`Case` per scorer says how to make examples and batches with a planted signal and
how to read its predictions and parameters; the tests then run the same way over every case.
"""

import functools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from river import checks, linear_model, optim

from fusionrec.online.candidates.features import FEATURES, SPARSE_FEATURES, VECTOR_FEATURES, CandidatePool
from fusionrec.online.learning.model import FusionModel, Rows
from fusionrec.online.learning.scorers import (
    SCORERS,
    FusionStacker,
    LogisticScorer,
    RiverScorer,
    SearchMix,
    TorchScorer,
)

DIM = 8
BAD = [np.nan, np.inf, -np.inf, 1e30, -1e30]


# ---------------------------------------------------------------- inputs with a planted signal
def _dense(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"profile": r.normal(size=(n, DIM)).astype(np.float32), "item": r.normal(size=(n, DIM)).astype(np.float32),
            "features": r.random((n, len(FEATURES))).astype(np.float32)}


def _labels(d: dict[str, np.ndarray]) -> np.ndarray:
    # a learnable signal: alignment of profile and item plus the repeat feature
    return ((d["profile"] * d["item"]).sum(1) + 2 * d["features"][:, 0] > 1.0).astype(float)


def _frame(names: list[str], n: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    # the signal is the first input against the last: a stacker must turn its positive prior on the last around
    X = pd.DataFrame(np.random.default_rng(seed).random((n, len(names))), columns=names)
    return X, X[names[0]] - X[names[-1]] > 0.0


def _rows(n: int, seed: int = 1) -> Rows:
    d = _dense(n, seed)
    return Rows(X=d["features"], items=[str(i) for i in range(n)], profile=d["profile"], item=d["item"], version="v1")


@dataclass
class Case:
    """How the suite drives one scorer: fresh instances, batches, one-at-a-time examples, readings."""

    make: Callable[[], Any]
    batch: Callable[[int, int], tuple[Any, Any]]  # (n, seed) -> (X, y) for learn_many
    learn_many: Callable[[Any, Any, Any], Any]
    proba_many: Callable[[Any, Any], np.ndarray]  # P(True) per row
    examples: Callable[[Any, Any], list[tuple[dict, bool]]]  # a batch as learn_one examples
    spoil: Callable[[Any, float], None]  # put a bad value into some rows of a batch, in place
    params: Callable[[Any], np.ndarray]  # every learned parameter, flat
    kw: dict[str, Any]  # extra keywords of the one-at-a-time methods


def _linear(make: Callable[[], LogisticScorer]) -> Case:
    names = make().names

    def spoil(X: pd.DataFrame, bad: float) -> None:
        X.iloc[::3, 0] = bad
        X.iloc[1::5, -1] = bad

    return Case(make=make, batch=lambda n, seed: _frame(names, n, seed),
                learn_many=lambda m, X, y: m.learn_many(X, y),
                proba_many=lambda m, X: m.predict_proba_many(X)[True].to_numpy(),
                examples=lambda X, y: [(x, bool(t)) for x, t in zip(X.to_dict("records"), y, strict=True)],
                spoil=spoil, params=lambda m: np.array([*m.weights().values(), m.intercept]), kw={})


def _torch_params(m: TorchScorer) -> np.ndarray:
    assert m.head is not None
    return torch.cat([p.detach().flatten() for p in m.head.parameters()]).double().numpy()


def _torch_spoil(d: dict[str, np.ndarray], bad: float) -> None:
    d["features"][::3, 0] = bad
    d["profile"][1::5, 2] = bad
    d["item"][2::7, 1] = bad


TORCH = Case(make=lambda: TorchScorer(seed=3, batch_size=64),
             batch=lambda n, seed: (lambda d: (d, _labels(d)))(_dense(n, seed)),
             learn_many=lambda m, X, y: m.learn_many(X, y, version="v1"),
             proba_many=lambda m, X: m.predict_proba_many(X, version="v1"),
             examples=lambda X, y: [({k: v[i] for k, v in X.items()}, bool(y[i])) for i in range(len(y))],
             spoil=_torch_spoil, params=_torch_params, kw={"version": "v1"})

CASES = {"river": _linear(RiverScorer), "fusion": _linear(FusionStacker), "search": _linear(SearchMix),
         "torch": TORCH}
every_scorer = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def _trained(case: Case) -> Any:
    model = case.make()
    case.learn_many(model, *case.batch(400, 2))
    for x, y in case.examples(*case.batch(10, 3)):
        model.learn_one(x, y, **case.kw)
    return model


# ---------------------------------------------------------------- the suite, over every scorer
@every_scorer
def test_pickle_round_trip_gives_identical_predictions_and_learning(case):
    model = _trained(case)
    clone = pickle.loads(pickle.dumps(model))
    probe = case.batch(50, 9)[0]
    np.testing.assert_array_equal(case.proba_many(model, probe), case.proba_many(clone, probe))
    # and both keep learning identically afterwards (optimiser state came along)
    X, y = case.batch(64, 5)
    for m in (model, clone):
        case.learn_many(m, X, y)
    np.testing.assert_array_equal(case.proba_many(model, probe), case.proba_many(clone, probe))
    np.testing.assert_array_equal(case.params(model), case.params(clone))


def test_torch_pickle_round_trip_keeps_the_optimiser_state():
    model = _trained(TORCH)
    clone = pickle.loads(pickle.dumps(model))
    assert model.optimizer is not None and clone.optimizer is not None
    want, got = model.optimizer.state_dict(), clone.optimizer.state_dict()
    assert want["param_groups"] == got["param_groups"] and want["state"].keys() == got["state"].keys()
    for key, state in want["state"].items():
        assert state.keys() == got["state"][key].keys()
        for name, value in state.items():
            torch.testing.assert_close(got["state"][key][name], value, rtol=0, atol=0)
    assert (clone.steps, clone.vector_version) == (model.steps, model.vector_version)


@every_scorer
def test_learning_returns_nothing_and_predictions_follow_the_protocol(case):
    model = case.make()
    (x, y), *_ = case.examples(*case.batch(1, 4))
    assert model.learn_one(x, y, **case.kw) is None
    assert case.learn_many(model, *case.batch(32, 4)) is None
    p = model.predict_proba_one(x, **case.kw)
    assert set(p) == {False, True} and abs(sum(p.values()) - 1) < 1e-9 and 0 < p[True] < 1
    assert model.predict_one(x, **case.kw) == (p[True] > 0.5)


@every_scorer
@pytest.mark.parametrize("bad", BAD)
def test_parameters_and_predictions_stay_finite_under_bad_input(case, bad):
    model = case.make()
    for seed in range(5):
        X, y = case.batch(64, seed)
        case.spoil(X, bad)
        case.learn_many(model, X, y)
        for x, t in case.examples(X, y)[:8]:
            model.learn_one(x, t, **case.kw)
    assert np.all(np.isfinite(case.params(model)))
    p = case.proba_many(model, X)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert all(np.isfinite(model.predict_proba_one(x, **case.kw)[True]) for x, _ in case.examples(X, y))


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@every_scorer
def test_predict_then_learn_over_a_stream_improves_on_a_planted_signal(case):
    """Prequential: each batch is scored before it is learned; the late batches must score better than the early."""
    model, losses = case.make(), []
    for seed in range(300):
        X, y = case.batch(32, 1000 + seed)
        losses.append(_log_loss(case.proba_many(model, X), np.asarray(y, dtype=float)))
        case.learn_many(model, X, y)
    early, late = np.mean(losses[:30]), np.mean(losses[-30:])
    assert late < 0.8 * early and late < np.log(2), (early, late)


def _river_check_stream(case: Case) -> list[tuple[dict, bool]]:
    X, y = case.batch(30, 6)
    return [({k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in x.items()}, t)
            for x, t in case.examples(X, y)]


@every_scorer
def test_river_estimator_checks_pass(case):
    """river's own checks (clone, repr, params, pickling, purity, ...); those that need data get the
    scorer's own stream instead of river's data sets, whose features the scorers do not read."""
    model, stream, ran = case.make(), _river_check_stream(case), set()
    for check in checks.yield_checks(model):
        if check.__name__ in model._unit_test_skips() or check.__name__ in ran:
            continue
        ran.add(check.__name__)
        if isinstance(check, functools.partial):  # a check bound to one of river's data sets
            check.func(model.clone(), dataset=stream)
        else:
            check(model.clone())
    assert {"check_pickling", "check_clone_is_idempotent", "check_predict_proba_one"} <= ran


# ---------------------------------------------------------------- the logistic scorers are river's arithmetic
def _river_lr(m: LogisticScorer) -> linear_model.LogisticRegression:
    return linear_model.LogisticRegression(optimizer=optim.SGD(m.lr), l2=m.l2, intercept_lr=m.lr,
                                           clip_gradient=m.clip_gradient)


def test_the_logistic_scorer_learns_bit_for_bit_like_river_logistic_regression():
    scorer = RiverScorer(l2=1e-3)
    reference = _river_lr(scorer)
    names = list(FEATURES)
    for seed in range(5):
        X, y = _frame(names, 64, seed)
        scorer.learn_many(X, y)
        reference.learn_many(X, y)
        for x, t in list(zip(X.to_dict("records"), y, strict=True))[:10]:
            scorer.learn_one(x, t)
            reference.learn_one(x, t)
    assert scorer.weights() == {n: reference.weights.get(n, 0.0) for n in names}
    assert scorer.intercept == reference.intercept
    probe = _frame(names, 20, 9)[0]
    assert [scorer.predict_proba_one(x) for x in probe.to_dict("records")] == \
        [reference.predict_proba_one(x) for x in probe.to_dict("records")]


def test_a_checkpoint_of_a_scorer_that_wrapped_river_logistic_regression_still_loads():
    names = list(SCORERS)
    legacy = _river_lr(FusionStacker())
    legacy.learn_many(*_frame(names, 64, 1))
    scorer = FusionStacker.__new__(FusionStacker)
    scorer.__setstate__({"names": names, "lr": 0.1, "l2": 0.0, "clip": 10.0, "clip_gradient": 1.0,
                         "model": legacy})
    assert scorer.weights() == legacy.weights and scorer.intercept == legacy.intercept
    assert scorer.prior_scale == 4.0 and scorer.scorers == tuple(names)
    x = dict(zip(names, np.linspace(0.1, 0.9, len(names)), strict=True))
    assert scorer.predict_proba_one(x) == legacy.predict_proba_one(x)


# ---------------------------------------------------------------- scorer-specific behaviour
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


@pytest.mark.parametrize("runs", [[200, 200, 200], [20] * 30, [1] * 600, [590, *[1] * 10]],
                         ids=["pools of 200", "pools of 20", "a profile per row", "one long run and single rows"])
def test_the_heads_inference_is_its_forward_pass(runs):
    """Rows sharing a profile are computed together, rows of many profiles by the plain product: both
    equal the module's forward pass; the scorer's probabilities are its sigmoid of the cleaned input."""
    m = TorchScorer(seed=0, clip=2.0)
    d = _dense(600, seed=3)
    d["profile"] = np.repeat(d["profile"][: len(runs)], runs, axis=0)
    d["item"][5, 0], d["features"][7, 1], d["item"][9, 2] = 9.0, np.nan, np.inf  # clipped; cleaned to 0
    m.learn_many(d, _labels(d), version="v")
    assert m.head is not None
    clean = {k: np.clip(np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), -2.0, 2.0) for k, v in d.items()}
    with torch.inference_mode():
        forward = m.head(*(torch.from_numpy(clean[k]) for k in ("profile", "item", "features"))).numpy()
    np.testing.assert_allclose(m.head.logits(clean["profile"], clean["item"], clean["features"]), forward,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.predict_proba_many(d, version="v"), 1.0 / (1.0 + np.exp(-forward)),
                               rtol=1e-5, atol=1e-6)
    assert m.head.logits(*(v[:0] for v in (clean["profile"], clean["item"], clean["features"]))).shape == (0,)


def test_a_new_vector_version_starts_a_fresh_head():
    m = TorchScorer(seed=0)
    d = _dense(64)
    m.learn_many(d, _labels(d), version="a")
    assert m.vector_version == "a" and m.steps > 0
    np.testing.assert_allclose(m.predict_proba_many(d, version="b"), 0.5)  # not trained for "b"
    m.learn_many(d, _labels(d), version="b")
    assert m.vector_version == "b" and m.steps == 1


def test_a_head_trained_on_other_features_abstains_until_it_learns_the_new_ones():
    m = TorchScorer(seed=0)
    d = _dense(64)
    m.learn_many(d, _labels(d), version="a")
    wider = {**d, "features": np.hstack([d["features"], np.ones((64, 3), np.float32)])}
    np.testing.assert_allclose(m.predict_proba_many(wider, version="a"), 0.5)  # a checkpoint from before
    m.learn_many(wider, _labels(d), version="a")
    assert m.head is not None and m.head.n_features == wider["features"].shape[1] and m.steps == 1
    assert not np.allclose(m.predict_proba_many(wider, version="a"), 0.5)


def test_the_stacker_and_the_search_mix_start_at_their_priors():
    assert FusionStacker(prior_scale=2.0).weights() == {"river": 0.0, "torch_head": 0.0, "repeat": 2.0,
                                                        "covis": 1.2, "content": 0.6, "fresh": 0.0,
                                                        "popular": 0.2, "trending": 0.2}
    mix = SearchMix(alpha_init=0.25, beta_init=2.0)
    assert (mix.alpha, mix.beta, mix.intercept) == (0.25, 2.0, 0.0)
    mix.learn_matrix(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([1.0, 0.0]))
    assert mix.alpha > 0.25 and mix.beta < 2.0
    assert (mix.clone().alpha, mix.clone().beta) == (0.25, 2.0)  # clone(): same hyper-parameters, fresh weights


# ---------------------------------------------------------------- the fused model that holds them all
def test_a_checkpoint_from_before_new_inputs_predicts_as_it_did_and_learns_them():
    new = ("fresh", "support", "item_new", "bought_n", "since_bought", "cycle_due", "src_fresh")
    model = FusionModel(seed=2)
    model.learn(_rows(200), _labels(_rows(200).dense()))
    state = pickle.loads(pickle.dumps(model)).__dict__  # as a checkpoint written before those inputs
    state["river"].names = [n for n in state["river"].names if n not in new]
    state["river"]._coef = np.array([model.river.weights()[n] for n in state["river"].names])
    state["river"]._index = {n: i for i, n in enumerate(state["river"].names)}
    state["fusion"].names = [n for n in state["fusion"].names if n != "fresh"]
    state["fusion"]._coef = np.array([model.fusion.weights()[n] for n in state["fusion"].names])
    state["fusion"]._index = {n: i for i, n in enumerate(state["fusion"].names)}
    old = FusionModel.__new__(FusionModel)
    old.__setstate__(state)
    assert set(old.river.names) == set(SPARSE_FEATURES) and "fresh" in old.fusion.names
    read = [n for n in new if n in SPARSE_FEATURES]  # river's new inputs (it reads no vector feature)
    assert read and all(old.river.weights()[n] == 0.0 for n in read) and old.fusion.weights()["fresh"] == 0.0
    rows = _rows(40, seed=5)
    rows.X[:, [FEATURES.index(n) for n in new]] = 0.0  # on the inputs it knew, the same scores
    np.testing.assert_allclose(old.predict(rows).fused, model.predict(rows).fused, rtol=1e-12)
    rows = _rows(300, seed=6)
    old.learn(rows, _labels(rows.dense()))
    assert any(old.river.weights()[n] != 0.0 for n in read)


def test_river_reads_no_vector_feature_and_a_checkpoint_whose_river_did_drops_them():
    model = FusionModel(seed=2)
    assert tuple(model.river.names) == SPARSE_FEATURES and not set(VECTOR_FEATURES) & set(model.river.names)
    rows = _rows(200)
    model.learn(rows, _labels(rows.dense()))
    state = pickle.loads(pickle.dumps(model)).__dict__  # as a checkpoint from when river read them too
    assert state["river"].extend(VECTOR_FEATURES) == list(VECTOR_FEATURES)
    state["river"]._coef[-len(VECTOR_FEATURES):] = 0.5
    old = FusionModel.__new__(FusionModel)
    old.__setstate__(state)
    assert tuple(old.river.names) == SPARSE_FEATURES
    rows = _rows(40, seed=5)  # the vector features set: only the dropped weights would have read them
    np.testing.assert_array_equal(old.predict(rows).fused, model.predict(rows).fused)


def test_the_plain_stacker_of_the_model_with_vectors_is_the_model_without_them():
    """Trained on the same rows, ``fusion_plain`` scores exactly as the fusion without vectors (so serving
    the plain order serves that model)."""
    with_vectors, without = FusionModel(use_vectors=True, seed=3), FusionModel(use_vectors=False, seed=3)
    for seed in range(4):
        rows = _rows(150, seed=seed)
        y = _labels(rows.dense())
        plain = Rows(X=rows.X.copy(), items=rows.items, profile=rows.profile[:, :0], item=rows.item[:, :0],
                     version=None)
        with_vectors.learn(rows, y)
        without.learn(plain, y)
    rows = _rows(60, seed=9)
    plain = Rows(X=rows.X.copy(), items=rows.items, profile=rows.profile[:, :0], item=rows.item[:, :0], version=None)
    fused_plain = with_vectors.predict(rows).scorers["fusion_plain"]
    np.testing.assert_allclose(fused_plain, without.predict(plain).fused, rtol=1e-12)
    assert not np.allclose(fused_plain, with_vectors.predict(rows).fused)  # the vectors' scorers do count


def test_the_fused_model_survives_pickle_with_identical_predictions():
    model = FusionModel(seed=4)
    rows = _rows(300)
    model.learn(rows, _labels(rows.dense()))
    clone = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(model.predict(_rows(40, seed=9)).fused, clone.predict(_rows(40, seed=9)).fused)


@pytest.mark.parametrize("bad", BAD)
def test_the_fused_model_stays_finite_under_non_finite_and_extreme_input(bad):
    model = FusionModel(seed=0)
    rows = _rows(128)
    rows.X[::3, 0] = bad
    rows.profile[1::5, 2] = bad
    rows.item[2::7, 1] = bad
    for _ in range(5):
        model.learn(rows, np.ones(128))
    weights = list(model.river.weights().values()) + list(model.fusion.weights().values())
    assert np.all(np.isfinite(weights)) and np.isfinite(model.river.intercept)
    assert model.torch is not None and model.torch.head is not None
    assert all(bool(p.detach().isfinite().all()) for p in model.torch.head.parameters())
    assert np.all(np.isfinite(model.predict(rows).fused))


def test_untrained_fusion_ranks_like_the_fixed_blend():
    model = FusionModel()
    X = np.zeros((3, len(FEATURES)), dtype=np.float32)
    X[0, FEATURES.index("repeat")] = 1.0
    X[1, FEATURES.index("covis")] = 1.0
    X[2, FEATURES.index("popular")] = 1.0
    pool = CandidatePool(user_id="u", ts=0, items=["r", "c", "p"], X=X)
    fused = model.predict(Rows.of_pools([pool], None)).fused
    assert list(np.argsort(-fused)) == [0, 1, 2]


def test_explain_names_each_rows_strongest_positive_scorers():
    from fusionrec.online.learning.model import Prediction, explain

    contributions = np.array([[0.1, -0.5, 0.7, 0.2, 0.0],
                              [-0.1, -0.2, -0.3, -0.4, -0.5],
                              [0.3, 0.3, 0.0, 0.9, 0.05]])
    pred = Prediction(fused=np.zeros(3), scorers={}, contributions=contributions, names=list("abcde"))
    assert explain(pred, [2, 0, 1]) == [{"d": 0.9, "a": 0.3, "b": 0.3}, {"c": 0.7, "d": 0.2, "a": 0.1}, {}]
    assert explain(pred, [0], top=1) == [{"c": 0.7}] and explain(pred, []) == []
