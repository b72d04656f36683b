"""Publish a dataset as contract events, catalog first, then user actions in event-time order.

Pacing: ``rate`` caps events per second (0 = as fast as the broker takes them); ``speedup`` replays
event time ``speedup`` times faster than it happened (0 = ignore event time). With both, the slower
of the two wins.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from fusionrec.streams.datasets import Dataset
from fusionrec.streams.producer import EventProducer

log = logging.getLogger(__name__)


class Pacer:
    """Sleeps just enough to honour an events/s cap and an event-time speed-up.

    It sleeps only once it is at least ``quantum_s`` ahead, so events leave in short bursts: a sleep
    per event would cost the producer more CPU than the event itself at thousands of events/s. No
    event is ever sent early by more than that quantum.
    """

    def __init__(self, rate: float = 0.0, speedup: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, quantum_s: float = 0.002) -> None:
        if rate < 0 or speedup < 0 or quantum_s < 0:
            raise ValueError("rate, speedup and quantum_s must be >= 0")
        self.rate, self.speedup, self.quantum_s = rate, speedup, quantum_s
        self._clock, self._sleep = clock, sleep
        self._start: float | None = None
        self._first_ts: int | None = None
        self._sent = 0

    def wait(self, ts_ms: int) -> None:
        now = self._clock()
        if self._start is None:
            self._start, self._first_ts = now, ts_ms
        due = self._start
        if self.rate:
            due = max(due, self._start + self._sent / self.rate)
        if self.speedup and self._first_ts is not None:
            due = max(due, self._start + (ts_ms - self._first_ts) / 1000.0 / self.speedup)
        if due > now and due - now >= self.quantum_s:
            self._sleep(due - now)
        self._sent += 1


def replay(dataset: Dataset, producer: EventProducer, *, limit: int | None = None, rate: float = 0.0,
           speedup: float = 0.0, catalog: bool = True, events: bool = True, progress: bool = True,
           on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[int, int]:
    """Publish the catalog, then up to ``limit`` user events; returns (catalog, events) published."""
    data = dataset.head(limit)
    producer.connect()
    n_catalog = 0
    if catalog and len(data.items):
        first_ts = int(data.events.ts.iloc[0]) if len(data.events) else int(time.time() * 1000)
        for ev in _bar(data.catalog_events(first_ts), len(data.items), "catalog", progress):
            producer.catalog_event(ev)
            n_catalog += 1
        producer.flush()
    pacer = Pacer(rate, speedup)
    n_events = 0
    if not events:
        return n_catalog, 0
    for ev in _bar(itertools.islice(data.user_events(), limit), len(data.events), "events", progress):
        pacer.wait(ev["ts"])
        producer.user_event(ev)
        if on_event is not None:
            on_event(ev)
        n_events += 1
    producer.flush()
    log.info("replayed %d catalog and %d user events from %s", n_catalog, n_events, dataset.name)
    return n_catalog, n_events


def _bar(it: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    return tqdm(it, total=total, desc=desc, unit="ev", disable=not enabled, mininterval=0.5, smoothing=0.1)
