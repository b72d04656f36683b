"""``repurchase``: a time-aware repurchase model learned online, in the spirit of SLRC and TAIW.

SLRC (Wang et al., WWW 2018) models the rate at which a user buys an item again as a base rate plus
a kernel over the time since earlier purchases: an exponential for short-term repeats and a bump
around the item's typical life-time. TAIW (RecSys 2023) weighs a user's past items by where the
time since the last purchase falls against the item's usual interval. This model keeps both ideas,
streaming, with no per-item parameters fitted by gradient descent:

* **The item's cycle.** Per item, the mean log interval between two purchases of it by the same user,
  over all users so far, shrunk towards the mean over all items (a global prior worth
  ``prior_gaps`` intervals), so a new item has the catalogue's typical cycle.
* **Where the user is in it.** For a candidate the user bought before, ``phase = log(elapsed) -
  log(typical interval)``, binned from -4 to +4 (1/55 to 55 times the cycle) in ``phase_bins``.
* **How often the user buys it.** The share of the user's baskets that held it, and how many times.
* **The learned curve.** The probability that such a candidate is bought, per (count, share, phase)
  cell, counted prequentially: every scored basket, every item of the user's history is one trial of
  its cell, a success when the basket holds it. A cell with few trials falls back on its (count,
  share) row, and a row on the global rate (Beta smoothing, ``smoothing`` pseudo-trials). The curve
  over phase is therefore whatever the data says — a decay after a purchase, a bump at the cycle —
  rather than a fixed shape.

Candidates are the user's own past items, ranked by that probability (ties by purchase share). The
model only ever recommends repeats, as SLRC and TAIW do; a first basket gets nothing.

Every input is the user's history before the basket: :meth:`rank` reads, then the evaluator calls
:meth:`learn` with the baskets just scored, then :meth:`observe` appends them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

_DAY_MS = 86_400_000
_COUNT_EDGES = np.array([2, 3, 4, 5, 7, 10, 15, 25])  # 1 | 2 | 3 | 4 | 5-6 | 7-9 | 10-14 | 15-24 | 25+
_SHARE_BUCKETS = 16  # share of baskets in (2^-(b+1)/2, 2^-b/2]


@dataclass
class _History:
    baskets: int = 0
    items: dict[int, list[int]] = field(default_factory=dict)  # item -> [purchases, last ts, first ts]


class Repurchase:
    """Time-aware repurchase probability per (count, share, phase) cell, learned online."""

    name = "repurchase"

    def __init__(self, *, phase_bins: int = 16, prior_gaps: float = 5.0, smoothing: float = 20.0) -> None:
        self.phase_bins = phase_bins
        self.prior_gaps = prior_gaps
        self.smoothing = smoothing
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._users: dict[str, _History] = {}
        self._gap_n = np.zeros(1024)  # per item: intervals seen, sum of their log (days)
        self._gap_sum = np.zeros(1024)
        self._all_gaps = [0, 0.0]  # over every item: intervals seen, sum of their log (days)
        cells = (len(_COUNT_EDGES) + 1) * _SHARE_BUCKETS
        self._row_tries, self._row_hits = np.zeros(cells), np.zeros(cells)
        self._tries = np.zeros(cells * (phase_bins + 1))  # the last phase bin: no interval known
        self._hits = np.zeros_like(self._tries)

    # ---------------------------------------------------------------- reading
    def rank(self, users: Sequence[str], ts: Sequence[int], k: int) -> list[list[str]]:
        """Each user's ``k`` most likely repurchases at ``ts`` (ms), from the history so far."""
        out: list[list[str]] = []
        for user, t in zip(users, ts, strict=True):
            cand = self._cells(user, t)
            if cand is None:
                out.append([])
                continue
            items, rows, cells, share = cand
            p = self._probability(rows, cells)
            order = np.lexsort((-share, -p))[:k]
            out.append([self._ids[i] for i in items[order]])
        return out

    def probability(self, user: str, t: int) -> dict[str, float]:
        """The learned repurchase probability of each of the user's past items at ``t``."""
        cand = self._cells(user, t)
        if cand is None:
            return {}
        items, rows, cells, _ = cand
        return {self._ids[i]: float(p) for i, p in zip(items, self._probability(rows, cells), strict=True)}

    # ---------------------------------------------------------------- learning
    def learn(self, user: str, items: Collection[str], t: int) -> None:
        """Count the basket as one trial of each past item's cell (call before :meth:`observe`)."""
        cand = self._cells(user, t)
        if cand is None:
            return
        ids, rows, cells, _ = cand
        bought = np.fromiter((self._ids[i] in items for i in ids), dtype=bool, count=len(ids))
        np.add.at(self._row_tries, rows, 1)
        np.add.at(self._row_hits, rows, bought)
        np.add.at(self._tries, cells, 1)
        np.add.at(self._hits, cells, bought)

    def observe(self, user: str, items: Collection[str], ts: int) -> None:
        """Append one basket to the user's history, adding its repeat intervals to the items' cycles."""
        h = self._users.setdefault(user, _History())
        h.baskets += 1
        for item in sorted(items):  # a set's order varies between processes: ties must not
            i = self._id(item)
            seen = h.items.get(i)
            if seen is None:
                h.items[i] = [1, ts, ts]
                continue
            gap = math.log(max(ts - seen[1], _DAY_MS / 24) / _DAY_MS)
            self._gap_n[i] += 1
            self._gap_sum[i] += gap
            self._all_gaps[0] += 1
            self._all_gaps[1] += gap
            seen[0] += 1
            seen[1] = ts

    # ---------------------------------------------------------------- internals
    def _id(self, item: str) -> int:
        i = self._index.get(item)
        if i is None:
            i = self._index[item] = len(self._ids)
            self._ids.append(item)
            if i >= len(self._gap_n):
                self._gap_n = np.concatenate([self._gap_n, np.zeros(len(self._gap_n))])
                self._gap_sum = np.concatenate([self._gap_sum, np.zeros(len(self._gap_sum))])
        return i

    def _cells(self, user: str, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        h = self._users.get(user)
        if h is None or not h.items:
            return None
        items = np.fromiter(h.items.keys(), dtype=np.int64, count=len(h.items))
        state = np.array(list(h.items.values()), dtype=np.float64)
        count, last, first = state[:, 0], state[:, 1], state[:, 2]
        share = count / h.baskets
        share_bucket = np.minimum(np.floor(-2 * np.log2(share)), _SHARE_BUCKETS - 1).astype(np.int64)
        rows = np.searchsorted(_COUNT_EDGES, count, side="right") * _SHARE_BUCKETS + share_bucket
        total_n, total_sum = self._all_gaps
        if total_n == 0:
            phase_bin = np.full(len(items), self.phase_bins)
        else:
            prior = total_sum / total_n
            typical = (self._gap_sum[items] + self.prior_gaps * prior) / (self._gap_n[items] + self.prior_gaps)
            # the user's own cycle where they bought it more than once, weighted by their intervals
            own_n = count - 1
            own = np.log(np.maximum((last - first) / np.maximum(own_n, 1), _DAY_MS / 24) / _DAY_MS)
            typical = (own_n * own + self.prior_gaps * typical) / (own_n + self.prior_gaps)
            elapsed = np.log(np.maximum(t - last, _DAY_MS / 24) / _DAY_MS)
            width = 8.0 / self.phase_bins
            phase_bin = np.clip(np.floor((elapsed - typical + 4.0) / width), 0, self.phase_bins - 1).astype(np.int64)
        return items, rows, rows * (self.phase_bins + 1) + phase_bin, share

    def _probability(self, rows: np.ndarray, cells: np.ndarray) -> np.ndarray:
        a = self.smoothing
        overall = (self._row_hits.sum() + 1.0) / (self._row_tries.sum() + 2.0)
        row_p = (self._row_hits[rows] + a * overall) / (self._row_tries[rows] + a)
        return (self._hits[cells] + a * row_p) / (self._tries[cells] + a)
