"""Chaos benchmark: a fixed-rate replay while processes and services are killed, restarted and paused;
at the end every user's state is compared with ground truth computed offline from the same events.

What runs (one temporary run dir, nothing shared with other runs): the embedded broker (Tansu, memory
storage) and Redis with AOF (``start_redis(run_dir, "aof")``: ``appendonly yes`` and Redis' default
``appendfsync everysec``; the run reads the policy back and prints it), and as ``fusionrec``
subprocesses with settings passed through the environment: two ``consume`` processes sharing the
user-state group, one ``learner``, one ``embed-workers --workers 1`` pool (a supervisor and one worker
process). Once the embedding worker has joined its group, the Complete Journey catalog of the replayed
slice is published and the run waits until the consumers applied it (an event's category/brand
affinity uses its item's metadata); then
``fusionrec replay completejourney --households H --limit N --rate R --no-catalog`` publishes
N = rate x duration purchases, keyed by user id, in time order.

Faults (``--seed``): from ``--warmup-s`` after the first event until the producer ends, one fault starts
every ``--fault-every-s`` x U(0.5, 1.5) seconds (or as soon as the previous one finished), each kind
equally likely:

* ``consumer``: SIGKILL one of the two consumer processes (its process group), restart it after U(0, 3) s;
* ``learner``: SIGKILL the learner, restart it after U(0, 3) s (it waits for the 15 s lease to lapse);
* ``embed``: half the time SIGKILL the pool's worker process (the pool's supervisor restarts it), else
  SIGKILL the whole pool (supervisor and worker) and restart it after U(0, 3) s;
* ``redis``: SIGKILL redis-server, restart it after U(0, 3) s on the same port, with the same password and
  AOF directory. A SIGKILL loses the acknowledged writes Redis had not yet handed to the kernel: normally
  none (it writes the AOF buffer before replying), up to ~2 s of them while a slow fsync postpones that
  write; an OS crash (not simulated) would lose about the last second. Either way the consumers
  reconcile Redis' applied positions with Kafka's committed offsets when partitions are assigned;
* ``broker``: SIGSTOP the broker for U(1, 5) s, then SIGCONT.

Faults do not overlap (the next starts after the previous restart), but recoveries do. A process that
exits without being killed is an *unplanned exit*: logged with its last lines and restarted.

After the producer ends no more faults are injected; the run waits until every process is up, the
user-state group has committed every events and catalog offset, the embedding group every catalog
offset, and every fault has recovered. Then ground truth: the same N events (the same dataset slice)
are applied offline by ``StateStore`` under another key prefix of the same Redis, catalog first, in
produce order as one partition: keyed by user id, each user's events reach the live consumers in that
order, which makes per-user state (and uncapped per-item state) equal to that one-partition pass
(see tests/integration/test_partitioners.py).

Compared, per user of the slice, in their stored state (``:s``): the counters per event type, last-seen
and purchases, the recent items (exact), the decayed item weights and category/brand affinity (same
members, values within a relative 1e-9). ``lost``: counter
shortfall summed over (user, event type); ``doubled``: surplus summed; ``mismatched_users``: users
with any difference. Also compared (details line): every item's catalog hash, the popularity set (same
tolerance), co-visitation sets that hold fewer than ``FUSIONREC_COVIS_CAP`` members in the truth
(fuller sets evict by arrival order and are skipped, counted); every user's stored list must have been
ranked at their last event (``stale_lists``); every catalog item must have a vector in the active
version (``vectors_missing``); the events topic must hold each event id once (``log_missing``,
``log_duplicates``: the producer's side). Event-id bookkeeping (the states' remembered ids, offset guards) differs by
construction and is not compared; neither are recommendation contents, feedback or item deltas.

Figures. A probe in this process samples every second: the end of every partition (a consumer of its
own reads all three topics: on the embedded broker ListOffsets can lag the true end) and each group's
committed offsets. ``max_lag``: the largest summed lag (end - committed) of the user-state group on
the events topic. ``recovery_p99_s``: the 99th percentile over faults of the recovery time, from the
fault's injection to the first sample, taken after the restart (or SIGCONT), where

* user-state faults (consumer, redis, broker): every events partition's committed offset is at its end
  or past where it stood at injection, and the group's summed events lag is at most ``--lag-bound``
  (default: 2 s of production);
* learner: the learner group committed past where it stood at injection (the new process wrote a
  checkpoint: it stores offsets only then);
* embed: a live worker process other than a killed one reported holding every catalog partition after
  the injection, and the embedding group committed a catalog offset past where it stood at injection
  (or all of them are at their end): the pool is back and embedding.

A fault not recovered when the run gives up counts with the time observed (``unrecovered``). Recoveries
are measured per fault and overlap: with a fault every few seconds, most recovery windows contain later
faults (``recoveries_overlapped``), so a time is an upper bound for that fault alone.
``chaos-trace.json`` in the run dir (kept with ``--keep`` or when a check failed) holds every fault and
every second's lags.

Final JSON line: faults_injected, events, lost, doubled, max_lag, recovery_p99_s, mismatched_users; the
line before it gives the details (per fault kind, item checks, learner lag, unplanned exits, sizes).

    python bench/chaos.py --quick          # 90 s, >= 15 faults
    python bench/chaos.py                  # 300 s, >= 50 faults
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from chaos_check import compare_items, compare_users, ground_truth, stale_lists  # bench/, beside this file
from chaos_procs import Proc, Services, crash_summary, spawned_children
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorStore
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer, kafka_config
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics

QUIET = logging.getLogger("chaos.kafka")  # librdkafka complains while the broker is stopped: expected
GROUP_OF = {"consumer": "state", "redis": "state", "broker": "state", "learner": "learner", "embed": "embed"}
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the probe
Offsets = dict[tuple[str, int], int]


@dataclass
class Sample:
    t: float  # monotonic
    wall_ms: int
    ends: Offsets  # true end of every partition seen so far
    committed: dict[str, Offsets | None]  # group name -> committed offsets (None: the broker did not answer)
    workers: list[tuple[int, int, int]] | None  # live embedding workers: (pid, partitions held, reported at ms)


class Probe:
    """Reads every partition to its end and each group's committed offsets, once a second."""

    def __init__(self, s: Settings, groups: dict[str, tuple[str, list[str]]]) -> None:
        self.settings, self.groups = s, groups
        self.keys = Keys.for_settings(s)
        self.redis = connect(s)
        topics = sorted({t for _, ts in groups.values() for t in ts})
        self.tps = {t: [TopicPartition(t, p) for p in range(s.kafka.partitions)] for t in topics}
        self.tail = Consumer(kafka_config(s, **{"group.id": f"chaos-tail-{uuid.uuid4().hex[:8]}",
                                                "enable.auto.commit": False, "fetch.wait.max.ms": 50}), logger=QUIET)
        self.tail.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(s.kafka.partitions)])
        self.seen: Offsets = {(tp.topic, tp.partition): 0 for tps in self.tps.values() for tp in tps}
        self.event_ids: Counter[str] = Counter()
        self.committers = {name: Consumer(kafka_config(s, **{"group.id": gid, "enable.auto.commit": False}),
                                          logger=QUIET) for name, (gid, _) in groups.items()}
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.stop = threading.Event()
        self.on_sample: Any = None
        self.thread = threading.Thread(target=self._loop, name="probe", daemon=True)

    def committed(self, group: str) -> Offsets | None:
        gid, topics = self.groups[group]
        try:
            with self.lock:
                got = self.committers[group].committed([tp for t in topics for tp in self.tps[t]], timeout=3)
        except KafkaException:
            return None
        return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in got}

    def _read_tail(self, budget_s: float = 0.5) -> None:
        deadline = time.monotonic() + budget_s
        events = self.settings.kafka.topic_events
        while time.monotonic() < deadline:
            msgs = self.tail.consume(5000, 0.05)
            for msg in msgs:
                if msg.error() is not None:
                    continue
                key = (msg.topic(), msg.partition())
                self.seen[key] = max(self.seen[key], msg.offset() + 1)
                if key[0] == events:
                    self.event_ids[msgspec.json.decode(msg.value())["event_id"]] += 1
            if not msgs:
                return

    def _workers(self) -> list[tuple[int, int, int]] | None:
        try:
            names = list(self.redis.scan_iter(match=self.keys.worker_status("*"), count=100))
            values = self.redis.mget(names) if names else []
        except Exception:  # noqa: BLE001 - Redis is down or loading: no answer this second
            return None
        out = []
        for name, raw in zip(names, values, strict=True):
            pid = int(name.decode().rsplit(":", 2)[-2])
            if raw and Path(f"/proc/{pid}").exists():
                status = json.loads(raw)
                out.append((pid, len(status["partitions"]), int(status["at"])))
        return out

    def sample(self) -> Sample:
        self._read_tail()
        ends = {}
        for key, nxt in self.seen.items():
            _low, high = self.tail.get_watermark_offsets(TopicPartition(*key), cached=True)
            ends[key] = max(nxt, high)
        return Sample(time.monotonic(), int(time.time() * 1000), ends,
                      {g: self.committed(g) for g in self.groups}, self._workers())

    def last(self, group: str) -> Offsets | None:
        return next((x.committed[group] for x in reversed(self.samples) if x.committed[group] is not None), None)

    def _loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append(self.sample())
                if self.on_sample is not None:
                    self.on_sample(self.samples[-1])
            except Exception as exc:  # noqa: BLE001 - one lost sample, not a lost probe
                say(f"probe: {type(exc).__name__}: {exc}")
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.tail.close()
        for c in self.committers.values():
            c.close()


