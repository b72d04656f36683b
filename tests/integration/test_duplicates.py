"""Producer duplicates (an event id a user sent before) are dropped, exactly, under replays and crashes."""

from __future__ import annotations

import random

import msgspec
import pytest

from fusionrec.core.metrics import Metrics
from fusionrec.core.redis_client import connect
from fusionrec.streams import datasets
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.state import BatchResult, Positioned, StateStore, decode_user_state
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, dump_state, make_settings

T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def with_copies():
    """A Complete Journey slice (one partition), and the same stream with 400 events sent again a
    few to a few hundred positions later, as a producer retrying after a timeout does."""
    ds = datasets.completejourney(households=30).head(3000)
    clean = [msgspec.convert(e, UserEvent) for e in ds.user_events()]
    rng = random.Random(7)
    stream = list(clean)
    for n in sorted(rng.sample(range(len(clean)), 400), reverse=True):
        stream.insert(min(len(stream), n + rng.randint(1, 300)), clean[n])
    return ds.catalog(1), clean, stream


def _positioned(events: list[UserEvent]) -> list[Positioned]:
    return [Positioned(0, n, e) for n, e in enumerate(events)]


def _state(client, prefix: str) -> dict:
    """The state that does not name offsets: guards and remembered ids (which do) left out."""
    return {k.split(":", 1)[1]: v for k, v in dump_state(client, prefix).items() if not k.endswith(":o")}


def _run(store: StateStore, events: list[Positioned], size: int) -> list[BatchResult]:
    return [store.apply(events[i: i + size]) for i in range(0, len(events), size)]


# Long enough that every copy in the slice is within it: the copies are exactly the 400 sent again.
EVERYTHING = {"dedupe_window_s": 10 * 365 * 86_400, "dedupe_ids": 100_000}


def _crash_and_replay(store: StateStore, evs: list[Positioned], size: int) -> tuple[list[BatchResult], list]:
    """Apply up to offset 1700, record 1199 as done, fail a write, replay from 1200 (a commit at 1200).
    Returns the results and the outputs a downstream consumer keeps (positions it has not seen)."""
    first = _run(store, evs[:1700], size)
    store.settle({0: 1199})  # what the consumer does once offsets up to 1199 are recorded as done
    original = store._apply_users
    store._apply_users = lambda *_: (_ for _ in ()).throw(ConnectionError("redis went away"))
    with pytest.raises(ConnectionError):
        store.apply(evs[1700:2300])
    store._apply_users = original
    replayed = _run(store, evs[1200:], size)
    assert 450 < sum(r.skipped for r in replayed) <= 500  # (a copy past its bucket's guard is not skipped)
    # the replayed events that were applied before are decided as the first pass decided them
    assert sorted(_outputs(replayed, 1200, 1700)) == sorted(_outputs(first, 1200, 1700))
    return first + replayed, _outputs(first) + _outputs(replayed, 1700)


def test_copies_change_nothing_and_a_replay_decides_them_again(services, with_copies):
    catalog, clean, stream = with_copies
    runs = []
    for events, size, crash in ((clean, 500, False), (stream, 500, False), (stream, 137, True)):
        s = make_settings(services, **EVERYTHING)
        client = connect(s)
        store = StateStore(client, s)
        store.apply_catalog(catalog)
        evs = _positioned(events)
        if crash:
            results, outputs = _crash_and_replay(store, evs, size)
        else:
            results = _run(store, evs, size)
            outputs = _outputs(results)
        runs.append((_state(client, s.redis.prefix), dump_state(client, s.redis.prefix, event_ids=True), outputs,
                     sum(r.duplicates for r in results)))
    (clean_state, _, clean_out, clean_dups), (a_state, a_dump, a_out, a_dups), (b_state, b_dump, b_out, _) = runs
    assert clean_dups == 0 and a_dups == len(stream) - len(clean) == 400
    assert a_state == clean_state == b_state  # counters, lists, weights, co-visitation, popularity
    # the two runs over the copies agree on every key, remembered ids and guards included
    assert {k.split(":", 1)[1]: v for k, v in a_dump.items()} == {k.split(":", 1)[1]: v for k, v in b_dump.items()}
    # outputs (the actions the learner and trending see) leave the copies out, replayed or not
    assert sorted(a_out) == sorted(clean_out) == sorted(b_out)
    assert len(clean_out) == sum(e.type != "impression" for e in clean)


