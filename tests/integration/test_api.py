"""The reader HTTP API: a real `fusionrec serve` process over real Redis and broker, driven over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from fusionrec.apps.services import RunningServices, free_port
from fusionrec.core.redis_client import connect, connect_async
from fusionrec.core.settings import Settings
from fusionrec.models.backfill import encoder_for_version, prepare, version_info
from fusionrec.models.encoder import TextEncoder
from fusionrec.models.pool import build_embedder
from fusionrec.online.learning.checkpoints import Checkpoint, CheckpointStore
from fusionrec.online.learning.model import FusionModel
from fusionrec.online.learning.search_feedback import KIND_HEADER, KIND_SEARCH, decode_search_log
from fusionrec.online.serving.api import Services, create_app
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.contract import CatalogEvent
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, make_settings, read_topic, start_fusionrec, title, wait_for

TOKEN = "s3cret-token-0123456789"
ITEMS = 60
USERS = 12


class Server:
    """`fusionrec serve` in a subprocess on a free loopback port."""

    def __init__(self, settings: Settings, *extra: str) -> None:
        self.settings = settings.replace(serve_port=free_port())
        self.url = f"http://127.0.0.1:{self.settings.serve.port}"
        self.proc = start_fusionrec(self.settings, "serve", *extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(self._healthy, 90, "serve to come up", interval=0.3)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> str:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return err.decode()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the server's /metrics, summed over the labels not named (0 when absent)."""
        return sum(s.value for family in text_string_to_metric_families(self.http.get("/metrics").text)
                   for s in family.samples if s.name == name and labels.items() <= s.labels.items())


@contextmanager
def in_process(app: FastAPI) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a thread of this process (so a test can hold a request inside it)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 60, "the in-process server to start")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(30)


def _catalog(settings: Settings) -> None:
    """Items with real vectors from the tiny encoder, written as the embedding workers would."""
    encoder = TextEncoder.from_settings(settings, device="cpu", threads=1)
    embedder = build_embedder(settings, encoder, None, worker="test")
    prepare(embedder.store, version_info(encoder.spec, settings))
    embedder.process([CatalogEvent(item_id=str(i), op="upsert", ts=1_000 + i, title=title(i),
                                   category=f"c{i % 4}", brand=f"b{i % 3}", price=1.0 + i % 7)
                      for i in range(ITEMS)])


def _events(settings: Settings) -> int:
    """Purchases: user u buys items u, u+1, ... (so each user has a history and recommendations)."""
    now = int(time.time() * 1000) - 3_600_000
    n = 0
    with EventProducer(settings) as producer:
        for u in range(USERS):
            for j in range(6):
                producer.user_event({"event_id": f"e{u}-{j}", "type": "purchase", "user_id": f"u{u}",
                                     "item_id": str((u + j) % ITEMS), "ts": now + 1000 * (u * 10 + j)})
                n += 1
    return n


