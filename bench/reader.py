"""Reader benchmark: recommendation reads straight from Redis, and through the HTTP API under load.

1. direct: ``RecommendationReader.top_k`` (one GET + msgspec decode) for random users, one request
   at a time on one connection, for ``--seconds``; p50/p99 latency and reads/s.
2. HTTP: ``fusionrec serve`` in its own process (uvicorn, uvloop, httptools), driven by an open-loop
   load generator in this process: ``--rate`` requests/s spread over ``--connections`` keep-alive
   HTTP/1.1 connections, for ``--seconds``. A request's latency runs from the moment it was *due*,
   so a server that falls behind is charged for the queueing it causes (no coordinated omission).
   The run is bounded in time and count, and only talks to loopback.

Both read the same users (20-item lists as the writer stores them; 10% unknown users get the
popular fallback). The last line is JSON: direct_p50_ms, direct_p99_ms, direct_rps, http_p50_ms,
http_p99_ms, http_rps, target_rps, errors, and http_p99_over_direct_p99 (the HTTP layer's cost
against the direct read measured in the same run).

    python bench/reader.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import msgspec
import numpy as np

from fusionrec.apps.evaluation.runner import scratch_redis
from fusionrec.apps.services import free_port
from fusionrec.core.keys import Keys
from fusionrec.core.settings import Settings
from fusionrec.online.ranking.ranker import RecList, Recommendation
from fusionrec.online.serving.reader import RecommendationReader


def populate(client, settings: Settings, users: int, items: int = 5000, seed: int = 0) -> None:
    keys = Keys.for_settings(settings)
    rng = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for u in range(users):
        recs = [Recommendation(item_id=str(rng.randrange(items)), score=round(1 - r / 20, 6),
                               sources={"repeat": 1.2, "covis": 0.4, "river": 0.3}) for r in range(20)]
        pipe.set(keys.user_rec(f"u{u}"), encode(RecList(user_id=f"u{u}", model="fusion-7", generated_at=now,
                                                        event_ts=now, items=recs)))
        if u % 1000 == 999:
            pipe.execute()
    pipe.zadd(keys.popularity(), {str(i): float(items - i) for i in range(200)})
    pipe.execute()


def user_ids(users: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"u{rng.randrange(users)}" if rng.random() > 0.1 else f"new{rng.randrange(10**9)}" for _ in range(n)]


def direct(reader: RecommendationReader, users: int, seconds: float) -> tuple[np.ndarray, float]:
    ids = user_ids(users, 200_000, seed=1)
    lat = []
    t_end = time.perf_counter() + seconds
    start = time.perf_counter()
    for uid in ids:
        t0 = time.perf_counter()
        reader.top_k(uid, 20)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if t1 >= t_end:
            break
    return np.array(lat), len(lat) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- the HTTP load generator
class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str, host: str) -> int:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status


async def load(port: int, users: int, rate: float, seconds: float, connections: int) -> dict[str, float]:
    host = f"127.0.0.1:{port}"
    conns: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.put_nowait(Connection(r, w))
    total = int(rate * seconds)
    ids = user_ids(users, total, seed=2)
    lat = np.zeros(total)
    errors = 0
    last_done = 0.0
    behind_max = 0.0

    async def one(i: int, due: float) -> None:
        nonlocal errors, last_done
        conn = await conns.get()
        try:
            status = await conn.get(f"/v1/users/{ids[i]}/recommendations?k=20", host)
            conns.put_nowait(conn)
            if status != 200:
                errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1  # the connection is gone: count it, and the request took until now
            r, w = await asyncio.open_connection("127.0.0.1", port)
            conns.put_nowait(Connection(r, w))
        finally:
            done = time.perf_counter()
            lat[i] = done - due
            last_done = max(last_done, done)
            finished[0] += 1
            if finished[0] == total:
                all_done.set()

    finished = [0]
    all_done = asyncio.Event()
    running: set[asyncio.Future[None]] = set()  # strong references until each request finishes
    loop_start = time.perf_counter()
    for i in range(total):
        due = loop_start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            behind_max = max(behind_max, -delay)
        task = asyncio.ensure_future(one(i, due))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.wait_for(all_done.wait(), timeout=seconds + 30)
    elapsed = last_done - loop_start
    slow = np.nonzero(lat > 0.05)[0]
    if len(slow):
        print(f"requests over 50 ms: {len(slow)} at indices {slow[:10].tolist()} of {total}", file=sys.stderr)
    while not conns.empty():
        conns.get_nowait().writer.close()
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
            "rps": total / elapsed, "late_ms": (behind_max) * 1000,
            "errors": errors}


def start_server(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONREC_")}
    env.update(FUSIONREC_REDIS_URL=settings.redis.url or "", FUSIONREC_REDIS_PREFIX=settings.redis.prefix,
               FUSIONREC_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "fusionrec", "serve", "--port", str(port),
                             "--no-search-log"],
                            env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):  # noqa: S310 (loopback)
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("fusionrec serve did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 s per phase, 20k users")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=2000.0, help="HTTP requests per second (open loop)")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.users, args.seconds = 20_000, 5.0
    with scratch_redis(Settings.from_env()) as (client, settings):
        populate(client, settings, args.users)
        reader = RecommendationReader(client, settings)
        direct_lat, direct_rps = direct(reader, args.users, args.seconds)
        port = free_port()
        server = start_server(settings, port)
        gc.collect()
        gc.freeze()  # this process imported torch & co.: no full collection may stall the generator
        try:
            import uvloop

            uvloop.run(load(port, args.users, args.rate / 10, 2.0, args.connections))  # warm-up
            http = uvloop.run(load(port, args.users, args.rate, args.seconds, args.connections))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    out = {"direct_p50_ms": round(float(np.percentile(direct_lat, 50)) * 1000, 3),
           "direct_p99_ms": round(float(np.percentile(direct_lat, 99)) * 1000, 3),
           "direct_rps": round(direct_rps), "http_p50_ms": round(http["p50"] * 1000, 3),
           "http_p99_ms": round(http["p99"] * 1000, 3), "http_max_ms": round(http["max"] * 1000, 3),
           "generator_behind_max_ms": round(http["late_ms"], 3), "http_rps": round(http["rps"]),
           "target_rps": args.rate,
           "errors": int(http["errors"]), "connections": args.connections, "users": args.users,
           "http_p99_over_direct_p99": round(http["p99"] / float(np.percentile(direct_lat, 99)), 2)}
    print(f"direct: p50 {out['direct_p50_ms']} ms, p99 {out['direct_p99_ms']} ms, {out['direct_rps']} reads/s")
    print(f"HTTP at {args.rate:.0f}/s: p50 {out['http_p50_ms']} ms, p99 {out['http_p99_ms']} ms, "
          f"{out['http_rps']} requests/s, {out['errors']} errors")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
