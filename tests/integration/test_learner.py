"""The learner on the real broker and Redis: end to end, rollback, crash + resume, the fenced lease, hot reload."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import msgspec
import numpy as np
import pytest
import redis

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.features import INDEX
from fusionrec.online.learning.checkpoints import CheckpointStore, LearnerLease, LeaseLostError, ServingModel
from fusionrec.online.learning.feedback import Group, Snapshot, encode_snapshot
from fusionrec.online.learning.learner import Learner, LearnerMetrics
from fusionrec.online.learning.loop import LearnerLoop
from fusionrec.online.learning.model import Rows
from fusionrec.online.learning.search_feedback import KIND_HEADER, KIND_SEARCH, SearchLog, encode_search_log
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.datasets import Dataset, load
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.state import UserTouch
from tests.integration.helpers import (
    SnapshotLog,
    covers,
    make_settings,
    on_one_redis_and_a_cluster,
    pool_with_best,
    read_topic,
    start_fusionrec,
    wait_for,
)


def _groups(n: int, seed: int, invert: bool = False) -> list[Group]:
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        pool, best = pool_with_best(rng, f"u{g}", g)
        y = np.zeros(len(pool))
        y[best] = 1.0
        if invert:  # the worst item by the rule is the "positive"
            y[:] = 0
            y[int(np.argmin(pool.X[:, INDEX["repeat"]] + 2 * (pool.X[:, INDEX["repeat"]] == 0)))] = 1.0
        out.append(Group(pool=pool, y=y, shown=20))
    return out


def test_quality_drop_rolls_back_to_the_previous_checkpoint(settings: Settings, rclient: redis.Redis):
    s = settings.replace(learn_vectors=False, learn_rollback_min_groups=100, learn_checkpoint_s=3600)
    store = CheckpointStore(rclient, s)
    metrics = Metrics()
    learner = Learner(s, store, None, metrics)
    for i in range(4):
        learner.learn(_groups(300, seed=i))
    first = learner.maybe_checkpoint(force=True)
    assert first is not None and learner.last is not None and learner.last.hit_rate > 0.6
    probe = Rows.of_pools([g.pool for g in _groups(20, seed=99)], None)
    good = learner.model.predict(probe).fused
    for i in range(6):  # a bad stream: labels contradict everything learned
        learner.learn(_groups(300, seed=10 + i, invert=True))
    assert not np.allclose(learner.model.predict(probe).fused, good)
    assert learner.maybe_checkpoint(force=True) is None
    assert learner.rollbacks == 1 and metrics.of(LearnerMetrics).learn_rollbacks._value.get() == 1
    assert store.head() == first
    np.testing.assert_array_equal(learner.model.predict(probe).fused, good)


def _examples(settings: Settings, rclient: redis.Redis) -> int:
    ckpt = CheckpointStore(rclient, settings).load()
    return ckpt.model.examples if ckpt else 0


def test_learner_killed_and_restarted_resumes_from_its_checkpoint(settings: Settings, rclient: redis.Redis):
    s = settings.replace(learn_vectors=False, learn_checkpoint_s=0.2, batch_size=200, learn_sampled_negatives=5)
    log = SnapshotLog(s, users=50)
    log.publish(30)
    cmd = ("learner", "--no-metrics")
    first = start_fusionrec(s, *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: covers(s, rclient, 30 * 50), 90, "a checkpoint covering the first 30 rounds")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    rclient.delete(CheckpointStore(rclient, s).keys.learner_lease())  # a dead holder's lease would expire
    at_kill = CheckpointStore(rclient, s).load()
    assert at_kill is not None and at_kill.model.examples > 10_000
    log.publish(30)
    second = start_fusionrec(s, *cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: covers(s, rclient, 60 * 50), 90, "a checkpoint covering all 60 rounds")
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=30)
    assert f"resumed from checkpoint {at_kill.number}".encode() in err
    final = CheckpointStore(rclient, s).load()
    assert final is not None and final.number > at_kill.number
    # One pass learns at most users * labelled decisions * (shown + positive + sampled) rows. Relearning
    # the first 30 rounds on top of the resumed model would exceed that by the examples before the kill.
    assert at_kill.model.examples < final.model.examples <= 50 * 59 * (20 + 1 + 5)
    # the second half was learned: the resumed learner went on from the checkpoint's offsets
    assert final.model.examples - at_kill.model.examples > 0.8 * at_kill.model.examples


def _lapsed(client: redis.Redis, keys: Keys) -> bool:
    return not client.exists(keys.learner_lease())


@on_one_redis_and_a_cluster
def test_a_learner_that_lost_its_lease_cannot_write_a_checkpoint(services, redis_target: dict[str, str]):
    """A learner paused past its lease (here: a short lease left to lapse) while another took over wakes
    up mid-checkpoint: the write is refused, the new owner's head stays, and the loop stops."""
    s = make_settings(services, learn_vectors=False, **redis_target)
    paused = LearnerLoop(s, name="paused", lease_s=0.2)
    successor = LearnerLoop(s, name="successor", lease_s=600)
    try:
        assert paused.lease.take()
        paused.learner.learn(_groups(50, seed=1))
        wait_for(lambda: _lapsed(paused.redis, paused.keys), 30, "the paused learner's lease to lapse")
        with pytest.raises(LeaseLostError, match="is free"):  # lapsed is lost, even before anyone takes it
            paused.learner.maybe_checkpoint(force=True)
        assert successor.lease.take()
        successor.learner.learn(_groups(50, seed=2))
        first = successor.learner.maybe_checkpoint(force=True)
        successor.learner.learn(_groups(50, seed=3))
        theirs = successor.learner.maybe_checkpoint(force=True)
        assert first is not None and theirs is not None
        with pytest.raises(LeaseLostError):
            paused.learner.maybe_checkpoint(force=True)
        with pytest.raises(LeaseLostError):  # nor move the head back
            paused.learner.store.set_head(first)
        store = CheckpointStore(successor.redis, s)
        assert store.head() == theirs and store.numbers() == [first, theirs]  # no blob of the refused save
        assert paused.tick() == {} and paused.finished() and paused.drain() == {}
        assert store.head() == theirs
        store.set_head(first)  # an operator's store has no lease: its writes are not fenced
        assert store.head() == first
    finally:
        paused.close()
        successor.close()


