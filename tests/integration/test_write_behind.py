"""Keyed state in process and write-behind, against the real Redis: what is kept in process saves the
reads and never changes the state; waiting events hold their offsets back and are written on time, on
flush, or forgotten with their partition; two writers of one user lose no update."""

from __future__ import annotations

import time

import msgspec
import pytest

from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.streams import datasets
from fusionrec.streams.consumer import Batch
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.state import (
    USER_MOVED_RETRIES,
    BatchResult,
    Positioned,
    StaleStateError,
    StateStore,
    UserMovedError,
    decode_user_state,
)
from fusionrec.streams.user_state import UserStateHandler
from tests.integration.helpers import dump_state, make_settings

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def events():
    ds = datasets.completejourney(households=30).head(3000)
    return ds.catalog(1), [Positioned(0, n, msgspec.convert(e, UserEvent)) for n, e in enumerate(ds.user_events())]


def _state(client, prefix):
    return {k.split(":", 1)[1]: v for k, v in dump_state(client, prefix).items()}


def _count(client, keys, uid: str, kind: str) -> int:
    return decode_user_state(client.hget(keys.user_state(uid), "d")).counts.get(kind, 0)


def _state_reads(client) -> int:
    """Users' states read (each read is an ``HMGET`` of a state hash, inside the read script)."""
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_kept_state_saves_the_reads_and_changes_nothing(services, events):
    catalog, evs = events
    dumps = []
    for cache_users in (200_000, 1):  # everything kept / nearly nothing kept
        s = make_settings(services, state_cache_users=cache_users)
        client = connect(s)
        store = StateStore(client, s)
        store.apply_catalog(catalog)
        for i in range(0, len(evs), 250):
            store.apply(evs[i: i + 250])
        assert store.cached_users == (1 if cache_users == 1 else len({pe.event.user_id for pe in evs}))
        dumps.append(_state(client, s.redis.prefix))
        if cache_users > 1:
            # every user of this batch is kept: their states are not read again
            before = _state_reads(client)
            again = [Positioned(0, len(evs) + n, msgspec.structs.replace(pe.event, ts=pe.event.ts + 1))
                     for n, pe in enumerate(evs[-200:])]
            store.apply(again)
            assert _state_reads(client) == before
            # and what was kept equals what Redis holds
            fresh = StateStore(client, s)
            for uid in {pe.event.user_id for pe in again}:
                assert store._kept[uid] == fresh._read({store.keys.bucket(uid): {uid: []}}, [])[1][uid]
    assert dumps[0] == dumps[1]


def test_a_cold_batch_reads_its_users_and_guards_in_one_round_trip(services, events):
    catalog, evs = events
    s = make_settings(services)
    client = connect(s)
    store = StateStore(client, s)
    store.apply_catalog(catalog)
    batch = evs[:600]
    users = {str(pe.event.user_id) for pe in batch}
    buckets = {store.keys.bucket(u) for u in users}
    read, calls = store._user_read, []

    def recorded(*, keys, args, client):
        calls.append((id(client), keys[0], len(keys) - 1))
        return read(keys=keys, args=args, client=client)

    store._user_read = recorded
    store.apply(batch)
    # one read script per bucket, all in one pipeline: the bucket's guard and each of its users' states
    assert len({pipe for pipe, _, _ in calls}) == 1
    assert sorted(guard for _, guard, _ in calls) == sorted(store.keys.user_guard(b) for b in buckets)
    assert sum(n for _, _, n in calls) == len(users)
    assert len(users) > 10 and len(buckets) > 5


def test_kept_states_stay_within_their_byte_bound(services):
    """Three users of about 0.5 MiB each under a 1 MiB bound: the least recently touched go first, and the
    bound counts each kept state's stored size."""
    s = make_settings(services, state_cache_mb=1)
    client = connect(s)
    store = StateStore(client, s)
    n = 0
    for uid in ("a", "b", "c"):
        evs = []
        for _ in range(20_000):  # as many distinct items: the state grows with them
            evs.append(Positioned(0, n, UserEvent(event_id=f"e{n}", type="view", user_id=uid, item_id=f"item-{n}",
                                                  ts=T0 + n)))
            n += 1
        for i in range(0, len(evs), 5000):
            store.apply(evs[i: i + 5000])
    stored = {u: len(client.hget(store.keys.user_state(u), "d")) for u in "abc"}
    assert all(size > 400_000 for size in stored.values())
    assert list(store._kept) == ["c"] and store.cached_bytes == stored["c"] <= 2**20
    store.apply([Positioned(0, n, UserEvent(event_id="last", type="view", user_id="a", item_id="x", ts=T0 + n))])
    assert list(store._kept) == ["a"] and store.cached_bytes == len(client.hget(store.keys.user_state("a"), "d"))


