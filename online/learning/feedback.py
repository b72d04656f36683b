"""The feedback log: what was served, joined with what the user did next, becomes training examples.

Each time the recommendation writer ranks a user it logs a :class:`Snapshot`: the candidate pool it
ranked (features as they were at decision time, shown items first), the user's profile vector, and
the user's events of the batch that caused this ranking. The learner keeps each user's latest
snapshot; when the next one arrives, its events are the *outcome* of the previous one:

* positives: pool items the user then clicked, added to cart or purchased within ``window_ms`` of
  the previous decision; where the user did none of those to a pool item, the pool items the user
  viewed (``views``: on a clickstream most decisions are followed by views alone, and the items
  viewed are what the list should have held; counted as ``labelled_views``);
* negatives: the shown items not acted on (explicit impressions included), plus up to
  ``sampled_negatives`` other pool candidates drawn at random.

Features come from the state *before* the outcome, so no label leaks into its own features, and the
same join runs in ``fusionrec learner`` (snapshots from Kafka) and in ``fusionrec evaluate``
(snapshots handed over in process). A decision followed by no positive within the window yields no
example (counted), since an absent user says nothing about which items were better.

Replays log decisions again: the user-state stream re-derives its outputs for events it had already
applied (see :mod:`fusionrec.streams.state`). Each snapshot carries the source positions of its
events (``upto``: newest offset per events partition; ``positions``: the position of each action),
and the joiner de-duplicates by them: a snapshot whose events the user's pending decision already
covered is a repeat (counted as ``duplicate``) and is dropped; one that overlaps it keeps only its
new actions. Every action is therefore the outcome of exactly one decision.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import numpy as np

from fusionrec.core.errors import InvalidEventError
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.features import FEATURES, CandidatePool
from fusionrec.streams.producer import AcknowledgedOutput, AcknowledgedPublisher, EventProducer

T = TypeVar("T")

POSITIVE_TYPES = frozenset({"click", "add_to_cart", "purchase"})


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """One logged decision (msgpack on the feedback topic)."""

    user_id: str
    ts: int  # decision time: event time of the newest event in the state that was ranked
    items: list[str]  # the pool, ranked: the first ``shown`` were stored as the user's recommendations
    shown: int
    X: bytes  # float16 (len(items), n_features), row-major
    n_features: int
    version: str | None  # vector model version of ``profile``
    profile: bytes | None  # float32 unit vector
    actions: list[tuple[str, str, int]]  # (type, item, ts) that led to this decision
    impressions: list[str]
    model: int  # fusion model version that ranked (0: none loaded)
    logged_at: int  # wall ms
    positions: list[tuple[int, int]] = []  # (events partition, offset) of each action
    upto: dict[int, int] = {}  # events partition -> newest offset of the user's events covered so far

    @classmethod
    def of(cls, pool: CandidatePool, order: list[int], shown: int, actions: list[tuple[str, str, int]],
           impressions: list[str], model: int, logged_at: int, positions: list[tuple[int, int]] | None = None,
           upto: dict[int, int] | None = None, features: bytes | None = None) -> Snapshot:
        """``features``: the pool's rows in ``order`` as float16 bytes, where the caller converted many
        pools at once (:func:`ordered_features`)."""
        version, profile = (pool.profile[0], pool.profile[1].astype("<f4").tobytes()) if pool.profile else (None, None)
        X = features if features is not None else np.ascontiguousarray(pool.X[order], dtype="<f2").tobytes()
        return cls(user_id=pool.user_id, ts=pool.ts, items=[pool.items[r] for r in order], shown=shown,
                   X=X, n_features=pool.X.shape[1],
                   version=version, profile=profile, actions=actions, impressions=impressions, model=model,
                   logged_at=logged_at, positions=list(positions or []), upto=dict(upto or {}))

    def pool(self) -> CandidatePool:
        X = np.frombuffer(self.X, dtype="<f2").reshape(len(self.items), self.n_features).astype(np.float32)
        profile = (self.version, np.frombuffer(self.profile, dtype="<f4")) \
            if self.version is not None and self.profile is not None else None
        return CandidatePool(user_id=self.user_id, ts=self.ts, items=list(self.items), X=X, profile=profile)


def ordered_features(pools: Sequence[CandidatePool], orders: Sequence[list[int]]) -> list[bytes]:
    """Each pool's feature rows in its order, as the float16 bytes a :class:`Snapshot` holds: one
    conversion for all the pools."""
    if not pools:
        return []
    starts = np.cumsum([0, *(len(p) for p in pools)])
    X = np.concatenate([p.X for p in pools])
    rows = np.concatenate([np.asarray(o, dtype=np.int64) + start for o, start in zip(orders, starts, strict=False)])
    half = np.ascontiguousarray(X[rows], dtype="<f2")
    ends = np.cumsum([0, *(len(o) for o in orders)])
    return [half[lo:hi].tobytes() for lo, hi in zip(ends[:-1], ends[1:], strict=True)]


encode_snapshot = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Snapshot)


def decode_snapshot(raw: bytes) -> Snapshot:
    """A logged decision whose parts agree with each other; anything else raises :class:`InvalidEventError`."""
    snap = decode_feedback(_decoder, raw)
    if snap.n_features != len(FEATURES) or len(snap.X) != 2 * len(snap.items) * snap.n_features:
        raise InvalidEventError("invalid_value", f"features of {len(snap.X)} bytes for {len(snap.items)} items "
                                                 f"x {snap.n_features} (expected x {len(FEATURES)})")
    if not 0 <= snap.shown <= len(snap.items):
        raise InvalidEventError("invalid_value", f"shown {snap.shown} of {len(snap.items)} items")
    if snap.profile is not None and len(snap.profile) % 4:
        raise InvalidEventError("invalid_value", f"profile of {len(snap.profile)} bytes is no float32 vector")
    if snap.positions and len(snap.positions) != len(snap.actions):
        raise InvalidEventError("invalid_value", f"{len(snap.positions)} positions for {len(snap.actions)} actions")
    return snap


def decode_feedback(decoder: msgspec.msgpack.Decoder[T], raw: bytes | None) -> T:
    """Decode one feedback message; whatever the bytes make the decoder raise is :class:`InvalidEventError`."""
    if not raw:
        raise InvalidEventError("empty", "message has no value")
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidEventError("undecodable", str(exc)[:300]) from exc
    except RecursionError as exc:
        raise InvalidEventError("too_deep", "msgpack nested too deeply") from exc
    except UnicodeDecodeError as exc:  # msgspec raises it, not DecodeError, for a msgpack str of invalid UTF-8
        raise InvalidEventError("undecodable", f"invalid UTF-8: {exc}"[:300]) from exc


@dataclass
class Group:
    """The labelled rows of one decision (a pool subset) and which of them are positive."""

    pool: CandidatePool
    y: np.ndarray  # (len(pool),) 0/1
    shown: int  # rows [0, shown) were shown
    # the decision's whole pool, in logged order, and which of its rows are positive (for the
    # learned share of new items, which replays whole lists: see fusionrec.online.learning.explore)
    full: CandidatePool | None = None
    positive: np.ndarray | None = None


class FeedbackJoiner:
    """Pairs each user's previous snapshot with the events of the next one (see module docstring)."""

    def __init__(self, window_ms: int, sampled_negatives: int = 30, max_users: int = 200_000, seed: int = 0,
                 views: bool = True) -> None:
        self.window_ms = window_ms
        self.views = views
        self.sampled_negatives = sampled_negatives
        self.max_users = max_users
        self.seed = seed
        self.pending: dict[str, Snapshot] = {}
        self.outcomes: Counter[str] = Counter()
        self._watermark = 0

    @classmethod
    def of(cls, settings: Settings) -> FeedbackJoiner:
        """The join as ``settings.learn`` configures it (the learner's and the evaluation's)."""
        s = settings.learn
        return cls(s.window_s * 1000, s.sampled_negatives, seed=s.seed, views=s.view_positives)

    def add(self, snapshots: list[Snapshot]) -> list[Group]:
        groups: list[Group] = []
        for snap in snapshots:
            if snap.n_features != len(FEATURES):
                self.outcomes["schema_mismatch"] += 1
                continue
            prev = self.pending.get(snap.user_id)
            if prev is not None and prev.upto and snap.upto:
                new = unseen_part(snap, prev.upto)
                if new is None:
                    self.outcomes["duplicate"] += 1
                    continue
                snap = new
            self.pending.pop(snap.user_id, None)
            if prev is not None:
                group = self._label(prev, snap)
                if group is not None:
                    groups.append(group)
            self.pending[snap.user_id] = snap
            self._watermark = max(self._watermark, snap.ts)
        self._expire()
        return groups

    def _label(self, prev: Snapshot, nxt: Snapshot) -> Group | None:
        inside = [(kind, item) for kind, item, ts in nxt.actions if prev.ts < ts <= prev.ts + self.window_ms]
        acted = {item for kind, item in inside if kind in POSITIVE_TYPES}
        index = {item: r for r, item in enumerate(prev.items)}
        hits = [index[i] for i in acted if i in index]
        outcome = "labelled"
        if not hits and self.views:  # nothing stronger happened to a pool item: the items viewed
            viewed = {item for kind, item in inside if kind == "view"}
            hits = [index[i] for i in viewed if i in index]
            acted |= viewed
            outcome = "labelled_views"
        if not acted:
            self.outcomes["no_positive"] += 1
            return None
        if not hits:
            self.outcomes["positive_outside_pool"] += 1
            return None
        self.outcomes[outcome] += 1
        hit_rows = set(hits)
        rest = [r for r in range(prev.shown, len(prev.items)) if r not in hit_rows]
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}:{prev.user_id}:{prev.ts}".encode()))
        sampled = sorted(rng.choice(rest, size=min(self.sampled_negatives, len(rest)), replace=False).tolist()) \
            if rest else []
        rows = sorted(set(range(min(prev.shown, len(prev.items)))) | hit_rows | set(sampled))
        pool = prev.pool()
        y = np.array([1.0 if r in hit_rows else 0.0 for r in rows])
        sub = CandidatePool(user_id=pool.user_id, ts=pool.ts, items=[pool.items[r] for r in rows], X=pool.X[rows],
                   profile=pool.profile)
        positive = np.zeros(len(prev.items))
        positive[hits] = 1.0
        return Group(pool=sub, y=y, shown=sum(1 for r in rows if r < prev.shown), full=pool, positive=positive)

    def _expire(self) -> None:
        """Forget decisions whose window closed without an outcome (and the oldest past ``max_users``)."""
        cutoff = self._watermark - self.window_ms
        if len(self.pending) > self.max_users or (self.pending and next(iter(self.pending.values())).ts < cutoff):
            stale = [u for u, s in self.pending.items() if s.ts < cutoff]
            for u in stale:
                del self.pending[u]
            self.outcomes["expired"] += len(stale)
            while len(self.pending) > self.max_users:
                self.pending.pop(next(iter(self.pending)))
                self.outcomes["evicted"] += 1


