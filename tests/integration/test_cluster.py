"""The pipeline on a real 3-master Redis Cluster: the same results as on one Redis."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fusionrec.apps.services import RedisClusterServices, RunningServices, free_port
from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorStore
from fusionrec.online.learning.checkpoints import CheckpointStore
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import (
    assert_outputs_exactly_once,
    consume_until,
    dump_state,
    make_settings,
    purchases_in,
    start_fusionrec,
    store_catalog,
    wait_for,
)


def _state(settings: Settings) -> dict[str, object]:
    client = connect(settings)
    try:
        prefix, topic = settings.redis.prefix, settings.kafka.topic_events
        state = {key.removeprefix(prefix): value for key, value in dump_state(client, prefix).items()}
        # the applied positions name the events topic, which differs between the two runs
        state[":{g}:applied"] = {f.removeprefix(topic): v for f, v in state.get(":{g}:applied", {}).items()}
        return state
    finally:
        client.close()


def test_stream_state_on_a_cluster_equals_one_redis(services: RunningServices, cluster_settings: Settings):
    single = make_settings(services)
    ensure_topics(single)
    ds = datasets.completejourney(households=20).head(3000)
    for s in (single, cluster_settings):
        with EventProducer(s) as producer:
            replay(ds, producer, progress=False)
        store_catalog(s, ds)
        consume_until(s, len(ds.events) + len(ds.items)).redis.close()
    on_cluster, on_one = _state(cluster_settings), _state(single)
    assert len(on_cluster) > 1000 and on_cluster == on_one


@pytest.mark.slow
def test_the_whole_pipeline_on_a_cluster(services: RunningServices, redis_cluster: RedisClusterServices,
                                         tiny_bert: Callable[..., Path], tmp_path: Path):
    """Replay → consume, embedding workers, learner, trending → the reader API, every process on the cluster."""
    s = make_settings(services, redis_url=redis_cluster.url, embed_model_path=str(tiny_bert()), embed_threads=1,
                      embed_workers=1, learn_checkpoint_s=1.0, learn_reload_s=0.5, trending_flush_s=0.5,
                      trending_window_s=10**7, trending_step_s=10**6)
    ensure_topics(s)
    ds = datasets.completejourney(households=30).head(3000)
    logs = {name: tmp_path / f"{name}.log" for name in ("consume", "embed-workers", "learner", "trending", "serve")}
    procs = {name: start_fusionrec(s, name, *(["--no-progress"] if name == "embed-workers" else ["--no-metrics"]),
                                   stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
             for name in ("consume", "embed-workers", "learner", "trending")}
    client = connect(s)
    keys = Keys.for_settings(s)
    try:
        def running() -> None:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited: {logs[name].read_text()[-3000:]}"

        # In two halves: the first half's users are served lists before the second half's events
        # arrive, so the learner has decisions with outcomes to learn from, whatever the timing.
        half = len(ds.events) // 2
        first, rest = ds.head(half), datasets.Dataset(ds.name, ds.events.iloc[half:].reset_index(drop=True), ds.items)
        with EventProducer(s) as producer:
            replay(first, producer, progress=False)
        wait_for(lambda: (running(), purchases_in(client, s.redis.prefix) == half)[1], 240, "the first half applied",
                 interval=0.5)
        wait_for(lambda: (running(), all(client.exists(keys.user_rec(str(u))) for u in set(first.events.user_id)))[1],
                 120, "the first half's lists", interval=0.5)
        with EventProducer(s) as producer:
            replay(rest, producer, progress=False)

        def vectors() -> int:
            version = VectorStore(client, s, keys).active()
            return VectorStore(client, s, keys).count(version) if version else 0

        for what, cond in (("every event applied", lambda: purchases_in(client, s.redis.prefix) == len(ds.events)),
                           ("every item embedded", lambda: vectors() == len(ds.items)),
                           ("a learner checkpoint", lambda: CheckpointStore(client, s, keys).head() is not None),
                           ("trending lists", lambda: client.zcard(keys.trending()) > 0)):
            wait_for(lambda c=cond: (running(), c())[1], 240, what, interval=0.5)
        api = s.replace(serve_port=free_port())
        procs["serve"] = start_fusionrec(api, "serve", "--no-search-log", stdout=open(logs["serve"], "wb"),  # noqa: SIM115
                                         stderr=subprocess.STDOUT)
        http = httpx.Client(base_url=f"http://127.0.0.1:{api.serve.port}", timeout=30)

        def ready() -> bool:
            try:
                got = http.get("/readyz")
                return got.status_code == 200 and got.json()["model"] > 0
            except httpx.TransportError:
                return False

        wait_for(lambda: (running(), ready())[1], 90, "the API to be ready (Redis and a checkpoint)")
        user, item = str(ds.events.user_id.iloc[-1]), str(ds.events.item_id.iloc[-1])
        recs = http.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
        assert len(recs["items"]) == 5 and recs["model"].startswith("fusion")
        similar = http.get(f"/v1/items/{item}/similar", params={"k": 3}).json()
        assert len(similar["similar"]) == 3
        http.close()
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(60) for name, proc in procs.items()}
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 is its clean exit
    assert codes == {**dict.fromkeys(procs, 0), "serve": -signal.SIGTERM}, \
        {n: logs[n].read_text()[-2000:] for n, c in codes.items() if c}
    for name, log in logs.items():
        assert "Traceback" not in log.read_text(), (name, log.read_text()[-4000:])
    assert_outputs_exactly_once(s, client, ds)