def test_a_learner_whose_lease_was_taken_stands_by_and_resumes_from_the_head(settings: Settings):
    """Losing the lease (a pause, a Redis outage past it) is not the end: the loop drops what it learned
    since its checkpoint, stands by while another holds the lease, then takes it with a new token."""
    loop = LearnerLoop(settings, name="learner", lease_s=600)
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: loop.lease.token is not None, 60, "the lease to be taken")
        first = loop.lease.token
        loop.redis.set(loop.keys.learner_lease(), "other:0", px=2000)  # another learner, gone in 2 s
        wait_for(lambda: loop.lease.token is not None and loop.lease.token > first, 60,
                 "the lease to be taken again")
        assert runner.is_alive() and loop.redis.get(loop.keys.learner_lease()) == f"learner:{loop.lease.token}".encode()
    finally:
        stop.set()
        runner.join(60)
        loop.close()
    assert not runner.is_alive()


@pytest.mark.parametrize("successor", ["other", "learner"], ids=["another learner", "a restart of the same name"])
def test_renewing_does_not_extend_a_lease_another_learner_took(settings: Settings, rclient: redis.Redis,
                                                               successor: str):
    keys = Keys.for_settings(settings)
    paused = LearnerLease(rclient, keys, "learner", ttl_s=0.2)
    taker = LearnerLease(rclient, keys, successor, ttl_s=600)
    assert paused.take()
    wait_for(lambda: _lapsed(rclient, keys), 30, "the first lease to lapse")
    assert taker.take()
    assert not paused.renew() and paused.token is None
    assert rclient.get(keys.learner_lease()) == f"{successor}:{taker.token}".encode()
    assert rclient.pttl(keys.learner_lease()) > 60_000  # a renewal by the paused learner would set 200 ms
    assert taker.renew()


def test_every_take_of_the_lease_draws_a_greater_token(settings: Settings, rclient: redis.Redis):
    keys = Keys.for_settings(settings)
    tokens: list[int] = []
    for name in ("a", "b", "a"):
        lease = LearnerLease(rclient, keys, name, ttl_s=600)
        assert lease.take() and lease.token is not None
        assert rclient.get(keys.learner_lease()) == f"{name}:{lease.token}".encode()
        standby = LearnerLease(rclient, keys, "standby", ttl_s=600)
        assert not standby.take() and standby.token is None and standby.holder == f"{name}:{lease.token}"
        tokens.append(lease.token)
        rclient.delete(keys.learner_lease())  # the lease lapses
    assert tokens[0] < tokens[1] < tokens[2]


