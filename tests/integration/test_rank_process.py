"""The ranking stage in a process of its own (:mod:`fusionrec.online.ranking.process`), on the real
broker and Redis: it writes what the in-process writer writes, comes back after being killed, never
outlives the consuming process, and a pipeline whose ranking process is killed mid-run derives every
output exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any

import msgspec
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.online.learning.feedback import Encoded, Snapshot, decode_snapshot, encode_feedback
from fusionrec.online.ranking.process import RankProcess, RankProcessLost
from fusionrec.online.ranking.scheduler import SchedulerMetrics
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.streams import datasets
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.state import Positioned, StateStore, UserTouch
from tests.integration.helpers import (
    assert_outputs_exactly_once,
    drive,
    env_for,
    make_settings,
    preloaded,
    store_catalog,
    wait_for,
)


def _applied(s: Any, rclient: redis.Redis, n_events: int) -> tuple[datasets.Dataset, dict[str, UserTouch]]:
    """A Complete Journey slice applied to Redis by the state store; the touches its batch reports."""
    ds = datasets.completejourney(households=20).head(n_events)
    store_catalog(s, ds)
    store = StateStore(rclient, s)
    from fusionrec.streams.contract import UserEvent
    events = [Positioned(0, i, msgspec.convert(ev, UserEvent)) for i, ev in enumerate(ds.user_events())]
    return ds, store.apply(events).users


def _lists(rclient: redis.Redis, keys: Keys, users: list[str]) -> dict[str, Any]:
    out = {}
    for uid in users:
        raw = rclient.get(keys.user_rec(uid))
        assert raw is not None, f"no list for {uid}"
        recs = msgspec.json.decode(raw)
        recs.pop("generated_at")
        out[uid] = recs
    return out


def _decisions(messages: list[Encoded]) -> list[tuple[str, dict[int, int], Snapshot]]:
    """Decoded decisions with the wall-clock field taken out (the only one two rankings may differ in)."""
    return [(key, first, msgspec.structs.replace(decode_snapshot(value), logged_at=0))
            for value, key, first in messages]


def test_the_process_writes_what_the_writer_writes(services, rclient: redis.Redis):
    s = make_settings(services)
    keys = Keys.for_settings(s)
    _ds, touches = _applied(s, rclient, 2_000)
    users = sorted(touches)
    assert len(users) >= 10

    in_thread: list[Snapshot] = []
    RecommendationWriter(rclient, s, sink=in_thread.extend).refresh(touches)
    expected_lists = _lists(rclient, keys, users)
    expected = _decisions(encode_feedback(in_thread))
    for uid in users:
        rclient.delete(keys.user_rec(uid))

    published: list[Encoded] = []
    metrics = Metrics()
    proc = RankProcess(s, metrics, sink=published.extend)
    try:
        assert proc.pid is not None and proc.pid != os.getpid()
        assert proc.refresh(touches) == len(users)
    finally:
        proc.close()
    assert _lists(rclient, keys, users) == expected_lists
    assert _decisions(published) == expected
    # the child's metrics are scraped through this process's registry
    assert metrics.registry.get_sample_value("fusionrec_recs_written_total") == len(users)


def test_two_processes_write_what_the_writer_writes_each_ranking_a_share(services, rclient: redis.Redis):
    s = make_settings(services)
    keys = Keys.for_settings(s)
    _ds, touches = _applied(s, rclient, 2_000)
    users = sorted(touches)
    in_thread: list[Snapshot] = []
    RecommendationWriter(rclient, s, sink=in_thread.extend).refresh(touches)
    expected_lists = _lists(rclient, keys, users)
    expected = sorted(_decisions(encode_feedback(in_thread)), key=lambda d: d[0])
    for uid in users:
        rclient.delete(keys.user_rec(uid))

    published: list[Encoded] = []
    metrics = Metrics()
    proc = RankProcess(s, metrics, sink=published.extend, processes=2)
    try:
        assert proc.parallel == 2 and len({*proc.pids, os.getpid()}) == 3
        shares = proc._split(touches)
        # whole buckets per child, both children busy
        assert sorted(shares) == [0, 1] and abs(len(shares[0]) - len(shares[1])) <= len(users) // 2
        assert not {keys.bucket(u) for u in shares[0]} & {keys.bucket(u) for u in shares[1]}
        assert proc.refresh(touches) == len(users)
        # ingest first: each child runs FUSIONREC_REC_NICE below this process's priority
        assert s.rec.nice == 10
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in proc.pids if pid] == [os.getpriority(
            os.PRIO_PROCESS, 0) + s.rec.nice] * 2
    finally:
        proc.close()
    assert _lists(rclient, keys, users) == expected_lists
    assert sorted(_decisions(published), key=lambda d: d[0]) == expected
    # each child's metrics, labelled with its index, in one family per name
    written = [metrics.registry.get_sample_value("fusionrec_recs_written_total", {"ranker": r}) for r in ("0", "1")]
    assert written == [len(shares[0]), len(shares[1])]
    families = [f.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())]
    assert len(families) == len(set(families))


def test_one_of_two_processes_killed_loses_the_whole_chunk_and_is_replaced(services, rclient: redis.Redis):
    s = make_settings(services)
    _ds, touches = _applied(s, rclient, 1_000)
    published: list[Encoded] = []
    proc = RankProcess(s, sink=published.extend, processes=2)
    try:
        assert proc.refresh(touches) == len(touches)
        victim = proc.pids[1]
        assert victim is not None
        _killed_then_lost(proc, victim, touches)
        # the surviving child's decisions of that chunk were not published: the retry ranks every user
        assert len(published) == len(touches)
        assert proc.refresh(touches) == len(touches)
        assert proc.started == 3 and proc.pids[1] not in (None, victim) and _alive(proc.pids[0] or 0)
    finally:
        proc.close()
    assert len(published) == 2 * len(touches)


def test_a_killed_process_is_reported_lost_and_replaced(services, rclient: redis.Redis):
    s = make_settings(services)
    keys = Keys.for_settings(s)
    _ds, touches = _applied(s, rclient, 1_000)
    published: list[Encoded] = []
    proc = RankProcess(s, sink=published.extend)
    try:
        first = proc.pid
        assert first is not None
        assert proc.refresh(touches) == len(touches)
        _killed_then_lost(proc, first, touches)
        assert proc.refresh(touches) == len(touches)  # a new child
        assert proc.started == 2 and proc.pid not in (None, first)
    finally:
        proc.close()
    assert len(published) == 2 * len(touches)
    assert all(rclient.exists(keys.user_rec(u)) for u in touches)


def test_a_process_killed_while_starting_is_replaced(services, rclient: redis.Redis):
    s = make_settings(services)
    _ds, touches = _applied(s, rclient, 300)
    proc = RankProcess(s)  # spawned, still importing
    try:
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        try:
            proc.refresh(touches)
            raise AssertionError("a process killed while starting answered")
        except RankProcessLost as exc:
            assert "starting" in str(exc)
        assert proc.refresh(touches) == len(touches)
        assert proc.started == 2
    finally:
        proc.close()


def test_an_error_in_the_child_comes_back_as_itself(services, rclient: redis.Redis):
    s = make_settings(services)
    _ds, touches = _applied(s, rclient, 500)
    proc = RankProcess(s)
    try:
        # a read-only replica would refuse the write the same way: the child's error, with its type
        rclient.config_set("min-replicas-to-write", 1)
        try:
            proc.refresh(touches)
            raise AssertionError("the write was not refused")
        except redis.ResponseError as exc:  # the stream's retry loop treats it as transient
            assert "NOREPLICAS" in str(exc)
        finally:
            rclient.config_set("min-replicas-to-write", 0)
        assert proc.refresh(touches) == len(touches)
        assert proc.started == 1  # an error is not a lost process
    finally:
        proc.close()


def test_the_process_never_outlives_the_consuming_process(services, tmp_path):
    s = make_settings(services)
    script = textwrap.dedent("""
        import sys, time
        from fusionrec.core.settings import Settings
        from fusionrec.online.ranking.process import RankProcess
        proc = RankProcess(Settings.from_env())
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], env=env_for(s), stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    wait_for(lambda: not _alive(child), 15, "the ranking process to exit after its parent was killed")


