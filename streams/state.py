"""Live user and item state in Redis, applied one consumed batch at a time with exactly-once effect.

Per batch, in three pipelined round trips of at most one script call per hash-tag bucket:

1. **read**: each touched user bucket's offset guards and its users' stored states; the catalog
   category/brand of the batch's items. Events at or below their bucket's guard were applied before
   and are dropped.
2. **items**: co-visitation increments (one guarded call per item bucket) and popularity increments
   (one guarded call). Contributions are computed from the users' state *before* this batch, so a
   replay recomputes exactly the same contributions; each guard skips what it already has.
3. **users**: each touched user's whole :class:`UserState` (counters, recent items, decayed item
   weights and category/brand affinity, last-seen, purchases, remembered event ids), computed in
   process, one compare-and-set per user bucket carrying the states and the bucket's partition guards
   (:data:`~fusionrec.core.scripts.USER_STORE`). Written after the items: a user guard past an offset
   means that event's item contributions are in Redis too. Redis stores the states; it does no
   arithmetic on them.

The consumer that owns a partition is the only writer of the users keyed to it, so the store keeps
what the read step would return in process: each bucket's guards, each user's state and the version
it was read or written at (at most ``state.cache_users``, least recently touched evicted first) and
the items' category/brand (for ``META_TTL_S``). A batch reads only what is not kept. A batch changes
the kept states in place; a failed write forgets all that is kept (:meth:`StateStore.reset`), so a
retry or a replay starts again from what Redis holds. A user whose events arrive on two partitions
owned by two consumers loses no update: the compare-and-set refuses a state whose stored version
moved since it was read, and the batch is recomputed from Redis (:class:`UserMovedError`).

Producer duplicates: a user event whose ``event_id`` the same user sent before is dropped (no
state, no outputs) while its first copy is remembered (:class:`Seen`: ``state.dedupe_window_s`` of
event time, at most ``state.dedupe_ids`` ids per user). The remembered ids are written with the
rest of the user's state in the same guarded call, each with the position of the event that
carried it, so a replay decides every duplicate as the first pass did. That holds for keyed producers (one
user's events on one partition, in order); a user whose events arrive on two partitions is
de-duplicated per consumer, best effort.

The caller commits Kafka offsets only after all three succeeded. A crash anywhere in between followed
by a replay from the last committed offset converges to the state of one clean pass.

The :class:`BatchResult` describes *every* event of the batch, the ones the guards skipped included,
each with its source position: the outputs derived from it downstream (recommendations refreshed,
feedback decisions, item count deltas) are produced again on a replay and carry the positions their
consumers de-duplicate by, so they are exactly once in effect even when the state write was not
what failed (see :mod:`fusionrec.streams.user_state`). Decay is forward
decay: an event at ``ts`` adds ``w * 2 ** ((ts - epoch) / half_life)``, so sorted-set order is decayed
order without ever rewriting old members, and a user's weights only ever grow.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import operator
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import redis

from fusionrec.core.errors import StateStoreError
from fusionrec.core.keys import Keys, Remembered
from fusionrec.core.scripts import CATALOG_APPLY, MULTI_HMGET, USER_READ, USER_STORE, ZSET_APPLY, register
from fusionrec.core.settings import DECAY_MAX_EXPONENT, Settings
from fusionrec.streams.contract import CatalogEvent, UserEvent
from fusionrec.streams.positions import AppliedPositions

log = logging.getLogger(__name__)
_msgpack = msgspec.msgpack.Encoder()
# How long an item's category/brand is used from process memory; catalog events this process applies
# replace it at once, those another consumer applies are seen within this time.
META_TTL_S = 30.0
META_CACHE_ITEMS = 200_000
# A co-visitation set's TTL is set again at most this often by one process (or a tenth of the TTL, if
# shorter), so a set expires between ``item_ttl_s`` minus this and ``item_ttl_s`` after it last changed
# (a set Redis lost and a write recreated meanwhile gets its TTL at the next refresh).
TTL_REFRESH_S = 3600.0
EXPIRED_KEYS = 500_000  # sets whose last TTL write is remembered (all forgotten beyond: written again)
KEY_CACHE = 500_000  # ids whose Redis keys are remembered (all forgotten beyond: built again)
_NO_META: tuple[None, None] = (None, None)  # an item without category or brand


class StaleStateError(StateStoreError):
    """A guard moved between reading state and writing it (a concurrent writer); retry the batch."""


class UserMovedError(StaleStateError):
    """Another consumer wrote some of the batch's users since they were read (a user whose events arrive
    on two partitions); no guard moved."""

# How many times a batch is recomputed at once when only users moved, before the caller's back-off.
USER_MOVED_RETRIES = 3

# How much one event of each type says about interest in its item.
EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0,
                                   "impression": 0.0}

Args = list[Any]


class Positioned(NamedTuple):
    """A valid event with its source position; ``partition`` scopes the offset guards."""

    partition: int
    offset: int
    event: UserEvent


@dataclass
class UserTouch:
    """What the recommendation writer needs to know about one user touched by a batch."""

    recent: list[str]
    last_ts: int
    # (type, item, ts) of the batch's events for this user with an item, in offset order, and the
    # items its impression events showed: the feedback the learner joins with what was served before
    actions: list[tuple[str, str, int]] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    # (partition, offset) of each action, and the newest offset per partition of all the user's
    # events in the batch: what the learner de-duplicates a replayed decision by
    positions: list[tuple[int, int]] = field(default_factory=list)
    upto: dict[int, int] = field(default_factory=dict)


@dataclass
class BatchResult:
    """Every event of a batch as its outputs need it; ``skipped`` ones were applied by an earlier pass."""

    applied: int = 0
    skipped: int = 0
    duplicates: int = 0  # producer duplicates (an event id the user sent before): no state, no outputs
    recomputed: int = 0  # times recomputed because another consumer wrote some of its users meanwhile
    users: dict[str, UserTouch] = field(default_factory=dict)
    # source partition -> item -> offsets of its interactions (not impressions), and the items' categories
    item_offsets: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)
    max_ts: int = 0

    def item_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for items in self.item_offsets.values():
            for item, offsets in items.items():
                counts[item] += len(offsets)
        return dict(counts)


class Decay:
    """Forward-decay weights: ``w * 2 ** ((ts - epoch) / half_life)``, finite whatever ``ts``.

    The exponent is capped at :data:`~fusionrec.core.settings.DECAY_MAX_EXPONENT`, which no valid
    event reaches: settings are refused unless an event ten years from now stays under it, and the
    contract dead-letters events more than ``FUSIONREC_MAX_FUTURE_SKEW_S`` ahead of now. The cap
    only guarantees that ``math.exp`` never raises here: this runs after validation, where an
    exception would stop the consumer instead of dead-lettering the event.

    >>> Decay(epoch_ms=0, half_life_s=60).weight(3.0, 120_000)
    12.0
    """

    def __init__(self, epoch_ms: int, half_life_s: float) -> None:
        self.epoch_ms = epoch_ms
        self.rate = math.log(2) / (half_life_s * 1000.0)

    def weight(self, w: float, ts_ms: int) -> float:
        return w * math.exp(min(self.rate * (ts_ms - self.epoch_ms), DECAY_MAX_EXPONENT))


class Seen:
    """One user's remembered event ids: the producer-duplicate window (``state.dedupe_*``).

    An entry is ``(ts, partition, offset, event_id, last partition, last offset)``: an applied event
    and the position of the newest copy of it dropped since (its own position while there is none).
    :meth:`forget` drops the entries more than ``window_ms`` of event time older than the newest, then
    the oldest beyond ``cap``, but only those whose last position is *settled*: at or below an offset
    whose outputs are done and recorded in Redis, which no replay goes back to (see
    :mod:`fusionrec.streams.positions`). So any event a replay meets finds the entry its first pass
    made or used, and is decided again the same way: applied once, dropped as a copy, or neither.
    What the window promises is a minimum: a copy within it is always dropped; one older than the
    window is dropped if its first is still remembered.

    >>> seen = Seen(window_ms=1000, cap=2)
    >>> seen.add("a", 0, 0, 100); seen.add("b", 0, 1, 200); seen.copied("a", 0, 2); seen.add("c", 0, 3, 5000)
    >>> seen.forget({0: 1}); [e[3] for e in seen.entries()]  # "a" was copied at offset 2, not settled yet
    ['a', 'c']
    >>> seen.forget({0: 3}); [e[3] for e in seen.entries()]
    ['c']
    """

    __slots__ = ("cap", "window_ms", "_by_id", "_order")

    def __init__(self, window_ms: int, cap: int, entries: Iterable[tuple[int, int, int, str, int, int]] = ()) -> None:
        self.window_ms = window_ms
        self.cap = cap
        self._order = sorted(entries)
        self._by_id = {e[3]: e for e in self._order}

    def first(self, event_id: str) -> tuple[int, int] | None:
        """(partition, offset) of the remembered event with this id."""
        e = self._by_id.get(event_id)
        return None if e is None else (e[1], e[2])

    def add(self, event_id: str, partition: int, offset: int, ts: int) -> None:
        """Remember an applied event (whose id is not remembered)."""
        entry = (ts, partition, offset, event_id, partition, offset)
        bisect.insort(self._order, entry)
        self._by_id[event_id] = entry

    def copied(self, event_id: str, partition: int, offset: int) -> None:
        """A copy of a remembered event was dropped at this position: keep the entry until it settles."""
        e = self._by_id[event_id]
        if (partition, offset) > (e[4], e[5]):
            i = bisect.bisect_left(self._order, e)
            self._order[i] = self._by_id[event_id] = (*e[:4], partition, offset)

    def forget(self, settled: Mapping[int, int]) -> None:
        """Drop what is out of the window or over the cap, of the entries whose last position is settled."""
        order = self._order
        if not order:
            return
        cutoff = order[-1][0] - self.window_ms
        excess = len(order) - self.cap
        kept: list[tuple[int, int, int, str, int, int]] = []
        for i, e in enumerate(order):
            if e[0] >= cutoff and excess <= 0:
                kept.extend(order[i:])
                break
            if e[5] <= settled.get(e[4], -1):
                del self._by_id[e[3]]
                excess -= 1
            else:
                kept.append(e)
        self._order = kept

    def entries(self) -> list[tuple[int, int, int, str, int, int]]:
        """``(ts, partition, offset, event_id, last partition, last offset)``, oldest first."""
        return list(self._order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Seen) and (self.window_ms, self.cap, self._order) == (
            other.window_ms, other.cap, other._order)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Seen({self.window_ms}, {self.cap}, {self._order!r})"


class UserState(msgspec.Struct, array_like=True):
    """One user's state: what their state hash stores (msgpack, field ``d``) and their partition's
    consumer keeps in process. Written whole; Redis does no arithmetic on it.

    Stored as an array, and fields are only ever appended: a state written before a field existed
    reads with its default, and one written by a later version reads with what this one knows (the
    later fields are dropped at this version's next write of the user)."""

    last_seen: int = -1  # newest event time (ms)
    counts: dict[str, int] = msgspec.field(default_factory=dict)  # events per type
    recent: list[str] = msgspec.field(default_factory=list)  # interacted items, newest first, capped
    # forward-decayed interest per item, and per ``c:<category>`` / ``b:<brand>``
    items: dict[str, float] = msgspec.field(default_factory=dict)
    affinity: dict[str, float] = msgspec.field(default_factory=dict)
    # purchased item -> (purchases, first, last purchase event time in ms)
    buys: dict[str, tuple[int, int, int]] = msgspec.field(default_factory=dict)
    # the remembered event ids (:class:`Seen` entries)
    seen: list[tuple[int, int, int, str, int, int]] = msgspec.field(default_factory=list)


_state_decoder = msgspec.msgpack.Decoder(UserState)


def decode_user_state(raw: bytes | None) -> UserState:
    """A stored state (the ``d`` field of a user's state hash); an empty one for ``None``.

    Raises :class:`StateStoreError` for bytes that are not a state this module wrote."""
    if raw is None:
        return UserState()
    try:
        return _state_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise StateStoreError(f"not a stored user state: {exc}") from exc


def user_state_or_empty(uid: str, raw: bytes | None, then: str) -> UserState:
    """:func:`decode_user_state`, or an empty state (logged, saying ``then``) for a value that is not one."""
    try:
        return decode_user_state(raw)
    except StateStoreError as exc:
        log.warning("user %s: %s; %s", uid, exc, then)
        return UserState()


@dataclass
class Kept:
    """What the store keeps in process of one user: their state as Redis holds it after the last write
    (or as the batch being written changes it), and the version it was read or written at."""

    version: str  # '' when Redis held no state
    state: UserState
    seen: Seen
    size: int = 0  # bytes of the state as last read or written (what the cache's byte bound counts)

    def encode(self) -> bytes:
        self.state.seen = self.seen.entries()
        raw = _msgpack.encode(self.state)
        self.size = len(raw)
        return raw


@dataclass
class ZsetCall:
    """Sorted-set contributions for one guard (an item bucket, or popularity) from one partition.

    ``entries[key]`` holds (offset, member, weight) in the order they were produced. With
    ``aggregate`` the weights per member are summed into one record (uncapped sets: order does not
    change the result); otherwise there is one record per offset, applied in offset order. The calls
    of one guard go to Redis together (:func:`zset_args`).
    """

    guard: str
    partition: int
    cap: int
    aggregate: bool
    ttl_s: int = 0  # the sets expire this long after their last update (0: never)
    entries: dict[str, list[tuple[int, str, float]]] = field(default_factory=lambda: defaultdict(list))

    def fresh(self, floor: int) -> tuple[dict[str, list[list[Any]]], int, int] | None:
        """Each set's records of the entries above ``floor``, and the lowest and highest offset among
        them; None when nothing is left."""
        out: dict[str, list[list[Any]]] = {}
        lo, hi = None, -1
        for key, entries in self.entries.items():
            # offsets are never negative: the first send (floor -1) takes every entry
            fresh = sorted(entries if floor < 0 else [e for e in entries if e[0] > floor], key=_offset)
            if not fresh:
                continue
            lo = fresh[0][0] if lo is None else min(lo, fresh[0][0])
            hi = max(hi, fresh[-1][0])
            out[key] = self._records(fresh)
        return None if lo is None else (out, lo, hi)

    def _records(self, fresh: list[tuple[int, str, float]]) -> list[list[Any]]:
        if self.aggregate:
            sums: dict[str, float] = {}
            for _off, member, w in fresh:
                sums[member] = sums.get(member, 0.0) + w
            return [[x for pair in sums.items() for x in pair]]
        records: list[list[Any]] = []
        last = None
        for off, member, w in fresh:
            if off != last:
                records.append([])
                last = off
            records[-1].extend((member, w))
        return records


def zset_args(calls: Sequence[ZsetCall], floors: Mapping[int, int],
              due: Callable[[str], bool] = lambda _key: True) -> tuple[list[str], Args, list[str]] | None:
    """One :data:`~fusionrec.core.scripts.ZSET_APPLY` call for the calls of one guard (one per
    partition): script keys and args for the entries above each partition's floor (``floors``, -1
    where absent), and the sets whose TTL it sets (those ``due`` says are due, first); None when
    nothing is left. A set's records go partition by partition, in the order of ``calls``."""
    first = calls[0]
    records: dict[str, list[list[Any]]] = {}
    spans: Args = []
    for call in calls:
        built = call.fresh(floors.get(call.partition, -1))
        if built is None:
            continue
        sets, lo, hi = built
        spans.extend((call.partition, lo, hi))
        for key, recs in sets.items():
            if key in records:
                records[key].extend(recs)
            else:
                records[key] = recs
    if not spans:
        return None
    refresh = [key for key in records if due(key)] if first.ttl_s > 0 else []
    if refresh:
        chosen = set(refresh)
        ordered = [*refresh, *(key for key in records if key not in chosen)]
    else:
        ordered = list(records)
    payload = _msgpack.encode([records[key] for key in ordered])
    return ([first.guard, *ordered], [first.cap, payload, first.ttl_s, len(refresh), len(spans) // 3, *spans],
            refresh)


@dataclass
class _BucketWrite:
    """One bucket's users to write and, per partition, the offsets their new events span."""

    users: list[str] = field(default_factory=list)
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)

    def span(self, partition: int, offset: int) -> None:
        lo, hi = self.spans.get(partition, (offset, offset))
        self.spans[partition] = (min(lo, offset), max(hi, offset))


class StateStore:
    """Applies validated events to the Redis key schema (see :mod:`fusionrec.core.keys`)."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.popularity_decay = Decay(settings.state.decay_epoch_ms, settings.state.popularity_half_life_s)
        self.affinity_decay = Decay(settings.state.decay_epoch_ms, settings.state.affinity_half_life_s)
        self._user_store = register(client, USER_STORE)
        self._user_read = register(client, USER_READ)
        self._zset_apply = register(client, ZSET_APPLY)
        self._catalog_apply = register(client, CATALOG_APPLY)
        self.positions = AppliedPositions(client, self.keys, settings.kafka.topic_events)
        self._hmget = register(client, MULTI_HMGET)
        # Kept in process (see the module docstring): what Redis acknowledged, or forgotten on a failure.
        self._guards: dict[tuple[int, int], int] = {}  # (user bucket, partition) -> applied offset
        self._kept: dict[str, Kept] = {}  # user -> state and version, least recently touched first
        self._kept_sizes: dict[str, int] = {}  # user -> the size their kept state counts for
        self._kept_bytes = 0
        self._settled: dict[int, int] = {}  # events partition -> offset no replay goes back to (inclusive)
        self._window_ms = settings.state.dedupe_window_s * 1000
        self._dedupe_ids = settings.state.dedupe_ids if self._window_ms > 0 else 0
        self._meta: dict[str, tuple[str | None, str | None, float]] = {}  # item -> category, brand, until
        self._expired: dict[str, float] = {}  # sorted set -> when this process last set its TTL (monotonic)
        # keys built once per id: an item's co-visitation (guard, set), a user's (bucket, state hash)
        k = self.keys
        self._covis_keys = Remembered(lambda item: (k.item_guard(k.bucket(item)), k.item_covis(item)), KEY_CACHE)
        self._user_keys = Remembered(lambda uid: (k.bucket(uid), k.user_state(uid)), KEY_CACHE)
        self._pop_keys = (self.keys.popularity_guard(), self.keys.popularity())

    def reset(self) -> None:
        """Forget what is kept in process; the next batch reads it from Redis again."""
        self._guards.clear()
        self._kept.clear()
        self._kept_sizes.clear()
        self._kept_bytes = 0
        self._meta.clear()

    def settle(self, done: Mapping[int, int]) -> None:
        """Events partition -> last offset whose outputs are done and recorded in Redis: no replay goes
        back to it, so remembered event ids up to it may be forgotten (-1: none, after a reset)."""
        self._settled.update(done)

    def stored(self, uid: str) -> UserState:
        """The user's state as Redis holds it (empty when none is stored)."""
        raw = self.redis.hget(self.keys.user_state(uid), "d")
        return decode_user_state(raw.encode() if isinstance(raw, str) else raw)

    @property
    def cached_users(self) -> int:
        return len(self._kept)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the kept users' states, encoded (about a third of what they take in process)."""
        return self._kept_bytes

    # ------------------------------------------------------------------ user events
    def apply(self, batch: Sequence[Positioned]) -> BatchResult:
        if not batch:
            return BatchResult()
        for attempt in range(USER_MOVED_RETRIES + 1):
            try:
                result = self._apply(batch)
                result.recomputed = attempt
                return result
            except UserMovedError:
                self.reset()  # the buckets written are guarded: the next pass skips what is in
                if attempt == USER_MOVED_RETRIES:
                    raise
            except BaseException:
                self.reset()  # a partial write, a concurrent writer: start again from what Redis holds
                raise
        raise AssertionError("unreachable")

    def _apply(self, batch: Sequence[Positioned]) -> BatchResult:
        by_bucket: dict[int, dict[str, list[Positioned]]] = defaultdict(lambda: defaultdict(list))
        user_keys = self._user_keys
        for pe in batch:
            uid = str(pe.event.user_id)  # validated ids are already str; this tells the type checker
            by_bucket[user_keys[uid][0]][uid].append(pe)
        for group in by_bucket.values():
            for events in group.values():
                events.sort(key=_position)  # source order, which every step below relies on
        guards, kepts, meta = self._read(by_bucket, batch)
        result = BatchResult()
        item_offsets, categories = result.item_offsets, result.categories
        items: dict[tuple[str, int], ZsetCall] = {}
        writes: dict[int, _BucketWrite] = {}
        for bucket, group in by_bucket.items():
            for uid, events in group.items():
                # changed in place: a failed write resets what is kept (see ``apply``)
                kept = kepts[uid]
                new = [pe for pe in events if pe.offset > guards.get((bucket, pe.partition), -1)]
                result.skipped += len(events) - len(new)
                if self._dedupe_ids:
                    fresh, outputs = self._dedupe(bucket, events, guards, kept.seen)
                    if new:  # (forgetting is a change to write: only with a write of the user)
                        kept.seen.forget(self._settled)
                else:
                    fresh, outputs = new, events
                result.duplicates += len(events) - len(outputs)
                if new:
                    # the guards move past every new event, copies included
                    write = writes.setdefault(bucket, _BucketWrite())
                    write.users.append(uid)
                    for pe in new:
                        write.span(pe.partition, pe.offset)
                    self._update(kept.state, fresh, meta, items)
                result.applied += len(fresh)
                if not outputs:
                    continue
                # outputs cover every event but duplicates, the skipped ones too: a replay reproduces them
                result.users[uid] = touch = _touch(list(kept.state.recent), outputs)
                for (_kind, item, _ts), (partition, offset) in zip(touch.actions, touch.positions, strict=True):
                    by_item = item_offsets.get(partition)
                    if by_item is None:
                        by_item = item_offsets[partition] = {}
                    at = by_item.get(item)
                    if at is None:
                        by_item[item] = [offset]
                    else:
                        at.append(offset)
                    category = meta.get(item, _NO_META)[0]
                    if category:
                        categories[item] = category
                if touch.last_ts > result.max_ts:
                    result.max_ts = touch.last_ts
        self._apply_zsets(list(items.values()))
        self._apply_users(writes, kepts)
        self._keep(writes, kepts)
        return result

    @staticmethod
    def _dedupe(bucket: int, events: list[Positioned], guards: dict[tuple[int, int], int],
                seen: Seen) -> tuple[list[Positioned], list[Positioned]]:
        """(events to apply, events with outputs) of one user's events in source order: copies of an event
        ``seen`` remembers are neither.
        ``seen`` learns the applied events and the dropped copies' positions.

        An id remembered at the event's own position is the event itself: applied by an earlier pass
        (the guards skip it), or remembered by a write of the user's events on another partition that
        landed before this one's (it is applied now)."""
        fresh: list[Positioned] = []
        outputs: list[Positioned] = []
        for pe in events:
            ev = pe.event
            first = seen.first(ev.event_id)
            applied_before = pe.offset <= guards.get((bucket, pe.partition), -1)
            if first is not None and first != (pe.partition, pe.offset):
                if not applied_before:
                    seen.copied(ev.event_id, pe.partition, pe.offset)
                continue
            outputs.append(pe)
            if not applied_before:
                fresh.append(pe)
                if first is None:
                    seen.add(ev.event_id, pe.partition, pe.offset, ev.ts)
        return fresh, outputs

    def _keep(self, writes: dict[int, _BucketWrite], kepts: dict[str, Kept]) -> None:
        """After an acknowledged write: the buckets' new guards; the users as written."""
        for bucket, write in writes.items():
            for partition, (_lo, hi) in write.spans.items():
                self._guards[(bucket, partition)] = hi
        kept, sizes = self._kept, self._kept_sizes
        for uid, state in kepts.items():
            kept.pop(uid, None)
            kept[uid] = state  # re-inserted: the dict is in least-recently-touched order
            self._kept_bytes += state.size - sizes.get(uid, 0)
            sizes[uid] = state.size
        users, budget = self.settings.state.cache_users, self.settings.state.cache_mb * 2**20
        n, total, victims = len(kept), self._kept_bytes, []
        for uid in kept:  # least recently touched first
            if n <= users and total <= budget:
                break
            victims.append(uid)
            n, total = n - 1, total - sizes[uid]
        for uid in victims:
            del kept[uid], sizes[uid]
        self._kept_bytes = total

    def _read(self, by_bucket: dict[int, dict[str, list[Positioned]]], batch: Sequence[Positioned]) -> tuple[
            dict[tuple[int, int], int], dict[str, Kept], dict[str, tuple[str | None, str | None]]]:
        """Guards, users' recent items and event ids, and item metadata of a batch: from process memory
        where kept, the rest in one pipelined round trip."""
        partitions = sorted({pe.partition for pe in batch})
        now = time.monotonic()
        meta: dict[str, tuple[str | None, str | None]] = {}
        items_by_bucket: dict[int, list[str]] = defaultdict(list)
        for iid in {str(pe.event.item_id) for pe in batch if pe.event.item_id is not None}:
            known = self._meta.get(iid)
            if known is not None and known[2] > now:
                meta[iid] = known[:2]
            else:
                items_by_bucket[self.keys.bucket(iid)].append(iid)
        guards: dict[tuple[int, int], int] = {}
        kepts: dict[str, Kept] = {}
        reads: list[tuple[int, list[int], list[str]]] = []
        for bucket, users in by_bucket.items():
            missing = []
            for p in partitions:
                g = self._guards.get((bucket, p))
                if g is None:
                    missing.append(p)
                else:
                    guards[(bucket, p)] = g
            unknown = []
            for uid in users:
                kept = self._kept.get(uid)
                if kept is None:
                    unknown.append(uid)
                else:
                    kepts[uid] = kept
            if missing or unknown:
                reads.append((bucket, missing, unknown))
        if not reads and not items_by_bucket:
            return guards, kepts, meta
        pipe = self.redis.pipeline(transaction=False)
        for bucket, missing, unknown in reads:
            self._user_read(keys=[self.keys.user_guard(bucket), *(self._user_keys[u][1] for u in unknown)],
                            args=missing, client=pipe)
        for iids in items_by_bucket.values():
            self._hmget(keys=[self.keys.item_meta(i) for i in iids], args=["category", "brand"], client=pipe)
        replies = pipe.execute()
        for (bucket, missing, unknown), reply in zip(reads, replies, strict=False):
            for p, raw in zip(missing, reply[0], strict=True):
                guards[(bucket, p)] = self._guards[(bucket, p)] = int(raw) if raw else -1
            for uid, (version, raw) in zip(unknown, reply[1:], strict=True):
                kepts[uid] = self._decoded(uid, version, raw)
        until = now + META_TTL_S
        if len(self._meta) > META_CACHE_ITEMS:
            self._meta.clear()
        for iids, reply in zip(items_by_bucket.values(), replies[len(reads):], strict=True):
            for iid, (category, brand) in zip(iids, reply, strict=True):
                meta[iid] = known_meta = (_opt(category), _opt(brand))
                self._meta[iid] = (*known_meta, until)
        return guards, kepts, meta

    def _decoded(self, uid: str, version: bytes | None, raw: bytes | None) -> Kept:
        # not a state this store wrote (another tool's value): it is replaced by the user's next write
        state = user_state_or_empty(uid, raw, "the stored state is replaced at the user's next write")
        seen = Seen(self._window_ms, self._dedupe_ids, state.seen)
        return Kept("" if version is None else _s(version), state, seen, len(raw or b""))

    def _update(self, state: UserState, events: list[Positioned], meta: dict[str, tuple[str | None, str | None]],
                items: dict[tuple[str, int], ZsetCall]) -> None:
        """Apply one user's new events (in source order) to their state; adds the item contributions."""
        s = self.settings.state
        counts, weights, affinity, buys, recent = state.counts, state.items, state.affinity, state.buys, state.recent
        cap, window, covis_cap, ttl_s = s.recent_items_cap, s.covis_window, s.covis_cap, s.item_ttl_s
        pop_guard, pop_key = self._pop_keys
        covis_keys = self._covis_keys
        for pe in events:
            ev = pe.event
            counts[ev.type] = counts.get(ev.type, 0) + 1
            if ev.ts > state.last_seen:
                state.last_seen = ev.ts
            w = EVENT_WEIGHTS[ev.type]
            item = str(ev.item_id) if ev.type != "impression" and ev.item_id is not None else None
            if item is None or w <= 0:
                continue
            if ev.type == "purchase":
                n, first, last = buys.get(item, (0, ev.ts, ev.ts))
                buys[item] = (n + 1, min(first, ev.ts), max(last, ev.ts))
            aw = self.affinity_decay.weight(w, ev.ts)
            weights[item] = weights.get(item, 0.0) + aw
            category, brand = meta.get(item, _NO_META)
            if category:
                key = f"c:{category}"
                affinity[key] = affinity.get(key, 0.0) + aw
            if brand:
                key = f"b:{brand}"
                affinity[key] = affinity.get(key, 0.0) + aw
            pop = _call(items, pop_guard, pe.partition, s.popularity_cap, True)
            pop.entries[pop_key].append((pe.offset, item, self.popularity_decay.weight(w, ev.ts)))
            # Directional co-visitation: what users went on to interact with after each recent item.
            for other in _window(recent, item, window):
                guard, key = covis_keys[other]
                _call(items, guard, pe.partition, covis_cap, False, ttl_s).entries[key].append((pe.offset, item, w))
            _push_recent(recent, item, cap)

    def _apply_zsets(self, calls: list[ZsetCall]) -> None:
        """One call per guard, for all its partitions; where a guard is already past some offsets,
        resend the rest. A set's TTL is set again only when this process has not set it for
        ``TTL_REFRESH_S`` (or a tenth of the TTL)."""
        now = time.monotonic()
        expired = self._expired
        by_guard: dict[str, list[ZsetCall]] = {}
        for call in calls:
            by_guard.setdefault(call.guard, []).append(call)
        pending: list[tuple[list[ZsetCall], dict[int, int]]] = [(group, {}) for group in by_guard.values()]
        while pending:
            pipe = self.redis.pipeline(transaction=False)
            sent = []
            for group, floors in pending:
                every = min(TTL_REFRESH_S, group[0].ttl_s / 10)
                built = zset_args(group, floors, functools.partial(_due, expired, now, every))
                if built is not None:
                    self._zset_apply(keys=built[0], args=built[1], client=pipe)
                    sent.append((group, floors, built[1][5::3], built[2]))
            replies = pipe.execute() if sent else []
            pending = []
            for (group, floors, partitions, refreshed), reply in zip(sent, replies, strict=True):
                if isinstance(reply, list):  # nothing applied: the rest is sent again
                    for partition, guard in zip(partitions, reply, strict=True):
                        floors[partition] = max(floors.get(partition, -1), int(guard))
                    pending.append((group, floors))
                    continue
                for key in refreshed:
                    expired[key] = now
        if len(expired) > EXPIRED_KEYS:
            expired.clear()

    def _apply_users(self, writes: dict[int, _BucketWrite], kepts: dict[str, Kept]) -> None:
        """One compare-and-set per bucket: the users' whole states and the bucket's partition guards."""
        if not writes:
            return
        pipe = self.redis.pipeline(transaction=False)
        for bucket, write in writes.items():
            args: Args = [self.settings.state.user_ttl_s, len(write.spans)]
            for partition, (lo, hi) in write.spans.items():
                args.extend((partition, lo, hi))
            for uid in write.users:
                kept = kepts[uid]
                args.extend((kept.version, kept.state.last_seen, kept.encode()))
            self._user_store(keys=[self.keys.user_guard(bucket), *(self._user_keys[u][1] for u in write.users)],
                             args=args, client=pipe)
        guards = users = 0
        for write, reply in zip(writes.values(), pipe.execute(), strict=True):
            if int(reply[0]) != 1:
                guards, users = guards + int(reply[1]), users + int(reply[2])
                continue
            for uid, version in zip(write.users, reply[1:], strict=True):
                kepts[uid].version = str(int(version))
        # Recomputed from what Redis holds now; the buckets written are guarded, so a retry skips them.
        if guards:
            raise StaleStateError(f"{guards} partition guards moved on during the batch (a stale writer)")
        if users:
            raise UserMovedError(f"{users} users were written by another consumer during the batch")

    # ------------------------------------------------------------------ catalog
    def apply_catalog(self, events: Iterable[CatalogEvent]) -> int:
        """Upsert/delete item metadata (event-time guarded); returns how many changed an item."""
        by_bucket: dict[int, list[CatalogEvent]] = defaultdict(list)
        for ev in events:
            by_bucket[self.keys.bucket(str(ev.item_id))].append(ev)
            self._meta.pop(str(ev.item_id), None)
        if not by_bucket:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for evs in by_bucket.values():
            args: Args = []
            for ev in evs:
                fields = _catalog_fields(ev)
                args.extend((ev.ts, ev.op, len(fields) // 2, *fields))
            self._catalog_apply(keys=[self.keys.item_meta(str(ev.item_id)) for ev in evs], args=args,
                                client=pipe)
        flags = pipe.execute()
        added: list[str] = []
        removed: list[str] = []
        for evs, applied in zip(by_bucket.values(), flags, strict=True):
            for ev, ok in zip(evs, applied, strict=True):
                if ok:
                    (added if ev.op == "delete" else removed).append(str(ev.item_id))
        pipe = self.redis.pipeline(transaction=False)
        if added:
            pipe.sadd(self.keys.deleted_items(), *added)
        if removed:
            pipe.srem(self.keys.deleted_items(), *removed)
        if len(pipe):
            pipe.execute()
        return len(added) + len(removed)


_offset = operator.itemgetter(0)


def _position(pe: Positioned) -> tuple[int, int]:
    return pe.partition, pe.offset


def _touch(recent: list[str], ordered: list[Positioned]) -> UserTouch:
    """One user's :class:`UserTouch` from their events in source order."""
    actions: list[tuple[str, str, int]] = []
    positions: list[tuple[int, int]] = []
    shown: list[str] = []
    upto: dict[int, int] = {}
    last_ts = ordered[0].event.ts
    for partition, offset, ev in ordered:
        upto[partition] = offset
        if ev.ts > last_ts:
            last_ts = ev.ts
        if ev.type == "impression":
            shown.extend(str(i) for i in ev.items_shown or ())
        elif ev.item_id is not None:
            actions.append((str(ev.type), str(ev.item_id), ev.ts))
            positions.append((partition, offset))
    return UserTouch(recent=recent, last_ts=last_ts, actions=actions, shown=shown, positions=positions, upto=upto)


def _catalog_fields(ev: CatalogEvent) -> list[str]:
    if ev.op != "upsert":
        return []
    out: list[str] = []
    for name in ("title", "description", "category", "brand", "price"):
        value = getattr(ev, name)
        if value is not None and value != "":
            out.extend((name, repr(value) if isinstance(value, float) else str(value)))
    return out


def _call(calls: dict[tuple[str, int], ZsetCall], guard: str, partition: int, cap: int,
          aggregate: bool, ttl_s: int = 0) -> ZsetCall:
    call = calls.get((guard, partition))
    if call is None:
        call = calls[(guard, partition)] = ZsetCall(guard, partition, cap, aggregate, ttl_s)
    return call


def _due(expired: dict[str, float], now: float, every: float, key: str) -> bool:
    """Whether a set's TTL is due to be set again: never set by this process, or ``every`` seconds ago."""
    last = expired.get(key)
    return last is None or now - last >= every


def _window(recent: list[str], item: str, size: int) -> list[str]:
    out: list[str] = []
    for other in recent:
        if len(out) >= size:
            break
        if other != item:
            out.append(other)
    return out


def _push_recent(recent: list[str], item: str, cap: int) -> None:
    if item in recent:
        recent.remove(item)
    recent.insert(0, item)
    if len(recent) > cap:
        del recent[cap:]


def _s(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _opt(raw: bytes | str | None) -> str | None:
    return None if raw is None else _s(raw)