def test_two_writers_of_one_user_lose_no_update(services):
    """Events of one user on two partitions, applied by two consumers in interleaved batches."""
    s = make_settings(services, partitions=2)
    client = connect(s)
    a, b = StateStore(client, s), StateStore(client, s)
    n = 0
    recomputed = []
    for round_ in range(3):
        for store, partition in ((a, 0), (b, 1)):
            batch = []
            for j in range(4):
                item = f"p{partition}-r{round_}-{j}"
                batch.append(Positioned(partition, n, UserEvent(event_id=f"e{n}", type="view", user_id="u",
                                                               item_id=item, ts=T0 + n)))
                n += 1
            recomputed.append(store.apply(batch).recomputed)
    # each store kept the user as it wrote them; from the second write on, the other had written since
    assert recomputed == [0, 0, 1, 1, 1, 1]
    recent = a.stored("u").recent
    assert sorted(recent) == sorted(f"p{p}-r{r}-{j}" for p in (0, 1) for r in range(3) for j in range(4))
    assert recent[0] == "p1-r2-3"  # the newest push first
    assert _count(client, a.keys, "u", "view") == n


def test_a_user_that_keeps_moving_fails_the_batch_after_the_retries_and_loses_nothing(services):
    """Another writer bumps the user's version between every read and write: the batch is recomputed
    USER_MOVED_RETRIES times, then fails for the runtime to retry with back-off; nothing is half written."""
    s = make_settings(services)
    client = connect(s)
    store = StateStore(client, s)
    ev = [Positioned(0, n, UserEvent(event_id=f"e{n}", type="click", user_id="m", item_id=f"i{n}", ts=T0 + n))
          for n in range(3)]
    store.apply(ev[:1])
    original, calls = store._apply_zsets, []

    def meddle(zsets):
        calls.append(1)
        original(zsets)
        client.hincrby(store.keys.user_state("m"), "v", 1)

    store._apply_zsets = meddle
    with pytest.raises(UserMovedError):
        store.apply(ev[1:])
    assert len(calls) == USER_MOVED_RETRIES + 1
    assert store.cached_users == 0 and _count(client, store.keys, "m", "click") == 1
    store._apply_zsets = original
    assert store.apply(ev[1:]).recomputed == 0
    assert _count(client, store.keys, "m", "click") == 3 and store.stored("m").recent == ["i2", "i1", "i0"]


def test_a_stale_writer_is_detected_and_its_batch_counts_once(services):
    """Two writers of one partition (a consumer that lost it and does not know yet, and its new owner):
    the new owner applies the same events between the stale writer's item and user writes. The stale
    writer's user write is refused by the partition guard (StaleStateError), and its retry skips the
    offsets: every event counts once, in the items and in the users."""
    s = make_settings(services)
    client = connect(s)
    stale, owner = StateStore(client, s), StateStore(client, s)
    ev = [Positioned(0, n, UserEvent(event_id=f"e{n}", type="purchase", user_id=f"u{n % 3}", item_id=f"i{n % 4}",
                                     ts=T0 + n)) for n in range(12)]
    stale.apply(ev[:4])
    original = stale._apply_zsets

    def owner_meanwhile(zsets):
        original(zsets)
        owner.apply(ev[4:])

    stale._apply_zsets = owner_meanwhile
    with pytest.raises(StaleStateError) as raised:
        stale.apply(ev[4:])
    assert not isinstance(raised.value, UserMovedError)
    stale._apply_zsets = original
    assert stale.apply(ev[4:]).skipped == len(ev) - 4  # the runtime's retry: all of it applied already
    assert sum(_count(client, stale.keys, f"u{k}", "purchase") for k in range(3)) == len(ev)
    # the items' sets too: a clean pass of the same events under another prefix writes the same
    clean = s.replace(redis_prefix=s.redis.prefix + "c")
    StateStore(client, clean).apply(ev)
    assert _state(client, s.redis.prefix) == _state(client, clean.redis.prefix)


class Recorder:
    def __init__(self):
        self.results: list[BatchResult] = []

    def __call__(self, result: BatchResult) -> None:
        self.results.append(result)


