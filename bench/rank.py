"""Ranking benchmark: users ranked per second by the recommendation writer, on the embedded Redis.

Per dataset, the state of its first N user events is applied by :class:`StateStore` before any clock
starts, in batches as a consumer applies them. Then every user those events touched is ranked by
:class:`RecommendationWriter` (the learned fusion ranker with the model a ranking process serves before
the learner's first checkpoint: the stacker's prior), their lists and profile vectors written to Redis,
and the feedback decisions encoded, as the ranking process does it:

1. batched: the users in chunks of ``CHUNK`` (256), as the ranking scheduler hands them over;
2. baseline, same run: the same users, one per call (a chunk of one: what ranking one user alone costs,
   as rank on read does).

The datasets: Complete Journey (households with long histories: 40 of their own items, co-visitation
of five recent items) and, when ``../shared/data`` is there, the Taobao sample (a clickstream: most
users have one or two events, so an event is nearly a user to rank). ``redis_us_per_user`` is the
Redis server's main-thread CPU (``INFO cpu``) over the batched run, per user. With ``--runs`` every
figure is the median of the runs.

Final JSON line: users_per_s, baseline_users_per_s, ratio, us_per_user, redis_us_per_user (Complete
Journey), clickstream_users_per_s, clickstream_baseline_users_per_s, clickstream_ratio,
clickstream_us_per_user (Taobao; null without the file).

    python bench/rank.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from fusionrec.core.collector import fewer_collections
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.core.threads import fewer_threads
from fusionrec.online.learning.feedback import Encoded, encode_feedback
from fusionrec.online.ranking.scheduler import CHUNK
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.streams import datasets
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.state import Positioned, StateStore, UserTouch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import embedded_redis, redis_usec, taobao  # noqa: E402  (the ingest bench's helpers)


def applied(base: Settings, ds: datasets.Dataset) -> tuple[Settings, dict[str, UserTouch]]:
    """A fresh prefix holding the dataset's catalog and the state of its events; each touched user's
    merged touch, as the ranking scheduler would hand it over."""
    s = base.replace(redis_prefix=f"r{uuid.uuid4().hex[:8]}")
    client = connect(s)
    store = StateStore(client, s)
    store.apply_catalog(ds.catalog())
    events = [Positioned(n % s.kafka.partitions, n, msgspec.convert(e, UserEvent))
              for n, e in enumerate(ds.user_events())]
    touches: dict[str, UserTouch] = {}
    for start in range(0, len(events), s.stream.batch_size):
        for uid, touch in store.apply(events[start: start + s.stream.batch_size]).users.items():
            touches.pop(uid, None)  # the latest touch, in the order users were last touched
            touches[uid] = touch
    client.close()
    return s, touches


def ranked(s: Settings, touches: dict[str, UserTouch], chunk: int) -> tuple[float, float]:
    """(users/s, Redis µs per user) ranking every user in chunks of ``chunk``; a fresh writer and client."""
    client = connect(s)
    encoded: list[Encoded] = []
    writer = RecommendationWriter(client, s, sink=lambda snaps: encoded.extend(encode_feedback(snaps)))
    users = list(touches)
    with fewer_collections(), fewer_threads(s.rec.threads):  # as the ranking process runs
        usec, t0 = redis_usec(client), time.perf_counter()
        for start in range(0, len(users), chunk):
            writer.refresh({u: touches[u] for u in users[start: start + chunk]})
            encoded.clear()
        elapsed = time.perf_counter() - t0
        usec = redis_usec(client) - usec
    client.close()
    return len(users) / elapsed, usec / len(users)


def one_dataset(base: Settings, ds: datasets.Dataset, runs: int) -> dict[str, float]:
    batched, single, redis = [], [], []
    users = 0
    for _ in range(runs):
        s, touches = applied(base, ds)
        users = len(touches)
        per_s, usec = ranked(s, touches, CHUNK)
        batched.append(per_s)
        redis.append(usec)
        single.append(ranked(s, touches, 1)[0])
    users_per_s, baseline = statistics.median(batched), statistics.median(single)
    print(f"{ds.name}: {len(ds.events)} events, {users} users ranked per pass; users/s of each run: "
          f"batched {', '.join(f'{x:.0f}' for x in batched)}, one per call {', '.join(f'{x:.0f}' for x in single)}",
          flush=True)
    return {"users_per_s": users_per_s, "baseline_users_per_s": baseline, "ratio": users_per_s / baseline,
            "us_per_user": 1e6 / users_per_s, "redis_us_per_user": statistics.median(redis)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller datasets (a few minutes)")
    ap.add_argument("--runs", type=int, default=1, help="runs per dataset; medians are reported")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n_cj, n_click = (30_000, 10_000) if args.quick else (100_000, 30_000)
    data = datasets.completejourney().head(n_cj)
    clicks = taobao(n_click)
    with embedded_redis() as base:
        cj = one_dataset(base, data, args.runs)
        click: dict[str, Any] = one_dataset(base, clicks, args.runs) if clicks is not None else {}
    print(json.dumps({
        "users_per_s": round(cj["users_per_s"]), "baseline_users_per_s": round(cj["baseline_users_per_s"]),
        "ratio": round(cj["ratio"], 2), "us_per_user": round(cj["us_per_user"], 1),
        "redis_us_per_user": round(cj["redis_us_per_user"], 1),
        "clickstream_users_per_s": round(click["users_per_s"]) if click else None,
        "clickstream_baseline_users_per_s": round(click["baseline_users_per_s"]) if click else None,
        "clickstream_ratio": round(click["ratio"], 2) if click else None,
        "clickstream_us_per_user": round(click["us_per_user"], 1) if click else None}))


if __name__ == "__main__":
    main()
