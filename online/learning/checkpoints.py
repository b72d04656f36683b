"""Fusion model checkpoints in Redis, and the hot-reloading view rankers serve from.

A checkpoint is one pickled :class:`Checkpoint` (the model: river pickles, the torch head's
``state_dict`` and optimiser state, the fusion weights; plus metadata) under ``{m}:fusion:<n>``.
``{m}:fusion:head`` names the one rankers serve; a save writes the blob, moves the head and drops
blobs beyond the newest ``keep`` in one script. Rolling back moves the head to an older number.

One learner writes at a time: it holds the lease ``{m}:learner:lease`` (:class:`LearnerLease`), and
taking the lease draws a *fencing token*. A store given the lease checks in the same script as every
write that the lease still holds its token, and raises :class:`LeaseLostError` otherwise: a learner
that was paused (GC, SIGSTOP) past its lease while another took over cannot overwrite the head. A
store without a lease (an operator's tool, a benchmark) writes unfenced.

Checkpoints are pickles, so each is signed: the stored value is ``FRCK1``, an HMAC-SHA256 of the
pickle under the model key (``FUSIONREC_MODEL_KEY``, or the key generated once in the run dir), then
the pickle. A value whose signature does not verify is never unpickled: write access to Redis is not
code execution. A refused checkpoint raises :class:`CheckpointRefused`; rankers keep serving what
they serve (``fusionrec_fusion_checkpoints_refused_total``), and a resuming learner takes the newest
checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis

from fusionrec.core.errors import FusionrecError
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics, MetricSet, counter, gauge, histogram
from fusionrec.core.scripts import LuaScript, register
from fusionrec.core.secret_files import secret_in
from fusionrec.core.settings import Settings

if TYPE_CHECKING:  # the model imports torch; readers of checkpoint numbers do not need it
    from fusionrec.online.learning.model import FusionModel

log = logging.getLogger(__name__)


class ModelMetrics(MetricSet):
    component = "served fusion model (fusionrec.online.learning.checkpoints)"
    model_version = gauge("fusionrec_fusion_model_version", "Fusion checkpoint this process serves",
                          multiprocess_mode="livemax")
    model_reload_lag = histogram("fusionrec_fusion_update_to_serving_seconds",
                                 "Oldest update in a checkpoint to the ranker serving it")
    refused = counter("fusionrec_fusion_checkpoints_refused_total",
                      "Checkpoints not loaded because their signature did not verify")


MAGIC = b"FRCK1"
_DIGEST = hashlib.sha256().digest_size


class CheckpointRefused(FusionrecError):
    """A stored checkpoint whose signature does not verify: planted, corrupt, or signed with another key."""


class LeaseLostError(FusionrecError):
    """A checkpoint write refused: the learner lease no longer holds the writer's token (another
    learner took over; not retried)."""


# Take the lease when it is free, with a new fencing token; renew it only while it still holds the
# caller's name and token. Check and write are one call, so no other learner takes the lease between
# them. KEYS: lease, token counter. ARGV: name, ttl ms, the token held ('' to take).
# Returns {token (0 when not the caller's), the lease's value (false when free)}.
_LEASE = """
local held = redis.call('GET', KEYS[1])
if ARGV[3] == '' then
  if held then return {0, held} end
  local token = redis.call('INCR', KEYS[2])
  local value = ARGV[1] .. ':' .. token
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return {token, value}
end
if held == ARGV[1] .. ':' .. ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {tonumber(ARGV[3]), held}
end
return {0, held}
"""

# The fence every checkpoint write starts with: unless the lease (KEYS[1], ``<name>:<token>``) holds
# the writer's token (ARGV[1]) nothing is written and {0, the lease's value (false when free)} is
# returned; a write returns {1}. An empty token is an operator's write, not fenced.
_FENCE = """
if ARGV[1] ~= '' then
  local held = redis.call('GET', KEYS[1])
  if not held or string.match(held, ':(%d+)$') ~= ARGV[1] then return {0, held} end