def test_hot_reload_reaches_the_writer_within_the_interval(settings: Settings, rclient: redis.Redis):
    s = settings.replace(learn_vectors=False, learn_reload_s=0.5)
    store = CheckpointStore(rclient, s)
    serving = ServingModel(store, s)
    from fusionrec.online.ranking.fusion import FusionRanker

    writer = RecommendationWriter(rclient, s, ranker=FusionRanker(rclient, s, serving))
    rclient.zadd(writer.keys.popularity(), {"p1": 3.0, "p2": 2.0})
    touch = {"u1": UserTouch(recent=[], last_ts=1)}
    writer.refresh(touch)
    reader = RecommendationReader(rclient, s)
    assert reader.top_k("u1").model == "fusion"  # no checkpoint yet: the untrained fusion
    learner = Learner(s, store, None)
    learner.learn(_groups(50, seed=1))
    number = learner.maybe_checkpoint(force=True)
    writer.refresh(touch)  # within the interval the old model may still serve
    time.sleep(s.learn.reload_s)
    writer.refresh(touch)
    assert reader.top_k("u1").model == f"fusion-{number}"


def test_a_segment_served_in_a_parts_order_is_explained_by_that_part(settings: Settings, rclient: redis.Redis):
    from fusionrec.online.learning.choice import OrderChoice
    from fusionrec.online.ranking.fusion import FusionRanker

    s = settings.replace(learn_vectors=False)
    store = CheckpointStore(rclient, s)
    learner = Learner(s, store, None)
    learner.learn(_groups(50, seed=1))
    # users whose pools hold none of their own items (segment 0) are served in river's order
    learner.model.choice = OrderChoice(learner.model.choice.orders, min_decisions=1, z=0.0)
    learner.model.choice.learn(0, {"fusion": False, "river": True})
    learner.maybe_checkpoint(force=True)
    writer = RecommendationWriter(rclient, s, ranker=FusionRanker(rclient, s, ServingModel(store, s)))
    rclient.zadd(writer.keys.popularity(), {f"p{i}": float(10 - i) for i in range(8)})
    writer.refresh({"u1": UserTouch(recent=[], last_ts=1)})
    items = RecommendationReader(rclient, s).top_k("u1").items
    assert len(items) == 8 and all(set(r.sources) == {"river"} for r in items)
    river = [r.sources["river"] for r in items]
    assert river == sorted(river, reverse=True)


@on_one_redis_and_a_cluster
def test_stream_to_learner_to_served_recommendations(services, redis_target: dict[str, str]):
    s = make_settings(services, partitions=2, learn_checkpoint_s=0.5, learn_reload_s=0.2,
                      rec_content_candidates=0, learn_vectors=False, **redis_target)
    from fusionrec.streams.topics import ensure_topics

    ensure_topics(s)
    ds = load("completejourney", households=40).head(6000)
    # In two halves, as a live stream would bring them: the first half's users are served lists
    # before the second half's events (their outcomes) arrive. One backlog consumed at once would be
    # written and ranked in a few large steps, leaving few decisions with outcomes after them.
    half = len(ds.events) // 2
    first, rest = ds.head(half), Dataset(ds.name, ds.events.iloc[half:].reset_index(drop=True), ds.items)
    with EventProducer(s) as producer:
        _, n_first = replay(first, producer, catalog=True)
    stop = threading.Event()
    metrics = Metrics()
    loop = LearnerLoop(s, metrics)
    learner = threading.Thread(target=loop.run, args=(stop,))
    learner.start()
    pipeline = StatePipeline(s, metrics=Metrics())
    consumer = threading.Thread(target=pipeline.consumer.run, args=(stop,))
    consumer.start()
    try:
        client = pipeline.redis
        wait_for(lambda: pipeline.consumer.consumed >= n_first + len(first.items) and not pipeline.handler.floor(),
                 180, "the first half applied and ranked")
        with EventProducer(s) as producer:
            _, n_rest = replay(rest, producer, catalog=False)
        wait_for(lambda: _examples(s, client) > 0 and pipeline.consumer.consumed >= n_first + n_rest + len(first.items),
                 180, "examples learned from the stream")
        # one more batch through the writer picks up the checkpoint
        number = CheckpointStore(client, s).head()
        time.sleep(s.learn.reload_s)
        user = str(ds.events.user_id.iloc[-1])
        pipeline.writer.refresh({user: UserTouch(recent=[], last_ts=int(ds.events.ts.iloc[-1]))})
        recs = RecommendationReader(client, s).top_k(user)
        assert recs.model.startswith("fusion-") and int(recs.model.split("-")[1]) >= (number or 1)
        assert recs.items and all(r.sources for r in recs.items)
        assert set().union(*(r.sources for r in recs.items)) <= {"river", "repeat", "covis", "popular", "trending"}
        assert metrics.of(LearnerMetrics).learn_decisions.labels("labelled")._value.get() > 0
    finally:
        stop.set()
        consumer.join(30)
        learner.join(30)
        pipeline.__exit__(None, None, None)


