"""Prometheus metrics: each component declares its own :class:`MetricSet`; a process's
:class:`Metrics` holds its registry and creates each set on it once.

Names follow ``fusionrec_<subsystem>_<name>_<unit>``; labels are low-cardinality (topic, event type,
reason, partition), never user or item ids. Tests pass a fresh ``CollectorRegistry``. The embedding
pool runs in prometheus_client's multi-process mode (:func:`enable_multiprocess`): its supervisor
serves one ``/metrics`` adding up every worker process, and each gauge says how its per-process
values combine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server, values
from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000)


class ConsumerLag:
    """Consumer lag per topic/partition, from the high watermarks that come back with fetches.

    A gauge (summed over live processes in multi-process mode: a partition belongs to one consumer
    at a time, and a partition given up is set to 0 before it is dropped, so the sum stays right).
    """

    def __init__(self, gauge: Gauge) -> None:
        self._lock = threading.Lock()
        self._lag: dict[tuple[str, int], int] = {}
        self.gauge = gauge

    def record(self, topic: str, partition: int, high_watermark: int, next_offset: int) -> None:
        lag = max(0, high_watermark - next_offset)
        with self._lock:
            self._lag[(topic, partition)] = lag
        self.gauge.labels(topic, str(partition)).set(lag)

    def forget(self, topic: str, partition: int) -> None:
        with self._lock:
            known = self._lag.pop((topic, partition), None) is not None
        if known:
            self.gauge.labels(topic, str(partition)).set(0)
            if values.ValueClass is values.MutexValue:  # multi-process mode keeps the 0 (removal unsupported)
                self.gauge.remove(topic, str(partition))

    def total(self) -> int:
        with self._lock:
            return sum(self._lag.values())

    def collect(self) -> Iterable[Metric]:
        return self.gauge.collect()


def enable_multiprocess(directory: str) -> None:
    """Put this process and the processes it spawns from now on in prometheus_client's multi-process mode.

    Metrics created afterwards write their values to files in ``directory`` (which must be empty and
    private to one pool); :func:`serve_multiprocess` adds them up at scrape time. The environment
    variable is how prometheus_client tells spawned children; this process switches directly.
    """
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()


def serve_multiprocess(host: str, port: int, directory: str) -> None:
    """Expose ``/metrics`` aggregated over every process writing to ``directory``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    start_http_server(port, addr=host, registry=registry)
    log.info("metrics (all pool processes) on http://%s:%d/metrics", host, port)


def process_exited(pid: int, directory: str) -> None:
    """Drop a dead process's live gauges from the aggregate."""
    multiprocess.mark_process_dead(pid, directory)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as its component declares it; created on a registry by :class:`MetricSet`."""

    kind: str  # counter | gauge | histogram
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str = "all"  # gauges: how per-process values combine in multi-process mode

    def create(self, registry: CollectorRegistry) -> Any:
        if self.kind == "counter":
            return Counter(self.name, self.doc, list(self.labels), registry=registry)
        if self.kind == "histogram":
            return Histogram(self.name, self.doc, list(self.labels), registry=registry,
                             buckets=self.buckets or LATENCY_BUCKETS)
        mode: Any = self.multiprocess_mode
        return Gauge(self.name, self.doc, list(self.labels), registry=registry, multiprocess_mode=mode)

    @property
    def exported_name(self) -> str:
        """The name a scrape shows (counters get ``_total``)."""
        return self.name if self.kind != "counter" or self.name.endswith("_total") else self.name + "_total"


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    return MetricSpec("counter", name, doc, labels)


def gauge(name: str, doc: str, labels: tuple[str, ...] = (), multiprocess_mode: str = "all") -> Any:
    return MetricSpec("gauge", name, doc, labels, multiprocess_mode=multiprocess_mode)


def histogram(name: str, doc: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Any:
    return MetricSpec("histogram", name, doc, labels, buckets)


class MetricSet:
    """A component's metrics, declared as class attributes with :func:`counter`, :func:`gauge` and
    :func:`histogram`; an instance holds them created on one registry (get it with :meth:`Metrics.of`).

    >>> class WriterMetrics(MetricSet):
    ...     written = counter("fusionrec_recs_written_total", "Recommendation lists written")
    >>> Metrics().of(WriterMetrics).written.inc()
    """

    component: str = ""  # shown in the generated reference

    def __init__(self, registry: CollectorRegistry) -> None:
        for attr, spec in self.specs().items():
            setattr(self, attr, spec.create(registry))

    @classmethod
    def specs(cls) -> dict[str, MetricSpec]:
        found: dict[str, MetricSpec] = {}
        for klass in reversed(cls.__mro__):
            found.update({k: v for k, v in vars(klass).items() if isinstance(v, MetricSpec)})
        return found


M = TypeVar("M", bound=MetricSet)


class Metrics:
    """A process's registry and the metric sets its components registered on it (one each).

    Components take the process's ``Metrics`` and ask it for their own set; tests pass a fresh
    ``CollectorRegistry``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._sets: dict[type[MetricSet], MetricSet] = {}
        self._lock = threading.Lock()

    def of(self, kind: type[M]) -> M:
        """The component's metric set on this registry, created on first use."""
        with self._lock:
            if kind not in self._sets:
                self._sets[kind] = kind(self.registry)
            return cast(M, self._sets[kind])

    def serve(self, host: str, port: int) -> None:
        """Expose ``/metrics`` over HTTP in a daemon thread (port 0 disables)."""
        if port:
            try:
                start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:  # a busy port costs the process its /metrics, not its work
                log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
                return
            log.info("metrics on http://%s:%d/metrics", host, port)