def unseen_part(snap: Snapshot, seen: dict[int, int]) -> Snapshot | None:
    """``snap`` without the actions at or below ``seen``; None when it has nothing newer (a repeat)."""
    if all(offset <= seen.get(p, -1) for p, offset in snap.upto.items()):
        return None
    keep = [i for i, (p, offset) in enumerate(snap.positions) if offset > seen.get(p, -1)]
    upto = {**seen, **{p: max(offset, seen.get(p, -1)) for p, offset in snap.upto.items()}}
    if len(keep) == len(snap.positions) and upto == snap.upto:
        return snap
    return msgspec.structs.replace(snap, actions=[snap.actions[i] for i in keep],
                                   positions=[snap.positions[i] for i in keep], upto=upto)


class FeedbackPublisher(AcknowledgedPublisher):
    """The writer's feedback sink in production: snapshots to the feedback topic, keyed by user.

    Produced without waiting (:class:`~fusionrec.streams.producer.AcknowledgedOutput`): each
    snapshot holds back the events offsets of what it logs (its actions' positions, or the newest
    offset of an impression-only user) until the broker acknowledges it. The ranking scheduler adds
    that to its floor, so the consumer stores its offsets only past durable feedback, and a replay
    logs the decisions again (the joiner treats a repeated decision like any other). A failed
    snapshot is produced again with every unacknowledged one behind it, in order: the joiner labels
    a user's decision with the next one.
    """

    def __init__(self, settings: Settings, producer: EventProducer | None = None, max_pending: int = 50_000) -> None:
        self.topic = settings.kafka.topic_feedback
        self.output = AcknowledgedOutput(settings, self.topic, producer=producer, producer_options={"linger.ms": 5},
                                         max_pending=max_pending)

    def __call__(self, snapshots: list[Snapshot]) -> None:
        self.publish(encode_feedback(snapshots))

    def publish(self, messages: list[Encoded]) -> None:
        """Produce snapshots another process encoded (:func:`encode_feedback`), in their order."""
        self.output.recover()
        for value, key, first in messages:
            self.output.send(value, key, first)


Encoded = tuple[bytes, str, dict[int, int]]  # a snapshot's message value, key (user) and held-back offsets


def encode_feedback(snapshots: list[Snapshot]) -> list[Encoded]:
    """The feedback topic's messages for ``snapshots``: what :meth:`FeedbackPublisher.publish` produces."""
    return [(encode_snapshot(s), s.user_id, first_offsets(s.positions, s.upto)) for s in snapshots]


def first_offsets(positions: list[tuple[int, int]], upto: dict[int, int]) -> dict[int, int]:
    """Events partition -> the first offset a decision's events hold back: its actions' positions, or
    for a partition with none (impressions only) the newest offset covered."""
    first: dict[int, int] = {}
    for p, offset in positions:
        first[p] = min(offset, first.get(p, offset))
    for p, offset in upto.items():
        first.setdefault(p, offset)
    return first
