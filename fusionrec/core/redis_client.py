"""Redis connections built from settings: one place for timeouts, retries and the Cluster switch."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from fusionrec.core.errors import ConfigError
from fusionrec.core.settings import Settings


def _options() -> dict[str, Any]:
    return dict(socket_timeout=30.0, socket_connect_timeout=5.0, health_check_interval=30, protocol=2)


def _url(settings: Settings) -> tuple[str, bool]:
    """The configured URL (cluster suffix removed) and whether it names a Redis Cluster."""
    url = settings.redis.url
    if not url:
        raise ConfigError("no Redis configured: set FUSIONREC_REDIS_URL or run `fusionrec up`")
    cluster = url.startswith("redis+cluster://") or url.startswith("rediss+cluster://")
    return (url.replace("+cluster", "", 1) if cluster else url), cluster


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis.url``; ``redis+cluster://`` URLs give a Redis Cluster client.

    Connection-level retries cover short blips; the stream consumer retries whole batches on top.
    """
    url, cluster = _url(settings)
    options = dict(_options(), retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    """An asyncio client for the same URL (the HTTP API's hot path)."""
    from redis.asyncio.retry import Retry as AsyncRetry

    url, cluster = _url(settings)
    options = dict(_options(), retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3))
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.asyncio.Redis.from_url(url, **options)
