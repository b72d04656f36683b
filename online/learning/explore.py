"""How many of a list's first places go to items new to the user, learned from feedback.

A pool holds the user's own items (the ``repeat`` source) and items new to them. Ranked by the fused
score alone, the first places are mostly the user's own items: each is likely, but they are bought
together or not at all, so the last of them adds little to the chance that the list holds something
the user takes, while the best new item could. :class:`ExploreShare` learns how many of the first
``places`` to give new items *at least*, per segment of users (by how many own items their pool
holds), from the learner's labelled decisions:

* each decision's whole pool is scored by the model as it stood before the update (prequential), and
  replayed under every share s = 0 … ``max_share``: the score order, with the lowest own items among
  the first places swapped for the best new items below them until s new items are there
  (:func:`arrange`); a share whose list holds a positive counts a hit;
* the counts decay with a half-life in decisions, so the share follows the model and the shop;
* a segment serves the share with the most hits once it has seen ``min_decisions`` decisions, and the
  plain score order before (ties go to the smaller share).

Every share is judged on the same decisions, against labels that do not depend on the share, so the
choice is an unbiased comparison, not a fixed slot count.

>>> share = ExploreShare(places=3, max_share=1, min_decisions=1)
>>> new = np.array([False, False, False, True])
>>> share.learn([0, 1, 2, 3], new, np.array([0.0, 0.0, 0.0, 1.0]))
>>> share.arrange([0, 1, 2, 3], new)
[0, 1, 3, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# own items in the pool -> segment: 0 (none: every candidate is new), 1-9, 10-24, 25-49, 50+
OWN_EDGES = (1, 10, 25, 50)


def arrange(order: Sequence[int], new: np.ndarray, places: int, share: int) -> list[int]:
    """``order`` with at least ``share`` new items among its first ``places`` (as many as there are).

    The lowest own items among the first places make room, moving just below them; the new items
    brought up keep their order and take the last of the first places.
    """
    order = list(order)
    if share <= 0:
        return order
    top = order[:places]
    missing = min(share, len(top)) - int(np.count_nonzero(new[top])) if top else 0
    if missing <= 0:
        return order
    raised = [r for r in order[places:] if new[r]][:missing]
    own_in_top = [i for i, r in enumerate(top) if not new[r]]
    dropped = set(own_in_top[len(own_in_top) - len(raised):]) if raised else set()
    moved = [top[i] for i in sorted(dropped)]
    kept = [r for i, r in enumerate(top) if i not in dropped]
    up = set(raised)
    return kept + raised + moved + [r for r in order[places:] if r not in up]


def hits_by_share(order: Sequence[int], new: np.ndarray, positive: np.ndarray, places: int,
                  max_share: int) -> np.ndarray:
    """For s = 0 … ``max_share``: whether :func:`arrange` with share s puts a positive in the first places."""
    rows = np.asarray(order, dtype=np.int64)
    top, below = rows[:places], rows[places:]
    own_top = top[~new[top]]  # in score order
    new_top = top[new[top]]
    new_below = below[new[below]]
    out = np.zeros(max_share + 1, dtype=bool)
    for s in range(max_share + 1):
        missing = max(0, min(s, len(top)) - len(new_top))
        raised = new_below[:missing]
        kept_own = own_top[:len(own_top) - len(raised)]
        out[s] = bool(positive[new_top].any() or positive[raised].any() or positive[kept_own].any())
    return out


class ExploreShare:
    """Learned minimum of new items among the first ``places`` of a list, per segment of users."""

    def __init__(self, places: int = 10, max_share: int = 5, half_life: float = 20_000,
                 min_decisions: int = 500) -> None:
        self.places, self.max_share = places, max_share
        self.half_life, self.min_decisions = half_life, min_decisions
        self.hits = np.zeros((len(OWN_EDGES) + 1, max_share + 1))
        self.decisions = np.zeros(len(OWN_EDGES) + 1)

    @staticmethod
    def segment(new: np.ndarray) -> int:
        return int(np.searchsorted(OWN_EDGES, int(np.count_nonzero(~new)), side="right"))

    @staticmethod
    def segments(own: np.ndarray) -> list[int]:
        """The segment of each pool holding ``own[p]`` of the user's own items (one search for all)."""
        return np.searchsorted(OWN_EDGES, own, side="right").tolist()

    def share(self, new: np.ndarray) -> int:
        """The share a pool with these new-item flags is served with."""
        return self._served(self.segment(new))

    def _served(self, seg: int) -> int:
        if self.decisions[seg] < self.min_decisions:
            return 0
        return int(np.argmax(self.hits[seg]))  # the first of equal counts: the smaller share

    def arrange(self, order: Sequence[int], new: np.ndarray, segment: int | None = None) -> list[int]:
        """``order`` with the share its segment (``segment``, if known, else from ``new``) is served with."""
        return arrange(order, new, self.places, self._served(self.segment(new) if segment is None else segment))

    def learn(self, order: Sequence[int], new: np.ndarray, positive: np.ndarray) -> None:
        """One labelled decision: its pool's rows in score order, which are new, which were taken."""
        seg = self.segment(new)
        keep = 0.5 ** (1.0 / self.half_life)
        self.hits[seg] = self.hits[seg] * keep + hits_by_share(order, new, positive, self.places, self.max_share)
        self.decisions[seg] = self.decisions[seg] * keep + 1.0

    def report(self) -> dict[str, dict[str, float]]:
        """Per segment: the share served and the (decayed) decisions it rests on."""
        names = ["none", *(f"{lo}-{hi - 1}" for lo, hi in zip(OWN_EDGES, OWN_EDGES[1:], strict=False)),
                 f"{OWN_EDGES[-1]}+"]
        return {f"own_{name}": {"share": self._served(s), "decisions": round(float(self.decisions[s]), 1)}
                for s, name in enumerate(names)}


def new_items(X: np.ndarray, column: int) -> np.ndarray:
    """Which rows are new to the user: not from the user's own items (``src_repeat`` is 0)."""
    return np.asarray(X[:, column] <= 0.0)
