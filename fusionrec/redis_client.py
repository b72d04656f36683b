"""Redis connections built from settings: one place for timeouts, retries and the Cluster switch."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from fusionrec.errors import ConfigError
from fusionrec.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url``; ``redis+cluster://`` URLs give a Redis Cluster client.

    Connection-level retries cover short blips; the stream consumer retries whole batches on top.
    """
    url = settings.redis_url
    if not url:
        raise ConfigError("no Redis configured: set FUSIONREC_REDIS_URL or run `fusionrec up`")
    options = dict(socket_timeout=30.0, socket_connect_timeout=5.0, health_check_interval=30,
                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3), protocol=2)
    if url.startswith("redis+cluster://") or url.startswith("rediss+cluster://"):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)
