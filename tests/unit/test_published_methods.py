"""TIFU-KNN and UP-CF@r on hand-built histories whose vectors and scores are worked out by hand."""

from __future__ import annotations

import math

import pytest

from fusionrec.apps.evaluation.published import TifuKnn, UpCf, _Rows


def feed(method: TifuKnn | UpCf, baskets: list[tuple[str, set[str]]]) -> None:
    for t, (user, items) in enumerate(baskets):
        method.observe(user, items, t * 1000)


# ------------------------------------------------------------------------------------ TIFU-KNN
def test_tifu_five_baskets_fill_three_groups_with_both_decays() -> None:
    # 5 baskets, m=3: groups of 1, 2, 2 baskets (the larger groups last).
    # Within decay counts from the newest basket: 0.5^4, 0.5^3, 0.5^2, 0.5^1, 0.5^0.
    # Group decay 0.5^(2 - g); each group is the mean of its baskets; the sum over groups is / 3.
    #   b0: 1/16 * 1/4 / 1 / 3 = 1/192     b1: 1/8 * 1/2 / 2 / 3 = 1/96    b2: 1/4 * 1/2 / 2 / 3 = 1/48
    #   b3: 1/2 * 1 / 2 / 3 = 1/12         b4: 1 * 1 / 2 / 3 = 1/6         z (in all five): 55/192
    tifu = TifuKnn(m=3, r_b=0.5, r_g=0.5, alpha=1.0)
    feed(tifu, [("u", {item, "z"}) for item in "abcde"])
    expected = {"a": 1 / 192, "b": 1 / 96, "c": 1 / 48, "d": 1 / 12, "e": 1 / 6, "z": 55 / 192}
    assert tifu.scores("u") == pytest.approx(expected, rel=1e-12)
    assert tifu.rank(["u"], [0], 3) == [["z", "e", "d"]]


def test_tifu_extra_baskets_go_to_the_last_groups() -> None:
    # 4 baskets, m=3, no decay: groups of 1, 1, 2 -> weights 1/3, 1/3, 1/6, 1/6 (not 1/6, 1/6, 1/3, 1/3).
    tifu = TifuKnn(m=3, r_b=1.0, r_g=1.0, alpha=1.0)
    feed(tifu, [("u", {item}) for item in "abcd"])
    assert tifu.scores("u") == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 6, "d": 1 / 6}, rel=1e-12)


def test_tifu_fewer_baskets_than_groups_keeps_the_reference_exponents() -> None:
    # 2 baskets, m=3: each basket its own group, group decay 0.5^(m-1-g) = 0.5^2, 0.5^1, divided by 2.
    #   b0: 0.5^1 * 0.25 / 2 = 1/16      b1: 0.5^0 * 0.5 / 2 = 1/4
    tifu = TifuKnn(m=3, r_b=0.5, r_g=0.5, alpha=1.0)
    feed(tifu, [("u", {"a"}), ("u", {"b"})])
    assert tifu.scores("u") == pytest.approx({"a": 1 / 16, "b": 1 / 4}, rel=1e-12)


@pytest.mark.parametrize(("k", "expected"), [
    (1, {"a": 1.0, "b": 1.0, "c": 0.2}),  # nearest v: 0.8 * own + 0.2 * v
    (2, {"a": 0.9, "b": 0.9, "c": 0.1, "x": 0.1}),  # mean of v and w: each of a, b, c, x at 0.5
])
def test_tifu_blends_own_vector_with_the_k_nearest(k: int, expected: dict[str, float]) -> None:
    # m=1, no decay: one basket per user is its indicator vector. |u - v|^2 = 1, |u - w|^2 = 3.
    tifu = TifuKnn(m=1, r_b=1.0, r_g=1.0, k=k, alpha=0.8)
    feed(tifu, [("u", {"a", "b"}), ("v", {"a", "b", "c"}), ("w", {"x"})])
    assert tifu.scores("u") == pytest.approx(expected, rel=1e-12)


