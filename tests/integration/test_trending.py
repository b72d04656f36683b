"""Trending: item count deltas from the user-state stream → faust hopping windows → Redis → candidates."""

from __future__ import annotations

import signal
import subprocess

import redis

from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams.state import BatchResult, UserTouch
from fusionrec.streams.trending import ItemDeltaPublisher, TrendingMetrics
from tests.integration.helpers import start_fusionrec, wait_for

T0 = 1_700_000_045_000  # 5 s past a minute boundary (window steps are whole minutes)


def test_faust_worker_keeps_trending_items_in_redis(settings: Settings, rclient: redis.Redis):
    s = settings.replace(trending_window_s=600, trending_step_s=60, trending_flush_s=0.5)
    keys = Keys.for_settings(s)
    metrics = Metrics()
    publisher = ItemDeltaPublisher(s, metrics)
    # an hour ago "old" was busy; in the last ten minutes "hot" is, and "warm" a little
    publisher(BatchResult(item_offsets={0: {"old": list(range(500))}}, categories={"old": "tea"},
                          max_ts=T0 - 3_600_000))
    for minute in range(10):
        first = 500 + minute * 25
        offsets = {"hot": list(range(first, first + 20)), "warm": list(range(first + 20, first + 25))}
        publisher(BatchResult(item_offsets={0: offsets}, categories={"hot": "tea", "warm": "coffee"},
                              max_ts=T0 + minute * 60_000))
        if minute == 4:  # a replayed batch publishes the same deltas again: counted once
            publisher(BatchResult(item_offsets={0: offsets}, categories={"hot": "tea", "warm": "coffee"},
                                  max_ts=T0 + minute * 60_000))
    publisher.close()
    assert metrics.of(TrendingMetrics).trending_deltas._value.get() == 23
    worker = start_fusionrec(s, "trending", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def settled() -> bool:
            top = dict(rclient.zrange(keys.trending(), 0, -1, withscores=True))
            return top.get(b"hot", 0) >= 200
        wait_for(settled, 120, "the current window's counts in Redis")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    top = rclient.zrange(keys.trending(), 0, -1, desc=True, withscores=True)
    assert [m for m, _ in top] == [b"hot", b"warm"]  # "old" fell out of the window
    assert top[0][1] == 200 and top[1][1] == 50
    assert rclient.zrange(keys.trending("tea"), 0, -1) == [b"hot"]
    assert dict(rclient.zrange(keys.trending_categories(), 0, -1, withscores=True)) == {b"tea": 200, b"coffee": 50}

    # the recommendation writer takes them as candidates
    writer = RecommendationWriter(rclient, s)
    writer.refresh({"newcomer": UserTouch(recent=[], last_ts=T0)})
    recs = RecommendationReader(rclient, s).top_k("newcomer")
    assert recs.items[0].item_id == "hot" and "trending" in recs.items[0].sources
