"""Consumer processes killed with SIGKILL, and two processes sharing a group, on real services."""

from __future__ import annotations

import random
import re
import signal
import subprocess
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
    make_settings,
    on_one_redis_and_a_cluster,
    purchases_in,
    start_fusionrec,
    store_catalog,
    wait_for,
)


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

    clean = crashy.replace(redis_prefix=crashy.redis.prefix + "c", group_state=crashy.stream.group + "-clean")
    store_catalog(clean, ds)
    consume_until(clean, len(ds.events) + len(ds.items))
    crashed_state = {k.split(":", 1)[1]: v for k, v in dump_state(client, crashy.redis.prefix).items()}
    clean_state = {k.split(":", 1)[1]: v for k, v in dump_state(client, clean.redis.prefix).items()}
    assert crashed_state.keys() == clean_state.keys()
    assert crashed_state == clean_state


@pytest.mark.slow
@on_one_redis_and_a_cluster
def test_two_processes_split_partitions_and_totals_are_exact(services, tmp_path, redis_target):
    s = make_settings(services, partitions=4, batch_size=400, **redis_target)
    ensure_topics(s)
    ds = datasets.completejourney(households=80).head(15_000)
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
    # partitions moved between the processes while users waited to be ranked: outputs exactly once
    assert_outputs_exactly_once(s, client, ds)