def test_tifu_neighbours_by_euclidean_distance_not_cosine() -> None:
    # u = {a}: |u - v|^2 = 3 (cosine 0.5), |u - w|^2 = 2 (cosine 0). Euclidean picks w.
    tifu = TifuKnn(m=1, r_b=1.0, r_g=1.0, k=1, alpha=0.5)
    feed(tifu, [("u", {"a"}), ("v", {"a", "b", "c", "d"}), ("w", {"x"})])
    assert tifu.scores("u") == pytest.approx({"a": 0.5, "x": 0.5}, rel=1e-12)
    assert tifu.rank(["u"], [0], 5) == [["a", "x"]]


def test_tifu_user_is_not_its_own_neighbour() -> None:
    # k=5 but one other user: the neighbour mean is v alone, never u itself.
    tifu = TifuKnn(m=1, r_b=1.0, r_g=1.0, k=5, alpha=0.75)
    feed(tifu, [("u", {"a"}), ("v", {"b"})])
    assert tifu.scores("u") == pytest.approx({"a": 0.75, "b": 0.25}, rel=1e-12)


def test_tifu_unknown_user_gets_nothing_and_state_is_before_the_basket() -> None:
    tifu = TifuKnn(m=1, r_b=1.0, r_g=1.0, k=1, alpha=0.5)
    assert tifu.rank(["u"], [0], 3) == [[]]
    tifu.observe("u", {"a"}, 0)
    assert tifu.rank(["new", "u", "other"], [1, 1, 1], 3) == [[], ["a"], []]
    tifu.observe("u", {"b"}, 2)
    assert tifu.rank(["u"], [3], 3) == [["a", "b"]]  # equal scores: ties by first seen


def test_tifu_ties_go_to_the_item_seen_first() -> None:
    # Three baskets, no decay, one group: z, y, a all at 1/3; first seen z, then y, then a.
    tifu = TifuKnn(m=1, r_b=1.0, r_g=1.0, alpha=1.0)
    feed(tifu, [("u", {"z"}), ("u", {"y"}), ("u", {"a"})])
    assert tifu.rank(["u"], [0], 2) == [["z", "y"]]


def test_tifu_published_settings() -> None:
    tifu = TifuKnn()
    assert (tifu.m, tifu.r_b, tifu.r_g, tifu.k, tifu.alpha) == (3, 1.0, 0.1, 100, 0.8)
    dunnhumby = TifuKnn(**TifuKnn.DUNNHUMBY)
    assert (dunnhumby.m, dunnhumby.r_b, dunnhumby.r_g, dunnhumby.k, dunnhumby.alpha) == (3, 0.9, 0.6, 900, 0.2)


# ------------------------------------------------------------------------------------ UP-CF@r
def test_upcf_popularity_counts_only_the_last_r_baskets() -> None:
    upcf = UpCf(r=2, q=1, alpha=0.5, k=10)  # alone, the user is its only neighbour, s(u, u) = 1
    feed(upcf, [("u", {"a"}), ("u", {"b"})])
    assert upcf.scores("u") == pytest.approx({"a": 0.5, "b": 0.5}, rel=1e-12)
    upcf.observe("u", {"b", "c"}, 2000)  # {a} leaves the window: b in 2 of 2, c in 1 of 2
    assert upcf.scores("u") == pytest.approx({"b": 1.0, "c": 0.5}, rel=1e-12)
    assert upcf.rank(["u"], [3000], 5) == [["b", "c"]]


@pytest.mark.parametrize(("alpha", "s_uv", "s_vu"), [
    (1.0, 2 / 4, 2 / 3),  # |I_u & I_v| / |I_u|  and  / |I_v|
    (0.0, 2 / 3, 2 / 4),
    (0.5, 2 / math.sqrt(12), 2 / math.sqrt(12)),
])
def test_upcf_asymmetric_cosine_raised_to_q(alpha: float, s_uv: float, s_vu: float) -> None:
    # I_u = {a, b, c, d}, I_v = {a, b, e}; one basket each, so every popularity is 1; q = 2.
    upcf = UpCf(r=10, q=2, alpha=alpha, k=10)
    feed(upcf, [("u", {"a", "b", "c", "d"}), ("v", {"a", "b", "e"})])
    w_uv, w_vu = s_uv**2, s_vu**2
    assert upcf.scores("u") == pytest.approx({"a": 1 + w_uv, "b": 1 + w_uv, "c": 1.0, "d": 1.0, "e": w_uv}, rel=1e-9)
    assert upcf.scores("v") == pytest.approx({"a": 1 + w_vu, "b": 1 + w_vu, "e": 1.0, "c": w_vu, "d": w_vu}, rel=1e-9)


