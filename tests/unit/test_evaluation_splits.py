"""Splits and the two NDCG@10 definitions of the prequential evaluation."""

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionrec.apps.evaluation.metrics import MethodScore, SplitScores, basket_parts, paired, sign_test


def test_basket_ndcg_divides_by_every_item_of_the_basket():
    m = MethodScore()
    basket = {f"t{i}" for i in range(12)}
    m.add(["t0", "x", "t1"] + [f"f{i}" for i in range(20)], basket, ts=0)
    dcg = 1 + 1 / math.log2(4)
    top_k = sum(1 / math.log2(r + 2) for r in range(10))
    whole = sum(1 / math.log2(r + 2) for r in range(12))
    s = m.summary()
    assert s["ndcg@10"] == round(dcg / top_k, 4)
    assert s["ndcg@10_basket"] == round(dcg / whole, 4)
    assert s["ndcg@10_basket"] < s["ndcg@10"]


def test_parts_split_a_basket_into_repeat_and_explore():
    parts = basket_parts({"a", "b", "c"}, seen={"a", "z"}, interactions=Counter({"a": 9, "b": 4, "c": 5}))
    assert parts == {"overall": {"a", "b", "c"}, "repeat": {"a"}, "explore": {"b", "c"}, "cold_start": {"b"}}


items = st.sampled_from([f"i{n}" for n in range(30)])


@given(st.lists(st.tuples(st.lists(items, max_size=25), st.sets(items, min_size=1, max_size=8),
                          st.sets(items, max_size=15)), min_size=1, max_size=30))
def test_splits_add_up_to_the_whole(baskets):
    s = SplitScores()
    for ranked, targets, seen in baskets:
        s.add(list(dict.fromkeys(ranked)), basket_parts(targets, seen, Counter()), ts=0)
    overall, repeat, explore = (s.splits[k] for k in ("overall", "repeat", "explore"))
    assert repeat.targets + explore.targets == overall.targets
    assert repeat.found + explore.found == overall.found
    assert overall.n == len(baskets) and repeat.n <= overall.n and explore.n <= overall.n
    report = s.report()
    assert report["repeat"]["found@20"] + report["explore"]["found@20"] == overall.found  # type: ignore[index]


def test_sign_test_against_worked_binomial_tails():
    # all five discordant baskets one way: 2 * 0.5^5; ten to none: 2 * 0.5^10; 1 against 7 (n = 8):
    # 2 * (C(8,0) + C(8,1)) / 2^8
    assert sign_test(0, 5) == 0.0625 and sign_test(5, 0) == 0.0625
    assert math.isclose(sign_test(10, 0), 2 / 1024)
    assert math.isclose(sign_test(1, 7), 18 / 256)
    assert sign_test(4, 4) == 1.0 and sign_test(0, 0) == 1.0
    # large counts stay finite: 10,000 against 10,300 is p ≈ 0.035 (normal approximation: z = 2.12)
    assert 0.02 < sign_test(10_000, 10_300) < 0.05


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60))
def test_paired_counts_are_the_difference_of_the_hit_rates(hits):
    a, b = MethodScore(), MethodScore()
    for ts, (x, y) in enumerate(hits):
        a.add(["t"] if x else ["f"], {"t"}, ts)
        b.add(["t"] if y else ["f"], {"t"}, ts)
    p = paired(a, b)
    assert p["wins"] == sum(x and not y for x, y in hits) and p["losses"] == sum(y and not x for x, y in hits)
    assert p["wins"] - p["losses"] == a.hits - b.hits
    assert paired(b, a) == {"wins": p["losses"], "losses": p["wins"], "p": p["p"]}


def test_paired_refuses_methods_scored_on_other_baskets():
    a, b = MethodScore(), MethodScore()
    a.add(["t"], {"t"}, 1)
    b.add(["t"], {"t"}, 2)
    with pytest.raises(ValueError):
        paired(a, b)


def test_plot_buckets_leave_empty_windows_as_gaps_and_count_each_windows_baskets():
    from fusionrec.apps.evaluation.plots import bucket_counts, bucket_means

    timeline = [(0, 1), (5, 0), (12, 1), (35, 0)]  # windows of 10: [0, 10) two baskets, [10, 20) one, [30, 40) one
    means = bucket_means(timeline, origin=0, bucket=10, n=4)
    assert means[0] == 0.5 and means[1] == 1.0 and np.isnan(means[2]) and means[3] == 0.0
    assert bucket_counts(timeline, origin=0, bucket=10, n=4).tolist() == [2, 1, 0, 1]
    assert bucket_counts([], origin=0, bucket=10, n=3).tolist() == [0, 0, 0]
    assert np.isnan(bucket_means([], 0, 10, 3)).all()
