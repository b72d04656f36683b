from fusionrec.online.ranking.ranker import SimpleRanker, UserContext


def ctx(**kw):
    base = dict(user_id="u", recent=["a", "b"], items=[("a", 4.0), ("x", 2.0)],
                covis={"a": [("c", 10.0), ("d", 5.0)], "b": [("d", 8.0)]},
                popular=[("p", 100.0), ("c", 50.0)])
    base.update(kw)
    return UserContext(**base)


def test_blend_orders_by_weighted_normalised_sources_and_explains():
    recs = SimpleRanker(repeat=1.0, covis=0.6, popular=0.1).rank(ctx(), k=10)
    by_id = {r.item_id: r for r in recs}
    assert recs[0].item_id == "a"
    assert by_id["a"].sources == {"repeat": 1.0}
    # c: covis from the most recent item (1.0 * 0.6) + half the top popularity (0.05)
    assert by_id["c"].sources == {"covis": 0.6, "popular": 0.05}
    assert abs(by_id["c"].score - 0.65) < 1e-9
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert all(abs(r.score - sum(r.sources.values())) < 1e-5 for r in recs)


def test_k_and_exclusions():
    recs = SimpleRanker().rank(ctx(excluded=frozenset({"a", "c"})), k=2)
    assert len(recs) == 2
    assert not {"a", "c"} & {r.item_id for r in recs}


def test_empty_context_gives_popular_only():
    recs = SimpleRanker().rank(ctx(recent=[], items=[], covis={}), k=5)
    assert [r.item_id for r in recs] == ["p", "c"]
    assert all(set(r.sources) == {"popular"} for r in recs)
