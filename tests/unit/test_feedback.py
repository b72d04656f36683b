"""Candidate pools, logged decisions and the outcome join."""

import msgspec
import numpy as np
import pytest

from fusionrec.core.errors import InvalidEventError
from fusionrec.online.candidates.context import UserContext
from fusionrec.online.candidates.features import FEATURES, INDEX, ItemInfo, build_pool, daypart, price_band
from fusionrec.online.learning.feedback import FeedbackJoiner, Snapshot, decode_snapshot, encode_snapshot

DAY = 86_400_000


def _ctx(**kw):
    base = dict(user_id="u1", recent=["a", "b"], items=[("a", 4.0), ("b", 2.0)],
                covis={"a": [("c", 3.0), ("d", 1.0)], "b": [("c", 1.0)]}, popular=[("p", 10.0), ("a", 5.0)],
                content=[("e", 0.9), ("c", 0.8)], trending=[("t", 7.0)],
                affinity={"c:dairy": 6.0, "b:acme": 3.0}, ts=1_700_000_000_000 + 9 * 3_600_000)
    base.update(kw)
    return UserContext(**base)


INFO = {"c": ItemInfo("dairy", "acme", 2.5), "e": ItemInfo("bakery", None, None), "p": ItemInfo(None, None, 99.0)}


def test_pool_holds_the_union_of_sources_with_bounded_features():
    pool = build_pool(_ctx(), INFO, size=50)
    assert set(pool.items) == {"a", "b", "c", "d", "e", "p", "t"}
    assert np.all((pool.X >= 0) & (pool.X <= 1))
    row = {i: r for r, i in enumerate(pool.items)}
    c = pool.X[row["c"]]
    assert c[INDEX["covis"]] == 1.0 and c[INDEX["src_covis"]] == 1 and c[INDEX["src_content"]] == 1
    assert c[INDEX["aff_category"]] == 1.0 and c[INDEX["aff_brand"]] == 0.5
    assert c[INDEX["price_b1"]] == 1 and pool.X[row["e"], INDEX["price_none"]] == 1
    assert pool.X[row["a"], INDEX["recent"]] == 1.0 and pool.X[row["b"], INDEX["recent"]] == 0.5
    assert np.all(pool.X[:, INDEX["hour_morning"]] == 1)  # 09:00 UTC
    assert pool.X.sum(axis=1).min() > 0


def test_pool_is_cut_to_size_by_the_blend_and_skips_excluded_items():
    pool = build_pool(_ctx(excluded=frozenset({"a"})), INFO, size=3)
    # c: co-visitation 0.6; b: repeat 0.5; e: content 0.3 (a, the strongest, is excluded)
    assert pool.items == ["c", "b", "e"]


def test_price_bands_and_dayparts():
    assert [price_band(p) for p in (None, float("nan"), -1, 0.5, 1, 9.99, 10, 500)] == [-1, -1, -1, 0, 1, 2, 3, 4]
    assert [daypart(h * 3_600_000) for h in (0, 5, 6, 12, 18, 23)] == [0, 0, 1, 2, 3, 3]


def _snap(user, ts, items, shown=2, actions=(), model=0):
    pool = build_pool(_ctx(user_id=user, ts=ts), INFO, size=50)
    order = [pool.items.index(i) for i in items]
    return Snapshot.of(pool, order, shown, list(actions), [], model, 0)


def test_snapshot_round_trips_through_msgpack():
    snap = _snap("u1", 1000, ["a", "c", "p"])
    back = decode_snapshot(encode_snapshot(snap))
    assert back == snap
    np.testing.assert_allclose(back.pool().X, snap.pool().X)
    assert back.pool().X.shape == (3, len(FEATURES))


def test_the_next_decision_labels_the_previous_one():
    j = FeedbackJoiner(window_ms=DAY, sampled_negatives=1, seed=1)
    assert j.add([_snap("u1", 1000, ["a", "c", "p", "t", "e"])]) == []
    groups = j.add([_snap("u1", 5000, ["a"], actions=[("view", "p", 4000), ("purchase", "t", 4500)])])
    assert len(groups) == 1
    g = groups[0]
    # shown a, c; positive t (unshown); one sampled negative from p/e; the view is not a positive (a
    # purchase of a pool item is the stronger outcome)
    assert g.pool.items[:2] == ["a", "c"] and "t" in g.pool.items and len(g.pool.items) == 4
    assert dict(zip(g.pool.items, g.y, strict=True))["t"] == 1 and g.y.sum() == 1 and g.shown == 2
    # the whole pool goes along, in logged order, with its positives: what the share of new items replays
    assert g.full is not None and g.full.items == ["a", "c", "p", "t", "e"]
    assert g.positive is not None and g.positive.tolist() == [0, 0, 0, 1, 0]