def _batch(partition: int, first: int, count: int, user: str = "w") -> Batch:
    evs = [Positioned(partition, first + k, UserEvent(event_id=f"{partition}-{first + k}", type="click",
                                                      user_id=user, item_id=f"i{k}", ts=T0 + first + k))
           for k in range(count)]
    return Batch(events=evs, timestamps=[int(time.time() * 1000)] * count)


def test_waiting_events_hold_their_offsets_until_written(services):
    s = make_settings(services, state_flush_ms=60_000)
    client = connect(s)
    store = StateStore(client, s)
    hook = Recorder()
    handler = UserStateHandler(store, Metrics(), after_apply=[hook])
    handler.handle(_batch(0, 10, 5, "w0"))
    handler.handle(_batch(1, 7, 3, "w1"))
    handler.tick()  # not due yet
    assert handler.floor() == {0: 10, 1: 7}
    assert not client.exists(store.keys.user_state("w0")) and hook.results == []
    handler.flush()
    assert handler.floor() == {}
    assert _count(client, store.keys, "w0", "click") == 5
    assert _count(client, store.keys, "w1", "click") == 3
    assert [sorted(r.users) for r in hook.results] == [["w0", "w1"]]  # one write, the hooks after it


def test_a_retried_batch_is_taken_once_and_time_writes_it(services):
    s = make_settings(services, state_flush_ms=30)
    client = connect(s)
    handler = UserStateHandler(StateStore(client, s), Metrics())
    batch = _batch(0, 0, 4)
    handler.handle(batch)
    handler.handle(batch)  # the runtime retrying the same step
    time.sleep(0.05)
    handler.tick()
    assert handler.floor() == {}
    assert _count(client, handler.store.keys, "w", "click") == 4


def test_revoked_partitions_waiting_events_are_forgotten(services):
    s = make_settings(services, state_flush_ms=60_000)
    client = connect(s)
    handler = UserStateHandler(StateStore(client, s), Metrics())
    handler.handle(_batch(0, 0, 4, "kept"))
    handler.handle(_batch(1, 0, 4, "gone"))
    handler.forget([1])
    assert handler.floor() == {0: 0}
    handler.flush()
    keys = handler.store.keys
    assert _count(client, keys, "kept", "click") == 4
    assert not client.exists(keys.user_state("gone"))
    handler.handle(_batch(0, 4, 2, "kept"))
    handler.drop()  # lost: everything waiting is dropped
    assert handler.floor() == {}
    handler.flush()
    assert _count(client, keys, "kept", "click") == 4


def test_a_batch_consumed_again_while_its_events_wait_counts_once(services):
    """An abandoned retry makes the runtime rewind and consume the batch again: its events are waiting
    already and must not be applied twice."""
    s = make_settings(services, state_flush_ms=60_000)
    client = connect(s)
    handler = UserStateHandler(StateStore(client, s), Metrics())
    handler.handle(_batch(0, 0, 5))
    handler.handle(_batch(0, 2, 6))  # offsets 2..7: 2..4 are waiting, 5..7 are new
    handler.flush()
    assert _count(client, handler.store.keys, "w", "click") == 8


def test_the_window_counts_from_the_idle_poll_that_brought_the_events(services):
    s = make_settings(services, state_flush_ms=1000)  # a window long beside any stall of a busy machine
    client = connect(s)
    handler = UserStateHandler(StateStore(client, s), Metrics())
    keys = handler.store.keys
    assert handler.poll_wait() == pytest.approx(1.0)  # nothing waits: one window at most
    handler.handle(_batch(0, 0, 2, "soon"))  # the poll returned at once: the window just began
    assert handler.floor() == {0: 0} and not client.exists(keys.user_state("soon"))
    assert 0.5 < handler.poll_wait() <= 1.0  # the next poll waits only for what is left of it
    time.sleep(1.01)
    assert handler.poll_wait() == 0.0
    handler.tick()
    assert handler.floor() == {} and _count(client, keys, "soon", "click") == 2

    handler.poll_wait()
    time.sleep(1.01)  # an idle poll that waited the whole window
    handler.handle(_batch(0, 2, 3, "late"))  # its events have used their window: written at once
    assert handler.floor() == {} and _count(client, keys, "late", "click") == 3

    handler.handle(_batch(0, 5, 1, "direct"))  # not brought by a poll: the window starts now
    assert handler.floor() == {0: 5}
    handler.flush()
    written = UserStateHandler(StateStore(client, make_settings(services, state_flush_ms=0)), Metrics())
    assert written.poll_wait() is None  # no write-behind: the poll's own timeout
