"""Redis memory against ``maxmemory``, and the writes Redis refused for it, as metrics.

fusionrec's Redis runs with ``maxmemory-policy noeviction`` (``deploy/compose.yaml``): state is never
evicted, so at the limit Redis answers every write ``OOM`` and the consumers retry their batches until
memory is freed. That is the right reaction (nothing is lost, nothing skipped) but a silent one.
:class:`RedisMemoryMonitor` reads ``INFO memory`` and ``INFO errorstats`` of every primary (the one
node of a single Redis) at most every ``FUSIONREC_REDIS_MEMORY_POLL_S`` seconds, on a thread of the
user-state consumer, so ``deploy/prometheus/rules.yml`` can warn before the limit and page at it.

Every consumer replica reports the same figures under the same ``node``: rules take the ``max`` by node.

>>> monitor = RedisMemoryMonitor(connect(settings), Metrics(), interval_s=5.0)   # doctest: +SKIP
>>> monitor.start()                                                             # doctest: +SKIP
>>> monitor.close()                                                             # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis

from fusionrec.core.metrics import Metrics, MetricSet, counter, gauge
from fusionrec.core.scripts import is_cluster

log = logging.getLogger(__name__)


class RedisMemoryMetrics(MetricSet):
    component = "Redis memory (fusionrec.core.redis_memory, refreshed by the user-state consumer)"
    used = gauge("fusionrec_redis_used_memory_bytes", "Memory Redis has allocated (INFO used_memory), per node",
                 ("node",))
    maxmemory = gauge("fusionrec_redis_maxmemory_bytes", "Redis maxmemory per node (0: no limit)", ("node",))
    oom_errors = counter("fusionrec_redis_oom_errors_total",
                         "Commands Redis refused as out of memory (OOM) while this process watched, per node "
                         "(INFO errorstats, every client counted)", ("node",))


@dataclass(frozen=True)
class NodeMemory:
    """One node's figures from ``INFO memory`` and ``INFO errorstats``."""

    used: int
    maxmemory: int
    oom_errors: int  # OOM replies since the server started (or its stats were reset)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> NodeMemory:
        return cls(int(info["used_memory"]), int(info["maxmemory"]),
                   int(info.get("errorstat_OOM", {}).get("count", 0)))


def read_nodes(client: redis.Redis) -> dict[str, NodeMemory]:
    """``host:port`` -> figures, for every primary of a Redis Cluster or the one Redis."""
    if is_cluster(client):
        cluster: Any = client
        return {node.name: NodeMemory.from_info(cluster.info("memory", "errorstats", target_nodes=node))
                for node in cluster.get_primaries()}
    kwargs = client.connection_pool.connection_kwargs
    name = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return {name: NodeMemory.from_info(client.info("memory", "errorstats"))}


class RedisMemoryMonitor:
    """Keeps :class:`RedisMemoryMetrics` up to date from a Redis (or every primary of a cluster).

    :meth:`refresh` reads once; :meth:`start` refreshes every ``interval_s`` on a daemon thread until
    :meth:`close`. A node that left the cluster drops out of the gauges. A failed read (Redis down, or
    an ACL user without ``+info``) keeps the last figures and is logged once until a read succeeds.
    """

    def __init__(self, client: redis.Redis, metrics: Metrics, interval_s: float) -> None:
        self.client = client
        self.metrics = metrics.of(RedisMemoryMetrics)
        self.interval_s = interval_s
        self._oom_seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def refresh(self) -> dict[str, NodeMemory]:
        nodes = read_nodes(self.client)
        m = self.metrics
        for name, node in nodes.items():
            m.used.labels(name).set(node.used)
            m.maxmemory.labels(name).set(node.maxmemory)
            seen = self._oom_seen.get(name, node.oom_errors)  # the first reading is the baseline
            # a count below the last one is a restarted server: all of its count is new
            m.oom_errors.labels(name).inc(node.oom_errors - seen if node.oom_errors >= seen else node.oom_errors)
            self._oom_seen[name] = node.oom_errors
        for gone in self._oom_seen.keys() - nodes.keys():
            del self._oom_seen[gone]
            for metric in (m.used, m.maxmemory, m.oom_errors):
                metric.remove(gone)
        return nodes

    def start(self) -> None:
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="redis-memory", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning("cannot read Redis memory (INFO memory): %s; the fusionrec_redis_* gauges keep "
                                "their last figures", exc)
                self._failing = True
            else:
                self._failing = False
            if self._stop.wait(self.interval_s):
                return