def test_views_label_a_decision_only_where_nothing_stronger_happened_to_a_pool_item():
    j = FeedbackJoiner(window_ms=DAY, sampled_negatives=0, seed=1)
    for user in ("strong", "views", "outside", "late"):
        j.add([_snap(user, 1000, ["a", "c", "p", "t", "e"])])
    # a purchase of a pool item: the views beside it are not positives
    strong = j.add([_snap("strong", 5000, ["a"], actions=[("view", "p", 4000), ("purchase", "t", 4500)])])
    assert dict(zip(strong[0].pool.items, strong[0].y, strict=True)) == {"a": 0, "c": 0, "t": 1}
    # a purchase outside the pool: the pool items viewed label the decision
    views = j.add([_snap("views", 5000, ["a"], actions=[("view", "p", 4000), ("view", "e", 4100),
                                                        ("purchase", "zzz", 4500), ("impression", "c", 4600)])])
    assert dict(zip(views[0].pool.items, views[0].y, strict=True)) == {"a": 0, "c": 0, "p": 1, "e": 1}
    assert views[0].positive is not None and views[0].positive.tolist() == [0, 0, 1, 0, 1]
    # views outside the pool or the window label nothing
    assert j.add([_snap("outside", 5000, ["a"], actions=[("view", "zzz", 4000)])]) == []
    assert j.add([_snap("late", DAY + 5000, ["a"], actions=[("view", "p", DAY + 4000)])]) == []
    assert (j.outcomes["labelled"], j.outcomes["labelled_views"]) == (1, 1)
    assert (j.outcomes["positive_outside_pool"], j.outcomes["no_positive"]) == (1, 1)
    off = FeedbackJoiner(window_ms=DAY, sampled_negatives=0, views=False)
    off.add([_snap("u", 1000, ["a", "p"])])
    assert off.add([_snap("u", 5000, ["a"], actions=[("view", "p", 4000)])]) == []
    assert off.outcomes["no_positive"] == 1


def test_outcomes_outside_the_window_or_pool_label_nothing():
    j = FeedbackJoiner(window_ms=1000, sampled_negatives=5)
    j.add([_snap("u1", 1000, ["a", "c"]), _snap("u2", 1000, ["a", "c"])])
    outside = j.add([_snap("u2", 1500, ["a"], actions=[("click", "zzz", 1400)])])
    late = j.add([_snap("u1", 9000, ["a"], actions=[("purchase", "a", 5000)])])
    assert late == [] and outside == []
    assert j.outcomes["no_positive"] == 1 and j.outcomes["positive_outside_pool"] == 1


def test_decisions_past_the_window_are_forgotten():
    j = FeedbackJoiner(window_ms=1000)
    j.add([_snap("old", 1000, ["a"])])
    j.add([_snap("new", 5000, ["a"])])
    assert "old" not in j.pending and j.outcomes["expired"] == 1


def _snapshot(**changes) -> Snapshot:
    X = np.zeros((3, len(FEATURES)), dtype=np.float32)
    from fusionrec.online.candidates.features import CandidatePool

    snap = Snapshot.of(CandidatePool(user_id="u", ts=1, items=["a", "b", "c"], X=X), [0, 1, 2], 2, [], [], 0, 0)
    return msgspec.structs.replace(snap, **changes)


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty"),
    (b"\xc1 not msgpack", "undecodable"),
    (b"\x91" * 3000 + b"\xc0", "undecodable"),  # nesting where a string belongs fails at once
    (encode_snapshot(_snapshot(X=b"\x00\x00")), "invalid_value"),  # features for fewer items than listed
    (encode_snapshot(_snapshot(n_features=3)), "invalid_value"),
    (encode_snapshot(_snapshot(shown=4)), "invalid_value"),
    (encode_snapshot(_snapshot(profile=b"\x00" * 6, version="v1")), "invalid_value"),
])
def test_bad_feedback_messages_are_invalid_events_with_their_reason(raw, reason):
    with pytest.raises(InvalidEventError) as caught:
        decode_snapshot(raw)
    assert caught.value.reason == reason
    assert decode_snapshot(encode_snapshot(_snapshot())).pool().X.shape == (3, len(FEATURES))


