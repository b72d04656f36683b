"""Redis floor benchmark: how much of Redis's work per event aggregating the item increments could remove.

Most of the Redis main thread's time on the state path goes to sorted-set updates: every event adds to
popularity and to the co-visitation sets of up to ``FUSIONREC_COVIS_WINDOW`` of the user's recent items.
Writing those sets whole from process memory (an item-keyed stage, or longer write-behind windows) could
only make them cheaper by sending fewer updates: one per distinct (set, member) of a window instead of
one per increment. This bench measures how many that leaves, on the data:

1. The first N user events of a dataset are applied by :class:`StateStore` in batches of
   ``FUSIONREC_BATCH_SIZE``, as a consumer applies them, over 4 partitions. Every sorted-set increment
   it computes is recorded (set, member, event). ``state_redis_us_per_event`` is the Redis server's
   main-thread CPU (``INFO cpu``) over those batches, per event; ``zincrby_per_event`` the increments
   Redis ran (``INFO commandstats``).
2. Per aggregation window (the batch, 2,000 and 20,000 events, and the whole run): distinct (set, member)
   pairs per event. The baseline, same run: the increments one per contribution (``increments_per_event``).
   ``ratio``: increments over the distinct pairs of the whole run, the most any aggregation saves.
3. The Redis main-thread CPU of one sorted-set update, measured in the same run on sets of
   ``FUSIONREC_COVIS_CAP`` members: ``ZINCRBY`` called from a Lua script (as the state path does), and
   ``ZADD`` of computed scores with one and with eight members a command (as a writer that keeps the
   sets' scores in process would send them), split into a cost per command and one per member.
4. ``floor_batch_us_per_event`` and ``floor_run_us_per_event``: what writing each window's distinct
   pairs would cost that way (one command per set and window), for a window of one batch and for the
   whole run: the sorted-set work per event that no aggregation removes.

Datasets: Complete Journey and, when ``../shared/data`` is there, the Taobao sample (``clickstream_*``).

Final JSON line: increments_per_event, distinct_per_event (by window), ratio, zincrby_per_event,
zincrby_us_per_event, state_redis_us_per_event, floor_batch_us_per_event, floor_run_us_per_event and
their clickstream_ equivalents; lua_zincrby_us, zadd1_us, zadd8_us.

    python bench/redis_floor.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.state import Positioned, StateStore, ZsetCall

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import embedded_redis, redis_usec, taobao  # noqa: E402  (the ingest bench's helpers)

PARTITIONS = 4
WINDOWS = (2_000, 20_000)
LUA_ZINCRBY = "for i = 1, #ARGV, 2 do redis.call('ZINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end return 1"
UPDATES = 200_000  # per cost measurement
PER_CALL = 8


def increments(base: Settings, ds: datasets.Dataset) -> dict[str, Any]:
    """Apply the dataset's events; every sorted-set increment as (set, member, event), and the Redis cost."""
    s = base.replace(redis_prefix=f"f{uuid.uuid4().hex[:8]}")
    client = connect(s)
    store = StateStore(client, s)
    store.apply_catalog(ds.catalog())
    events = [Positioned(n % PARTITIONS, n, msgspec.convert(e, UserEvent)) for n, e in enumerate(ds.user_events())]
    seen: list[tuple[int, str, str]] = []
    send = store._apply_zsets

    def recorded(calls: list[ZsetCall]) -> None:
        for call in calls:
            for key, entries in call.entries.items():
                seen.extend((offset, key, member) for offset, member, _w in entries)
        send(calls)

    store._apply_zsets = recorded  # type: ignore[method-assign]
    batch = s.stream.batch_size
    calls_before = client.info("commandstats").get("cmdstat_zincrby", {}).get("calls", 0)
    usec = redis_usec(client)
    for start in range(0, len(events), batch):
        store.apply(events[start: start + batch])
    usec = redis_usec(client) - usec
    zincrby = client.info("commandstats").get("cmdstat_zincrby", {}).get("calls", 0) - calls_before
    client.close()
    n = len(events)
    seen.sort()
    distinct = {"batch": _distinct(seen, batch)}
    for window in WINDOWS:
        distinct[str(window)] = _distinct(seen, window)
    distinct["run"] = _distinct(seen, n + 1)
    return {"events": n, "increments_per_event": len(seen) / n,
            "distinct_per_event": {w: pairs / n for w, (pairs, _sets) in distinct.items()},
            "sets_per_event": {w: sets / n for w, (_pairs, sets) in distinct.items()},
            "zincrby_per_event": zincrby / n, "state_redis_us_per_event": usec / n}