def test_forgotten_ids_never_change_a_replayed_decision(services, with_copies):
    """With the default one-hour window, most ids of this two-year slice are forgotten as the
    stream moves on: a replay still derives exactly the outputs of the first pass."""
    catalog, _clean, stream = with_copies
    s = make_settings(services)
    client = connect(s)
    store = StateStore(client, s)
    store.apply_catalog(catalog)
    results, _outputs_kept = _crash_and_replay(store, _positioned(stream), 137)
    remembered = sum(len(decode_user_state(client.hget(k, "d")).seen)
                     for k in client.scan_iter(match=f"{s.redis.prefix}:*:s"))
    assert remembered > 0
    assert remembered < len(stream) - 1200  # ids were forgotten ...
    assert sum(r.duplicates for r in results) > 0  # ... and copies dropped


def _outputs(results: list[BatchResult], since: int = 0, until: int = 1 << 62) -> list[tuple[str, str, int]]:
    """Every action the results carry for their outputs, from source offsets ``since`` to ``until``."""
    out = []
    for r in results:
        for touch in r.users.values():
            out += [a for a, (_p, off) in zip(touch.actions, touch.positions, strict=True) if since <= off < until]
    return out


def test_without_suppression_the_copies_count_twice(services, with_copies):
    """The check above can fail: the same stream with suppression off doubles counters."""
    catalog, clean, stream = with_copies
    s = make_settings(services, dedupe_window_s=0)
    client = connect(s)
    store = StateStore(client, s)
    store.apply_catalog(catalog)
    results = _run(store, _positioned(stream), 500)
    assert sum(r.duplicates for r in results) == 0
    counts = sum(v["state"]["counts"].get("purchase", 0) for k, v in dump_state(client, s.redis.prefix).items()
                 if k.endswith(":s"))
    assert counts == len(stream) > len(clean)


def test_the_window_is_event_time_and_the_cap_forgets_the_oldest(services):
    s = make_settings(services, dedupe_window_s=60, dedupe_ids=3)
    client = connect(s)
    store = StateStore(client, s)

    def ev(eid: str, ts_s: int, offset: int) -> Positioned:
        return Positioned(0, offset, UserEvent(event_id=eid, type="purchase", user_id="u", item_id=eid,
                                               ts=T0 + ts_s * 1000))

    assert store.apply([ev("a", 0, 0), ev("a", 1, 1)]).duplicates == 1  # within one batch
    assert store.apply([ev("a", 30, 2)]).duplicates == 1  # remembered across batches
    store.reset()  # ... and across processes: read back from Redis
    assert store.apply([ev("a", 59, 3)]).duplicates == 1
    assert store.apply([ev("b", 61, 4)]).duplicates == 0  # "a" is now more than 60 s older than the newest,
    assert store.apply([ev("a", 62, 5)]).duplicates == 1  # but its copy at offset 3 may still be replayed
    store.settle({0: 5})  # offsets up to 5 are done: no replay goes back to them
    assert store.apply([ev("c", 62, 6)]).duplicates == 0  # "a" is forgotten now
    assert store.apply([ev("a", 63, 7)]).duplicates == 0  # so it counts again
    store.settle({0: 7})
    assert store.apply([ev("d", 63, 8), ev("e", 63, 9)]).duplicates == 0
    stored = store.stored("u")
    assert [e[3] for e in stored.seen] == ["a", "d", "e"]  # at most 3: "b" and "c", the oldest settled, go
    assert stored.counts["purchase"] == 6


def test_a_resent_event_counts_once_through_the_broker(services):
    """A producer that resends events after a restart: the consumer pipeline applies each once."""
    s = make_settings(services)
    ensure_topics(s)
    events = [{"event_id": f"order-{n}", "type": "purchase", "user_id": f"u{n % 3}", "item_id": f"i{n % 5}",
               "ts": T0 + n} for n in range(30)]
    with EventProducer(s) as producer:
        for e in events + events[10:25]:  # the second send of 15 of them
            producer.user_event(e)
    metrics = Metrics()
    with consume_until(s, 45, metrics=metrics) as pipeline:
        state = dump_state(pipeline.redis, s.redis.prefix)
    assert sum(v["state"]["counts"].get("purchase", 0) for k, v in state.items() if k.endswith(":s")) == 30
    assert metrics.registry.get_sample_value("fusionrec_state_duplicate_events_total") == 15