def _positioned(user, ts, items, actions, positions, upto):
    snap = _snap(user, ts, items, actions=actions)
    return msgspec.structs.replace(snap, positions=positions, upto=upto)


def test_a_replayed_decision_is_dropped_and_an_overlapping_one_keeps_only_its_new_actions():
    j = FeedbackJoiner(window_ms=DAY, sampled_negatives=0)
    first = _positioned("u1", 1000, ["a", "c", "p"], [("view", "a", 900)], [(0, 10)], {0: 10})
    assert j.add([first]) == []
    # a replay of the same batch logs the same decision again: a duplicate, the pending one stays
    assert j.add([first]) == [] and j.outcomes["duplicate"] == 1
    assert j.pending["u1"] is first
    # a bigger replay: offset 10 was the outcome of nothing new, offset 12 (a click on c) is
    overlapping = _positioned("u1", 2000, ["c", "a", "p"], [("view", "a", 900), ("click", "c", 1500)],
                              [(0, 10), (0, 12)], {0: 12})
    (group,) = j.add([overlapping])
    assert dict(zip(group.pool.items, group.y, strict=True)) == {"a": 0.0, "c": 1.0}
    assert j.pending["u1"].actions == [("click", "c", 1500)] and j.pending["u1"].upto == {0: 12}
    # the same click again, from another replay: not a second positive
    assert j.add([overlapping]) == [] and j.outcomes["duplicate"] == 2
    assert j.outcomes["labelled"] == 1


def test_snapshots_without_positions_are_joined_as_they_come():
    j = FeedbackJoiner(window_ms=DAY, sampled_negatives=0)
    first = _snap("u1", 1000, ["a", "c", "p"])
    j.add([first])
    assert len(j.add([_snap("u1", 2000, ["c", "a"], actions=[("click", "c", 1500)])])) == 1
    assert j.outcomes["duplicate"] == 0


def test_positions_must_match_the_actions():
    snap = _positioned("u1", 1000, ["a"], [("view", "a", 900)], [(0, 1), (0, 2)], {0: 2})
    with pytest.raises(InvalidEventError):
        decode_snapshot(encode_snapshot(snap))


def test_features_converted_for_many_pools_equal_one_at_a_time():
    from fusionrec.online.learning.feedback import ordered_features

    pools = [build_pool(_ctx(user_id=u, ts=1_700_000_000_000 + n), INFO, size=50) for n, u in enumerate("abc")]
    orders = [list(reversed(range(len(p)))) for p in pools]
    orders[1] = orders[1][:2]  # a logged pool may hold fewer rows than were built
    for pool, order, X in zip(pools, orders, ordered_features(pools, orders), strict=True):
        assert X == Snapshot.of(pool, order, 1, [], [], 0, 0).X  # the pool converted alone
    assert ordered_features([], []) == []


def test_a_logged_decision_holds_the_offsets_of_what_it_logs():
    from fusionrec.core.settings import Settings
    from fusionrec.online.learning.feedback import FeedbackPublisher

    class Producer:  # keeps each message's delivery report for the test to give
        def __init__(self):
            self.reports = []

        def produce(self, topic, value, key=None, headers=None, timestamp=0, on_delivery=None):
            self.reports.append(on_delivery)

        def poll(self, timeout=0):
            return 0

        def drain(self, timeout=30.0):
            return 0

    producer = Producer()
    publisher = FeedbackPublisher(Settings(), producer=producer)  # type: ignore[arg-type]
    pool = build_pool(_ctx(), INFO, size=50)
    acted = Snapshot.of(pool, [0, 1], 2, [("view", "a", 1), ("purchase", "b", 2)], [], 0, 0,
                        positions=[(0, 12), (1, 4)], upto={0: 12, 1: 4})
    shown_only = Snapshot.of(pool, [0], 1, [], ["a"], 0, 0, upto={0: 10})
    publisher([acted, shown_only])
    assert publisher.floor() == {0: 10, 1: 4}
    producer.reports[1](None, None)
    assert publisher.floor() == {0: 12, 1: 4} and publisher.delivered == 1
    producer.reports[0](None, None)
    assert publisher.floor() == {} and publisher.delivered == 2