def test_learner_learns_the_search_mix_from_logged_searches(settings: Settings, rclient: redis.Redis):
    """Users click the result most similar to their query: the learned mix leans on f_query."""
    s = settings.replace(learn_vectors=False, learn_checkpoint_s=0.3)
    rng = np.random.default_rng(7)
    rounds, users = 8, 40
    with EventProducer(s) as producer:
        for r in range(rounds):
            for u in range(users):
                user, ts = f"u{u}", 10_000_000 + r * 10_000
                items = [f"{user}-{r}-{j}" for j in range(10)]
                f_item, f_query = rng.random(10).round(6), rng.random(10).round(6)
                entry = SearchLog(user_id=user, ts=ts, items=items, f_item=f_item.tolist(), f_query=f_query.tolist(),
                                  model=0)
                producer.produce(s.kafka.topic_feedback, encode_search_log(entry), key=user,
                                 headers=[(KIND_HEADER, KIND_SEARCH)])
                pool, _ = pool_with_best(rng, user, ts + 5_000)
                clicked = items[int(np.argmax(f_query))]
                snap = Snapshot.of(pool, list(range(len(pool))), 20, [("click", clicked, ts + 4_000)], [], 0, 0)
                producer.produce(s.kafka.topic_feedback, encode_snapshot(snap), key=user)
            if r == 0:  # bad messages amid the good ones: dead letters, and the loop learns on
                for raw, headers in _bad_feedback(snap, entry):
                    producer.produce(s.kafka.topic_feedback, raw, key="bad", headers=headers)
    metrics = Metrics()
    loop = LearnerLoop(s, metrics)
    stop = threading.Event()
    done = lambda lp: lp.searches.outcomes["labelled"] >= rounds * users  # noqa: E731
    worker = threading.Thread(target=loop.run, args=(stop, done))
    worker.start()
    worker.join(120)
    stop.set()
    worker.join(30)
    ckpt = CheckpointStore(rclient, s).load()
    assert ckpt is not None
    mix = ckpt.model.search
    assert mix.examples == rounds * users * 10
    assert metrics.of(LearnerMetrics).learn_search_examples._value.get() == rounds * users * 10
    assert mix.beta > mix.alpha + 0.5, mix.weights()
    dead = read_topic(s, s.dlq_topic(s.kafka.topic_feedback), until=lambda got: len(got) >= 6, timeout=30)
    assert sorted(dict(m.headers())["fusionrec.dlq.reason"].decode() for m in dead) == [
        "empty", "invalid_value", "invalid_value", "non_finite", "undecodable", "undecodable"]


def _bad_feedback(snap: Snapshot, entry: SearchLog) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    search = [(KIND_HEADER, KIND_SEARCH)]
    return [(b"", []), (b"\xc1 not msgpack", []),
            (b"\x9c" + b"\x91" * 3000 + b"\xc0", []),  # a decision whose first field nests 3,000 arrays deep
            (encode_snapshot(msgspec.structs.replace(snap, X=snap.X[:-2])), []),  # features for fewer items
            (encode_search_log(msgspec.structs.replace(entry, f_item=entry.f_item[:-1])), search),
            (encode_search_log(msgspec.structs.replace(entry, f_query=[float("nan")] * len(entry.f_query))), search)]