@pytest.fixture(scope="module", params=["redis", "redis_cluster"])
def stack(services: RunningServices, tiny_bert: Callable[..., Path],
          request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Catalog vectors, users' state and recommendations, on one Redis and on a Redis Cluster."""
    on = {"redis_url": request.getfixturevalue("redis_cluster").url} if request.param == "redis_cluster" else {}
    s = make_settings(services, embed_model_path=str(tiny_bert()), embed_threads=1, learn_reload_s=0.3,
                      search_candidates=40, **on)
    ensure_topics(s)
    _catalog(s)
    with consume_until(s, _events(s)):
        pass
    yield s


@pytest.fixture(scope="module")
def server(stack: Settings) -> Iterator[Server]:
    srv = Server(stack)
    yield srv
    err = srv.close()
    assert "Traceback" not in err, err[-4000:]


@pytest.fixture(scope="module")
def checkpoint(stack: Settings, server: Server) -> int:
    """A fusion checkpoint (the server saw none at start)."""
    client = connect(stack)
    try:
        first = server.http.get("/readyz")  # can answer without a model: the lists and the popular fallback
        assert first.status_code == 200 and first.json()["model"] == 0
        assert "no fusion checkpoint" in first.json()["model_state"]
        number = CheckpointStore(client, stack).save(Checkpoint(model=FusionModel(), learned_from_ms=0,
                                                                 learned_to_ms=0, examples=0, hit_rate=None))
    finally:
        client.close()
    wait_for(lambda: server.http.get("/readyz").json()["model"] == number, 30, "the checkpoint reported")
    return number


def test_readyz_reports_the_loaded_checkpoint(server: Server, checkpoint: int):
    body = server.http.get("/readyz").json()
    assert body == {"status": "ready", "model": checkpoint, "model_state": f"fusion checkpoint {checkpoint}",
                    "problems": []}
    assert server.http.get("/healthz").json() == {"status": "ok"}


def test_recommendations_match_the_reader_and_unknown_users_get_popular_items(stack: Settings, server: Server):
    reader = RecommendationReader(connect(stack), stack)
    for user in ("u0", "u7"):
        got = server.http.get(f"/v1/users/{user}/recommendations", params={"k": 5})
        assert got.status_code == 200 and got.headers["content-type"] == "application/json"
        assert got.json() == msgspec.to_builtins(reader.top_k(user, 5))
        assert not got.json()["fallback"] and len(got.json()["items"]) == 5
        assert all(item["sources"] for item in got.json()["items"])  # each item is explained
    unknown = server.http.get("/v1/users/nobody-like-this/recommendations", params={"k": 3}).json()
    popular = reader.popular("nobody-like-this", 3)
    assert unknown["fallback"] and unknown["model"] == "popular"
    assert [i["item_id"] for i in unknown["items"]] == [r.item_id for r in popular.items]


@pytest.mark.parametrize(("path", "params", "needle"), [
    ("/v1/users/u0/recommendations", {"k": 0}, "greater than or equal to 1"),
    ("/v1/users/u0/recommendations", {"k": 10_000}, "less than or equal to 100"),
    ("/v1/users/u0/recommendations", {"k": "ten"}, "valid integer"),
    ("/v1/users/a%7Bb%7D/recommendations", {}, "should match pattern"),
    ("/v1/users/u0%0A/recommendations", {}, "should match pattern"),  # a trailing newline
    ("/v1/users/u%E2%80%AE0/recommendations", {}, "should match pattern"),  # right-to-left override
    ("/v1/items/3%00/similar", {}, "should match pattern"),  # NUL
    ("/v1/items/3/similar", {"k": -1}, "greater than or equal to 1"),
    ("/v1/search", {}, "Field required"),
    ("/v1/search", {"q": "   "}, "non-space"),
    ("/v1/search", {"q": "x" * 600}, "at most 512"),
])
def test_bad_parameters_get_a_4xx_with_a_clear_message(server: Server, path: str, params: dict[str, Any],
                                                       needle: str):
    got = server.http.get(path, params=params)
    assert got.status_code == 422
    assert needle in got.text


def test_similar_items_and_unknown_items(stack: Settings, server: Server):
    reader = RecommendationReader(connect(stack), stack)
    got = server.http.get("/v1/items/3/similar", params={"k": 5})
    assert got.status_code == 200
    body = got.json()
    assert [(s["item_id"], s["score"]) for s in body["similar"]] == \
        [(i, round(sc, 6)) for i, sc in reader.similar_items("3", 5)]
    assert len(body["similar"]) == 5 and "3" not in {s["item_id"] for s in body["similar"]}
    missing = server.http.get("/v1/items/no-such-item/similar")
    assert missing.status_code == 404 and "has no vector" in missing.json()["detail"]


def test_search_mixes_query_similarity_with_the_personal_score_and_logs_feedback(stack: Settings, server: Server,
                                                                                 checkpoint: int):
    q = title(5)
    anon = server.http.get("/v1/search", params={"q": q, "k": 10})
    assert anon.status_code == 200, anon.text
    body = anon.json()
    assert body["model"] == checkpoint and body["alpha"] == 1.0 and body["beta"] == 1.0
    assert body["items"][0]["item_id"] == "5"  # the item whose title is the query
    for hit in body["items"]:
        assert hit["score"] == pytest.approx(body["alpha"] * hit["f_item"] + body["beta"] * hit["f_query"], abs=1e-5)
    personal = server.http.get("/v1/search", params={"q": q, "k": 10, "user_id": "u5"}).json()
    # u5 bought items 5..10: the personal score lifts them above what an anonymous user sees
    owned = {str(i) for i in range(5, 11)}
    f_item = {h["item_id"]: h["f_item"] for h in personal["items"]}
    f_anon = {h["item_id"]: h["f_item"] for h in body["items"]}
    shared_owned = owned & f_item.keys() & f_anon.keys()
    assert shared_owned and all(f_item[i] > f_anon[i] for i in shared_owned)
    logged = _search_logs(stack, "u5")
    assert logged
    assert logged[-1].items == [h["item_id"] for h in personal["items"]]
    assert logged[-1].f_query == [h["f_query"] for h in personal["items"]]


def _search_logs(settings: Settings, user: str, timeout: float = 45.0) -> list[Any]:
    """The search lists logged for ``user`` on the feedback topic, read until there is at least one."""

    def of_user(messages: list[Any]) -> list[Any]:
        entries = [decode_search_log(m.value()) for m in messages if (KIND_HEADER, KIND_SEARCH) in (m.headers() or [])]
        return [entry for entry in entries if entry.user_id == user]

    return of_user(read_topic(settings, settings.kafka.topic_feedback, until=lambda got: bool(of_user(got)),
                              timeout=timeout))


def test_metrics_and_openapi(server: Server):
    server.http.get("/v1/users/u1/recommendations")
    text = server.http.get("/metrics").text
    assert 'fusionrec_api_requests_total{route="/v1/users/{user_id}/recommendations",status="200"}' in text
    assert 'fusionrec_api_request_seconds_bucket{le="0.005",route="/v1/users/{user_id}/recommendations"}' in text
    assert "u1" not in text.replace("fusionrec", "")  # no user ids in labels
    spec = server.http.get("/openapi.json").json()
    assert {"/v1/users/{user_id}/recommendations", "/v1/items/{item_id}/similar", "/v1/search", "/healthz",
            "/readyz"} <= spec["paths"].keys()


def test_schemathesis_finds_no_server_error(server: Server, checkpoint: int, tmp_path: Path):
    run = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", server.url + "/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "40", "--workers", "1", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all", "--no-color", "--seed", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout


def test_bearer_token_guards_the_v1_routes(stack: Settings, checkpoint: int):
    srv = Server(stack.replace(serve_token=TOKEN), "--no-search-log")
    try:
        assert srv.http.get("/v1/users/u0/recommendations").status_code == 401
        wrong = srv.http.get("/v1/users/u0/recommendations", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = srv.http.get("/v1/users/u0/recommendations", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["user_id"] == "u0"
        assert srv.http.get("/healthz").status_code == 200  # probes stay open
        assert srv.http.get("/readyz").status_code == 200
    finally:
        err = srv.close()
    assert TOKEN not in err


def test_redis_down_gives_503_not_500(stack: Settings, checkpoint: int):
    srv = Server(stack.replace(redis_url="redis://127.0.0.1:1/0"), "--no-search-log")
    try:
        got = srv.http.get("/v1/users/u0/recommendations")
        assert got.status_code == 503 and "Redis unavailable" in got.json()["detail"]
        ready = srv.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["problems"][0].startswith("redis")
        for body in (got.text, ready.text, srv.http.get("/v1/items/i1/similar").text):
            assert "127.0.0.1" not in body and "Connection refused" not in body, body  # no internal addresses
    finally:
        srv.close()


def test_a_broker_outage_drops_search_logs_and_slows_no_request(stack: Settings, checkpoint: int):
    """The feedback topic's broker is gone, and the producer's buffer holds about three lists (a long outage,
    compressed): searches, readiness and similar items all answer, and the lists not logged are counted."""
    outage = stack.replace(kafka_bootstrap=f"127.0.0.1:{free_port()}",
                           kafka_options={"queue.buffering.max.kbytes": 1, "log_level": 0})
    srv = Server(outage)
    try:
        def search(n: int) -> int:
            params = {"q": title(n), "user_id": f"u{n % USERS}", "k": 10}
            return srv.http.get("/v1/search", params=params).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(search, range(48))) == [200] * 48
        assert srv.http.get("/readyz").status_code == 200
        assert srv.http.get("/v1/items/3/similar", params={"k": 5}).status_code == 200
        wait_for(lambda: srv.metric("fusionrec_api_search_log_dropped_total", reason="buffer_full") > 0, 30,
                 "search lists dropped for the full buffer, and counted")
    finally:
        err = srv.close()
    assert "Traceback" not in err, err[-4000:]  # shutdown gave up on the broker after a bounded flush


def test_past_the_concurrency_limit_data_requests_get_503_while_probes_answer(stack: Settings, checkpoint: int):
    """One request is held inside the search handler (its query encoder is still loading) with a limit of 1."""
    settings = stack.replace(api_max_concurrency=1)
    entered, release = threading.Event(), threading.Event()

    def slow_encoder(version: str) -> TextEncoder:
        entered.set()
        release.wait(60)
        return encoder_for_version(settings, version)

    services = Services(settings, connect(settings), connect_async(settings), encoder=slow_encoder)
    with in_process(create_app(services)) as http, ThreadPoolExecutor(1) as pool:
        held = pool.submit(http.get, "/v1/search", params={"q": title(5)})
        try:
            assert entered.wait(60), "the search never reached its encoder"
            busy = [http.get("/v1/users/u0/recommendations"), http.get("/v1/items/3/similar")]
            probes = [http.get(path) for path in ("/healthz", "/readyz", "/metrics")]
        finally:
            release.set()
        assert held.result().status_code == 200
        for got in busy:
            assert got.status_code == 503 and got.headers["retry-after"] == "1", got.text
            assert "limit of 1 requests" in got.json()["detail"]
        assert [got.status_code for got in probes] == [200, 200, 200]
        assert http.get("/v1/users/u0/recommendations").status_code == 200  # the held request gave its place back
        assert "fusionrec_api_rejected_total 2.0" in http.get("/metrics").text