end
"""

# KEYS: lease, head, index, the new blob, then the old blobs to drop.
# ARGV: token, number, signed blob, then the numbers of the old blobs.
_SAVE = _FENCE + """
redis.call('SET', KEYS[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
redis.call('SET', KEYS[2], ARGV[2])
for k = 5, #KEYS do
  redis.call('DEL', KEYS[k])
  redis.call('ZREM', KEYS[3], ARGV[k - 1])
end
return {1}
"""

# KEYS: lease, head. ARGV: token, number.
_SET_HEAD = _FENCE + """
redis.call('SET', KEYS[2], ARGV[2])
return {1}
"""


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class LearnerLease:
    """The single-learner lease ``{m}:learner:lease``, valued ``<name>:<token>``.

    :meth:`take` succeeds only on a free lease and draws a new token (``{m}:learner:token``, only ever
    incremented); :meth:`renew` extends it only while it still holds that token. A lease that lapsed
    is lost for good, even when nobody took it yet: another learner may have taken, written and
    released it meanwhile. ``holder`` is the lease's value at the last call (None when free).

    >>> lease = LearnerLease(client, keys, "learner-1", ttl_s=15)
    >>> lease.take(), lease.token                     # doctest: +SKIP
    (True, 7)
    """

    def __init__(self, client: redis.Redis, keys: Keys, name: str, ttl_s: float) -> None:
        self.keys = keys
        self.name = name
        self.ttl_ms = int(ttl_s * 1000)
        self.token: int | None = None
        self.holder: str | None = None
        self._script = register(client, _LEASE)

    def take(self) -> bool:
        """Take the lease if it is free, with a new token; False while another holds it."""
        self.token = self._call("") or None
        return self.token is not None

    def renew(self) -> bool:
        """Extend the lease; False (and the token is dropped) once it lapsed or another holds it."""
        if self.token is None:
            return False
        self.token = self._call(str(self.token)) or None
        return self.token is not None

    def _call(self, token: str) -> int:
        got, held = self._script(keys=[self.keys.learner_lease(), self.keys.learner_token()],
                                 args=[self.name, self.ttl_ms, token])
        self.holder = _text(held)
        return int(got)


def model_key(settings: Settings) -> bytes:
    """The key checkpoints are signed with: ``FUSIONREC_MODEL_KEY``, else ``<run dir>/model.key``
    (generated on first use, mode 0600, shared by the processes that share the run dir)."""
    if settings.learn.model_key:
        return settings.learn.model_key.encode()
    return secret_in(Path(settings.ops.run_dir) / "model.key").encode()


def sign(key: bytes, payload: bytes) -> bytes:
    return MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def verified(key: bytes, blob: bytes, name: str) -> bytes:
    """The payload of a signed blob; :class:`CheckpointRefused` unless the signature verifies."""
    head = len(MAGIC) + _DIGEST
    if len(blob) < head or not blob.startswith(MAGIC):
        raise CheckpointRefused(f"{name} is not a signed fusion checkpoint; not loaded")
    payload = blob[head:]
    if not hmac.compare_digest(blob[len(MAGIC):head], hmac.new(key, payload, hashlib.sha256).digest()):
        raise CheckpointRefused(f"{name} has a signature that does not verify under this model key; not loaded")
    return payload


@dataclass
class Checkpoint:
    model: FusionModel
    number: int = 0
    created_ms: int = 0
    # wall time of the oldest and newest update included since the previous checkpoint
    learned_from_ms: int = 0
    learned_to_ms: int = 0
    examples: int = 0
    hit_rate: float | None = None  # prequential HitRate@10 over the interval it covers
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """Signed checkpoints and the head. Given a ``lease``, every write (:meth:`save`, :meth:`set_head`)
    is fenced by its token and raises :class:`LeaseLostError` once another learner holds it; without
    one, writes are an operator's and are not fenced."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None,
                 lease: LearnerLease | None = None) -> None:
        self.redis = client
        self.keys = keys or Keys.for_settings(settings)
        self.keep = settings.learn.keep_checkpoints
        self.key = model_key(settings)
        self.lease = lease
        self._save = register(client, _SAVE)
        self._set_head = register(client, _SET_HEAD)

    def head(self) -> int | None:
        raw = self.redis.get(self.keys.fusion("head"))
        return int(cast(bytes, raw)) if raw is not None else None

    def numbers(self) -> list[int]:
        """Stored checkpoint numbers, oldest first."""
        found = cast(list[bytes], self.redis.zrange(self.keys.fusion("index"), 0, -1))
        return [int(n) for n in found]

    def save(self, ckpt: Checkpoint) -> int:
        """Store ``ckpt`` under a new number and make it the head; returns the number."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(self.keys.fusion("seq"))  # a number a refused save draws is skipped, never reused
        pipe.zrange(self.keys.fusion("index"), 0, -1)
        seq, stored = pipe.execute()
        number = int(seq)
        ckpt.number = number
        ckpt.created_ms = int(time.time() * 1000)
        blob = sign(self.key, pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL))
        older = [int(n) for n in stored]
        drop = older[: max(0, len(older) + 1 - self.keep)]  # the new one is the newest: never dropped
        self._fenced(self._save, [self.keys.fusion("head"), self.keys.fusion("index"), self.keys.fusion(number),
                                  *(self.keys.fusion(n) for n in drop)], [number, blob, *drop])
        return number

    def load(self, number: int | None = None) -> Checkpoint | None:
        """The head (or numbered) checkpoint; None when there is none. Raises :class:`CheckpointRefused`
        for one whose signature does not verify, before anything of it is unpickled."""
        number = self.head() if number is None else number
        if number is None:
            return None
        name = self.keys.fusion(number)
        raw = self.redis.get(name)
        if raw is None:
            return None
        payload = verified(self.key, cast(bytes, raw), name)
        try:
            ckpt = pickle.loads(payload)  # noqa: S301 - signed by a holder of the model key (module docstring)
        except Exception as exc:  # signed but unreadable here: written by another release, or cut short
            raise CheckpointRefused(f"{name} is signed but cannot be loaded by this release "
                                    f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        if not isinstance(ckpt, Checkpoint):
            raise CheckpointRefused(f"{name} does not hold a fusion checkpoint")
        return ckpt

    def newest_valid(self) -> Checkpoint | None:
        """The head checkpoint, or where it is refused the newest older one that verifies (logged)."""
        head = self.head()
        if head is None:
            return None
        for number in [head, *reversed([n for n in self.numbers() if n < head])]:
            try:
                ckpt = self.load(number)
            except CheckpointRefused as exc:
                log.error("%s", exc)
                continue
            if ckpt is not None:
                return ckpt
        return None

    def previous(self, number: int) -> int | None:
        older = [n for n in self.numbers() if n < number]
        return older[-1] if older else None

    def set_head(self, number: int) -> None:
        self._fenced(self._set_head, [self.keys.fusion("head")], [number])

    def _fenced(self, script: LuaScript, keys: list[str], args: list[Any]) -> None:
        """Run a write script behind the lease's fence (:data:`_FENCE`); :class:`LeaseLostError` if refused."""
        if self.lease is None:
            token = ""
        elif self.lease.token is None:
            raise LeaseLostError(f"{self.lease.name} holds no learner lease; checkpoint not written")
        else:
            token = str(self.lease.token)
        reply = script(keys=[self.keys.learner_lease(), *keys], args=[token, *args])
        if not reply[0]:
            raise LeaseLostError(f"the learner lease is {_text(reply[1]) or 'free'}, not token {token}: "
                                 "another learner took over; checkpoint not written")


class ServingModel:
    """What a ranker serves: the head checkpoint, re-checked at most every ``reload_s`` (thread-safe).

    Before any checkpoint exists it serves an untrained model (the fusion's prior weights).
    """

    def __init__(self, store: CheckpointStore, settings: Settings, metrics: Metrics | None = None,
                 reload_s: float | None = None) -> None:
        self.store = store
        self.metrics = metrics.of(ModelMetrics) if metrics is not None else None
        self.reload_s = settings.learn.reload_s if reload_s is None else reload_s
        self.use_vectors = settings.learn.vectors
        from fusionrec.online.learning.model import FusionModel

        self.number = 0
        self.model = FusionModel(use_vectors=self.use_vectors, seed=settings.learn.seed)
        self.refused: int | None = None  # the head last refused (logged once, not retried)
        self.last_lag_s: float | None = None  # update -> serving lag of the checkpoint loaded last
        self._checked = 0.0
        self._lock = threading.Lock()

    def current(self) -> tuple[int, FusionModel]:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.reload_s:
                self._checked = now
                self._reload()
            return self.number, self.model

    def _reload(self) -> None:
        try:
            head = self.store.head()
        except redis.RedisError as exc:
            log.warning("could not check the fusion checkpoint head: %s", exc)
            return
        if head is None or head == self.number or head == self.refused:
            return
        try:
            ckpt = self.store.load(head)
        except CheckpointRefused as exc:
            self.refused = head
            if self.metrics is not None:
                self.metrics.refused.inc()
            log.error("%s; still serving checkpoint %d", exc, self.number)
            return
        if ckpt is None:
            return
        self.number, self.model = ckpt.number, ckpt.model
        lag_s = max(0.0, time.time() - ckpt.learned_from_ms / 1000) if ckpt.learned_from_ms else None
        self.last_lag_s = lag_s
        if self.metrics is not None:
            self.metrics.model_version.set(ckpt.number)
            if lag_s is not None:
                self.metrics.model_reload_lag.observe(lag_s)
        log.info("serving fusion checkpoint %d (%d examples learned)", ckpt.number, ckpt.model.examples)
