"""Which order a list is served in: the stacker's, or another the model has, learned from feedback.

The stacker learns a logistic fit of single rows; what a list is judged by is whether its first
places hold an item the user takes. The two can disagree: a part (river alone, the torch head alone,
a stacker without the torch head and the vector sources' scores) or the reciprocal rank fusion of the
learned scorers' orders may rank a segment of users better than the fused score. :class:`OrderChoice`
watches for that, per segment of users (the segments of
:class:`~fusionrec.online.learning.explore.ExploreShare`: how many own items the pool holds), on the
learner's whole labelled pools:

* each decision's pool is ranked by every candidate order as the model stood before the update
  (prequential), each list arranged with the learned share of new items as it would be served, and a
  list holding a positive among its first ``places`` counts a hit for its order;
* against the stacker, each other order counts the decisions it hit and the stacker missed (``won``)
  and the reverse (``lost``); the counts decay with a half-life in decisions, like the share's;
* a segment serves the stacker's order unless another order won clearly: more wins than losses by
  ``z`` standard deviations of a paired sign test (``won - lost > z * sqrt(won + lost)``), over at
  least ``min_decisions`` decisions. Of the orders that won clearly, the one with the most hits.

Every order is judged on the same decisions against labels that do not depend on it, and the stacker
keeps the lists until the evidence is clear, so the served list is never worse than the stacker's by
more than noise, and follows a part where that part is better.

>>> choice = OrderChoice(("fusion", "river"), min_decisions=1, z=0.0)
>>> choice.learn(0, {"fusion": False, "river": True})
>>> choice.chosen(0)
'river'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusionrec.online.learning.explore import OWN_EDGES


class OrderChoice:
    """The order each segment of users is served in; ``orders[0]`` is the stacker's (the default)."""

    def __init__(self, orders: Sequence[str], places: int = 10, half_life: float = 20_000,
                 min_decisions: int = 500, z: float = 2.0) -> None:
        self.orders = tuple(orders)
        self.places, self.half_life, self.min_decisions, self.z = places, half_life, min_decisions, z
        segments = len(OWN_EDGES) + 1
        self.hits = np.zeros((segments, len(self.orders)))
        self.won = np.zeros((segments, len(self.orders)))  # hit where the stacker missed
        self.lost = np.zeros((segments, len(self.orders)))  # missed where the stacker hit
        self.decisions = np.zeros(segments)

    def chosen(self, segment: int) -> str:
        """The order this segment is served in now."""
        if self.decisions[segment] < self.min_decisions:
            return self.orders[0]
        won, lost = self.won[segment], self.lost[segment]
        clear = (won - lost) > self.z * np.sqrt(won + lost)
        clear[0] = False
        if not clear.any():
            return self.orders[0]
        return self.orders[int(np.argmax(np.where(clear, self.hits[segment], -np.inf)))]

    def learn(self, segment: int, hit: Mapping[str, bool]) -> None:
        """One labelled decision: whether each order's list held a positive in its first places (an order
        left out, one the model could not score this time, counts as the stacker's)."""
        keep = 0.5 ** (1.0 / self.half_life)
        base = bool(hit[self.orders[0]])
        got = np.array([bool(hit.get(name, base)) for name in self.orders])
        self.hits[segment] = self.hits[segment] * keep + got
        self.won[segment] = self.won[segment] * keep + (got & (not base))
        self.lost[segment] = self.lost[segment] * keep + (~got & base)
        self.decisions[segment] = self.decisions[segment] * keep + 1.0

    def extend(self, orders: Sequence[str]) -> None:
        """Add orders it does not know, with no evidence yet (a checkpoint from before they existed)."""
        added = [name for name in orders if name not in self.orders]
        if not added:
            return
        pad = np.zeros((len(self.decisions), len(added)))
        self.orders = (*self.orders, *added)
        self.hits = np.hstack([self.hits, pad])
        self.won = np.hstack([self.won, pad])
        self.lost = np.hstack([self.lost, pad])

    def report(self) -> dict[str, dict[str, object]]:
        """Per segment: the order served, the (decayed) decisions, and each other order's wins and losses
        against the stacker."""
        names = ["none", *(f"{lo}-{hi - 1}" for lo, hi in zip(OWN_EDGES, OWN_EDGES[1:], strict=False)),
                 f"{OWN_EDGES[-1]}+"]
        return {f"own_{name}": {"order": self.chosen(s), "decisions": round(float(self.decisions[s]), 1),
                                **{f"{o}_won_lost": [round(float(self.won[s, j]), 1), round(float(self.lost[s, j]), 1)]
                                   for j, o in enumerate(self.orders) if j > 0}}
                for s, name in enumerate(names)}
