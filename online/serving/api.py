"""``fusionrec serve``: the reader HTTP API (FastAPI on uvicorn) over Redis.

=========================================  ===========================================================
route                                      answer
=========================================  ===========================================================
``GET /v1/users/{user_id}/recommendations``  the stored top-K (``?k=``), or the popular fallback
``GET /v1/items/{item_id}/similar``          nearest items by content (404 while the item has no vector)
``GET /v1/search?q=&user_id=&k=``            query ranked by the learned mix (:mod:`fusionrec.online.serving.search`)
``GET /healthz``                             the process is up
``GET /readyz``                              Redis answers (else 503); the served model's state reported
``GET /metrics``                             Prometheus metrics of this process
``GET /openapi.json``, ``/docs``             the OpenAPI spec and its browser
=========================================  ===========================================================

Recommendations are the hot path: one ``GET`` on an asyncio Redis client, the stored JSON passed
through msgspec. Similar items and search run on the thread pool (a vector query, and for search
an encoder forward pass); nothing blocking runs on the event loop. With ``FUSIONREC_SERVE_TOKEN``
set, every ``/v1`` route wants ``Authorization: Bearer <token>``; health, readiness and metrics
stay open for probes and scrapers.

Overload is answered, not queued: at most ``FUSIONREC_API_MAX_CONCURRENCY`` ``/v1`` requests are
served at once and the next gets 503 with ``Retry-After`` (:class:`Admission`). Health, readiness
and metrics are exempt, and the thread pool holds every admitted request plus a reserve for them,
so a saturated server still says it is alive and ready: saturation is a reason to retry, not to
take the server out of rotation, which would only move its load onto the others. Served search
lists are logged off the request path (:class:`~fusionrec.online.serving.search.SearchLogQueue`):
a broker outage drops and counts them and slows no request.
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures at runtime

import gc
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

import anyio.to_thread
import msgspec
import redis
import redis.asyncio
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel

from fusionrec.core.keys import ID_EXCLUDED, ID_REGEX, Keys
from fusionrec.core.metrics import Metrics, MetricSet, counter, gauge, histogram
from fusionrec.core.settings import Settings
from fusionrec.online.learning.checkpoints import CheckpointStore, ModelMetrics
from fusionrec.online.serving.reader import AsyncRecommendationReader, OnReadRanker, RecommendationReader
from fusionrec.online.serving.search import Searcher, SearchLogQueue, SearchUnavailableError

if TYPE_CHECKING:
    from fusionrec.models.encoder import TextEncoder

log = logging.getLogger(__name__)

ID = ID_REGEX  # the contract's id rule (fusionrec.core.keys)
_json = msgspec.json.Encoder()
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PROBE_THREADS = 8  # thread-pool reserve for readiness and metrics beyond the admitted /v1 requests
_RETRY_AFTER_S = 1
_FLUSH_S = 5.0  # how long shutdown waits for the broker to take the last search lists
_BUSY: dict[int | str, dict[str, Any]] = {
    503: {"description": "FUSIONREC_API_MAX_CONCURRENCY requests are in flight: retry after Retry-After seconds"}}


# ---------------------------------------------------------------------------- response schemas (OpenAPI)
class RecommendationOut(BaseModel):
    item_id: str
    score: float
    sources: dict[str, float]


class RecListOut(BaseModel):
    user_id: str
    model: str
    generated_at: int
    event_ts: int
    fallback: bool
    on_read: bool = False
    items: list[RecommendationOut]


class SimilarOut(BaseModel):
    item_id: str
    version: str | None
    similar: list[dict[str, Any]]


class SearchHitOut(BaseModel):
    item_id: str
    score: float
    f_item: float
    f_query: float


class SearchOut(BaseModel):
    query: str
    user_id: str | None
    model: int
    alpha: float
    beta: float
    items: list[SearchHitOut]


class ApiMetrics(MetricSet):
    component = "reader API (fusionrec.online.serving.api)"
    requests = counter("fusionrec_api_requests_total", "HTTP requests by route and status", ("route", "status"))
    latency = histogram("fusionrec_api_request_seconds", "HTTP request latency by route", ("route",),
                        buckets=_LATENCY_BUCKETS)
    in_flight = gauge("fusionrec_api_in_flight_requests", "/v1 requests being served now")
    rejected = counter("fusionrec_api_rejected_total",
                       "/v1 requests answered 503 because FUSIONREC_API_MAX_CONCURRENCY were in flight")
    ranked_on_read = counter("fusionrec_api_ranked_on_read_total",
                             "Recommendation lists ranked by the API because the user's state was newer than "
                             "their stored list (FUSIONREC_REC_RANK_ON_READ)")
    search_log_dropped = counter("fusionrec_api_search_log_dropped_total",
                                 "Served search lists not logged to the feedback topic, by reason "
                                 "(queue_full, buffer_full, produce_error, delivery_failed, shutdown)", ("reason",))


class Admission:
    """ASGI middleware: at most ``limit`` ``/v1`` requests at once; the next gets 503 with ``Retry-After``.

    Everything else (health, readiness, metrics, the OpenAPI spec) is exempt: probes must see the
    truth while the data routes are saturated. The count lives on the event loop's thread, so it
    needs no lock.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int, metrics: "ApiMetrics") -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0
        self.metrics = metrics
        metrics.in_flight.set_function(lambda: self.in_flight)
        self.busy_body = _json.encode({"detail": f"the server is serving its limit of {limit} requests; retry shortly"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.metrics.rejected.inc()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"%d" % _RETRY_AFTER_S),
                                    (b"content-length", str(len(self.busy_body)).encode())]})
            await send({"type": "http.response.body", "body": self.busy_body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class Timing:
    """ASGI middleware: latency and status per route template (never per user or item id)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def record_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status[0])).inc()


RECS_ROUTE = "/v1/users/{user_id}/recommendations"
_RECS_PATH = re.compile(rf"/v1/users/([^/{ID_EXCLUDED}]{{1,128}})/recommendations")


class FastRecommendations:
    """ASGI front for the hot route: a plain, valid, authorised recommendations GET skips FastAPI.

    Anything else (another route, a bad ``k``, a missing token, a Redis error) goes on to the
    FastAPI app, which validates and answers it; so both paths give the same answers and the
    OpenAPI spec still describes the route. It saves FastAPI's per-request dependency and
    validation machinery on the one route that carries the traffic.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], services: "Services") -> None:
        self.app = app
        self.services = services
        self.default_k = services.settings.rec.k
        self.max_k = services.settings.serve.max_k
        token = services.settings.serve.token
        self.auth = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _RECS_PATH.fullmatch(scope["path"])
            k = self._k(scope["query_string"]) if match else None
            if match and k is not None and self._authorised(scope):
                t0 = time.perf_counter()
                try:
                    recs = await self.services.areader.top_k(match.group(1), k)
                except redis.RedisError:
                    pass  # the FastAPI route answers 503 with the reason
                else:
                    body = _json.encode(recs)
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    metrics = self.services.metrics
                    metrics.latency.labels(RECS_ROUTE).observe(time.perf_counter() - t0)
                    metrics.requests.labels(RECS_ROUTE, "200").inc()
                    return
        await self.app(scope, receive, send)

    def _k(self, query: bytes) -> int | None:
        if not query:
            return self.default_k
        name, _, value = query.partition(b"=")
        if name != b"k" or not value.isdigit() or len(value) > 6:
            return None
        k = int(value)
        return k if 1 <= k <= self.max_k else None

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if self.auth is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value.strip(), self.auth)
        return False