def lag(sample: Sample, group: str, topic: str) -> int | None:
    committed = sample.committed.get(group)
    if committed is None:
        return None
    return sum(max(0, end - committed.get(key, 0)) for key, end in sample.ends.items() if key[0] == topic)


# --------------------------------------------------------------------------- faults
@dataclass
class Fault:
    n: int
    kind: str
    at: float  # monotonic: injected
    wall_ms: int
    before: dict[str, Offsets | None]  # committed offsets at injection
    target: str = ""
    killed: set[int] = field(default_factory=set)  # pids that must not count as recovered
    back: float = 0.0  # restarted, or continued
    recovered: float | None = None


class Injector:
    """One fault at a time, at random moments, until stopped; restarts what it killed."""

    KINDS = ("consumer", "learner", "embed", "redis", "broker")

    def __init__(self, rng: random.Random, every_s: float, procs: dict[str, Proc], services: Services,
                 probe: Probe, lock: threading.Lock) -> None:
        self.rng, self.every_s = rng, every_s
        self.procs, self.services, self.probe, self.lock = procs, services, probe, lock
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="injector", daemon=True)

    def _loop(self) -> None:
        next_at = time.monotonic()
        try:
            while not self.stop.wait(max(0.0, next_at - time.monotonic())):
                fault = self.inject(self.rng.choice(self.KINDS))
                next_at = fault.at + self.every_s * self.rng.uniform(0.5, 1.5)
        except BaseException as exc:  # noqa: BLE001 - the run reports it and stops injecting
            say(f"the fault injector failed: {type(exc).__name__}: {exc}")
            self.error = exc

    def inject(self, kind: str) -> Fault:
        # where each group stood; when the broker does not answer at once, the last sample's view
        before = {g: self.probe.committed(g) or self.probe.last(g) for g in self.probe.groups}
        fault = Fault(len(self.faults) + 1, kind, time.monotonic(), int(time.time() * 1000), before)
        self.faults.append(fault)
        getattr(self, f"_{kind}")(fault)
        fault.back = time.monotonic()
        say(f"fault {fault.n}: {kind} {fault.target} ({fault.back - fault.at:.1f} s until restarted/continued)")
        return fault

    def _restart(self, fault: Fault, proc: Proc) -> None:
        fault.target = f"{proc.name} pid {proc.pid}"
        with self.lock:
            proc.kill()
        time.sleep(self.rng.uniform(0, 3))
        with self.lock:
            proc.start()

    def _consumer(self, fault: Fault) -> None:
        self._restart(fault, self.procs[self.rng.choice(["consumer-0", "consumer-1"])])

    def _learner(self, fault: Fault) -> None:
        self._restart(fault, self.procs["learner"])

    def _embed(self, fault: Fault) -> None:
        pool = self.procs["embed"]
        workers = spawned_children(pool.pid) if pool.popen is not None else []
        fault.killed = set(workers)
        if workers and self.rng.random() < 0.5:
            fault.target = f"worker pid {workers[0]} (the pool restarts it)"
            with contextlib.suppress(ProcessLookupError):
                os.kill(workers[0], signal.SIGKILL)
            return
        self._restart(fault, pool)
        fault.target += " (whole pool)"

    def _redis(self, fault: Fault) -> None:
        fault.target = f"pid {self.services.redis.pid}"
        self.services.kill_redis()
        time.sleep(self.rng.uniform(0, 3))
        self.services.restart_redis()

    def _broker(self, fault: Fault) -> None:
        pause = self.rng.uniform(1, 5)
        fault.target = f"SIGSTOP for {pause:.1f} s"
        self.services.pause_broker(True)
        try:
            time.sleep(pause)
        finally:
            self.services.pause_broker(False)