def test_upcf_similarity_uses_the_whole_history() -> None:
    # r = 1: u's window is {c}, but I_u = {a, b, c} overlaps I_v = {a, b, e} in 2 items: 2 / (3^.5 * 3^.5).
    upcf = UpCf(r=1, q=1, alpha=0.5, k=10)
    feed(upcf, [("u", {"a", "b"}), ("u", {"c"}), ("v", {"a", "b", "e"})])
    assert upcf.scores("u") == pytest.approx({"c": 1.0, "a": 2 / 3, "b": 2 / 3, "e": 2 / 3}, rel=1e-9)


@pytest.mark.parametrize(("k", "expected"), [
    (1, {"a": 1.0, "b": 1.0}),  # the user itself is the most similar and counts as one of the k
    (2, {"a": 1 + 2 / math.sqrt(6), "b": 1 + 2 / math.sqrt(6), "x": 2 / math.sqrt(6)}),
    (3, {"a": 1 + 2 / math.sqrt(6) + 0.5, "b": 1 + 2 / math.sqrt(6), "x": 2 / math.sqrt(6), "y": 0.5}),
])
def test_upcf_keeps_the_k_most_similar_users(k: int, expected: dict[str, float]) -> None:
    # s(u, v1) = 2 / (2^.5 * 3^.5); s(u, v2) = 1 / (2^.5 * 2^.5) = 0.5; w shares nothing (s = 0).
    upcf = UpCf(r=10, q=1, alpha=0.5, k=k)
    feed(upcf, [("u", {"a", "b"}), ("v1", {"a", "b", "x"}), ("v2", {"a", "y"}), ("w", {"z"})])
    assert upcf.scores("u") == pytest.approx(expected, rel=1e-9)


def test_upcf_zero_similarity_is_never_a_neighbour() -> None:
    # q = 0 gives every neighbour weight 1, so a user sharing nothing would show up if it counted.
    upcf = UpCf(r=10, q=0, alpha=0.5, k=10)
    feed(upcf, [("u", {"a"}), ("v", {"a", "b"}), ("w", {"z"})])
    assert upcf.scores("u") == pytest.approx({"a": 2.0, "b": 1.0}, rel=1e-12)
    assert upcf.rank(["nobody", "w", "u"], [0, 0, 0], 5) == [[], ["z"], ["a", "b"]]


# ------------------------------------------------------------------- incremental user matrices
@pytest.mark.parametrize("make", [lambda: TifuKnn(k=3, alpha=0.6), lambda: UpCf(r=3, q=2, alpha=0.3, k=4)],
                         ids=["tifu_knn", "upcf"])
def test_products_between_rebuilds_equal_a_fresh_build(make) -> None:  # type: ignore[no-untyped-def]
    # One instance rebuilds its user matrices after every change (the plain product); the other only
    # after 5 changed users, answering in between from the old build plus the changed rows. Users come
    # back with new items and new users appear between rankings, so both paths are taken.
    import random

    rnd = random.Random(7)
    fresh, incremental = make(), make()
    for m, (share, least) in ((fresh, (0.0, 0)), (incremental, (0.0, 5))):
        for rows in vars(m).values():
            if isinstance(rows, _Rows):
                rows.rebuild_share, rows.min_rebuild = share, least
    users = [f"u{i}" for i in range(12)]
    from_changed = 0
    for step in range(60):
        chunk = rnd.sample(users[: 4 + step // 5], 3)
        assert fresh.rank(chunk, [step] * 3, 6) == incremental.rank(chunk, [step] * 3, 6)
        pending = [len(r._changed) for r in vars(incremental).values() if isinstance(r, _Rows)]
        from_changed += any(0 < p for p in pending)  # this ranking used the old build plus changed rows
        for u in chunk:
            assert fresh.scores(u) == pytest.approx(incremental.scores(u), rel=1e-12, abs=1e-15)
            basket = {f"i{rnd.randrange(15 + step)}" for _ in range(rnd.randint(1, 4))}
            fresh.observe(u, basket, step)
            incremental.observe(u, basket, step)
    assert from_changed > 30