class Services:
    """What the routes use; built once per server (tests pass their own clients and encoder).

    Search is built on its first request: only then does the process load the served fusion model
    and the query encoder (and import torch). Recommendations and similar items never need them.
    """

    def __init__(self, settings: Settings, client: redis.Redis, aclient: redis.asyncio.Redis,
                 encoder: "TextEncoder | Callable[[str], TextEncoder] | None" = None,
                 log_searches: bool = False, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.keys = Keys.for_settings(settings)
        self.redis, self.aredis = client, aclient
        self.process_metrics = Metrics(registry or CollectorRegistry())
        self.metrics = self.process_metrics.of(ApiMetrics)
        self.model_metrics = self.process_metrics.of(ModelMetrics)
        on_read = (OnReadRanker(client, settings, self.keys, counted=self.metrics.ranked_on_read.inc)
                   if settings.rec.rank_on_read else None)
        self.reader = RecommendationReader(client, settings, self.keys, on_read=on_read)
        self.areader = AsyncRecommendationReader(aclient, self.keys, pseudonyms=self.reader.pseudonyms,
                                                 on_read=on_read)
        self.checkpoints = CheckpointStore(client, settings, self.keys)
        self.search_log = (SearchLogQueue.from_settings(settings, self.metrics.search_log_dropped)
                           if log_searches else None)
        self._encoder = encoder
        self._searcher: Searcher | None = None
        self._head = 0
        self._search_lock = threading.Lock()

    def searcher(self) -> Searcher:
        with self._search_lock:
            if self._searcher is None:
                from fusionrec.models.backfill import encoder_for_version
                from fusionrec.online.learning.checkpoints import ServingModel
                from fusionrec.online.ranking.fusion import FusionRanker

                settings = self.settings
                ranker = FusionRanker(self.redis, settings, ServingModel(self.checkpoints, settings), self.keys)
                encoder = self._encoder or (lambda version: encoder_for_version(settings, version))
                self._searcher = Searcher(self.redis, settings, ranker, encoder, self.keys, self.search_log)
            return self._searcher

    def search(self, q: str, user_id: str | None, k: int) -> Any:
        return self.searcher().search(q, user_id, k)

    def similar(self, item_id: str, k: int) -> tuple[list[tuple[str, float]], str | None]:
        """The items nearest to ``item_id`` and the vector version they come from (both may read Redis)."""
        return self.reader.similar_items(item_id, k), self.reader.content.active()

    def model_number(self) -> int:
        """The fusion checkpoint search serves once loaded; before that, the newest one stored."""
        if self._searcher is not None:
            number, _ = self._searcher.ranker.serving.current()
        else:
            try:
                number = self.checkpoints.head() or 0
            except redis.RedisError as exc:  # readiness reports Redis itself; this stays the last known
                log.warning("could not check the fusion checkpoint head: %s", exc)
                return self._head
        self._head = number
        self.model_metrics.model_version.set(number)
        return number


def redis_unavailable(exc: redis.RedisError) -> HTTPException:
    """A 503 that names the failure's kind, not its text: Redis errors carry internal host names and ports."""
    log.warning("Redis unavailable: %s", exc)
    return HTTPException(503, f"Redis unavailable ({type(exc).__name__})")


def create_app(services: Services) -> FastAPI:
    settings = services.settings
    max_k = settings.serve.max_k

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Every admitted /v1 request may hold a pool thread; readiness and metrics still find one free.
        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = max(threads.total_tokens, settings.serve.max_concurrency + _PROBE_THREADS)
        await run_in_threadpool(services.model_number)
        # Everything imported so far (torch, transformers, …) lives as long as the process: move it out
        # of the collector's reach, or a full collection pauses a request for a few hundred ms.
        gc.collect()
        gc.freeze()
        yield
        await services.aredis.aclose()
        if services.search_log is not None:
            await run_in_threadpool(services.search_log.close, _FLUSH_S)

    app = FastAPI(title="fusionrec reader API", version="1", lifespan=lifespan,
                  description="Recommendations, similar items and personalised search, read from Redis.")

    async def authorised(request: Request) -> None:
        token = settings.serve.token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    Auth = [Depends(authorised)]
    K = Annotated[int, Query(ge=1, le=max_k, description=f"how many items (1..{max_k})")]

    @app.get("/v1/users/{user_id}/recommendations", response_model=RecListOut, dependencies=Auth, responses=_BUSY,
             summary="A user's current recommendations (popular items for an unknown user)")
    async def recommendations(user_id: Annotated[str, Path(pattern=ID, max_length=128)],
                              k: K = settings.rec.k) -> Response:
        try:
            recs = await services.areader.top_k(user_id, k)
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from exc
        return Response(_json.encode(recs), media_type="application/json")

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarOut, dependencies=Auth,
             responses={404: {"description": "the item has no vector (unknown, deleted, or not embedded yet)"},
                        **_BUSY},
             summary="Items most similar to an item by content")
    async def similar(item_id: Annotated[str, Path(pattern=ID, max_length=128)], k: K = 10) -> Response:
        try:
            found, version = await run_in_threadpool(services.similar, item_id, k)
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from exc
        if not found:
            raise HTTPException(404, f"item {item_id!r} has no vector (unknown, deleted, or not embedded yet)")
        body = {"item_id": item_id, "version": version,
                "similar": [{"item_id": i, "score": round(s, 6)} for i, s in found]}
        return Response(_json.encode(body), media_type="application/json")

    @app.get("/v1/search", response_model=SearchOut, dependencies=Auth,
             responses={503: {"description": "no active item vectors, or the query encoder does not match them; "
                                             "or the server is at its limit of requests (Retry-After)"}},
             summary="Items for a text query, personalised for user_id when given")
    async def search(q: Annotated[str, Query(min_length=1, max_length=512, description="the query text")],
                     user_id: Annotated[str | None, Query(pattern=ID, max_length=128)] = None,
                     k: K = 10) -> Response:
        if not q.strip():
            raise HTTPException(422, "q must contain a non-space character")
        try:
            result = await run_in_threadpool(services.search, q, user_id, k)
        except SearchUnavailableError as exc:
            raise HTTPException(503, str(exc)) from exc
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from exc
        return Response(_json.encode(result), media_type="application/json")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the server can answer (Redis answers); the model's state",
             responses={503: {"description": "not ready, with the reasons"}})
    async def readyz() -> JSONResponse:
        """Ready means "can answer": recommendations are lists in Redis (or the popular fallback) with or
        without a fusion checkpoint, so only Redis decides; the model's state is reported beside it."""
        problems = []
        try:
            await services.aredis.ping()
        except redis.RedisError as exc:
            log.warning("readiness: Redis does not answer: %s", exc)
            problems.append(f"redis: unavailable ({type(exc).__name__})")
        number = 0
        if not problems:
            number = await run_in_threadpool(services.model_number)
        state = (f"fusion checkpoint {number}" if number else "no fusion checkpoint yet: lists as the stream "
                 "wrote them, search unavailable (is `fusionrec learner` running?)")
        body = {"status": "ready" if not problems else "not ready", "model": number, "model_state": state,
                "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        await run_in_threadpool(services.model_number)
        return Response(generate_latest(services.process_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Timing, metrics=services.metrics)
    app.add_middleware(FastRecommendations, services=services)
    app.add_middleware(Admission, limit=settings.serve.max_concurrency, metrics=services.metrics)  # outermost
    return app


def serve(settings: Settings, *, log_searches: bool | None = None) -> None:
    """Run the API with uvicorn in the foreground (``serve_host``:``serve_port``) until SIGINT/SIGTERM."""
    import uvicorn

    from fusionrec.core.redis_client import connect, connect_async

    log_searches = settings.serve.search_log if log_searches is None else log_searches
    services = Services(settings, connect(settings), connect_async(settings), log_searches=log_searches)
    config = uvicorn.Config(create_app(services), host=settings.serve.host, port=settings.serve.port,
                            loop="uvloop", http="httptools", access_log=False, log_level=settings.ops.log_level.lower(),
                            timeout_graceful_shutdown=10)
    log.info("reader API on http://%s:%d (token %s)", settings.serve.host, settings.serve.port,
             "required" if settings.serve.token else "not required")
    uvicorn.Server(config).run()
