"""Ground truth and the comparisons of the chaos benchmark (``bench/chaos.py``, whose docstring says what
is compared and why): the replayed slice applied offline by ``StateStore`` under a prefix of its own,
then the live state read back beside it."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec

from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.state import Positioned, StateStore, decode_user_state


def ground_truth(s: Settings, ds: datasets.Dataset) -> Settings:
    """The slice applied offline by ``StateStore`` under its own prefix: catalog first, then every event
    in produce order as one partition, in batches of 2,000."""
    truth = s.replace(redis_prefix=f"{s.redis.prefix}truth")
    client = connect(truth)
    store = StateStore(client, truth)
    store.apply_catalog(ds.catalog())
    batch: list[Positioned] = []
    for n, ev in enumerate(ds.user_events()):
        batch.append(Positioned(0, n, msgspec.convert(ev, UserEvent)))
        if len(batch) == 2000:
            store.apply(batch)
            batch = []
    store.apply(batch)
    client.close()
    return truth


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _scores(raw: list[tuple[bytes, float]]) -> dict[str, float]:
    return {m.decode(): float(v) for m, v in raw}


def _close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def _example(got: tuple[Any, ...], want: tuple[Any, ...], kinds: list[str]) -> dict[str, Any]:
    """What differs for one user: whole values for the hash and the list, member-level for the sorted sets."""
    out: dict[str, Any] = {}
    for kind in kinds:
        i = ("s", "recent", "items", "aff").index(kind)
        if kind in ("s", "recent"):
            out[kind] = {"live": got[i], "truth": want[i]}
        else:
            g, w = got[i], want[i]
            worst = max((abs(g[m] - w[m]) / max(abs(w[m]), 1e-300) for m in g.keys() & w.keys()), default=0.0)
            out[kind] = {"only_live": sorted(g.keys() - w.keys())[:5], "only_truth": sorted(w.keys() - g.keys())[:5],
                         "max_rel_diff": worst}
    return out


def read_users(client: Any, keys: Keys, users: list[str]) -> dict[str, tuple[Any, ...]]:
    """Per user: (counters ``n:<type>``, last-seen and purchases; recent items; item weights; affinity)."""
    out = {}
    for chunk in _chunks(users, 200):
        pipe = client.pipeline(transaction=False)
        for u in chunk:
            pipe.hget(keys.user_state(u), "d")
        for u, raw in zip(chunk, pipe.execute(), strict=True):
            st = decode_user_state(raw)
            header = {**{f"n:{k}": str(v) for k, v in st.counts.items()}, "last_seen": str(st.last_seen),
                      **{f"buy:{i}": ":".join(map(str, b)) for i, b in st.buys.items()}}
            out[u] = (header, st.recent, st.items, st.affinity)
    return out


def compare_users(client: Any, live: Keys, truth: Keys, users: list[str]) -> dict[str, Any]:
    got, want = read_users(client, live, users), read_users(client, truth, users)
    lost = doubled = 0
    differs: dict[str, list[str]] = {}
    for u in users:
        (gh, gr, gi, ga), (wh, wr, wi, wa) = got[u], want[u]
        for name in {k for k in (*gh, *wh) if k.startswith("n:")}:
            delta = int(gh.get(name, 0)) - int(wh.get(name, 0))
            lost, doubled = lost + max(0, -delta), doubled + max(0, delta)
        kinds = [kind for kind, same in (("s", gh == wh), ("recent", gr == wr), ("items", _close(gi, wi)),
                                         ("aff", _close(ga, wa))) if not same]
        if kinds:
            differs[u] = kinds
    examples = {u: _example(got[u], want[u], kinds) for u, kinds in list(differs.items())[:5]}
    return {"lost": lost, "doubled": doubled, "mismatched_users": len(differs),
            "mismatch_kinds": dict(Counter(k for kinds in differs.values() for k in kinds)),
            "mismatch_examples": examples}


def compare_items(client: Any, live: Keys, truth: Keys, items: list[str], cap: int) -> dict[str, Any]:
    meta_diff = covis_diff = capped = 0
    for chunk in _chunks(items, 500):
        pipe = client.pipeline(transaction=False)
        for keys in (live, truth):
            for i in chunk:
                pipe.hgetall(keys.item_meta(i))
                pipe.zrange(keys.item_covis(i), 0, -1, withscores=True)
        replies = pipe.execute()
        half = len(replies) // 2
        for j in range(len(chunk)):
            gm, gc = replies[2 * j], _scores(replies[2 * j + 1])
            wm, wc = replies[half + 2 * j], _scores(replies[half + 2 * j + 1])
            meta_diff += gm != wm
            if len(wc) >= cap:
                capped += 1
            else:
                covis_diff += gc != wc
    pop = [_scores(client.zrange(k.popularity(), 0, -1, withscores=True)) for k in (live, truth)]
    pop_diff = len(pop[0].keys() ^ pop[1].keys()) + sum(
        not math.isclose(pop[0][i], pop[1][i], rel_tol=1e-9) for i in pop[0].keys() & pop[1].keys())
    return {"meta_mismatched": meta_diff, "covis_mismatched": covis_diff, "covis_capped_skipped": capped,
            "popularity_mismatched": pop_diff}


def stale_lists(client: Any, keys: Keys, ds: datasets.Dataset) -> int:
    last = ds.events.groupby("user_id").ts.max()
    users = [str(u) for u in last.index]
    raw = client.mget([keys.user_rec(u) for u in users])
    return sum(1 for u, r in zip(users, raw, strict=True)
               if r is None or msgspec.json.decode(r)["event_ts"] != int(last[u]))