def test_a_pipeline_whose_ranking_process_is_killed_derives_outputs_exactly_once(services, rclient: redis.Redis):
    s = make_settings(services, partitions=2, batch_size=300, rec_debounce_ms=0, state_flush_ms=40,
                      rec_processes=Settings().rec.processes)
    assert s.rec.process and s.rec.processes == 2
    ds = preloaded(s)
    metrics = Metrics()
    pipeline = StatePipeline(s, metrics=metrics)
    assert isinstance(pipeline.writer, RankProcess)
    writer = pipeline.writer
    refresh, kills = writer.refresh, []

    def killing(users: dict[str, UserTouch]) -> int:
        # the child is killed 20 ms into the first ranking (the thread's, or the final flush's): lists
        # may be written, decisions not sent back (or, had it answered by then, the next call finds it dead)
        pid = writer.pid
        if not kills and pid is not None:
            threading.Timer(0.02, os.kill, (pid, signal.SIGKILL)).start()
            kills.append(pid)
        return refresh(users)

    writer.refresh = killing  # type: ignore[method-assign]
    writer.wait_ready()  # spawned with the pipeline: killed while ranking, not while starting
    drive(pipeline, len(ds.events))
    assert len(kills) == 1 and writer.started >= writer.parallel + 1, "the ranking process was not killed and replaced"
    assert metrics.registry.get_sample_value("fusionrec_recs_rank_process_starts_total") == writer.started
    # one scrape shows the child's metrics beside the consumer's, each family once
    families = [f.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())]
    assert "fusionrec_recs_rank_seconds" in families and "fusionrec_stream_events" in families
    assert len(families) == len(set(families))
    assert metrics.of(StreamMetrics).retries.labels("rank")._value.get() >= 1
    assert metrics.of(SchedulerMetrics).recs_dirty._value.get() == 0
    assert not any(_alive(pid) for pid in kills)
    assert_outputs_exactly_once(s, rclient, ds)


def _killed_then_lost(proc: RankProcess, pid: int, touches: dict[str, UserTouch]) -> None:
    """SIGKILL one of ``proc``'s children; the next ranking reports it gone."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), 10, "the ranking process to die")
    try:
        proc.refresh(touches)
        raise AssertionError("a dead ranking process answered")
    except RankProcessLost as exc:
        assert "gone" in str(exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


