import math
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from fusionrec.apps.evaluation.metrics import MethodScore, TopCounter


def test_metrics_of_one_basket():
    m = MethodScore()
    m.add(["x", "a", "y"] + [f"f{i}" for i in range(20)], {"a", "b"}, ts=0)
    s = m.summary()
    assert s["hit_rate@10"] == 1.0
    assert s["recall@20"] == 0.5
    assert abs(s["ndcg@10"] - round((1 / math.log2(3)) / (1 + 1 / math.log2(3)), 4)) < 1e-4


def test_miss_scores_zero():
    m = MethodScore()
    m.add(["x"] * 10, {"a"}, ts=0)
    assert m.summary() == {"hit_rate@10": 0.0, "recall@20": 0.0, "ndcg@10": 0.0, "ndcg@10_basket": 0.0}


@given(st.lists(st.sampled_from("abcdefghijklmnop"), max_size=300), st.integers(1, 6))
def test_top_counter_matches_brute_force(items, k):
    tc = TopCounter(k)
    for i in items:
        tc.add(i)
    counts = Counter(items)
    got = tc.ranked()
    assert len(got) == min(k, len(counts))
    # the k-th largest count bounds every item left out
    kth = sorted(counts.values(), reverse=True)[: k][-1] if counts else 0
    assert all(counts[i] >= kth for i in got)
    assert all(counts[i] <= min(counts[g] for g in got) for i in counts if i not in got)
