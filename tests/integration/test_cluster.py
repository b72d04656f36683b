"""The pipeline on a real 3-master Redis Cluster: the same results as on one Redis."""

from __future__ import annotations

from fusionrec.apps.services import RunningServices
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, dump_state, make_settings, store_catalog


def _state(settings: Settings) -> dict[str, object]:
    client = connect(settings)
    try:
        prefix = settings.redis.prefix
        return {key.removeprefix(prefix): value for key, value in dump_state(client, prefix).items()}
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
