"""The reader API's limits without a server: admission past the concurrency limit, and search logging that
drops and counts instead of waiting (a fake producer, and librdkafka pointed at an address nobody serves)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry

from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.online.learning.search_feedback import KIND_HEADER, KIND_SEARCH, SearchLog, decode_search_log
from fusionrec.online.serving.api import Admission, ApiMetrics
from fusionrec.online.serving.search import SearchLogQueue

TOPIC = "feedback"


class Recorded:
    """The API's metrics on a fresh registry, and the value of one sample (summed over unnamed labels)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.api = Metrics(self.registry).of(ApiMetrics)

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for family in self.registry.collect() for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _entry(n: int) -> SearchLog:
    return SearchLog(user_id=f"u{n}", ts=n, items=[str(n)], f_item=[0.5], f_query=[0.25], model=1)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------- admission
class Held:
    """An ASGI app whose /v1 requests wait until released; ``/v1/boom`` raises."""

    def __init__(self) -> None:
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/v1/boom":
            raise RuntimeError("boom")
        if scope["path"].startswith("/v1/"):
            self.entered.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _get(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "GET", "path": path}, None, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def test_past_the_limit_a_v1_request_gets_503_with_retry_after_and_probes_pass():
    metrics = Recorded()

    async def scenario() -> None:
        inner = Held()
        admission = Admission(inner, limit=1, metrics=metrics.api)
        held = asyncio.create_task(_get(admission, "/v1/search"))
        await inner.entered.wait()
        assert metrics.value("fusionrec_api_in_flight_requests") == 1
        status, headers, body = await _get(admission, "/v1/users/u1/recommendations")
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
        assert "limit of 1 requests" in msgspec.json.decode(body)["detail"]
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert (await _get(admission, probe))[0] == 200
        inner.release.set()
        assert (await held)[0] == 200
        assert (await _get(admission, "/v1/users/u1/recommendations"))[0] == 200

    asyncio.run(scenario())
    assert metrics.value("fusionrec_api_rejected_total") == 1
    assert metrics.value("fusionrec_api_in_flight_requests") == 0


def test_a_request_that_fails_gives_its_place_back():
    metrics = Recorded()
    admission = Admission(Held(), limit=1, metrics=metrics.api)
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(_get(admission, "/v1/boom"))
    assert admission.in_flight == 0 and metrics.value("fusionrec_api_in_flight_requests") == 0


# --------------------------------------------------------------------------- search logging
class FakeProducer:
    """confluent_kafka.Producer's calls as SearchLogQueue makes them; ``full``: every produce raises BufferError."""

    def __init__(self, *, full: bool = False, undelivered: int = 0) -> None:
        self.full = full
        self.undelivered = undelivered
        self.gate = threading.Event()
        self.gate.set()
        self.producing = threading.Event()
        self.produced: list[tuple[str, bytes, Any, Any]] = []
        self.callbacks: list[Callable[[KafkaError | None, Any], None]] = []
        self.flushed_for: float | None = None

    def produce(self, topic: str, value: bytes, key: Any = None, headers: Any = None,
                on_delivery: Any = None) -> None:
        self.producing.set()
        self.gate.wait()
        if self.full:
            raise BufferError("Local: Queue full")
        self.produced.append((topic, value, key, headers))
        self.callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        self.flushed_for = timeout
        return self.undelivered


def test_served_lists_reach_the_producer_keyed_by_user_with_the_search_header():
    metrics = Recorded()
    producer = FakeProducer()
    logs = SearchLogQueue(producer, TOPIC, metrics.api.search_log_dropped, maxsize=10)
    for n in range(3):
        logs.log(_entry(n))
    logs.close(5.0)
    assert [(t, decode_search_log(v), k, h) for t, v, k, h in producer.produced] == \
        [(TOPIC, _entry(n), f"u{n}", [(KIND_HEADER, KIND_SEARCH)]) for n in range(3)]
    assert metrics.value("fusionrec_api_search_log_dropped_total") == 0


def test_a_full_producer_buffer_drops_and_counts_instead_of_retrying():
    metrics = Recorded()
    logs = SearchLogQueue(FakeProducer(full=True), TOPIC, metrics.api.search_log_dropped, maxsize=10)
    for n in range(4):
        logs.log(_entry(n))
    _wait(lambda: metrics.value("fusionrec_api_search_log_dropped_total", reason="buffer_full") == 4,
          "four lists dropped for a full buffer")
    logs.close(5.0)


def test_a_full_queue_drops_at_once_while_the_producer_is_stuck():
    metrics = Recorded()
    producer = FakeProducer()
    producer.gate.clear()
    logs = SearchLogQueue(producer, TOPIC, metrics.api.search_log_dropped, maxsize=2)
    logs.log(_entry(0))
    assert producer.producing.wait(10)  # the thread holds entry 0; the queue is empty again
    for n in range(1, 6):
        logs.log(_entry(n))  # 1 and 2 fill the queue; 3, 4 and 5 are dropped, and log() returned each time
    assert metrics.value("fusionrec_api_search_log_dropped_total", reason="queue_full") == 3
    producer.gate.set()
    logs.close(5.0)
    assert [decode_search_log(v).user_id for _, v, _, _ in producer.produced] == ["u0", "u1", "u2"]


def test_undelivered_and_left_over_lists_are_counted_and_close_waits_a_bounded_time():
    metrics = Recorded()
    producer = FakeProducer(undelivered=2)
    logs = SearchLogQueue(producer, TOPIC, metrics.api.search_log_dropped, maxsize=10)
    logs.log(_entry(0))
    _wait(lambda: bool(producer.callbacks), "the list handed to the producer")
    producer.callbacks[0](KafkaError(KafkaError._MSG_TIMED_OUT), None)
    logs.close(0.5)
    assert producer.flushed_for is not None and producer.flushed_for <= 0.5
    assert metrics.value("fusionrec_api_search_log_dropped_total", reason="delivery_failed") == 1
    assert metrics.value("fusionrec_api_search_log_dropped_total", reason="shutdown") == 2


def test_drops_are_logged_once_per_interval_not_once_per_list(caplog: pytest.LogCaptureFixture):
    metrics = Recorded()
    producer: Any = FakeProducer(full=True)
    logs = SearchLogQueue(producer, TOPIC, metrics.api.search_log_dropped, maxsize=100)
    with caplog.at_level(logging.WARNING, logger="fusionrec.online.serving.search"):
        for n in range(50):
            logs.log(_entry(n))
        _wait(lambda: metrics.value("fusionrec_api_search_log_dropped_total") == 50, "50 lists dropped")
    logs.close(5.0)
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_with_no_broker_every_list_is_dropped_and_counted_once():
    """Real librdkafka at an address nobody serves, with room for one message: nothing waits for the broker."""
    settings = Settings.from_env({}, kafka_bootstrap="127.0.0.1:1", search_log_timeout_s=0.2,
                                 kafka_options={"queue.buffering.max.messages": 1, "log_level": 0})
    metrics = Recorded()
    logs = SearchLogQueue.from_settings(settings, metrics.api.search_log_dropped)
    for n in range(5):
        logs.log(_entry(n))
    _wait(lambda: metrics.value("fusionrec_api_search_log_dropped_total", reason="delivery_failed") >= 1,
          "a list to time out waiting for the broker")
    logs.close(1.0)
    assert metrics.value("fusionrec_api_search_log_dropped_total", reason="buffer_full") >= 1
    assert metrics.value("fusionrec_api_search_log_dropped_total") == 5
