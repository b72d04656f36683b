"""Redis going away mid-stream: the consumer retries with back-off, loses nothing, and never dies."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry

from fusionrec.apps.pipeline import StatePipeline
from fusionrec.apps.services import _stop, start_redis
from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import make_settings, purchases_in


def test_consumer_survives_a_redis_restart_without_loss(services, tmp_path):
    redis_info = start_redis(tmp_path, "aof")
    s = make_settings(services, redis_url=f"redis://127.0.0.1:{redis_info.port}/0", batch_size=200,
                      retry_max_backoff_s=1.0)
    ensure_topics(s)
    ds = datasets.completejourney(households=50).head(10_000)
    total = len(ds.events) + len(ds.items)
    metrics = Metrics(CollectorRegistry())
    pipeline = StatePipeline(s, metrics=metrics)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.consumer.run, args=(stop, lambda: pipeline.consumer.consumed >= total))
    worker.start()
    try:
        with EventProducer(s) as p:
            replay(ds, p, progress=False, rate=3000)
            # Redis shuts down (AOF flushed) while events keep flowing, and comes back 3 s later.
            _stop(redis_info)
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
