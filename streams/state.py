"""Live user and item state in Redis, applied one consumed batch at a time with exactly-once effect.

Per batch, in three pipelined round trips of at most one script call per hash-tag bucket:

1. **read**: each touched user bucket's offset guards and its users' recent items; the catalog
   category/brand of the batch's items. Events at or below their bucket's guard were applied before
   and are dropped.
2. **items**: co-visitation increments (one guarded call per item bucket) and popularity increments
   (one guarded call). Contributions are computed from the users' state *before* this batch, so a
   replay recomputes exactly the same contributions; each guard skips what it already has.
3. **users**: recent items, counters, decayed item weights and category/brand affinity, last-seen,
   each purchased item's purchase count and first and last purchase time, remembered event ids, one
   guarded call per user bucket. Written after the items: a user guard past
   an offset means that event's item contributions are in Redis too.

The consumer that owns a partition is the only writer of the users keyed to it, so the store keeps
what the read step would return in process: each bucket's guards, each user's recent items (at most
``state.cache_users``, least recently touched evicted first) and the items' category/brand (for
``META_TTL_S``). A batch reads only what is not kept, and the kept state changes only after Redis
acknowledged the write; any failure forgets all of it (:meth:`StateStore.reset`), so a retry or a
replay starts again from what Redis holds. Recent items are written as the items pushed, not as the
whole list, so a user whose events arrive on two partitions owned by two consumers loses no update.

Producer duplicates: a user event whose ``event_id`` the same user sent before is dropped (no
state, no outputs) while its first copy is remembered (:class:`Seen`: ``state.dedupe_window_s`` of
event time, at most ``state.dedupe_ids`` ids per user). The remembered ids are written with the
user's state in the same guarded script call, each with the position of the event that carried it,
so a replay decides every duplicate as the first pass did. That holds for keyed producers (one
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
order without ever rewriting old members.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import redis

from fusionrec.core.errors import StateStoreError
from fusionrec.core.keys import Keys
from fusionrec.core.scripts import CATALOG_APPLY, MULTI_HMGET, USER_APPLY, USER_READ, ZSET_APPLY, register
from fusionrec.core.settings import DECAY_MAX_EXPONENT, Settings
from fusionrec.streams.contract import CatalogEvent, UserEvent
from fusionrec.streams.positions import AppliedPositions

_msgpack = msgspec.msgpack.Encoder()
# How long an item's category/brand is used from process memory; catalog events this process applies
# replace it at once, those another consumer applies are seen within this time.
META_TTL_S = 30.0
META_CACHE_ITEMS = 200_000


class StaleStateError(StateStoreError):
    """A guard moved between reading state and writing it (a concurrent writer); retry the batch."""

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
    >>> seen.forget({0: 1}); sorted(seen.members())  # "a" was copied at offset 2, not settled yet
    ['0:0:0:2:a', '0:3:0:3:c']
    >>> seen.forget({0: 3}); sorted(seen.members())
    ['0:3:0:3:c']
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

    def copy(self) -> Seen:
        new = Seen(self.window_ms, self.cap)
        new._order = list(self._order)
        new._by_id = dict(self._by_id)
        return new

    def changes(self, before: Seen) -> tuple[list[Any], list[str]]:
        """Zset members to add (flat member, score) and to remove, from ``before`` to this."""
        old, new = set(before._order), set(self._order)
        added = [x for e in self._order if e not in old for x in (_member(e), e[0])]
        return added, [_member(e) for e in before._order if e not in new]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Seen) and (self.window_ms, self.cap, self._order) == (
            other.window_ms, other.cap, other._order)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Seen({self.window_ms}, {self.cap}, {self._order!r})"

    def members(self) -> dict[str, int]:
        """Redis zset members (``<partition>:<offset>:<last partition>:<last offset>:<event_id>``) with
        their event times."""
        return {_member(e): e[0] for e in self._order}

    @classmethod
    def from_redis(cls, window_ms: int, cap: int, flat: Sequence[Any]) -> Seen:
        entries = []
        for member, score in zip(flat[::2], flat[1::2], strict=True):
            p, o, lp, lo, eid = _s(member).split(":", 4)
            entries.append((int(float(score)), int(p), int(o), eid, int(lp), int(lo)))
        return cls(window_ms, cap, entries)


def _member(e: tuple[int, int, int, str, int, int]) -> str:
    return f"{e[1]}:{e[2]}:{e[4]}:{e[5]}:{e[3]}"


@dataclass
class Kept:
    """What the store keeps in process of one user, as Redis holds it after the last write."""

    recent: list[str]
    seen: Seen

    def copy(self) -> Kept:
        return Kept(list(self.recent), self.seen.copy())


@dataclass
class ZsetCall:
    """Sorted-set contributions for one guard (an item bucket, or popularity) and one partition.

    ``entries[key]`` holds (offset, member, weight) in the order they were produced. With
    ``aggregate`` the weights per member are summed into one record (uncapped sets: order does not
    change the result); otherwise there is one record per offset, applied in offset order.
    """

    guard: str
    partition: int
    cap: int
    aggregate: bool
    ttl_s: int = 0  # the sets expire this long after their last update (0: never)
    entries: dict[str, list[tuple[int, str, float]]] = field(default_factory=lambda: defaultdict(list))

    def args(self, floor: int) -> tuple[list[str], Args] | None:
        """Script keys and args for the entries above ``floor``; None when nothing is left."""
        keys: list[str] = []
        payload: list[list[list[Any]]] = []
        lo, hi = None, -1
        for key, entries in self.entries.items():
            fresh = sorted((e for e in entries if e[0] > floor), key=lambda e: e[0])
            if not fresh:
                continue
            lo = fresh[0][0] if lo is None else min(lo, fresh[0][0])
            hi = max(hi, fresh[-1][0])
            keys.append(key)
            payload.append(self._records(fresh))
        if lo is None:
            return None
        return [self.guard, *keys], [self.partition, self.cap, lo, hi, _msgpack.encode(payload), self.ttl_s]

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


class StateStore:
    """Applies validated events to the Redis key schema (see :mod:`fusionrec.core.keys`)."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.popularity_decay = Decay(settings.state.decay_epoch_ms, settings.state.popularity_half_life_s)
        self.affinity_decay = Decay(settings.state.decay_epoch_ms, settings.state.affinity_half_life_s)
        self._user_apply = register(client, USER_APPLY)
        self._user_read = register(client, USER_READ)
        self._zset_apply = register(client, ZSET_APPLY)
        self._catalog_apply = register(client, CATALOG_APPLY)
        self.positions = AppliedPositions(client, self.keys, settings.kafka.topic_events)
        self._hmget = register(client, MULTI_HMGET)
        # Kept in process (see the module docstring): changed only after Redis acknowledged a write.
        self._guards: dict[tuple[int, int], int] = {}  # (user bucket, partition) -> applied offset
        self._kept: dict[str, Kept] = {}  # user -> recent items and event ids, least recently touched first
        self._settled: dict[int, int] = {}  # events partition -> offset no replay goes back to (inclusive)
        self._window_ms = settings.state.dedupe_window_s * 1000
        self._dedupe_ids = settings.state.dedupe_ids if self._window_ms > 0 else 0
        self._meta: dict[str, tuple[str | None, str | None, float]] = {}  # item -> category, brand, until

    def reset(self) -> None:
        """Forget what is kept in process; the next batch reads it from Redis again."""
        self._guards.clear()
        self._kept.clear()
        self._meta.clear()

    def settle(self, done: Mapping[int, int]) -> None:
        """Events partition -> last offset whose outputs are done and recorded in Redis: no replay goes
        back to it, so remembered event ids up to it may be forgotten (-1: none, after a reset)."""
        self._settled.update(done)

    @property
    def cached_users(self) -> int:
        return len(self._kept)

    # ------------------------------------------------------------------ user events
    def apply(self, batch: Sequence[Positioned]) -> BatchResult:
        if not batch:
            return BatchResult()
        try:
            return self._apply(batch)
        except BaseException:
            self.reset()  # a partial write, a concurrent writer: start again from what Redis holds
            raise

    def _apply(self, batch: Sequence[Positioned]) -> BatchResult:
        by_bucket: dict[int, dict[str, list[Positioned]]] = defaultdict(lambda: defaultdict(list))
        for pe in batch:
            uid = str(pe.event.user_id)  # validated ids are already str; this tells the type checker
            by_bucket[self.keys.bucket(uid)][uid].append(pe)
        guards, kepts, meta = self._read(by_bucket, batch)
        result = BatchResult()
        items: dict[tuple[str, int], ZsetCall] = {}
        users: dict[tuple[int, int], tuple[list[str], list[Any], list[int]]] = {}
        for bucket, group in by_bucket.items():
            for uid, events in group.items():
                before = kepts[uid]
                kept = kepts[uid] = before.copy()  # the kept state changes only once written
                new = [pe for pe in events if pe.offset > guards.get((bucket, pe.partition), -1)]
                result.skipped += len(events) - len(new)
                if self._dedupe_ids:
                    fresh, outputs = self._dedupe(bucket, events, guards, kept.seen)
                    if new:  # (forgetting is a change to write: only with a write of the user)
                        kept.seen.forget(self._settled)
                else:
                    fresh, outputs = new, events
                result.duplicates += len(events) - len(outputs)
                remembered, forgotten = kept.seen.changes(before.seen)
                applying = {(pe.partition, pe.offset) for pe in fresh}
                # one record per partition with new events, copies included: the guard moves past a
                # copy, and the first record carries the remembered ids' changes
                for partition, evs in _by_partition(new).items():
                    keys, payload, offsets = users.setdefault((bucket, partition), ([], [], []))
                    keys.extend(self.keys.user_keys(uid))
                    applied = [pe for pe in evs if (pe.partition, pe.offset) in applying]
                    payload.append([*self._user_record(partition, applied, kept.recent, meta, items),
                                    remembered, forgotten])
                    remembered, forgotten = [], []
                    offsets.extend(pe.offset for pe in evs)
                result.applied += len(fresh)
                if not outputs:
                    continue
                # outputs cover every event but duplicates, the skipped ones too: a replay reproduces them
                result.users[uid] = touch = _touch(kept.recent, outputs)
                for (_kind, item, _ts), (partition, offset) in zip(touch.actions, touch.positions, strict=True):
                    result.item_offsets.setdefault(partition, {}).setdefault(item, []).append(offset)
                    category = meta.get(item, (None, None))[0]
                    if category:
                        result.categories[item] = category
                result.max_ts = max(result.max_ts, touch.last_ts)
        self._apply_zsets(list(items.values()))
        self._apply_users(users)
        self._keep(users, kepts)
        return result

    @staticmethod
    def _dedupe(bucket: int, events: list[Positioned], guards: dict[tuple[int, int], int],
                seen: Seen) -> tuple[list[Positioned], list[Positioned]]:
        """(events to apply, events with outputs): copies of an event ``seen`` remembers are neither.
        ``seen`` learns the applied events and the dropped copies' positions.

        An id remembered at the event's own position is the event itself: applied by an earlier pass
        (the guards skip it), or remembered by a write of the user's events on another partition that
        landed before this one's (it is applied now)."""
        fresh: list[Positioned] = []
        outputs: list[Positioned] = []
        for pe in sorted(events, key=lambda x: (x.partition, x.offset)):
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

    def _keep(self, users: dict[tuple[int, int], tuple[list[str], list[Any], list[int]]],
              kepts: dict[str, Kept]) -> None:
        """After an acknowledged write: the buckets' new guards and the users' recent items and ids."""
        for (bucket, partition), (_keys, _payload, offsets) in users.items():
            self._guards[(bucket, partition)] = max(offsets)
        kept = self._kept
        for uid, state in kepts.items():
            kept.pop(uid, None)
            kept[uid] = state  # re-inserted: the dict is in least-recently-touched order
        over = len(kept) - self.settings.state.cache_users
        if over > 0:
            for uid in list(itertools.islice(kept, over)):
                del kept[uid]

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
            per_user = (k for u in unknown for k in (self.keys.user_recent(u), self.keys.user_event_ids(u)))
            self._user_read(keys=[self.keys.user_guard(bucket), *per_user],
                            args=[self.settings.state.recent_items_cap, *missing], client=pipe)
        for iids in items_by_bucket.values():
            self._hmget(keys=[self.keys.item_meta(i) for i in iids], args=["category", "brand"], client=pipe)
        replies = pipe.execute()
        for (bucket, missing, unknown), reply in zip(reads, replies, strict=False):
            for p, raw in zip(missing, reply[0], strict=True):
                guards[(bucket, p)] = self._guards[(bucket, p)] = int(raw) if raw else -1
            for uid, lst, ids in zip(unknown, reply[1::2], reply[2::2], strict=True):
                kepts[uid] = Kept([_s(x) for x in lst], Seen.from_redis(self._window_ms, self._dedupe_ids, ids))
        until = now + META_TTL_S
        if len(self._meta) > META_CACHE_ITEMS:
            self._meta.clear()
        for iids, reply in zip(items_by_bucket.values(), replies[len(reads):], strict=True):
            for iid, (category, brand) in zip(iids, reply, strict=True):
                meta[iid] = known_meta = (_opt(category), _opt(brand))
                self._meta[iid] = (*known_meta, until)
        return guards, kepts, meta

    def _user_record(self, partition: int, events: list[Positioned], recent: list[str],
                     meta: dict[str, tuple[str | None, str | None]],
                     items: dict[tuple[str, int], ZsetCall]) -> list[Any]:
        """One user's USER_APPLY record; adds the item contributions and advances ``recent``."""
        s, k = self.settings, self.keys
        counts: dict[str, int] = defaultdict(int)
        weights: dict[str, float] = defaultdict(float)
        affinity: dict[str, float] = defaultdict(float)
        pop = _call(items, k.popularity_guard(), partition, s.state.popularity_cap, True)
        last_seen = -1
        pushed: dict[str, None] = {}  # items pushed to the recent list, oldest push first
        buys: list[Any] = []  # item, event time per purchase
        for pe in sorted(events, key=lambda x: x.offset):
            ev = pe.event
            counts[ev.type] += 1
            last_seen = max(last_seen, ev.ts)
            w = EVENT_WEIGHTS[ev.type]
            item = str(ev.item_id) if ev.type != "impression" and ev.item_id is not None else None
            if item is None or w <= 0:
                continue
            if ev.type == "purchase":
                buys.extend((item, ev.ts))
            aw = self.affinity_decay.weight(w, ev.ts)
            weights[item] += aw
            category, brand = meta.get(item, (None, None))
            if category:
                affinity[f"c:{category}"] += aw
            if brand:
                affinity[f"b:{brand}"] += aw
            pop.entries[k.popularity()].append((pe.offset, item, self.popularity_decay.weight(w, ev.ts)))
            # Directional co-visitation: what users went on to interact with after each recent item.
            for other in _window(recent, item, s.state.covis_window):
                call = _call(items, k.item_guard(k.bucket(other)), partition, s.state.covis_cap, False,
                             s.state.item_ttl_s)
                call.entries[k.item_covis(other)].append((pe.offset, item, w))
            _push_recent(recent, item, s.state.recent_items_cap)
            pushed.pop(item, None)
            pushed[item] = None
        return [last_seen, [x for kv in counts.items() for x in kv], list(pushed),
                [x for kv in weights.items() for x in kv], [x for kv in affinity.items() for x in kv], buys]

    def _apply_zsets(self, calls: list[ZsetCall]) -> None:
        """Send every call; where a guard is already past some offsets, resend the rest."""
        pending = [(call, -1) for call in calls]
        while pending:
            pipe = self.redis.pipeline(transaction=False)
            sent = []
            for call, floor in pending:
                built = call.args(floor)
                if built is not None:
                    self._zset_apply(keys=built[0], args=built[1], client=pipe)
                    sent.append(call)
            replies = pipe.execute() if sent else []
            pending = [(call, int(g)) for call, g in zip(sent, replies, strict=True) if int(g) != -1]

    def _apply_users(self, calls: dict[tuple[int, int], tuple[list[str], list[Any], list[int]]]) -> None:
        if not calls:
            return
        pipe = self.redis.pipeline(transaction=False)
        for (bucket, partition), (keys, payload, offsets) in calls.items():
            self._user_apply(keys=[self.keys.user_guard(bucket), *keys],
                             args=[partition, self.settings.state.user_ttl_s, min(offsets), max(offsets),
                                   _msgpack.encode(payload), self.settings.state.recent_items_cap], client=pipe)
        conflicts = [g for g in pipe.execute() if int(g) != -1]
        if conflicts:
            # Another writer applied part of this batch meanwhile: recompute from fresh state.
            raise StaleStateError(f"{len(conflicts)} user buckets moved on during the batch; retrying")

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


def _touch(recent: list[str], events: list[Positioned]) -> UserTouch:
    ordered = sorted(events, key=lambda pe: (pe.partition, pe.offset))
    acted = [pe for pe in ordered if pe.event.item_id is not None and pe.event.type != "impression"]
    shown = [str(i) for pe in ordered if pe.event.type == "impression" for i in (pe.event.items_shown or ())]
    upto: dict[int, int] = {}
    for pe in ordered:
        upto[pe.partition] = pe.offset
    return UserTouch(recent=recent, last_ts=max(pe.event.ts for pe in events),
                     actions=[(str(pe.event.type), str(pe.event.item_id), pe.event.ts) for pe in acted],
                     shown=shown, positions=[(pe.partition, pe.offset) for pe in acted], upto=upto)


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


def _by_partition(events: list[Positioned]) -> dict[int, list[Positioned]]:
    out: dict[int, list[Positioned]] = defaultdict(list)
    for pe in events:
        out[pe.partition].append(pe)
    return out


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
    del recent[cap:]


def _s(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _opt(raw: bytes | str | None) -> str | None:
    return None if raw is None else _s(raw)
