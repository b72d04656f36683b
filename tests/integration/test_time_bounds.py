"""Event time on the real broker and Redis: an event stamped far ahead of now changes nothing but the DLQ."""

from __future__ import annotations

import json
import time

import redis

from fusionrec.core.keys import Keys
from fusionrec.core.settings import Settings
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.state import decode_user_state
from tests.integration.helpers import consume_until, read_topic


def test_a_far_future_user_event_is_dead_lettered_and_the_next_one_applies(settings: Settings,
                                                                           rclient: redis.Redis) -> None:
    now = int(time.time() * 1000)
    # an hour ahead: well past the five-minute bound, well within the one day allowed before
    future = json.dumps({"event_id": "ahead", "type": "purchase", "user_id": "u1", "item_id": "ghost",
                         "ts": now + 3_600_000}).encode()
    with EventProducer(settings) as p:
        p.produce(settings.kafka.topic_events, future, key="u1")
        p.user_event({"event_id": "ok", "type": "purchase", "user_id": "u1", "item_id": "real", "ts": now})
    consume_until(settings, 2)

    dead = read_topic(settings, settings.dlq_topic(settings.kafka.topic_events), until=lambda got: len(got) >= 1,
                      timeout=30)
    assert [(m.value(), dict(m.headers())["fusionrec.dlq.reason"]) for m in dead] == [(future, b"future_ts")]
    keys = Keys.for_settings(settings)
    state = decode_user_state(rclient.hget(keys.user_state("u1"), "d"))
    assert (state.recent, state.counts, state.last_seen, list(state.items)) == (["real"], {"purchase": 1}, now,
                                                                                ["real"])
    assert int(rclient.hget(keys.user_state("u1"), "last_seen")) == now
    assert rclient.zrange(keys.popularity(), 0, -1) == [b"real"]
