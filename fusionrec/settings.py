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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionrec.errors import ConfigError

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
    # Hash-tag buckets per entity kind; fixed for a deployment's lifetime (see fusionrec.keys).
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
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from exc
