"""Consumer processes killed with SIGKILL, and two processes sharing a group, on real services."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import (
    assert_outputs_exactly_once,
    consume_until,
    dump_state,
    env_for,
    make_settings,
    on_one_redis_and_a_cluster,
    purchases_in,
    start_fusionrec,
    store_catalog,
    wait_for,
)


def _replay_slowly_until(settings, ds, fast: threading.Event):
    """Replay ``ds``, about 400 events/s until ``fast`` is set, then as fast as it goes."""
    with EventProducer(settings) as p:
        replay(ds, p, progress=False, on_event=lambda _: fast.is_set() or time.sleep(0.0025))


def _consumer(settings, log_path):
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return start_fusionrec(settings, "consume", "--no-metrics", stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@on_one_redis_and_a_cluster
def test_sigkill_at_random_points_then_restart_equals_one_clean_pass(services, tmp_path, redis_target):
    # One partition, so per-item state has one deterministic order (see test_state_store.py).
    crashy = make_settings(services, partitions=1, batch_size=50, **redis_target)
    ensure_topics(crashy)
    ds = datasets.completejourney(households=120).head(30_000)
    with EventProducer(crashy) as p:
        replay(ds, p, progress=False)
    client = connect(crashy)
    store_catalog(crashy, ds)
    rng = random.Random(7)
    keys = Keys.for_settings(crashy)
    kills = 0

    def finished() -> bool:  # every event's state and outputs done (one cheap command)
        done = client.hget(keys.applied_positions(), f"{crashy.kafka.topic_events}:0")
        return done is not None and int(done) >= len(ds.events) - 1

    for _ in range(4):
        if finished():  # a fast consumer got through before a kill: nothing left to kill it in
            break
        started = client.zcard(keys.popularity())
        proc = _consumer(crashy, tmp_path / "crashy.log")
        # let it join the group and get some way into the data, then kill it mid-flight
        # (cheap commands: scanning the whole state would take longer than the consumer needs)
        wait_for(lambda p=proc, n=started: client.zcard(keys.popularity()) > n or p.poll() is not None
                 or finished(), 60, "the consumer to start applying", interval=0.05)
        time.sleep(rng.uniform(0.01, 0.12))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    assert purchases_in(client, crashy.redis.prefix) < len(ds.events), "the kills came too late to test anything"
    proc = _consumer(crashy, tmp_path / "crashy.log")
    try:
        wait_for(lambda: purchases_in(client, crashy.redis.prefix) == len(ds.events), 180, "the restart to finish",
                 interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "crashy.log").read_text()[-3000:]

    # what the stream derived (recommendations, feedback decisions, item deltas): exactly once in effect
    assert_outputs_exactly_once(crashy, client, ds)
    # Not vacuous: some kill fell between a state write and the point where its outputs were done
    # (recorded in Redis' applied positions), so a restart consumed events whose state was written,
    # skipped them in the state and derived their outputs again.
    replayed = sum(int(n) for n in re.findall(r"skipped (\d+) already-applied events",
                                                   (tmp_path / "crashy.log").read_text()))
    assert replayed > 0, "no kill fell between a state write and its outputs"

    crashed_state, clean_state = _and_one_clean_pass(client, crashy, ds)
    assert crashed_state.keys() == clean_state.keys()
    assert crashed_state == clean_state


@pytest.mark.slow
@on_one_redis_and_a_cluster
def test_two_processes_split_partitions_and_totals_are_exact(services, tmp_path, redis_target):
    s = make_settings(services, partitions=4, batch_size=400, **redis_target)
    ensure_topics(s)
    ds = datasets.completejourney(households=80).head(15_000)
    store_catalog(s, ds)  # the affinities need item metadata as each event is applied
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_consumer(s, logs[0]), _consumer(s, logs[1])]
    try:
        time.sleep(4)
        with EventProducer(s) as p:
            replay(ds, p, progress=False, rate=4000)
        client = connect(s)
        wait_for(lambda: purchases_in(client, s.redis.prefix) >= len(ds.events), 180, "both consumers to finish",
                 interval=0.5)
        time.sleep(2)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    # each process was assigned (and consumed from) some of the events partitions
    for log in logs:
        text = log.read_text()
        assert f"assigned {s.kafka.topic_events}[" in text or f", {s.kafka.topic_events}[" in text, text[-2000:]
    state = dump_state(client, s.redis.prefix)
    assert purchases_in(client, s.redis.prefix) == len(ds.events)
    per_user = ds.events.groupby("user_id").size()
    for uid, n in per_user.items():
        key = next(k for k in state if k.endswith(f":{uid}:s") and "{u:" in k)
        assert state[key]["state"]["counts"]["purchase"] == n
    pop_key = next(k for k in state if k.endswith("{g}:pop"))
    assert set(state[pop_key]) == set(ds.events.item_id)
    # what the two processes derived from their partitions: outputs exactly once, and every user's
    # state that of one process consuming everything
    assert_outputs_exactly_once(s, client, ds)
    _assert_users_as_one_pass(client, s, ds)


def _and_one_clean_pass(client, s, ds):
    """Every key under ``s``'s prefix, and under the prefix of a clean single-consumer pass over the same
    topics (a group of its own), each without its prefix."""
    clean = s.replace(redis_prefix=s.redis.prefix + "c", group_state=s.stream.group + "-clean")
    store_catalog(clean, ds)
    consume_until(clean, len(ds.events) + len(ds.items))
    return ({k.split(":", 1)[1]: v for k, v in dump_state(client, s.redis.prefix).items()},
            {k.split(":", 1)[1]: v for k, v in dump_state(client, clean.redis.prefix).items()})


def _assert_users_as_one_pass(client, s, ds):
    """Every user's state under ``s`` equals a clean single-consumer pass's (a user's events are on one
    partition, in order); the item sets, sums whose order across partitions differs, have the same members."""
    split, whole = _and_one_clean_pass(client, s, ds)
    users = sorted(k for k in whole if k.startswith("{u:") and k.endswith(":s"))
    assert len(users) == ds.events.user_id.nunique()
    assert {k: split.get(k) for k in users} == {k: whole[k] for k in users}
    assert split["{g}:pop"].keys() == whole["{g}:pop"].keys()


@pytest.mark.slow
@on_one_redis_and_a_cluster
def test_partitions_revoked_while_their_events_wait_are_written_before_the_commit(services, tmp_path, redis_target):
    # A write-behind window of 3 s: whatever the first consumer holds when the second joins the group is
    # still waiting in its memory, and the revocation must write it before the offsets are committed.
    s = make_settings(services, partitions=4, batch_size=200, state_flush_ms=3000, **redis_target)
    ensure_topics(s)
    ds = datasets.completejourney(households=50).head(10_000)
    store_catalog(s, ds)
    client = connect(s)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [_consumer(s, logs[0])]
    rebalanced = threading.Event()
    producing = threading.Thread(target=_replay_slowly_until, args=(s, ds, rebalanced))
    try:
        wait_for(lambda: "assigned" in logs[0].read_text(), 60, "the first consumer's assignment")
        producing.start()
        # the second joins once the first holds state of its own: the rebalance comes mid-stream
        wait_for(lambda: client.zcard(Keys.for_settings(s).popularity()) > 0, 60, "the first consumer's first write")
        procs.append(_consumer(s, logs[1]))
        wait_for(lambda: "assigned" in logs[1].read_text(), 60, "the second consumer's assignment")
        assert producing.is_alive(), "the events ran out before the rebalance: nothing waited at the revoke"
        rebalanced.set()
        producing.join(120)
        wait_for(lambda: purchases_in(client, s.redis.prefix) >= len(ds.events), 180, "both consumers to finish",
                 interval=0.5)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    first = logs[0].read_text()
    # not vacuous: the first consumer's partitions were revoked while events of theirs waited unwritten,
    # mid-stream (it was assigned partitions again afterwards), not only at its shutdown
    wrote = re.search(r"revoke: wrote the state of [1-9]\d* waiting events before the commit", first)
    assert wrote is not None, first[-3000:]
    assert first.rfind("assigned") > wrote.start(), first[-3000:]
    assert "assigned" in logs[1].read_text()
    assert_outputs_exactly_once(s, client, ds)
    _assert_users_as_one_pass(client, s, ds)


# A consumer that kills itself inside a write-behind flush: ``when`` is "items" (the batch's item sets
# are written, its users are not) or "users" (both written, no output derived yet); on the Nth flush.
_KILLED_MID_FLUSH = """
import os, signal, sys
from fusionrec.apps.cli import main
from fusionrec.streams.state import StateStore
when, nth = sys.argv[1], int(sys.argv[2])
apply_users = StateStore._apply_users
calls = 0
def crashing(self, *args, **kwargs):
    global calls
    calls += 1
    if when == "items" and calls == nth:
        print("killed between the item and the user writes", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    apply_users(self, *args, **kwargs)
    if when == "users" and calls == nth:
        print("killed after the user writes", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
StateStore._apply_users = crashing
sys.exit(main(["consume", "--no-metrics"]))
"""


@pytest.mark.slow
@on_one_redis_and_a_cluster
def test_sigkill_mid_flush_then_restart_equals_one_clean_pass(services, tmp_path, redis_target):
    s = make_settings(services, partitions=1, batch_size=100, state_flush_ms=10, **redis_target)
    ensure_topics(s)
    ds = datasets.completejourney(households=60).head(5_000)
    with EventProducer(s) as p:
        replay(ds, p, progress=False)
    client = connect(s)
    store_catalog(s, ds)
    script = tmp_path / "killed_mid_flush.py"
    script.write_text(_KILLED_MID_FLUSH)
    log_path = tmp_path / "consumer.log"
    for when, nth in (("items", 3), ("users", 2)):
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, str(script), when, str(nth)], env=env_for(s), stdout=log,
                                    stderr=subprocess.STDOUT)
            assert proc.wait(120) == -signal.SIGKILL, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert text.count("killed between the item and the user writes") == 1
    assert text.count("killed after the user writes") == 1
    assert purchases_in(client, s.redis.prefix) < len(ds.events), "the kills came after the last event"
    proc = _consumer(s, log_path)
    try:
        wait_for(lambda: purchases_in(client, s.redis.prefix) == len(ds.events), 180, "the restart to finish",
                 interval=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    assert_outputs_exactly_once(s, client, ds)

    crashed_state, clean_state = _and_one_clean_pass(client, s, ds)
    assert crashed_state.keys() == clean_state.keys()
    assert crashed_state == clean_state
