"""StateStore against the real Redis: replays, partial failures and batch boundaries change nothing."""

from __future__ import annotations

import random
import time
import zlib

import msgspec
import pytest

from fusionrec.core.redis_client import connect
from fusionrec.online.candidates.context import CandidateReader, strongest
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams import datasets
from fusionrec.streams.contract import CatalogEvent, UserEvent
from fusionrec.streams.state import Positioned, StateStore
from tests.integration.helpers import dump_state, make_settings

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def slice_events():
    ds = datasets.completejourney(households=40).head(6000)
    catalog = ds.catalog(1)
    # One partition: with several, per-item state from different partitions interleaves in arrival
    # order, so only per-partition determinism is defined (totals are checked in test_stream.py).
    events = [Positioned(0, n, msgspec.convert(e, UserEvent)) for n, e in enumerate(ds.user_events())]
    return catalog, events


def _store(services, **kw):
    s = make_settings(services, **kw)
    client = connect(s)
    return s, client, StateStore(client, s), RecommendationWriter(client, s)


def _crash_after_items(store, events):
    """Apply ``events`` with Redis going away after the item write and before the users' write."""
    original = store._apply_users
    store._apply_users = lambda *_: (_ for _ in ()).throw(ConnectionError("redis went away"))
    with pytest.raises(ConnectionError):
        store.apply(events)
    store._apply_users = original


def _run(store, writer, events, size):
    for i in range(0, len(events), size):
        writer(store.apply(events[i: i + size]))


def test_batch_boundaries_and_replays_do_not_change_state(services, slice_events):
    catalog, events = slice_events
    dumps = []
    for size, replay in ((500, False), (137, True)):
        s, client, store, writer = _store(services)
        store.apply_catalog(catalog)
        _run(store, writer, events, size)
        if replay:
            again = store.apply(events[1000:3000])
            assert (again.applied, again.skipped) == (0, 2000)
        dumps.append({k.split(":", 1)[1]: v for k, v in dump_state(client, s.redis.prefix).items()})
    assert dumps[0] == dumps[1]
    counts = [v["state"]["counts"].get("purchase", 0) for k, v in dumps[0].items() if k.endswith(":s")]
    assert sum(counts) == len(events)


def test_crash_between_item_and_user_writes_converges(services, slice_events):
    catalog, events = slice_events
    results = []
    for crash in (False, True):
        s, client, store, writer = _store(services)
        store.apply_catalog(catalog)
        _run(store, writer, events[:2000], 400)
        if crash:
            _crash_after_items(store, events[2000:2600])
            _run(store, writer, events[2000:], 300)  # replay from the last "committed" offset
        else:
            _run(store, writer, events[2000:], 600)
        results.append({k.split(":", 1)[1]: v for k, v in dump_state(client, s.redis.prefix).items()})
    assert results[0] == results[1]


def test_item_guards_past_one_partition_hold_the_call_and_the_rest_is_sent_again(services, slice_events):
    """Each item bucket's increments from every partition go in one guarded call. After a crash
    between the item and the user writes, the replay finds the item guards past some partitions'
    offsets: the calls are refused whole and sent again above each partition's guard, and every key
    ends as in one clean pass."""
    catalog, events = slice_events
    # keyed by user over two partitions; no co-visitation set reaches its cap, so the order in which two
    # partitions' increments of one set interleave (batch boundaries decide it) changes no member
    keyed = [Positioned(zlib.crc32(pe.event.user_id.encode()) % 2, n, pe.event) for n, pe in enumerate(events)]
    results = []
    for crash in (False, True):
        s, client, store, writer = _store(services, covis_cap=100_000)
        store.apply_catalog(catalog)
        _run(store, writer, keyed[:2000], 400)
        if crash:
            _crash_after_items(store, keyed[2000:2600])
            sent = []
            apply = store._zset_apply

            def count(*, keys, args, client, sent=sent, apply=apply):
                sent.append(args[4])
                return apply(keys=keys, args=args, client=client)

            store._zset_apply = count
            _run(store, writer, keyed[2000:], 900)  # replay from the last "committed" offset
            assert max(sent) == 2  # one call carries both partitions
        else:
            _run(store, writer, keyed[2000:], 600)
        results.append({k.split(":", 1)[1]: v for k, v in dump_state(client, s.redis.prefix).items()})
    assert results[0] == results[1]