def _distinct(seen: list[tuple[int, str, str]], window: int) -> tuple[int, int]:
    """Distinct (set, member) pairs and distinct sets, each summed over consecutive windows of
    ``window`` events."""
    total = total_sets = 0
    current = -1
    pairs: set[tuple[str, str]] = set()
    for offset, key, member in seen:
        if offset // window != current:
            total, total_sets = total + len(pairs), total_sets + len({k for k, _m in pairs})
            pairs, current = set(), offset // window
        pairs.add((key, member))
    return total + len(pairs), total_sets + len({k for k, _m in pairs})


def update_costs(client: redis.Redis, members: int, runs: int = 3) -> dict[str, float]:
    """Redis main-thread µs per sorted-set update on sets of ``members``: ``lua`` (ZINCRBY from a Lua
    script, eight a call), ``zadd1`` and ``zadd8`` (ZADD of computed scores, one and eight members a
    command, pipelined)."""
    script = client.register_script(LUA_ZINCRBY)
    found: dict[str, list[float]] = {"lua": [], "zadd1": [], "zadd8": []}
    for _ in range(runs):
        for kind, out in found.items():
            client.flushdb()
            usec = redis_usec(client)
            for start in range(0, UPDATES, 4_000):
                pipe = client.pipeline(transaction=False)
                for j in range(start, start + 4_000, PER_CALL):
                    key, names = f"z{j % 5_000}", [f"m{(j + m) % members}" for m in range(PER_CALL)]
                    if kind == "lua":
                        script(keys=[key], args=[x for name in names for x in (1.5, name)], client=pipe)
                    elif kind == "zadd8":
                        pipe.zadd(key, {name: float(j + m) for m, name in enumerate(names)})
                    else:
                        for m, name in enumerate(names):
                            pipe.zadd(f"z{(j + m) % 5_000}", {name: float(j + m)})
                pipe.execute()
            out.append((redis_usec(client) - usec) / UPDATES)
    return {kind: statistics.median(out) for kind, out in found.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller datasets (about a minute)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_cj, n_click = (60_000, 60_000) if args.quick else (300_000, 110_000)
    data = datasets.completejourney().head(n_cj)
    clicks = taobao(n_click)
    with embedded_redis() as base:
        found = {"": increments(base, data)}
        if clicks is not None:
            found["clickstream_"] = increments(base, clicks)
        costs = update_costs(connect(base), base.state.covis_cap)
    # ZADD's cost as one part per command and one per member, from its one- and eight-member figures
    per_member = (PER_CALL * costs["zadd8"] - costs["zadd1"]) / (PER_CALL - 1)
    per_command = costs["zadd1"] - per_member
    out: dict[str, Any] = {}
    for prefix, f in found.items():
        name = "Complete Journey" if not prefix else "Taobao"
        pairs, sets = f["distinct_per_event"], f["sets_per_event"]
        floors = {w: sets[w] * per_command + pairs[w] * per_member for w in pairs}
        by_window = ", ".join(f"{w}: {pairs[w]:.2f} in {sets[w]:.2f} sets, {floors[w]:.2f} µs" for w in pairs)
        print(f"{name}: {f['events']} events; sorted-set increments {f['increments_per_event']:.2f} per event "
              f"(ZINCRBY run by Redis: {f['zincrby_per_event']:.2f}); state path {f['state_redis_us_per_event']:.2f} "
              f"µs per event. Per event and aggregation window, distinct (set, member) pairs and what writing them "
              f"as ZADD of computed scores, one command per set, would cost: {by_window}", flush=True)
        out.update({
            f"{prefix}increments_per_event": round(f["increments_per_event"], 3),
            f"{prefix}distinct_per_event": {w: round(d, 3) for w, d in pairs.items()},
            f"{prefix}ratio": round(f["increments_per_event"] / pairs["run"], 3),
            f"{prefix}zincrby_per_event": round(f["zincrby_per_event"], 3),
            f"{prefix}zincrby_us_per_event": round(f["zincrby_per_event"] * costs["lua"], 2),
            f"{prefix}state_redis_us_per_event": round(f["state_redis_us_per_event"], 2),
            f"{prefix}floor_batch_us_per_event": round(floors["batch"], 2),
            f"{prefix}floor_run_us_per_event": round(floors["run"], 2)})
    print(f"one sorted-set update on sets of {base.state.covis_cap} members: ZINCRBY from Lua {costs['lua']:.3f} µs; "
          f"ZADD of computed scores {costs['zadd1']:.3f} µs one member a command, {costs['zadd8']:.3f} µs a member "
          f"eight a command ({per_command:.3f} µs a command + {per_member:.3f} µs a member)")
    out.update({"lua_zincrby_us": round(costs["lua"], 3), "zadd1_us": round(costs["zadd1"], 3),
                "zadd8_us": round(costs["zadd8"], 3)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
