"""Real embedded broker + Redis for the whole session; a fresh topic set, group and key prefix per test.

Every test under this folder is marked ``integration`` by ``tests/conftest.py``; helpers are in ``helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from fusionrec.apps.services import EmbeddedServices, RedisClusterServices, RunningServices
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import make_settings


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServices]:
    svc = EmbeddedServices(tmp_path_factory.mktemp("services"))
    running = svc.up(persistence="none")
    try:
        yield running
    finally:
        svc.down()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServices]:
    """A real 3-master Redis Cluster (three redis-server processes), for the whole session."""
    with RedisClusterServices(tmp_path_factory.mktemp("cluster"), masters=3) as cluster:
        yield cluster


@pytest.fixture
def redis_target(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings overrides that put the state on one Redis (default) or on the Redis Cluster; a test
    marked ``@on_one_redis_and_a_cluster`` (tests/integration/helpers.py) runs on both."""
    if getattr(request, "param", "redis") == "redis_cluster":
        return {"redis_url": request.getfixturevalue("redis_cluster").url}
    return {}


@pytest.fixture
def cluster_settings(services: RunningServices, redis_cluster: RedisClusterServices) -> Settings:
    """Fresh topics and key prefix on the embedded broker, state on the Redis Cluster."""
    s = make_settings(services, redis_url=redis_cluster.url)
    ensure_topics(s)
    return s


@pytest.fixture
def settings(services: RunningServices) -> Settings:
    s = make_settings(services)
    ensure_topics(s)
    return s


@pytest.fixture
def rclient(settings: Settings) -> Iterator[redis.Redis]:
    client = connect(settings)
    yield client
    client.close()
