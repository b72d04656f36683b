"""Redis going away mid-stream: the consumer and the learner retry with back-off, lose nothing, and never die."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import _stop, redis_url, start_redis
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.online.learning.loop import LearnerLoop
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import SnapshotLog, covers, make_settings, purchases_in, wait_for


def test_consumer_survives_a_redis_restart_without_loss(services, tmp_path):
    redis_info = start_redis(tmp_path, "aof")
    s = make_settings(services, redis_url=redis_url(redis_info), batch_size=200,
                      retry_max_backoff_s=1.0)
    ensure_topics(s)
    ds = datasets.completejourney(households=50).head(10_000)
    total = len(ds.events) + len(ds.items)
    metrics = Metrics(CollectorRegistry())
    pipeline = StatePipeline(s, metrics=metrics)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.consumer.run, args=(stop, lambda: pipeline.consumer.consumed >= total))
    worker.start()
    half = len(ds.events) // 2
    later = datasets.Dataset(ds.name, ds.events.iloc[half:].reset_index(drop=True), ds.items)
    try:
        with EventProducer(s) as p:
            replay(ds, p, progress=False, events=False)  # the whole catalog
            replay(ds.head(half), p, progress=False, catalog=False, rate=3000)
            # the consumer is running and has the first half; Redis shuts down (AOF flushed) while the
            # second half flows, and comes back 3 s after it was published
            wait_for(lambda: pipeline.consumer.consumed >= len(ds.items) + half, 60, "the first half consumed")
            _stop(redis_info)
            replay(later, p, progress=False, catalog=False, rate=3000)
            time.sleep(3)
            assert worker.is_alive()
            redis_info = start_redis(tmp_path, "aof", port=redis_info.port)
        worker.join(120)
        assert not worker.is_alive(), "consumer did not finish after Redis came back"
        assert purchases_in(connect(s), s.redis.prefix) == len(ds.events)
        assert sum(sample.value for m in metrics.registry.collect() if m.name == "fusionrec_stream_retries"
                   for sample in m.samples if sample.name.endswith("_total")) > 0
    finally:
        stop.set()
        worker.join(30)
        _stop(redis_info)


def _learner_on_its_own_redis(services, tmp_path):
    """A Redis (AOF) of the test's own, and learner settings on it."""
    redis_info = start_redis(tmp_path, "aof")
    s = make_settings(services, redis_url=redis_url(redis_info), batch_size=100,
                      retry_max_backoff_s=1.0, learn_vectors=False, learn_checkpoint_s=0.2)
    ensure_topics(s)
    return redis_info, s


def _running(loop: LearnerLoop) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    return stop, worker


def _back_after(seconds: float, tmp_path, redis_info, worker: threading.Thread):
    """Redis stays down ``seconds`` (the learner must outlive it), then restarts on its port."""
    time.sleep(seconds)
    assert worker.is_alive(), "the learner exited while Redis was down"
    return start_redis(tmp_path, "aof", port=redis_info.port)


def test_learner_survives_a_redis_restart_and_checkpoints_everything(services, tmp_path):
    redis_info, s = _learner_on_its_own_redis(services, tmp_path)
    log = SnapshotLog(s, users=40)
    log.publish(10)
    metrics = Metrics(CollectorRegistry())
    stop, worker = _running(LearnerLoop(s, metrics))
    client = connect(s)
    try:
        wait_for(lambda: covers(s, client, 10 * 40), 60, "a checkpoint of the first rounds")
        # Redis goes away for longer than the client's own retries while decisions keep arriving
        _stop(redis_info)
        log.publish(10)
        redis_info = _back_after(4, tmp_path, redis_info, worker)
        client = connect(s)
        wait_for(lambda: covers(s, client, 20 * 40), 60, "a checkpoint of every round after Redis came back")
        assert worker.is_alive()
        retries = sum(sample.value for m in metrics.registry.collect() if m.name == "fusionrec_stream_retries"
                      for sample in m.samples if sample.name.endswith("_total"))
        assert retries > 0
    finally:
        stop.set()
        worker.join(30)
        _stop(redis_info)


def test_a_learner_starting_while_redis_is_down_waits_for_it(services, tmp_path):
    """A learner (re)started during a Redis restart retries taking the lease instead of exiting."""
    redis_info, s = _learner_on_its_own_redis(services, tmp_path)
    SnapshotLog(s, users=20).publish(5)
    loop = LearnerLoop(s, Metrics(CollectorRegistry()))
    _stop(redis_info)
    stop, worker = _running(loop)
    try:
        redis_info = _back_after(3, tmp_path, redis_info, worker)
        client = connect(s)
        wait_for(lambda: covers(s, client, 5 * 20), 60, "a checkpoint once Redis is back")
        assert worker.is_alive()
    finally:
        stop.set()
        worker.join(30)
        _stop(redis_info)
