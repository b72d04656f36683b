"""The served order: the stacker's unless a part clearly ranks a segment better, judged prequentially on
whole labelled pools, and the fused model serving and learning it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fusionrec.online.candidates.features import INDEX
from fusionrec.online.learning.choice import OrderChoice
from fusionrec.online.learning.explore import ExploreShare
from fusionrec.online.learning.model import FusionModel, Prediction, Rows, order_scores
from tests.unit.test_explore_share import own_and_new_pool


def test_the_stacker_serves_until_enough_decisions() -> None:
    choice = OrderChoice(("fusion", "river"), min_decisions=50, z=0.0, half_life=float("inf"))
    for _ in range(49):
        choice.learn(2, {"fusion": False, "river": True})
    assert choice.chosen(2) == "fusion"
    choice.learn(2, {"fusion": False, "river": True})
    assert choice.chosen(2) == "river"
    assert choice.chosen(0) == "fusion"  # other segments saw nothing


def test_a_part_must_win_clearly_not_by_noise() -> None:
    choice = OrderChoice(("fusion", "river", "torch_head"), min_decisions=1, z=2.0, half_life=float("inf"))
    # river: 60 wins, 45 losses against the stacker: 15 < 2 * sqrt(105) = 20.5 -> not clear
    for _ in range(60):
        choice.learn(1, {"fusion": False, "river": True, "torch_head": False})
    for _ in range(45):
        choice.learn(1, {"fusion": True, "river": False, "torch_head": True})
    assert choice.chosen(1) == "fusion"
    # 20 more wins: 80 - 45 = 35 > 2 * sqrt(125) = 22.4 -> river serves the segment
    for _ in range(20):
        choice.learn(1, {"fusion": False, "river": True, "torch_head": False})
    assert choice.chosen(1) == "river"
    report = choice.report()["own_1-9"]
    assert report["order"] == "river" and report["river_won_lost"] == [80.0, 45.0]
    assert report["torch_head_won_lost"] == [0.0, 0.0]


def test_of_the_parts_that_win_clearly_the_one_with_most_hits_serves() -> None:
    choice = OrderChoice(("fusion", "river", "torch_head"), min_decisions=1, z=1.0, half_life=float("inf"))
    for _ in range(30):
        choice.learn(0, {"fusion": False, "river": True, "torch_head": True})
    for _ in range(10):
        choice.learn(0, {"fusion": False, "river": False, "torch_head": True})
    assert choice.chosen(0) == "torch_head"


def test_an_order_left_out_counts_as_the_stackers_and_evidence_decays() -> None:
    choice = OrderChoice(("fusion", "river"), min_decisions=0, z=0.0, half_life=1.0)
    choice.learn(0, {"fusion": True})  # river could not score: neither a win nor a loss
    assert choice.won[0].tolist() == [0.0, 0.0] and choice.lost[0].tolist() == [0.0, 0.0]
    choice.learn(0, {"fusion": False, "river": True})
    choice.learn(0, {"fusion": True, "river": False})
    assert choice.won[0, 1] == pytest.approx(0.5) and choice.lost[0, 1] == pytest.approx(1.0)
    assert choice.decisions[0] == pytest.approx(1.75)
    assert choice.chosen(0) == "fusion"


def test_the_model_judges_every_order_on_each_whole_pool_before_its_update() -> None:
    model = FusionModel(use_vectors=False, seed=3)
    model.choice = OrderChoice(model.choice.orders, places=3, min_decisions=1, z=0.0, half_life=float("inf"))
    model.explore = ExploreShare(places=3, max_share=0, min_decisions=1, half_life=float("inf"))
    pools = [own_and_new_pool(5, 7, s) for s in range(6)]
    positives = [np.eye(12)[s % 12] for s in range(6)]
    model.learn(Rows.of_pools(pools, None), np.concatenate(positives))  # river's scores now tell rows apart
    pred = model.predict(Rows.of_pools(pools, None))
    assert all(np.ptp(pred.scorers["river"][n * 12:(n + 1) * 12]) > 0 for n in range(6))
    expected = OrderChoice(model.choice.orders, places=3, min_decisions=1, z=0.0, half_life=float("inf"))
    for n, (pool, positive) in enumerate(zip(pools, positives, strict=True)):
        rows = slice(n * 12, (n + 1) * 12)
        hit = {}
        by_rank = {name: np.argsort(np.lexsort((np.arange(12), -scores))) + 1
                   for name, scores in (("fusion", pred.fused[rows]), ("river", pred.scorers["river"][rows]))}
        rrf = sum(1.0 / (60 + ranks) for ranks in by_rank.values())
        for name, scores in (("fusion", pred.fused[rows]), ("river", pred.scorers["river"][rows]),
                             ("reciprocal_rank", rrf)):
            order = np.lexsort((np.arange(12), -scores)).tolist()
            hit[name] = bool(positive[order[:3]].any())
        expected.learn(ExploreShare.segment(pool.X[:, INDEX["src_repeat"]] <= 0), hit)
    model.learn_explore(pools, positives, None)
    np.testing.assert_array_equal(model.choice.hits, expected.hits)
    np.testing.assert_array_equal(model.choice.won, expected.won)
    np.testing.assert_array_equal(model.choice.lost, expected.lost)


def test_served_scores_take_the_chosen_part_for_its_segment_only() -> None:
    model = FusionModel(use_vectors=False, seed=1)
    few, many = own_and_new_pool(3, 4, 1), own_and_new_pool(30, 4, 2)  # segments 1 (1-9 own items) and 3 (25-49)
    seg = ExploreShare.segment(many.X[:, INDEX["src_repeat"]] <= 0)
    model.choice = OrderChoice(model.choice.orders, min_decisions=1, z=0.0)
    model.choice.learn(seg, {"fusion": False, "river": True})
    pred = model.predict(Rows.of_pools([few, many], None))
    served, names = model.served_scores([few, many], pred)
    assert names == ["fusion", "river"]
    np.testing.assert_array_equal(served[:7], pred.fused[:7])
    np.testing.assert_array_equal(served[7:], pred.scorers["river"][7:])
    untouched = Prediction(fused=pred.fused, scorers={}, contributions=pred.contributions, names=pred.names)
    np.testing.assert_array_equal(model.served_scores([few, many], untouched)[0], pred.fused)  # no river: fused


def test_the_model_with_vectors_learns_a_plain_stacker_on_the_same_rows() -> None:
    model = FusionModel(use_vectors=True, seed=1)
    assert model.choice.orders == ("fusion", "river", "torch_head", "fusion_plain", "reciprocal_rank")
    assert model.plain is not None and "content" not in model.plain.names and "torch_head" not in model.plain.names
    pool = own_and_new_pool(4, 4, 0)
    rows = Rows.of_pools([pool], None)
    before = model.predict(rows).scorers["fusion_plain"].copy()
    model.learn(rows, np.array([1.0, 0, 0, 0, 0, 0, 0, 1.0]))
    assert not np.allclose(model.predict(rows).scorers["fusion_plain"], before)


def test_a_checkpoint_from_before_the_choice_loads_serving_the_stacker() -> None:
    model = FusionModel(use_vectors=True, seed=1)
    state = dict(model.__dict__)
    del state["choice"], state["plain"]
    old = FusionModel.__new__(FusionModel)
    old.__setstate__(state)
    assert old.choice.orders == model.choice.orders and old.choice.decisions.sum() == 0
    assert old.plain is not None and old.plain.names == model.plain.names  # type: ignore[union-attr]
    partial = OrderChoice(("fusion", "river"))
    partial.learn(0, {"fusion": True, "river": True})
    state["choice"] = partial
    again = FusionModel.__new__(FusionModel)
    again.__setstate__(state)
    assert again.choice.orders == model.choice.orders and again.choice.hits[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    loaded = pickle.loads(pickle.dumps(model))
    assert loaded.choice.orders == model.choice.orders


def test_reciprocal_rank_fusion_sums_one_over_60_plus_each_rank_and_skips_abstaining_parts() -> None:
    fused = np.array([0.9, 0.5, 0.1, 0.7])  # ranks 1, 3, 4, 2
    river = np.array([0.2, 0.8, 0.6, 0.4])  # ranks 4, 1, 2, 3
    pred = Prediction(fused=fused, scorers={"river": river, "torch_head": np.full(4, 0.5)},
                      contributions=np.zeros((4, 0)), names=[])
    expected = [1 / 61 + 1 / 64, 1 / 63 + 1 / 61, 1 / 64 + 1 / 62, 1 / 62 + 1 / 63]
    np.testing.assert_allclose(order_scores("reciprocal_rank", pred, 0, 4), expected)
    np.testing.assert_allclose(order_scores("reciprocal_rank", pred, 1, 3), [1 / 61 + 1 / 61, 1 / 62 + 1 / 62])
    assert order_scores("fusion_plain", pred, 0, 4) is None
    assert order_scores("reciprocal_rank", pred, 2, 2).shape == (0,)
