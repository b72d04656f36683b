"""Rank on read: a reader asked for a user whose state is newer than their stored list ranks the user
itself, from that state, and writes nothing (real Redis; the stream's ranking is not running)."""

from __future__ import annotations

import asyncio

import redis
from prometheus_client import CollectorRegistry

from fusionrec.core.redis_client import connect_async
from fusionrec.core.settings import Settings
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.online.serving.api import Services
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.state import Positioned, StateStore

T0 = 1_700_000_000_000


def _event(n: int, user: str, item: str, ts: int, kind: str = "purchase") -> Positioned:
    return Positioned(0, n, UserEvent(event_id=f"e{n}", type=kind, user_id=user, item_id=item, ts=ts))


def _rec_keys(rclient: redis.Redis, s: Settings) -> dict[bytes, bytes]:
    return {k: rclient.get(k) for k in rclient.scan_iter(match=f"{s.redis.prefix}:*:rec", count=1000)}


def test_a_reader_ranks_a_user_whose_state_is_newer_than_their_list(settings: Settings, rclient: redis.Redis):
    s = settings.replace(rec_rank_on_read=True)
    store = StateStore(rclient, s)
    writer = RecommendationWriter(rclient, s)
    # "a" bought apples and bread; their list is written from that
    touched = store.apply([_event(0, "a", "apples", T0), _event(1, "a", "bread", T0 + 1)])
    writer.refresh(touched.users)
    # then "a" buys cheese, and "b" (never ranked) buys dates: the state moves on, the lists do not
    store.apply([_event(2, "a", "cheese", T0 + 2), _event(3, "b", "dates", T0 + 3)])
    before = _rec_keys(rclient, s)

    stored = RecommendationReader(rclient, settings).top_k("a")  # rank on read off: the stored list
    assert not stored.on_read and stored.event_ts == T0 + 1
    assert "cheese" not in [r.item_id for r in stored.items]

    reader = RecommendationReader(rclient, s)
    fresh = reader.top_k("a")
    assert fresh.on_read and not fresh.fallback and fresh.event_ts == T0 + 2
    assert {"apples", "bread", "cheese"} <= {r.item_id for r in fresh.items}
    assert fresh.model.startswith("fusion")
    newcomer = reader.top_k("b", k=3)  # state but no list yet: ranked, not the popular fallback
    assert newcomer.on_read and newcomer.items[0].item_id == "dates" and len(newcomer.items) == 3
    unknown = reader.top_k("nobody")
    assert unknown.fallback and not unknown.on_read
    # many users at once: the stale ones ranked together, each as top_k answers it alone
    ranked: list[int] = []
    assert reader.on_read is not None
    reader.on_read.counted = lambda: ranked.append(1)
    together = reader.many(["a", "b", "nobody", "a"])
    assert list(together) == ["a", "b", "nobody"]
    assert len(ranked) == 2  # "a", asked for twice, is one list ranked
    assert together["a"].on_read and together["a"].items == fresh.items and together["a"].event_ts == T0 + 2
    assert together["b"].on_read and together["b"].items[0].item_id == "dates"
    assert together["nobody"].fallback and not together["nobody"].on_read
    assert RecommendationReader(rclient, settings).many(["a"])["a"] == stored  # rank on read off
    assert _rec_keys(rclient, s) == before  # a reader writes nothing

    # once the stream has ranked "a" from the newest state, the stored list is served again
    writer.refresh({"a": store.apply([_event(2, "a", "cheese", T0 + 2)]).users["a"]})
    again = reader.top_k("a")
    assert not again.on_read and again.event_ts == T0 + 2
    assert reader.many(["a"])["a"] == again


def test_the_api_ranks_on_read_in_a_worker_thread_and_counts_it(settings: Settings, rclient: redis.Redis):
    s = settings.replace(rec_rank_on_read=True)
    store = StateStore(rclient, s)
    RecommendationWriter(rclient, s).refresh(store.apply([_event(0, "a", "apples", T0)]).users)
    store.apply([_event(1, "a", "bread", T0 + 5)])

    async def read() -> tuple[object, object]:
        aclient = connect_async(s)
        try:
            services = Services(s, rclient, aclient, registry=CollectorRegistry())
            assert services.areader.on_read is services.reader.on_read is not None
            recs = await services.areader.top_k("a", 5)
            return recs, services.metrics.ranked_on_read._value.get()
        finally:
            await aclient.aclose()

    recs, counted = asyncio.run(read())
    assert recs.on_read and recs.event_ts == T0 + 5 and "bread" in [r.item_id for r in recs.items]  # type: ignore[attr-defined]
    assert counted == 1
    aclient = connect_async(settings)
    off = Services(settings, rclient, aclient, registry=CollectorRegistry())
    assert off.reader.on_read is None and off.areader.on_read is None
    asyncio.run(aclient.aclose())