def recovered(fault: Fault, s: Sample, topics: dict[str, str], bound: int) -> bool:
    """Whether sample ``s`` shows ``fault`` recovered (the module docstring's definitions)."""
    group = GROUP_OF[fault.kind]
    now, before = s.committed.get(group), fault.before.get(group) or {}
    if s.t < fault.back or now is None:
        return False
    keys = [k for k in s.ends if k[0] == topics[group]]

    def at_end(k: tuple[str, int]) -> bool:
        return now.get(k, 0) >= s.ends[k]

    def moved(k: tuple[str, int]) -> bool:
        return now.get(k, 0) > before.get(k, -1)

    if group == "learner":
        return any(moved(k) for k in keys)
    if group == "embed":
        fresh = [w for w in s.workers or [] if w[0] not in fault.killed and w[1] == len(keys) and w[2] >= fault.wall_ms]
        return bool(fresh) and (all(at_end(k) for k in keys) or any(moved(k) for k in keys))
    return all(at_end(k) or moved(k) for k in keys) and (lag(s, group, topics[group]) or 0) <= bound


# --------------------------------------------------------------------------- the run
@dataclass
class Run:
    args: argparse.Namespace
    run_dir: Path
    services: Services
    settings: Settings
    ds: datasets.Dataset
    procs: dict[str, Proc] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unplanned: list[dict[str, Any]] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # after the final SIGTERM

    @property
    def topics(self) -> dict[str, str]:
        k = self.settings.kafka
        return {"state": k.topic_events, "embed": k.topic_catalog, "learner": k.topic_feedback}

    def start_processes(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONREC_")}
        env.update(self.settings.to_env())
        for name, args in (("consumer-0", ["consume", "--no-metrics"]), ("consumer-1", ["consume", "--no-metrics"]),
                           ("learner", ["learner", "--no-metrics"]),
                           ("embed", ["embed-workers", "--workers", "1", "--no-progress"])):
            self.procs[name] = Proc(name, args, env, self.run_dir)
            self.procs[name].start()
        a = self.args
        self.procs["producer"] = Proc("producer", [
            "replay", "completejourney", "--households", str(a.households), "--limit", str(len(self.ds.events)),
            "--rate", str(a.rate), "--no-catalog"], env, self.run_dir)

    def watch(self, _sample: Sample) -> None:
        """Restart a process that exited without being killed, and record it."""
        with self.lock:
            for name, proc in self.procs.items():
                code = proc.exited() if name != "producer" else None
                if code is not None:
                    say(f"UNPLANNED EXIT: {name} (code {code}); restarting. Last lines:\n{proc.tail()}")
                    self.unplanned.append({"process": name, "code": code, "at_s": round(time.monotonic() - T0, 1),
                                           **crash_summary(proc.tail(60))})
                    proc.start()

    def publish_catalog(self) -> int:
        with EventProducer(self.settings) as producer:
            n, _ = replay(self.ds, producer, progress=False, events=False)
        return n

    def caught_up(self, s: Sample) -> bool:
        k = self.settings.kafka
        return (not any(p.down for p in self.procs.values())
                and lag(s, "state", k.topic_events) == 0 and lag(s, "state", k.topic_catalog) == 0
                and lag(s, "embed", k.topic_catalog) == 0)


def reconciled(run_dir: Path) -> dict[str, int]:
    """How the consumers found Redis' applied positions on assignment (the outcomes they log)."""
    found: Counter[str] = Counter()
    for log in run_dir.glob("consumer-*.log"):
        text = log.read_text(errors="replace")
        found.update(re.findall(r"\]: (redis_ahead|redis_behind|redis_empty|topic_reset) \(", text))
    return dict(found)


def wait_until(probe: Probe, cond: Any, timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    seen = len(probe.samples)
    while time.monotonic() < deadline:
        if len(probe.samples) > seen:
            seen = len(probe.samples)
            if cond(probe.samples[-1]):
                return True
        time.sleep(0.2)
    say(f"gave up waiting for {what} after {timeout:.0f} s")
    return False


def progress(run: Run, probe: Probe, injector: Injector | None) -> None:
    s = probe.samples[-1]
    k = run.settings.kafka
    say(f"events in topic {sum(v for (t, _), v in s.ends.items() if t == k.topic_events):>7d}  "
        f"lag: state {lag(s, 'state', k.topic_events)}  embed {lag(s, 'embed', k.topic_catalog)}  "
        f"learner {lag(s, 'learner', k.topic_feedback)}  faults {len(injector.faults) if injector else 0}  "
        f"unplanned exits {len(run.unplanned)}")


def run_chaos(run: Run, probe: Probe) -> tuple[Injector, float]:
    """Catalog, then the replay under faults; returns the injector and the producer's duration."""
    s, args = run.settings, run.args
    wait_until(probe, lambda x: any(w[1] == s.kafka.partitions for w in x.workers or []), 300,
               "the embedding worker to join")  # as deployed: the pool runs before the catalog arrives
    n_cat = run.publish_catalog()
    say(f"catalog published ({n_cat} items); waiting for the consumers to apply it")
    wait_until(probe, lambda x: sum(v for (t, _), v in x.ends.items() if t == s.kafka.topic_catalog) >= n_cat
               and lag(x, "state", s.kafka.topic_catalog) == 0, 600, "the catalog to be applied")
    producer = run.procs["producer"]
    producer.start()
    t_start = time.monotonic()
    say(f"producer started: {len(run.ds.events)} events at {args.rate}/s")
    wait_until(probe, lambda x: any(v for (t, _), v in x.ends.items() if t == s.kafka.topic_events), 120,
               "the first event")
    time.sleep(args.warmup_s)
    injector = Injector(random.Random(args.seed), args.fault_every_s, run.procs, run.services, probe, run.lock)
    injector.thread.start()
    while producer.popen is not None and producer.popen.poll() is None:
        time.sleep(10)
        progress(run, probe, injector)
    produced_s = time.monotonic() - t_start
    injector.stop.set()
    injector.thread.join()
    say(f"producer exited with {producer.popen.returncode if producer.popen else None} after {produced_s:.0f} s; "
        f"{len(injector.faults)} faults; no more faults, waiting for every group to catch up")
    return injector, produced_s


def finish(run: Run, probe: Probe, injector: Injector, bound: int) -> dict[str, Any]:
    """Wait for the catch-up, then measure recoveries and lags from the samples."""
    topics = run.topics

    def settled(x: Sample) -> bool:
        for f in injector.faults:
            if f.recovered is None and recovered(f, x, topics, bound):
                f.recovered = x.t
        return run.caught_up(x) and all(f.recovered is not None for f in injector.faults)

    for f in injector.faults:  # what the samples so far show
        f.recovered = next((x.t for x in probe.samples if recovered(f, x, topics, bound)), None)
    caught_up = wait_until(probe, settled, run.args.catch_up_s, "the catch-up")
    learner_done = wait_until(probe, lambda x: lag(x, "learner", topics["learner"]) == 0, 30, "the learner's lag 0")
    last = probe.samples[-1]
    end = last.t
    times = [(f.recovered or end) - f.at for f in injector.faults]
    lags = [v for x in probe.samples if (v := lag(x, "state", topics["state"])) is not None]
    by_kind: dict[str, list[float]] = {}
    for f, t in zip(injector.faults, times, strict=True):
        by_kind.setdefault(f.kind, []).append(t)
    return {"caught_up": caught_up, "learner_lag_end": lag(last, "learner", topics["learner"]),
            "learner_caught_up": learner_done, "max_lag": max(lags, default=0),
            "max_lag_embed": max((v for x in probe.samples if (v := lag(x, "embed", topics["embed"])) is not None),
                                 default=0),
            "recovery_p99_s": round(float(np.percentile(times, 99)), 1) if times else None,
            "unrecovered": sum(f.recovered is None for f in injector.faults),
            # recoveries during which the next fault was already injected (they overlap: see the docstring)
            "recoveries_overlapped": sum(1 for f, g in zip(injector.faults, injector.faults[1:], strict=False)
                                         if g.at < (f.recovered or end)),
            "faults_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
            "recovery_by_kind_s": {k: {"p50": round(float(np.median(v)), 1), "max": round(max(v), 1)}
                                   for k, v in sorted(by_kind.items())}}


def write_trace(run: Run, probe: Probe, injector: Injector) -> None:
    """``chaos-trace.json`` in the run dir (kept with ``--keep`` or when something failed): every fault
    and every second's lags, seconds from the first sample."""
    t0, topics = probe.samples[0].t, run.topics
    faults = [{"n": f.n, "kind": f.kind, "target": f.target, "at": round(f.at - t0, 1), "back": round(f.back - t0, 1),
               "recovered": None if f.recovered is None else round(f.recovered - t0, 1)} for f in injector.faults]
    lags = [[round(x.t - t0, 1), *(lag(x, g, t) for g, t in topics.items())] for x in probe.samples]
    trace = {"faults": faults, "lags": {"columns": ["t", *topics], "rows": lags}}
    (run.run_dir / "chaos-trace.json").write_text(json.dumps(trace))


def verify(run: Run, probe: Probe) -> dict[str, Any]:
    """Ground truth, then every comparison named in the module docstring."""
    s, ds = run.settings, run.ds
    t0 = time.monotonic()
    truth = ground_truth(s, ds)
    say(f"ground truth applied in {time.monotonic() - t0:.0f} s; comparing")
    client = connect(s)
    live_keys, truth_keys = Keys.for_settings(s), Keys.for_settings(truth)
    users = sorted(ds.events.user_id.astype(str).unique())
    out = compare_users(client, live_keys, truth_keys, users)
    out.update(compare_items(client, live_keys, truth_keys, sorted(ds.items.item_id.astype(str)), s.state.covis_cap))
    out["stale_lists"] = stale_lists(client, live_keys, ds)
    store = VectorStore(client, s)
    version = store.active()
    out["vectors_missing"] = len(ds.items) - (store.count(version) if version else 0)
    ids = probe.event_ids
    out["log_missing"] = len(ds.events) - len(ids)
    out["log_duplicates"] = sum(ids.values()) - len(ids)
    out["appendfsync"] = client.config_get("appendfsync").get("appendfsync")
    client.close()
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="90 s of replay, a fault every ~4 s (>= 15 faults)")
    ap.add_argument("--duration-s", type=float, help="seconds of replay (default 300; --quick 90)")
    ap.add_argument("--rate", type=float, default=400, help="user events per second")
    ap.add_argument("--households", type=int, default=400, help="Complete Journey households in the slice")
    ap.add_argument("--fault-every-s", type=float, help="mean seconds between fault starts (default 5; --quick 4)")
    ap.add_argument("--warmup-s", type=float, default=10, help="replay before the first fault")
    ap.add_argument("--lag-bound", type=int, help="events lag under which the state stream counts as recovered "
                                                  "(default: 2 s of production)")
    ap.add_argument("--catch-up-s", type=float, default=600, help="longest wait for the catch-up after the replay")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the run dir (logs, AOF) even when everything matched")
    args = ap.parse_args()
    args.duration_s = args.duration_s or (90 if args.quick else 300)
    args.fault_every_s = args.fault_every_s or (4 if args.quick else 5)
    args.lag_bound = args.lag_bound or int(2 * args.rate)
    return args


def settings_for(services: Services, run_dir: Path) -> Settings:
    """The run's settings, handed to every process through its environment; topics created."""
    export_dir = Path(Settings.from_env({}).ops.run_dir) / "encoders"  # the ONNX export cache: not run state
    s = Settings.from_env({}, kafka_bootstrap=f"127.0.0.1:{services.broker.port}", redis_url=services.redis_url,
                          run_dir=str(run_dir), redis_prefix="chaos", session_timeout_ms=6000, metrics_port=0,
                          learn_metrics_port=0, embed_metrics_port=0, trending_metrics_port=0,
                          embed_export_dir=str(export_dir))
    ensure_topics(s)
    return s


def execute(run: Run) -> dict[str, Any]:
    """Everything between starting the processes and the comparison; the run's figures and checks."""
    s = run.settings
    probe = Probe(s, {"state": (s.stream.group, [s.kafka.topic_events, s.kafka.topic_catalog]),
                      "embed": (s.embed.group, [s.kafka.topic_catalog]),
                      "learner": (s.learn.group, [s.kafka.topic_feedback])})
    try:
        run.start_processes()
        probe.on_sample = run.watch
        probe.thread.start()
        injector, produced_s = run_chaos(run, probe)
        figures = finish(run, probe, injector, run.args.lag_bound)
        write_trace(run, probe, injector)
        checks = verify(run, probe)
    finally:
        probe.close()
        run.exit_codes = {name: p.stop() for name, p in run.procs.items() if name != "producer"}
    producer = run.procs["producer"].popen
    return {"faults_injected": len(injector.faults), "events": len(run.ds.events),
            "producer_exit": producer.returncode if producer else None,
            "injector_error": repr(injector.error) if injector.error else None,
            **figures, **checks, "produced_s": round(produced_s)}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    QUIET.setLevel(logging.CRITICAL)
    ds = datasets.completejourney(households=args.households).head(int(args.rate * args.duration_s))
    run_dir = Path(tempfile.mkdtemp(prefix="fusionrec-chaos-"))
    services = Services(run_dir)
    problems = True
    try:
        run = Run(args, run_dir, services, settings_for(services, run_dir), ds)
        say(f"run dir {run_dir}; {len(ds.events)} events by {ds.events.user_id.nunique()} households, "
            f"{len(ds.items)} items; a fault every ~{args.fault_every_s} s for {args.duration_s:.0f} s")
        out = execute(run)
        problems = bool(out["lost"] or out["doubled"] or out["mismatched_users"] or run.unplanned
                        or not out["caught_up"] or out["injector_error"] or out["producer_exit"] != 0)
    finally:
        services.down()
        if problems or args.keep:
            say(f"run dir kept: {run_dir}")
    out.update(reconciled=reconciled(run_dir), unplanned_exits=run.unplanned, exit_codes_on_sigterm=run.exit_codes,
               lag_bound=args.lag_bound, rate=args.rate, households=args.households, seed=args.seed,
               bench_cpu_s=round(sum(os.times()[:2])), wall_s=round(time.monotonic() - T0))
    if not (problems or args.keep):
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(out))
    # exactly the keys the chaos issue names, and the users that differ
    print(json.dumps({k: out[k] for k in ("faults_injected", "events", "lost", "doubled", "max_lag", "recovery_p99_s",
                                          "mismatched_users")}))


if __name__ == "__main__":
    main()
