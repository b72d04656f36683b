"""Per-basket ranking metrics and the splits that show where a method's accuracy comes from.

Each scored basket is judged on up to four target sets, each a :class:`MethodScore`:

* ``overall``: every item of the basket;
* ``repeat``: the basket's items the user had interacted with before (any event but an impression);
* ``explore``: the basket's items new to the user; ``repeat`` and ``explore`` partition ``overall``;
* ``cold_start``: the basket's items with fewer than ``COLD_START_BELOW`` prior interactions by anyone.

A split is scored only on baskets where its target set is not empty, always against the method's
whole ranked list. Every method sees the same baskets in the same order, so two methods compare basket
by basket (:func:`paired`): the baskets only one of them hit, and the exact sign test on those
(McNemar's exact test), which says whether a difference in HitRate@10 is more than the baskets'
chance. Two NDCG@10 are reported, each named: ``ndcg@10`` divides by the ideal DCG of
``min(|basket|, 10)`` hits (the usual top-k definition), ``ndcg@10_basket`` by the ideal DCG over
every item in the basket, as the next-basket papers' published code does (TIFU-KNN's ``get_NDCG``,
the reality-check study's evaluation), which is lower for baskets of more than ten items.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

HIT_K, RECALL_K, NDCG_K = 10, 20, 10
COLD_START_BELOW = 5
SPLITS = ("overall", "repeat", "explore", "cold_start")
_DISCOUNT = [1.0 / math.log2(r + 2) for r in range(NDCG_K)]


@functools.cache
def _ideal(n: int) -> float:
    """The DCG of ``n`` hits at the top of a list."""
    return sum(1.0 / math.log2(r + 2) for r in range(n))


@dataclass
class MethodScore:
    """Sums of one method's metrics over the baskets of one split, plus a timeline for plots."""

    hits: float = 0.0
    recall: float = 0.0
    ndcg: float = 0.0
    ndcg_basket: float = 0.0
    n: int = 0
    targets: int = 0  # target items over all scored baskets
    found: int = 0  # of those, in the top RECALL_K: the splits' ``found`` add up to ``overall``'s
    timeline: list[tuple[int, int]] = field(default_factory=list)  # (ts, hit)

    def add(self, ranked: list[str], targets: set[str], ts: int) -> None:
        top = ranked[:RECALL_K]
        hit = int(any(i in targets for i in top[:HIT_K]))
        found = len(targets.intersection(top))
        dcg = sum(_DISCOUNT[r] for r, i in enumerate(top[:NDCG_K]) if i in targets)
        self.hits += hit
        self.recall += found / len(targets)
        self.ndcg += dcg / _ideal(min(len(targets), NDCG_K))
        self.ndcg_basket += dcg / _ideal(len(targets))
        self.n += 1
        self.targets += len(targets)
        self.found += found
        self.timeline.append((ts, hit))

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"hit_rate@10": round(self.hits / n, 4), "recall@20": round(self.recall / n, 4),
                "ndcg@10": round(self.ndcg / n, 4), "ndcg@10_basket": round(self.ndcg_basket / n, 4)}


@dataclass
class SplitScores:
    """One method's :class:`MethodScore` per split."""

    splits: dict[str, MethodScore] = field(default_factory=lambda: {s: MethodScore() for s in SPLITS})

    def add(self, ranked: list[str], parts: dict[str, set[str]], ts: int) -> None:
        for split, targets in parts.items():
            if targets:
                self.splits[split].add(ranked, targets, ts)

    def report(self) -> dict[str, object]:
        """``overall``'s figures at the top level (the report's long-standing shape), then the splits."""
        out: dict[str, object] = dict(self.splits["overall"].summary())
        for split in ("repeat", "explore"):
            s = self.splits[split]
            out[split] = {**s.summary(), "baskets": s.n, "items": s.targets, "found@20": s.found}
        return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between ``wins`` and
    ``losses`` if each discordant basket were a fair coin (McNemar's exact test).

    >>> sign_test(0, 5)
    0.0625
    >>> sign_test(4, 4)
    1.0
    """
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    base = math.lgamma(n + 1) + n * math.log(0.5)
    tail = sum(math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1)) for i in range(k + 1))
    return min(1.0, 2.0 * tail)


def paired(a: MethodScore, b: MethodScore) -> dict[str, float]:
    """HitRate@10 of ``a`` against ``b`` basket by basket (the same baskets, in the same order): how many
    only ``a`` hit (``wins``), only ``b`` hit (``losses``), and the sign test's ``p`` on them (three
    significant digits). Their difference over the baskets is the difference of the two HitRate@10."""
    if [ts for ts, _h in a.timeline] != [ts for ts, _h in b.timeline]:
        raise ValueError("the two methods were not scored on the same baskets")
    wins = sum(1 for (_t, x), (_u, y) in zip(a.timeline, b.timeline, strict=True) if x and not y)
    losses = sum(1 for (_t, x), (_u, y) in zip(a.timeline, b.timeline, strict=True) if y and not x)
    return {"wins": wins, "losses": losses, "p": float(f"{sign_test(wins, losses):.3g}")}


def basket_parts(targets: set[str], seen: set[str], interactions: Counter[str]) -> dict[str, set[str]]:
    """A basket's target items by split: see the module's docstring."""
    repeat = {t for t in targets if t in seen}
    return {"overall": targets, "repeat": repeat, "explore": targets - repeat,
            "cold_start": {t for t in targets if interactions[t] < COLD_START_BELOW}}


class TopCounter:
    """Item counts that only grow, with the current top-k kept incrementally."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.counts: Counter[str] = Counter()
        self.top: dict[str, int] = {}
        self._min: tuple[int, str] | None = None

    def add(self, item: str, n: int = 1) -> None:
        c = self.counts[item] = self.counts[item] + n
        if item in self.top:
            self.top[item] = c
            if self._min is not None and self._min[1] == item:
                self._min = None
        elif len(self.top) < self.k:
            self.top[item] = c
            self._min = None
        else:
            if self._min is None:
                self._min = min((v, i) for i, v in self.top.items())
            if c > self._min[0]:
                del self.top[self._min[1]]
                self.top[item] = c
                self._min = None

    def ranked(self) -> list[str]:
        return [i for i, _ in sorted(self.top.items(), key=lambda x: (-x[1], x[0]))]