def test_catalog_is_event_time_guarded_and_deletes_exclude_items(services):
    s, client, store, writer = _store(services)
    up = CatalogEvent(item_id="i1", op="upsert", ts=200, title="new title", category="c")
    old = CatalogEvent(item_id="i1", op="upsert", ts=100, title="old title")
    assert store.apply_catalog([up, old]) == 1
    assert client.hget(store.keys.item_meta("i1"), "title") == b"new title"
    evs = [Positioned(0, n, UserEvent(event_id=str(n), type="purchase", user_id=f"u{n % 3}", item_id=i,
                                      ts=T0 + n)) for n, i in enumerate(["i1", "i2", "i1", "i3", "i2", "i1"])]
    writer(store.apply(evs))
    reader = RecommendationReader(client, s)
    assert "i1" in [r.item_id for r in reader.top_k("u0").items]
    store.apply_catalog([CatalogEvent(item_id="i1", op="delete", ts=300)])
    view = UserEvent(event_id="x", type="view", user_id="u0", item_id="i2", ts=T0 + 2000)
    writer(store.apply([Positioned(0, 10, view)]))
    assert "i1" not in [r.item_id for r in reader.top_k("u0").items]
    assert "i1" not in [r.item_id for r in reader.top_k("nobody").items]
    assert client.hget(store.keys.item_meta("i1"), "deleted") == b"1"


def test_catalog_keeps_the_first_listing_time(services):
    s, client, store, _ = _store(services)
    key = store.keys.item_meta

    def listed(item: str) -> int | None:
        raw = client.hget(key(item), "listed")
        return None if raw is None else int(raw)

    store.apply_catalog([CatalogEvent(item_id="a", op="upsert", ts=200, title="a")])
    assert listed("a") == 200
    store.apply_catalog([CatalogEvent(item_id="a", op="upsert", ts=300, title="a2")])  # an update
    assert listed("a") == 200 and client.hget(key("a"), "title") == b"a2"
    store.apply_catalog([CatalogEvent(item_id="a", op="upsert", ts=100, title="old")])  # older, arriving late
    assert listed("a") == 100 and client.hget(key("a"), "title") == b"a2"
    store.apply_catalog([CatalogEvent(item_id="a", op="delete", ts=400)])
    store.apply_catalog([CatalogEvent(item_id="a", op="upsert", ts=500, title="back")])
    assert listed("a") == 100
    store.apply_catalog([CatalogEvent(item_id="gone", op="delete", ts=50)])  # never listed
    assert listed("gone") is None
    client.hset(key("legacy"), mapping={"ts": 10, "title": "stored before listing times"})
    store.apply_catalog([CatalogEvent(item_id="legacy", op="upsert", ts=600, title="legacy")])
    assert listed("legacy") is None  # its listing time is unknown, not 600


def test_purchases_keep_count_first_and_last_time_and_reach_the_reader(services):
    s, client, store, _ = _store(services)
    day = 86_400_000

    def ev(n: int, kind: str, item: str, ts: int) -> Positioned:
        return Positioned(0, n, UserEvent(event_id=str(n), type=kind, user_id="u", item_id=item, ts=ts))

    store.apply([ev(0, "purchase", "milk", T0), ev(1, "view", "milk", T0 + 9 * day), ev(2, "purchase", "bread", T0)])
    store.apply([ev(3, "purchase", "milk", T0 + 6 * day), ev(4, "purchase", "milk", T0 + 3 * day)])  # one late
    store.apply([ev(3, "purchase", "milk", T0 + 6 * day)])  # a replay of an applied offset: skipped
    assert store.stored("u").buys == {"milk": (3, T0, T0 + 6 * day), "bread": (1, T0, T0)}
    assert client.ttl(store.keys.user_state("u")) > 0
    [ctx] = CandidateReader(client, s).for_stored_users({"u": T0 + 9 * day})
    assert ctx.bought == {"milk": (3, T0, T0 + 6 * day), "bread": (1, T0, T0)}
    client.hset(store.keys.user_state("u"), "d", b"not a state")  # not what the store writes
    [ctx] = CandidateReader(client, s).for_stored_users({"u": T0 + 9 * day})
    assert (ctx.bought, ctx.items, ctx.recent) == ({}, [], [])  # read as a user with no history
    store.reset()
    store.apply([ev(5, "purchase", "bread", T0 + 9 * day)])  # and replaced by the user's next write
    assert store.stored("u").buys == {"bread": (1, T0 + 9 * day, T0 + 9 * day)}


