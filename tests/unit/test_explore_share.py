"""The learned share of new items among a list's first places: the arrangement, the replay of every
share on whole pools, the choice per segment, and the fused model learning it before its update."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from fusionrec.online.candidates.features import FEATURES, INDEX, CandidatePool
from fusionrec.online.learning.explore import OWN_EDGES, ExploreShare, arrange, hits_by_share
from fusionrec.online.learning.model import FusionModel, Rows


def flags(pattern: str) -> np.ndarray:
    """'o' an own item, 'n' a new one, rows in order."""
    return np.array([c == "n" for c in pattern])


@pytest.mark.parametrize(("pattern", "share", "expected"), [
    ("oooonn", 0, [0, 1, 2, 3, 4, 5]),
    ("oooonn", 1, [0, 1, 2, 4, 3, 5]),  # the lowest own item of the first four makes room
    ("oooonn", 2, [0, 1, 4, 5, 2, 3]),  # new items keep their order; dropped own items follow, in theirs
    ("oooonn", 3, [0, 1, 4, 5, 2, 3]),  # only two new items exist
    ("onoonn", 2, [0, 1, 2, 4, 3, 5]),  # one new item is already among the first four
    ("nnnnoo", 3, [0, 1, 2, 3, 4, 5]),
    ("oo", 1, [0, 1]),
])
def test_arrange_brings_up_the_best_new_items(pattern: str, share: int, expected: list[int]) -> None:
    assert arrange(range(len(pattern)), flags(pattern), 4, share) == expected


def test_arrange_follows_the_given_order_not_row_numbers() -> None:
    order = [3, 0, 2, 1]  # rows 1 and 2 are new; 2 ranks above 1
    assert arrange(order, flags("onno"), 2, 1) == [3, 2, 0, 1]


def test_replayed_hits_equal_arranged_lists_on_random_pools() -> None:
    rnd = random.Random(5)
    for _ in range(300):
        n = rnd.randint(1, 30)
        new = np.array([rnd.random() < 0.4 for _ in range(n)])
        positive = np.array([float(rnd.random() < 0.1) for _ in range(n)])
        order = rnd.sample(range(n), n)
        places, most = rnd.randint(1, 12), rnd.randint(0, 6)
        expected = [bool(positive[arrange(order, new, places, s)[:places]].any()) for s in range(most + 1)]
        assert hits_by_share(order, new, positive, places, most).tolist() == expected


def test_a_segment_takes_the_share_with_most_hits_once_it_has_enough_decisions() -> None:
    share = ExploreShare(places=3, max_share=2, half_life=float("inf"), min_decisions=3)
    many_own = flags("o" * 12 + "nnn")  # 12 own items: segment 2
    order = list(range(15))
    bought_new = np.zeros(15)
    bought_new[13] = 1.0  # the second-best new item
    bought_own = np.zeros(15)
    bought_own[2] = 1.0  # the third own item
    for _ in range(2):
        share.learn(order, many_own, bought_new)
    assert share.share(many_own) == 0  # two decisions: not enough yet
    share.learn(order, many_own, bought_own)
    # hits per share: s=0 [own 2] -> 1; s=1 drops own 2 for new 12 -> 0; s=2 keeps own 0, new 12, 13 -> 2
    assert share.hits[ExploreShare.segment(many_own)].tolist() == [1.0, 0.0, 2.0]
    assert share.share(many_own) == 2
    assert share.arrange(order, many_own)[:3] == [0, 12, 13]
    assert share.share(flags("o" * 30 + "n")) == 0  # another segment: nothing learned there
    assert share.report()["own_10-24"] == {"share": 2, "decisions": 3.0}


def test_ties_go_to_the_smaller_share_and_counts_decay() -> None:
    share = ExploreShare(places=2, max_share=1, half_life=1.0, min_decisions=0)
    pool, nothing = flags("oon"), np.zeros(3)
    share.learn([0, 1, 2], pool, nothing)
    assert share.share(pool) == 0
    share.learn([0, 1, 2], pool, np.array([0.0, 0.0, 1.0]))
    assert share.decisions[ExploreShare.segment(pool)] == pytest.approx(1.5)  # 1 * 0.5 + 1
    assert share.hits[ExploreShare.segment(pool)].tolist() == [0.0, 1.0]


def test_segments_count_own_items() -> None:
    assert [ExploreShare.segment(flags("o" * k + "n")) for k in (0, 1, 9, 10, 24, 25, 49, 50, 80)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(OWN_EDGES) == 4


def own_and_new_pool(own: int, new: int, seed: int) -> CandidatePool:
    """A pool of `own` of the user's items, then `new` items new to them, random features."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, size=(own + new, len(FEATURES))).astype(np.float32)
    X[:, INDEX["src_repeat"]] = [1.0] * own + [0.0] * new
    return CandidatePool(user_id="u", ts=0, items=[f"i{r}" for r in range(own + new)], X=X)


def test_the_fused_model_replays_whole_pools_with_its_scores_before_the_update() -> None:
    model = FusionModel(use_vectors=False, seed=1)
    model.explore = ExploreShare(places=4, max_share=2, min_decisions=1, half_life=float("inf"))
    pools = [own_and_new_pool(12, 6, s) for s in range(5)]
    positives = [np.eye(18)[12 + s % 6] for s in range(5)]  # always a new item
    expected = ExploreShare(places=4, max_share=2, min_decisions=1, half_life=float("inf"))
    fused = model.predict(Rows.of_pools(pools, None)).fused
    for n, (pool, positive) in enumerate(zip(pools, positives, strict=True)):
        scores = fused[n * 18:(n + 1) * 18]
        order = np.lexsort((np.arange(18), -scores)).tolist()
        expected.learn(order, pool.X[:, INDEX["src_repeat"]] <= 0, positive)
    model.learn_explore(pools, positives, None)
    np.testing.assert_array_equal(model.explore.hits, expected.hits)
    assert model.explore.hits[2, 2] >= model.explore.hits[2, 0]
    ranked = model.arrange(pools[0], list(range(18)))
    assert sum(1 for r in ranked[:4] if r >= 12) >= model.explore.share(pools[0].X[:, INDEX["src_repeat"]] <= 0)


def test_a_checkpoint_without_the_share_loads_with_an_untrained_one() -> None:
    model = FusionModel(use_vectors=False, seed=1)
    state = dict(model.__dict__)
    del state["explore"]
    old = FusionModel.__new__(FusionModel)
    old.__setstate__(state)
    assert isinstance(old.explore, ExploreShare) and old.explore.decisions.sum() == 0
    assert pickle.loads(pickle.dumps(model)).explore.places == 10
