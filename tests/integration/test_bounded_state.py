"""Random item ids cannot grow Redis without bound: every key is capped, expires, or is bounded by
the deployment's shape (buckets × partitions), through the real broker and pipeline."""

from __future__ import annotations

import random
import re

from fusionrec.core.redis_client import connect
from fusionrec.streams.contract import UserEvent
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.state import Positioned, StateStore
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import consume_until, make_settings

T0 = 1_700_000_000_000

# Global keys that neither expire nor grow with ids: the offset guards (one field per source
# partition), the applied positions (one per partition), the capped popularity set.
BOUNDED = re.compile(r":\{[ugi](:\d+)?\}:(o|applied|pop)$")


def test_random_item_ids_leave_only_capped_or_expiring_keys(services):
    s = make_settings(services, popularity_cap=50, covis_cap=5, item_ttl_s=3600, rec_ranker="simple")
    ensure_topics(s)
    rng = random.Random(3)
    with EventProducer(s) as producer:
        for n in range(3000):  # 3,000 distinct random item ids over 40 users
            producer.user_event({"event_id": f"e{n}", "type": rng.choice(["view", "click", "purchase"]),
                                 "user_id": f"u{n % 40}", "item_id": f"rnd-{rng.getrandbits(48):x}", "ts": T0 + n})
    with consume_until(s, 3000) as pipeline:
        client = pipeline.redis
        keys = [k.decode() for k in client.scan_iter(match=f"{s.redis.prefix}:*", count=1000)]
        unbounded = [k for k in keys if client.ttl(k) < 0 and not BOUNDED.search(k)]
        assert not unbounded, unbounded[:10]
        assert client.zcard(pipeline.store.keys.popularity()) == 50
        covis = [k for k in keys if k.endswith(":covis")]
        assert len(covis) > 2000 and all(0 < client.ttl(k) <= 3600 for k in covis)
        assert max(client.zcard(k) for k in covis) <= 5
        guards = [k for k in keys if k.endswith(":o")]
        assert all(len(client.hkeys(k)) <= 4 for k in guards)  # one field per source partition


def test_the_popularity_cap_keeps_the_most_popular(services):
    s = make_settings(services, popularity_cap=10)
    client = connect(s)
    store = StateStore(client, s)
    # item i<n> gets n purchases: one batch, so the capped set is exactly the top 10
    events = [UserEvent(event_id=f"e{n}-{k}", type="purchase", user_id=f"u{k}", item_id=f"i{n}", ts=T0)
              for n in range(1, 31) for k in range(n)]
    store.apply([Positioned(0, off, e) for off, e in enumerate(events)])
    kept = [m.decode() for m in client.zrange(store.keys.popularity(), 0, -1, desc=True)]
    assert kept == [f"i{n}" for n in range(30, 20, -1)]