def test_unknown_user_gets_popular_fallback(services):
    s, client, store, writer = _store(services)
    evs = [Positioned(0, n, UserEvent(event_id=str(n), type="view", user_id="u", item_id=f"i{n % 4}", ts=T0 + n))
           for n in range(20)]
    writer(store.apply(evs))
    recs = RecommendationReader(client, s).top_k("stranger", 3)
    assert recs.fallback and len(recs.items) == 3
    assert all(r.sources.keys() == {"popular"} for r in recs.items)
    known = RecommendationReader(client, s).top_k("u", 3)
    assert not known.fallback and known.model == "fusion"  # no checkpoint yet: the untrained fusion


def test_a_users_strongest_items_come_in_the_order_a_sorted_set_gives(services):
    """Readers take a user's top items from their stored state; ties (items of one basket share a weight)
    break as ``ZRANGE … REV`` breaks them, which the candidate pools had before states were written whole."""
    s, client, _store_, _ = _store(services)
    rng = random.Random(7)
    weights = {f"i{rng.randrange(400)}": float(rng.choice([0.5, 1.0, 2.0, 2.0, 4.0])) for _ in range(300)}
    client.zadd("ties", weights)
    for n in (1, 10, 150, len(weights), 1000):
        want = [(m.decode(), w) for m, w in client.zrange("ties", 0, n - 1, desc=True, withscores=True)]
        assert strongest(weights, n) == want
    assert strongest(weights, 0) == [] and strongest({}, 5) == []


def test_a_covisitation_sets_ttl_is_set_when_due_not_at_every_write(services):
    """With ``item_ttl_s=10`` a process sets a set's TTL again at most every second (a tenth of it)."""
    s, client, store, _ = _store(services, item_ttl_s=10)
    n = 0

    def visit(*items: str) -> None:
        nonlocal n
        store.apply([Positioned(0, n + j, UserEvent(event_id=f"e{n + j}", type="view", user_id=f"u{n}", item_id=i,
                                                    ts=T0 + n + j)) for j, i in enumerate(items)])
        n += len(items)

    visit("a", "b")
    key = store.keys.item_covis("a")
    assert 0 < client.ttl(key) <= 10
    client.expire(key, 1000)  # marks whether the next writes set it again
    visit("a", "c")
    assert client.zscore(key, "c") is not None and client.ttl(key) > 10  # written, TTL not due yet
    time.sleep(1.1)
    visit("a", "d")
    assert client.zscore(key, "d") is not None and 0 < client.ttl(key) <= 10


def test_a_pipeline_checks_a_script_is_loaded_once_a_second_and_loads_it_again_after_a_flush(services, monkeypatch):
    from redis.exceptions import NoScriptError

    from fusionrec.core import scripts

    s = make_settings(services)
    client = connect(s)
    script = scripts.LuaScript(client, "return 'fusionrec-script-check:' .. ARGV[1]")

    def checks() -> int:
        return int(client.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0))

    def run(i: int) -> list:
        pipe = client.pipeline(transaction=False)
        script(args=[i], client=pipe)
        return pipe.execute()

    before = checks()
    assert [run(i) for i in range(5)] == [[f"fusionrec-script-check:{i}".encode()] for i in range(5)]
    assert checks() - before == 1  # the first pipeline made sure; the next four sent EVALSHA alone
    client.script_flush()  # what a restarted Redis has lost
    with pytest.raises(NoScriptError):
        run(5)
    assert script(args=[6]) == b"fusionrec-script-check:6"  # a call of its own loads it
    client.script_flush()
    monkeypatch.setattr(scripts, "CHECK_EVERY_S", 0.0)  # the next check is due: the pipeline loads it
    assert run(7) == [b"fusionrec-script-check:7"]
    client.close()
