"""The search mix (α·f_item + β·f_query) and the join of served search results with later actions."""

import pickle

import numpy as np
import pandas as pd

from fusionrec.online.learning.feedback import Snapshot
from fusionrec.online.learning.model import FusionModel
from fusionrec.online.learning.scorers import SearchMix
from fusionrec.online.learning.search_feedback import SearchJoiner, SearchLog, decode_search_log, encode_search_log

HOUR = 3_600_000


def _snap(user: str, ts: int, actions: list[tuple[str, str, int]]) -> Snapshot:
    return Snapshot(user_id=user, ts=ts, items=[], shown=0, X=b"", n_features=0, version=None, profile=None,
                    actions=actions, impressions=[], model=0, logged_at=ts)


def _log(user: str, ts: int, items: list[str]) -> SearchLog:
    n = len(items)
    return SearchLog(user_id=user, ts=ts, items=items, f_item=[0.1 * i for i in range(n)],
                     f_query=[1.0 - 0.1 * i for i in range(n)], model=3)


def test_an_untrained_mix_is_an_even_sum():
    mix = SearchMix()
    assert (mix.alpha, mix.beta) == (1.0, 1.0)
    np.testing.assert_allclose(mix.score(np.array([0.2, 0.5]), np.array([0.7, 0.1])), [0.9, 0.6])


def test_the_mix_learns_which_signal_predicts_the_click():
    rng = np.random.default_rng(0)
    query_driven, item_driven = SearchMix(), SearchMix()
    for _ in range(40):
        M = rng.random((200, 2))
        query_driven.learn_matrix(M, (M[:, 1] > 0.7).astype(float))
        item_driven.learn_matrix(M, (M[:, 0] > 0.7).astype(float))
    assert query_driven.beta > query_driven.alpha + 1.0
    assert item_driven.alpha > item_driven.beta + 1.0
    assert query_driven.examples == 8000


def test_the_mix_ignores_non_finite_rows_and_speaks_river():
    mix = SearchMix()
    before = mix.weights()
    assert mix.learn_matrix(np.array([[np.nan, 1.0], [np.inf, 0.0], [1e30, -np.inf]]), np.ones(3)) is None
    assert mix.weights() == before and mix.examples == 0
    X = pd.DataFrame({"item": [0.2, 0.9], "query": [0.8, 0.1]})
    assert mix.learn_many(X, pd.Series([True, False])) is None
    proba = mix.predict_proba_many(X)
    assert list(proba.columns) == [False, True] and np.allclose(proba.sum(axis=1), 1.0)
    assert all(np.isfinite(v) for v in mix.weights().values())


def test_a_checkpoint_from_before_search_loads_with_an_even_mix():
    model = FusionModel(use_vectors=False)
    state = dict(model.__dict__)
    del state["search"]
    old = FusionModel.__new__(FusionModel)
    old.__setstate__(state)
    assert (old.search.alpha, old.search.beta) == (1.0, 1.0)
    clone = pickle.loads(pickle.dumps(old))
    assert clone.search.weights() == old.search.weights()


def test_search_log_round_trips():
    entry = _log("u1", 123, ["a", "b"])
    assert decode_search_log(encode_search_log(entry)) == entry


def test_a_search_is_labelled_by_the_first_later_action_on_a_shown_item():
    joiner = SearchJoiner(window_ms=HOUR)
    joiner.add(_log("u1", 1000, ["a", "b", "c"]))
    # before the search, or on an item not shown: not an outcome
    assert joiner.observe([_snap("u1", 1500, [("purchase", "b", 900), ("click", "zzz", 1200)])]) is None
    assert "u1" in joiner.pending
    ex = joiner.observe([_snap("u1", 2000, [("view", "a", 1900), ("add_to_cart", "c", 1950)])])
    assert ex is not None
    np.testing.assert_array_equal(ex.y, [0.0, 0.0, 1.0])  # a view is not a positive
    np.testing.assert_allclose(ex.M, [[0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    assert "u1" not in joiner.pending and joiner.outcomes["labelled"] == 1
    assert joiner.observe([_snap("u1", 3000, [("purchase", "a", 2900)])]) is None  # labelled once


def test_searches_expire_and_a_new_search_replaces_the_old_one():
    joiner = SearchJoiner(window_ms=HOUR)
    joiner.add(_log("u1", 0, ["a"]))
    joiner.add(_log("u1", 10, ["b"]))
    assert joiner.outcomes["replaced"] == 1
    assert joiner.observe([_snap("u1", 20, [("click", "a", 15)])]) is None  # "a" was in the replaced list
    joiner.add(_log("u2", 0, ["x"]))
    assert joiner.observe([_snap("u2", 2 * HOUR, [("click", "x", 2 * HOUR)])]) is None
    assert "u2" not in joiner.pending and joiner.outcomes["expired"] == 1
