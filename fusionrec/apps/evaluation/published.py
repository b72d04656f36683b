"""Two published next-basket methods, run prequentially: TIFU-KNN and UP-CF@r.

Both keep the interface of the other evaluation methods: :meth:`rank` reads the state as it stands
before the users' next baskets, then :meth:`observe` appends each basket just scored. Item ids
become integer columns as they appear; per-user state is a few small arrays updated per basket. For
a chunk of users, the neighbour search is one sparse product against every user seen so far and the
blend of the neighbours' rows a second one (both against the transposed user matrix, whose
accumulators stay small), rebuilt only when some user changed.

* :class:`TifuKnn` — Hu, He, Gao, Zhang, "Modeling Personalized Item Frequency Information for
  Next-basket Recommendation", SIGIR 2020; reference code github.com/HaojiHu/TIFUKNN, ``TIFUKNN.py``
  at 15daf63 (May 2021, "fix bugs"), cited by line below.
* :class:`UpCf` — Faggioli, Polato, Aiolli, "Recency Aware Collaborative Filtering for Next Basket
  Recommendation", UMAP 2020. The authors' own code was not found; the class follows the
  implementations others use: ``NextBasketRecFramework.py`` of github.com/MayloIFERR/RACF (the one
  the Next-Basket Reality Check links for UP-CF) and Cornac's ``cornac/models/upcf/recom_upcf.py``,
  both calling ``similaripy.asymmetric_cosine``, and the Reality Check's ``methods/upcf/racf.py``.

Shared departures from the batch protocol of both papers: every basket of every user is scored (no
user filter, no split of users into training and test), each user's state is its history before the
basket, and the neighbours are all users seen so far, with their current histories. Top-k lists
hold only items with a positive score, ties going to the item seen first.

Example::

    >>> m = UpCf(r=2, q=1, alpha=0.5, k=10)
    >>> m.observe("u", {"milk"}, 0); m.observe("u", {"milk", "eggs"}, 1)
    >>> m.rank(["u", "new"], [2, 2], k=2)
    [['milk', 'eggs'], []]
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Collection, Sequence
from typing import ClassVar, TypedDict

import numpy as np
from scipy import sparse


class _Rows:
    """One sparse row per user, for products against every user's current row.

    The stacked matrix (users x items) and its transpose are rebuilt only once the rows changed since
    the last build exceed ``max(min_rebuild, users * rebuild_share)``; until then a product takes the
    unchanged users from the built matrices and the changed ones (new users included) from their
    current rows. Every product sums exactly the terms of a product against a fresh build.
    """

    def __init__(self, rebuild_share: float = 0.125, min_rebuild: int = 256) -> None:
        self._cols: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []
        self.rebuild_share, self.min_rebuild = rebuild_share, min_rebuild
        self._built: sparse.csr_array | None = None  # users x items, of the first ``_n_built`` users
        self._built_t: sparse.csr_array | None = None  # its transpose
        self._n_built = 0
        self._changed: dict[int, None] = {}  # rows put since the build, in order

    def put(self, row: int, cols: np.ndarray, vals: np.ndarray) -> None:
        if row == len(self._cols):
            self._cols.append(cols)
            self._vals.append(vals)
        else:
            self._cols[row], self._vals[row] = cols, vals
        self._changed[row] = None

    def matrix(self, rows: Sequence[int] | np.ndarray, width: int) -> sparse.csr_array:
        """The given users' current rows (len(rows) x items)."""
        lengths = [len(self._cols[r]) for r in rows]
        index = _index_dtype(sum(lengths), width, len(lengths))  # int32 halves the products' index traffic
        indptr = np.zeros(len(lengths) + 1, dtype=index)
        np.cumsum(lengths, out=indptr[1:])
        if len(lengths):
            cols = np.concatenate([self._cols[r] for r in rows]).astype(index, copy=False)
            vals = np.concatenate([self._vals[r] for r in rows]).astype(np.float64, copy=False)
        else:
            cols, vals = np.empty(0, index), np.empty(0)
        return sparse.csr_array((vals, cols, indptr), shape=(len(lengths), width))

    def _build(self, width: int) -> tuple[sparse.csr_array, sparse.csr_array, np.ndarray]:
        """(built rows, their transpose, changed rows), rebuilt first when too many changed."""
        n = len(self._cols)
        if self._built is None or len(self._changed) > max(self.min_rebuild, n * self.rebuild_share):
            self._built = self.matrix(range(n), width)
            self._built_t = sparse.csr_array(self._built.T.tocsr())
            self._n_built = n
            self._changed = {}
        assert self._built_t is not None
        built, built_t = self._built, self._built_t
        if built.shape[1] != width:  # items registered since: only changed rows can hold them
            built = sparse.csr_array((built.data, built.indices, built.indptr), shape=(self._n_built, width))
            grown = np.full(width + 1, built_t.indptr[-1], dtype=built_t.indptr.dtype)
            grown[:len(built_t.indptr)] = built_t.indptr
            built_t = sparse.csr_array((built_t.data, built_t.indices, grown), shape=(width, self._n_built))
        return built, built_t, np.fromiter(self._changed, dtype=np.int64, count=len(self._changed))

    def overlap(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Dense inner products of the given users' rows with every user's row (chunk x users)."""
        built, built_t, changed = self._build(width)
        query = self.matrix(rows, width)
        out = np.zeros((len(rows), len(self._cols)))
        out[:, :self._n_built] = (query @ built_t).toarray()
        if len(changed):
            out[:, changed] = (query @ self.matrix(changed, width).T).toarray()
        return out

    def spread(self, weights: sparse.csr_array, width: int) -> sparse.csc_array:
        """``weights @ rows`` (chunk x users times users x items), as items x chunk, one column per user."""
        built, built_t, changed = self._build(width)
        weights = sparse.csr_array(weights)
        if not len(changed):
            return sparse.csc_array(built_t @ sparse.csr_array(weights[:, :self._n_built].T))
        is_changed = np.zeros(weights.shape[1], dtype=bool)
        is_changed[changed] = True
        kept = weights.copy()
        kept.data[is_changed[kept.indices]] = 0.0
        kept.eliminate_zeros()
        kept = sparse.csr_array((kept.data, kept.indices, kept.indptr), shape=(weights.shape[0], self._n_built))
        moved = self.matrix(changed, width).T @ sparse.csr_array(weights[:, changed].T)
        return sparse.csc_array(built_t @ sparse.csr_array(kept.T) + moved)


def _index_dtype(*sizes: int) -> type[np.signedinteger]:
    return np.int32 if max(sizes) < np.iinfo(np.int32).max else np.int64


def _user_weights(data: np.ndarray, cols: np.ndarray, indptr: np.ndarray, n_users: int) -> sparse.csr_array:
    """Chunk x users weights in CSR, with the narrowest index type (products then stay in it)."""
    index = _index_dtype(len(data), n_users)
    return sparse.csr_array((data, cols.astype(index), indptr.astype(index)), shape=(len(indptr) - 1, n_users))


def _largest(score: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest entries of each row (all columns when ``k`` covers them)."""
    if k <= 0:
        return np.empty((score.shape[0], 0), dtype=np.int64)
    if k >= score.shape[1]:
        return np.broadcast_to(np.arange(score.shape[1]), score.shape)
    return np.argpartition(-score, k - 1, axis=1)[:, :k]


class _NeighbourMethod:
    """What both methods share: item and user indices, and reading the predictions."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}  # item -> column
        self._ids: list[str] = []
        self._users: dict[str, int] = {}  # user -> row

    def rank(self, users: Sequence[str], ts: Sequence[int], k: int) -> list[list[str]]:
        """Each user's top-k items as the state stands now (before their next basket); [] for an unknown user."""
        known = [self._users.get(u) for u in users]
        rows = np.array([r for r in known if r is not None], dtype=np.int64)
        if len(rows) == 0:
            return [[] for _ in users]
        scores = self._predict(rows)
        top = iter(self._best(scores, j, k) for j in range(len(rows)))
        return [[] if r is None else [self._ids[c] for c in next(top)] for r in known]

    def scores(self, user: str) -> dict[str, float]:
        """The user's predicted item scores before its next basket (zeros left out)."""
        row = self._users.get(user)
        if row is None:
            return {}
        p = self._predict(np.array([row]))
        return {self._ids[c]: float(v) for c, v in zip(p.indices, p.data, strict=True) if v != 0}

    def _columns(self, items: Collection[str]) -> np.ndarray:
        """The basket's distinct items as sorted columns, registering new ones (in id order: reproducible ties)."""
        cols = []
        for item in sorted(set(items)):
            c = self._index.get(item)
            if c is None:
                c = self._index[item] = len(self._ids)
                self._ids.append(item)
            cols.append(c)
        return np.array(sorted(cols), dtype=np.int64)

    def _predict(self, rows: np.ndarray) -> sparse.csc_array:
        raise NotImplementedError

    @staticmethod
    def _best(scores: sparse.csc_array, j: int, k: int) -> np.ndarray:
        """Column ``j``'s ``k`` best items with a positive score, best first, ties by item column."""
        lo, hi = scores.indptr[j], scores.indptr[j + 1]
        cols, vals = scores.indices[lo:hi], scores.data[lo:hi]
        if len(vals) > k:
            kth = np.partition(vals, len(vals) - k)[len(vals) - k]  # the k-th largest score
            above, tied = np.flatnonzero(vals > kth), np.flatnonzero(vals == kth)
            keep = np.concatenate([above, tied[np.argsort(cols[tied])][:k - len(above)]])
            cols, vals = cols[keep], vals[keep]
        order = np.lexsort((cols, -vals))
        return cols[order][vals[order] > 0]


# ---------------------------------------------------------------------------------------- TIFU-KNN
class TifuSettings(TypedDict):
    """TIFU-KNN's hyper-parameters under the paper's names, for ``TifuKnn(**settings)``."""

    m: int
    r_b: float
    r_g: float
    k: int
    alpha: float


def tifu_basket_weights(n: int, m: int, r_b: float, r_g: float) -> np.ndarray:
    """Weight of each of ``n`` baskets (oldest first) in a TIFU-KNN user vector.

    As ``temporal_decay_sum_history`` (l. 199-221) and ``group_history_list`` (l. 146-197) in
    TIFUKNN.py: basket ``j`` is decayed by ``r_b ** (n - 1 - j)``, counted from the newest basket of
    the whole history, not of its group (l. 207). With ``n >= m`` the baskets fill ``m`` groups in
    order, the first ``m - n % m`` of ``n // m`` baskets and the last ``n % m`` of one more
    (l. 155-193); a group is the mean of its baskets, decayed by ``r_g ** (m - 1 - g)`` (l. 215), and
    the sum over groups is divided by ``m``. With ``n < m`` every basket is its own group, still
    decayed by ``r_g ** (m - 1 - g)``, and the sum is divided by ``n`` (l. 148-153, 220).
    """
    if n < m:
        sizes, groups = np.ones(n, dtype=np.int64), n
    else:
        base, extra = divmod(n, m)
        sizes, groups = np.array([base] * (m - extra) + [base + 1] * extra), m
    group = np.repeat(np.arange(groups), sizes)
    within = r_b ** np.arange(n - 1, -1, -1, dtype=np.float64)
    return within * r_g ** (m - 1 - group) / sizes[group] / groups


class _Baskets:
    """One user's baskets as positions into the user's own list of distinct items."""

    def __init__(self) -> None:
        self.local: dict[int, int] = {}  # item column -> position
        self.entries = np.empty(64, dtype=np.int64)
        self.n_entries = 0
        self.sizes: list[int] = []

    def add(self, cols: np.ndarray) -> None:
        pos = [self.local.setdefault(c, len(self.local)) for c in cols.tolist()]
        end = self.n_entries + len(pos)
        if end > len(self.entries):
            self.entries = np.concatenate([self.entries, np.empty(max(end, len(self.entries)), np.int64)])
        self.entries[self.n_entries:end] = pos
        self.n_entries = end
        self.sizes.append(len(pos))

    def vector(self, m: int, r_b: float, r_g: float) -> tuple[np.ndarray, np.ndarray]:
        weights = np.repeat(tifu_basket_weights(len(self.sizes), m, r_b, r_g), self.sizes)
        vals = np.bincount(self.entries[:self.n_entries], weights=weights, minlength=len(self.local))
        return np.fromiter(self.local, dtype=np.int64, count=len(self.local)), vals


class TifuKnn(_NeighbourMethod):
    """TIFU-KNN: a user's time-decayed, grouped item-frequency vector blended with its neighbours'.

    ``prediction = alpha * own + (1 - alpha) * mean of the k nearest other users' vectors``, all of
    them the grouped vectors of :func:`tifu_basket_weights` (``evaluate`` l. 581-597 and
    ``merge_history`` l. 540-555 in TIFUKNN.py at 15daf63; the July 2020 version blended the
    ungrouped ``temporal_decay_add_history`` vectors instead). Neighbours are the ``k`` smallest
    Euclidean distances between those vectors (``KNN`` l. 53-64: sklearn ``NearestNeighbors`` with
    its default Minkowski p=2, brute force), averaged without weights (``/ len(index)``, l. 550); the
    user is never its own neighbour (the reference queries test users against training users).
    Baskets are sets (``his_vec[ele] = decayed_val``). Defaults: the paper's Complete Journey
    settings (:attr:`COMPLETE_JOURNEY`); :attr:`DUNNHUMBY` holds its Dunnhumby ones
    (``TifuKnn(**TifuKnn.DUNNHUMBY)``).

    Departures, for the online setting: the vector is the user's history before each basket, and
    neighbours are all other users seen so far (fewer than ``k`` early on: all of them; none: own
    vector only), where the reference searches a fixed training 72 % of the users with more than one
    basket (``partition_the_data_validate``) and needs ``k`` of them.
    Ties in distance at the k-th place fall as ``np.argpartition`` puts them.
    """

    name = "tifu_knn"
    COMPLETE_JOURNEY: ClassVar[TifuSettings] = {"m": 3, "r_b": 1.0, "r_g": 0.1, "k": 100, "alpha": 0.8}
    DUNNHUMBY: ClassVar[TifuSettings] = {"m": 3, "r_b": 0.9, "r_g": 0.6, "k": 900, "alpha": 0.2}

    def __init__(self, *, m: int = 3, r_b: float = 1.0, r_g: float = 0.1, k: int = 100, alpha: float = 0.8) -> None:
        super().__init__()
        self.m, self.r_b, self.r_g, self.k, self.alpha = m, r_b, r_g, k, alpha
        self._baskets: list[_Baskets] = []
        self._vectors = _Rows()
        self._norms: list[float] = []  # squared Euclidean norm of each user's vector

    def observe(self, user: str, items: Collection[str], ts: int) -> None:
        """Append one basket (the set of items; ts in ms) to the user's history, after it has been scored."""
        row = self._users.setdefault(user, len(self._users))
        if row == len(self._baskets):
            self._baskets.append(_Baskets())
            self._norms.append(0.0)
        self._baskets[row].add(self._columns(items))
        cols, vals = self._baskets[row].vector(self.m, self.r_b, self.r_g)
        self._vectors.put(row, cols, vals)
        self._norms[row] = float(vals @ vals)

    def _predict(self, rows: np.ndarray) -> sparse.csc_array:
        width, norms = len(self._ids), np.array(self._norms)
        distance = norms[rows, None] + norms[None, :] - 2.0 * self._vectors.overlap(rows, width)
        distance[np.arange(len(rows)), rows] = np.inf
        near = _largest(-distance, min(self.k, len(norms) - 1))
        n_near = near.shape[1]
        cols = np.concatenate([rows[:, None], near], axis=1).ravel()
        weights = np.tile(np.r_[self.alpha, np.full(n_near, (1.0 - self.alpha) / max(n_near, 1))], len(rows))
        indptr = np.arange(len(rows) + 1) * (n_near + 1)
        return self._vectors.spread(_user_weights(weights, cols, indptr, len(norms)), width)


# ---------------------------------------------------------------------------------------- UP-CF@r
class _Recent:
    """One user's item set over the whole history and item counts over its last ``r`` baskets."""

    def __init__(self) -> None:
        self.items: dict[int, None] = {}
        self.window: deque[list[int]] = deque()
        self.counts: Counter[int] = Counter()

    def add(self, cols: list[int], r: int) -> None:
        self.items.update(dict.fromkeys(cols))
        self.window.append(cols)
        self.counts.update(cols)
        if len(self.window) > r:
            for c in self.window.popleft():
                self.counts[c] -= 1
                if self.counts[c] == 0:
                    del self.counts[c]

    def popularity(self) -> tuple[np.ndarray, np.ndarray]:
        cols = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
        return cols, counts / len(self.window)


class UpCf(_NeighbourMethod):
    """UP-CF@r: recency-aware user-wise popularity spread over asymmetric-cosine neighbours.

    ``score(u, i) = sum over v in N_k(u) of s(u, v) ** q * pop_r(v, i)``, where

    * ``pop_r(v, i)`` is the share of v's last ``r`` baskets holding ``i``: the count over those
      baskets divided by ``min(r, |B_v|)`` (``uwPopMat`` in RACF, ``history_seq[-recency:]`` in
      racf.py, ``_get_user_wise_popularity`` in Cornac);
    * ``s(u, v) = |I_u & I_v| / (|I_u| ** alpha * |I_v| ** (1 - alpha))`` over the items of the whole
      histories, not only the last ``r`` baskets (the binary user-item matrix of ``upcf`` in RACF, of
      racf.py and of Cornac), the target user ``u`` taking the ``alpha`` exponent (similaripy's
      ``s_plus`` with ``c1=alpha`` on the row, ``c2=1-alpha`` on the column, no shrink);
    * ``N_k(u)`` is the ``k`` most similar users with a positive similarity, the user itself
      included with ``s(u, u) = 1`` (similaripy keeps the diagonal and takes the top ``k`` of the
      row; racf.py sets the diagonal to 1); ``q`` is applied after the top-k cut (``userSim.power(q)``).

    Departures: online, as the module says. RACF's ``uwPopMat`` keeps the baskets with
    ``order >= Bu - r``, one more than ``r`` when orders count from 1; this follows Cornac and racf.py
    (exactly the last ``r``), the paper's definition. racf.py also shrinks the similarity
    (``shrink=1000``), which RACF and Cornac do not. Ties in similarity at the k-th place fall as
    ``np.argpartition`` puts them.
    """

    name = "upcf"

    def __init__(self, *, r: int = 42, q: float = 5, alpha: float = 0.3, k: int = 200) -> None:
        super().__init__()
        self.r, self.q, self.alpha, self.k = r, q, alpha, k
        self._recent: list[_Recent] = []
        self._history = _Rows()  # binary: items over the whole history
        self._popularity = _Rows()
        self._sizes: list[int] = []  # |I_u|

    def observe(self, user: str, items: Collection[str], ts: int) -> None:
        """Append one basket (the set of items; ts in ms) to the user's history, after it has been scored."""
        row = self._users.setdefault(user, len(self._users))
        if row == len(self._recent):
            self._recent.append(_Recent())
            self._sizes.append(0)
            self._history.put(row, np.empty(0, np.int64), np.empty(0))
        recent = self._recent[row]
        recent.add(self._columns(items).tolist(), self.r)
        if len(recent.items) != self._sizes[row]:
            self._history.put(row, np.fromiter(recent.items, np.int64), np.ones(len(recent.items)))
            self._sizes[row] = len(recent.items)
        self._popularity.put(row, *recent.popularity())

    def _predict(self, rows: np.ndarray) -> sparse.csc_array:
        width = len(self._ids)
        sizes = np.maximum(np.array(self._sizes, dtype=np.float64), 1.0)  # an empty history overlaps nothing
        sim = self._history.overlap(rows, width)
        sim /= sizes[rows, None] ** self.alpha * sizes[None, :] ** (1.0 - self.alpha)
        near = _largest(sim, self.k)
        weights = np.take_along_axis(sim, near, axis=1)
        keep = weights > 0
        indptr = np.r_[0, np.cumsum(keep.sum(axis=1))]
        return self._popularity.spread(_user_weights(weights[keep] ** self.q, near[keep], indptr, len(sizes)), width)
