"""Live user and item state in Redis, applied one consumed batch at a time with exactly-once effect.

Per batch, in three pipelined round trips of at most one script call per hash-tag bucket:

1. **read**: each touched user bucket's offset guards and its users' recent items; the catalog
   category/brand of the batch's items. Events at or below their bucket's guard were applied before
   and are dropped.
2. **items**: co-visitation increments (one guarded call per item bucket) and popularity increments
   (one guarded call). Contributions are computed from the users' state *before* this batch, so a
   replay recomputes exactly the same contributions; each guard skips what it already has.
3. **users**: recent items, counters, decayed item weights and category/brand affinity, last-seen,
   one guarded call per user bucket. Written after the items: a user guard past an offset means that
   event's item contributions are in Redis too.

The caller commits Kafka offsets only after all three succeeded. A crash anywhere in between followed
by a replay from the last committed offset converges to the state of one clean pass. Decay is forward
decay: an event at ``ts`` adds ``w * 2 ** ((ts - epoch) / half_life)``, so sorted-set order is decayed
order without ever rewriting old members.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from fusionrec.keys import Keys
from fusionrec.settings import Settings
from streams.contract import CatalogEvent, UserEvent
from streams.scripts import CATALOG_APPLY, MULTI_HMGET, USER_APPLY, USER_READ, ZSET_APPLY

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


@dataclass
class BatchResult:
    applied: int = 0
    skipped: int = 0
    users: dict[str, UserTouch] = field(default_factory=dict)


class Decay:
    """Forward-decay weights: ``w * 2 ** ((ts - epoch) / half_life)``."""

    def __init__(self, epoch_ms: int, half_life_s: float) -> None:
        self.epoch_ms = epoch_ms
        self.rate = math.log(2) / (half_life_s * 1000.0)

    def weight(self, w: float, ts_ms: int) -> float:
        return w * math.exp(self.rate * (ts_ms - self.epoch_ms))

    def value_at(self, stored: float, now_ms: int) -> float:
        """Convert a stored forward-decayed score into its decayed value at ``now_ms``."""
        return stored * math.exp(-self.rate * (now_ms - self.epoch_ms))


class ZsetUpdates:
    """Sorted-set contributions by (bucket, partition) → key → offset → [member, weight, ...]."""

    def __init__(self) -> None:
        self.groups: dict[tuple[int, int], dict[str, dict[int, list[str]]]] = defaultdict(
            lambda: defaultdict(dict))

    def add(self, bucket: int, partition: int, key: str, offset: int, member: str, weight: float) -> None:
        self.groups[(bucket, partition)][key].setdefault(offset, []).extend((member, repr(weight)))

    @staticmethod
    def argv(partition: int, cap: int, per_key: dict[str, dict[int, list[str]]]) -> tuple[list[str], Args]:
        """(keys after the guard, args) with each key's records in ascending offset order."""
        args: Args = [partition, cap]
        for by_offset in per_key.values():
            args.append(len(by_offset))
            for offset in sorted(by_offset):
                pairs = by_offset[offset]
                args.extend((offset, len(pairs) // 2, *pairs))
        return list(per_key), args


class StateStore:
    """Applies validated events to the Redis key schema (see :mod:`fusionrec.keys`)."""

    def __init__(self, client: redis.Redis, settings: Settings, keys: Keys | None = None) -> None:
        self.redis = client
        self.settings = settings
        self.keys = keys or Keys.for_settings(settings)
        self.popularity_decay = Decay(settings.decay_epoch_ms, settings.popularity_half_life_s)
        self.affinity_decay = Decay(settings.decay_epoch_ms, settings.affinity_half_life_s)
        self._user_apply = client.register_script(USER_APPLY)
        self._user_read = client.register_script(USER_READ)
        self._zset_apply = client.register_script(ZSET_APPLY)
        self._catalog_apply = client.register_script(CATALOG_APPLY)
        self._hmget = client.register_script(MULTI_HMGET)

    # ------------------------------------------------------------------ user events
    def apply(self, batch: Sequence[Positioned]) -> BatchResult:
        if not batch:
            return BatchResult()
        by_bucket: dict[int, dict[str, list[Positioned]]] = defaultdict(lambda: defaultdict(list))
        for pe in batch:
            by_bucket[self.keys.bucket(pe.event.user_id)][pe.event.user_id].append(pe)
        guards, recents, meta = self._read(by_bucket, batch)
        result = BatchResult()
        covis, pop = ZsetUpdates(), ZsetUpdates()
        user_calls: dict[tuple[int, int], tuple[list[str], list[Args]]] = {}
        for bucket, users in by_bucket.items():
            for uid, events in users.items():
                fresh = [pe for pe in events if pe.offset > guards.get((bucket, pe.partition), -1)]
                result.skipped += len(events) - len(fresh)
                if not fresh:
                    continue
                recent = recents[uid]
                for partition, evs in _by_partition(fresh).items():
                    keys, args = user_calls.setdefault((bucket, partition), ([], []))
                    keys.extend(self.keys.user_keys(uid))
                    args.append(self._user_events(partition, evs, recent, meta, covis, pop))
                result.applied += len(fresh)
                result.users[uid] = UserTouch(recent=recent, last_ts=max(pe.event.ts for pe in fresh))
        self._write_items(covis, pop)
        self._write_users(user_calls)
        return result

    def _read(self, by_bucket: dict[int, dict[str, list[Positioned]]], batch: Sequence[Positioned]) -> tuple[
            dict[tuple[int, int], int], dict[str, list[str]], dict[str, tuple[str | None, str | None]]]:
        partitions = sorted({pe.partition for pe in batch})
        items_by_bucket: dict[int, list[str]] = defaultdict(list)
        for iid in {pe.event.item_id for pe in batch if pe.event.item_id is not None}:
            items_by_bucket[self.keys.bucket(iid)].append(iid)
        pipe = self.redis.pipeline(transaction=False)
        for bucket, users in by_bucket.items():
            self._user_read(keys=[self.keys.user_guard(bucket), *(self.keys.user_recent(u) for u in users)],
                            args=[self.settings.recent_items_cap, *partitions], client=pipe)
        for iids in items_by_bucket.values():
            self._hmget(keys=[self.keys.item_meta(i) for i in iids], args=["category", "brand"], client=pipe)
        replies = pipe.execute()
        guards: dict[tuple[int, int], int] = {}
        recents: dict[str, list[str]] = {}
        for (bucket, users), reply in zip(by_bucket.items(), replies, strict=False):
            for p, raw in zip(partitions, reply[0], strict=True):
                if raw:
                    guards[(bucket, p)] = int(raw)
            for uid, lst in zip(users, reply[1:], strict=True):
                recents[uid] = [_s(x) for x in lst]
        meta: dict[str, tuple[str | None, str | None]] = {}
        for iids, reply in zip(items_by_bucket.values(), replies[len(by_bucket):], strict=True):
            for iid, (category, brand) in zip(iids, reply, strict=True):
                meta[iid] = (_opt(category), _opt(brand))
        return guards, recents, meta

    def _user_events(self, partition: int, events: list[Positioned], recent: list[str],
                     meta: dict[str, tuple[str | None, str | None]], covis: ZsetUpdates,
                     pop: ZsetUpdates) -> Args:
        """One user's script records; adds its item contributions and advances ``recent``."""
        s = self.settings
        args: Args = [len(events)]
        for pe in sorted(events, key=lambda x: x.offset):
            ev = pe.event
            item = ev.item_id if ev.type != "impression" else None
            w = EVENT_WEIGHTS[ev.type]
            aff: list[str] = []
            item_w = ""
            if item is not None and w > 0:
                item_w = repr(self.affinity_decay.weight(w, ev.ts))
                category, brand = meta.get(item, (None, None))
                if category:
                    aff.extend((f"c:{category}", item_w))
                if brand:
                    aff.extend((f"b:{brand}", item_w))
                pop.add(0, partition, self.keys.popularity(), pe.offset, item,
                        self.popularity_decay.weight(w, ev.ts))
                for other in _window(recent, item, s.covis_window):
                    covis.add(self.keys.bucket(item), partition, self.keys.item_covis(item), pe.offset, other, w)
                    covis.add(self.keys.bucket(other), partition, self.keys.item_covis(other), pe.offset, item, w)
            args.extend((pe.offset, ev.type, item or "", ev.ts, item_w, len(aff) // 2, *aff))
            if item is not None:
                _push_recent(recent, item, s.recent_items_cap)
        return args

    def _write_items(self, covis: ZsetUpdates, pop: ZsetUpdates) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for (bucket, partition), per_key in covis.groups.items():
            keys, args = ZsetUpdates.argv(partition, self.settings.covis_cap, per_key)
            self._zset_apply(keys=[self.keys.item_guard(bucket), *keys], args=args, client=pipe)
        for (_, partition), per_key in pop.groups.items():
            keys, args = ZsetUpdates.argv(partition, 0, per_key)
            self._zset_apply(keys=[self.keys.popularity_guard(), *keys], args=args, client=pipe)
        if len(pipe):
            pipe.execute()

    def _write_users(self, calls: dict[tuple[int, int], tuple[list[str], list[Args]]]) -> None:
        if not calls:
            return
        s = self.settings
        pipe = self.redis.pipeline(transaction=False)
        for (bucket, partition), (keys, per_user) in calls.items():
            args: Args = [partition, s.user_ttl_s, s.recent_items_cap, len(per_user)]
            for user_args in per_user:
                args.extend(user_args)
            self._user_apply(keys=[self.keys.user_guard(bucket), *keys], args=args, client=pipe)
        pipe.execute()

    # ------------------------------------------------------------------ catalog
    def apply_catalog(self, events: Iterable[CatalogEvent]) -> int:
        """Upsert/delete item metadata (event-time guarded); returns how many changed an item."""
        by_bucket: dict[int, list[CatalogEvent]] = defaultdict(list)
        for ev in events:
            by_bucket[self.keys.bucket(str(ev.item_id))].append(ev)
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
        added, removed = [], []
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


def _catalog_fields(ev: CatalogEvent) -> list[str]:
    if ev.op != "upsert":
        return []
    out: list[str] = []
    for name in ("title", "description", "category", "brand", "price"):
        value = getattr(ev, name)
        if value is not None and value != "":
            out.extend((name, repr(value) if isinstance(value, float) else str(value)))
    return out


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
