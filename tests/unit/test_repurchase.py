"""The time-aware repurchase model on hand-built histories whose answers are known."""

import math

from fusionrec.apps.evaluation.repurchase import Repurchase

DAY = 86_400_000


def _train(model: Repurchase, users: int) -> None:
    """Each user buys X 10 days apart and Y 2 days apart; the scored basket at day 20 holds X only.

    Every history is in before any basket is scored, so all users see the same item cycles.
    """
    for n in range(users):
        model.observe(f"u{n}", {"X", "Y"}, 0)
        model.observe(f"u{n}", {"Y"}, 2 * DAY)
        model.observe(f"u{n}", {"X"}, 10 * DAY)
    for n in range(users):
        model.learn(f"u{n}", {"X"}, 20 * DAY)
    for n in range(users):
        model.observe(f"u{n}", {"X"}, 20 * DAY)


def test_the_cycle_separates_items_bought_equally_often():
    model = Repurchase(smoothing=20.0)
    _train(model, users=30)
    for u, t in (("z", 0), ("z", 2 * DAY), ("z", 10 * DAY)):
        model.observe(u, {"X", "Y"} if t == 0 else {"Y"} if t == 2 * DAY else {"X"}, t)
    # z bought X and Y twice each in 3 baskets: per-user frequency ties them; the cycle does not.
    assert model.rank(["z"], [20 * DAY], 10) == [["X", "Y"]]
    p = model.probability("z", 20 * DAY)
    # X sits in a cell tried 30 times with 30 successes, Y in one tried 30 times with none; both in the
    # row (2 purchases, share 2/3) tried 60 times with 30 successes; the global rate is (30+1)/(60+2).
    a, overall = 20.0, 31 / 62
    row = (30 + a * overall) / (60 + a)
    assert math.isclose(p["X"], (30 + a * row) / (30 + a))
    assert math.isclose(p["Y"], (0 + a * row) / (30 + a))


def test_an_unseen_phase_falls_back_on_its_row():
    model = Repurchase(smoothing=20.0)
    _train(model, users=30)
    model.observe("z", {"X", "Y"}, 0)
    model.observe("z", {"Y"}, 2 * DAY)
    model.observe("z", {"X"}, 10 * DAY)
    # one day after the last X: a phase no basket was scored at; no evidence beyond the row's rate
    p = model.probability("z", 11 * DAY)
    a = 20.0
    assert math.isclose(p["X"], (30 + a * 31 / 62) / (60 + a))


def test_first_basket_and_unknown_users_get_nothing():
    model = Repurchase()
    assert model.rank(["nobody"], [0], 10) == [[]]
    model.learn("nobody", {"X"}, 0)  # nothing to learn from: no history
    assert model.probability("nobody", 0) == {}
