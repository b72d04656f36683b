"""The user-state stream on the real broker and Redis: contract, dead letters, idempotence, metrics."""

from __future__ import annotations

import json
import time

import msgspec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.redis_client import connect
from fusionrec.online.serving.reader import RecommendationReader
from fusionrec.streams import datasets
from fusionrec.streams.producer import EventProducer
from fusionrec.streams.replay import replay
from fusionrec.streams.topics import ensure_topics
from tests.integration.helpers import (
    consume_until,
    dump_state,
    make_settings,
    on_one_redis_and_a_cluster,
    purchases_in,
    read_topic,
)

NOW = int(time.time() * 1000)


def _invalid_payloads(n: int) -> list[tuple[bytes, str]]:
    """Hypothesis-generated payloads that each break the contract in a known way."""
    valid = {"event_id": "e", "type": "view", "user_id": "u1", "item_id": "i1", "ts": NOW}
    breakers = st.one_of(
        st.binary(min_size=1, max_size=40).filter(lambda b: not b.strip().startswith((b"{", b"[", b'"')))
        .map(lambda b: (b, "garbage")),
        st.sampled_from(sorted(valid)).map(lambda f: (json.dumps({k: v for k, v in valid.items() if k != f}).encode(),
                                                       f"missing {f}")),
        st.text(min_size=1, max_size=10).filter(lambda t: t not in ("view", "click", "add_to_cart", "purchase",
                                                                    "impression"))
        .map(lambda t: (json.dumps({**valid, "type": t}).encode(), "type")),
        st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans())
        .map(lambda v: (json.dumps({**valid, "ts": v}).encode(), "ts type")),
        st.sampled_from([b"NaN", b"Infinity", b"-1e999", b"1e999", b"-5"])
        .map(lambda x: (json.dumps({**valid, "price": 0}).encode().replace(b'"price": 0', b'"price": ' + x), "price")),
        st.integers(min_value=NOW + 3 * 86_400_000, max_value=10**15)
        .map(lambda t: (json.dumps({**valid, "ts": t}).encode(), "future")),
        st.text(alphabet="{} \t", min_size=1, max_size=5)
        .map(lambda u: (json.dumps({**valid, "user_id": u}).encode(), "bad id")),
        st.integers(min_value=70_000, max_value=90_000).map(lambda k: (json.dumps({**valid, "pad": "x" * k}).encode(),
                                                                        "oversize")),
    )
    out: list[tuple[bytes, str]] = []

    @hsettings(max_examples=n, suppress_health_check=list(HealthCheck), database=None)
    @given(breakers)
    def collect(case):
        out.append(case)

    collect()
    return out


HOSTILE = [  # each one used to stop the consumer, or must never
    (b'{"event_id": "e", "type": "view", "user_id": "u1", "item_id": "i1", "ts": 1, "x": '
     + b"[" * 3000 + b"]" * 3000 + b"}", "too deep"),
    (b'{"event_id": "e", "type": "view", "user_id": "\xff\xfe", "item_id": "i1", "ts": 1}', "invalid UTF-8"),
    (b'{"event_id": "e", "type": "view", "user_id": 1.5, "item_id": "i1", "ts": 1}', "float id"),
]


def test_invalid_payloads_go_to_the_dlq_with_reasons_and_valid_ones_apply(settings):
    invalid = _invalid_payloads(1000) + HOSTILE
    assert len(invalid) >= 1000
    valid = [{"event_id": f"v{n}", "type": "purchase", "user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "ts": NOW - n}
             for n in range(len(invalid) // 3)]
    with EventProducer(settings) as p:
        for n, (raw, _why) in enumerate(invalid):
            p.produce(settings.kafka.topic_events, raw, key=str(n), headers=[("origin", b"fuzz")])
            if n % 3 == 0 and n // 3 < len(valid):
                p.user_event(valid[n // 3])
    metrics = Metrics(CollectorRegistry())
    pipeline = consume_until(settings, len(invalid) + len(valid), metrics=metrics)
    dead = read_topic(settings, settings.dlq_topic(settings.kafka.topic_events),
                      until=lambda got: len(got) >= len(invalid))
    assert len(dead) == len(invalid)
    assert sorted(m.value() for m in dead) == sorted(raw for raw, _ in invalid)
    for m in dead:
        h = dict(m.headers())
        assert h["fusionrec.dlq.reason"] and h["origin"] == b"fuzz"
        assert h["fusionrec.source.topic"].decode() == settings.kafka.topic_events
        assert int(h["fusionrec.source.offset"]) >= 0
    reasons = {dict(m.headers())["fusionrec.dlq.reason"].decode() for m in dead}
    assert {"not_json", "missing_field", "unknown_type", "future_ts", "invalid_id", "oversize", "too_deep",
            "wrong_type"} <= reasons
    dlq_total = sum(s.value for s in metrics.registry.collect() if s.name == "fusionrec_stream_dead_letters"
                    for s in s.samples if s.name.endswith("_total"))
    assert dlq_total == len(invalid)
    client = connect(settings)
    assert purchases_in(client, settings.redis.prefix) == len(valid)
    assert pipeline.consumer.consumed == len(invalid) + len(valid)


@on_one_redis_and_a_cluster
def test_consuming_the_same_range_twice_leaves_identical_state(services, redis_target):
    s = make_settings(services, partitions=2, **redis_target)
    ensure_topics(s)
    ds = datasets.completejourney(households=30).head(4000)
    with EventProducer(s) as p:
        replay(ds, p, progress=False)
    total = len(ds.events) + len(ds.items)
    consume_until(s, total)
    client = connect(s)
    first = dump_state(client, s.redis.prefix)
    # A second group starts from the beginning again. Redis' applied positions would start it after
    # them (fusionrec.streams.positions); without them (state written by an older release) every
    # event is a replay for the state, which the offset guards skip.
    positions = client.hgetall(f"{s.redis.prefix}:{{g}}:applied")
    assert len(positions) == 2
    client.delete(f"{s.redis.prefix}:{{g}}:applied")
    metrics = Metrics(CollectorRegistry())
    consume_until(s, total, group_id=s.stream.group + "-again", metrics=metrics)
    assert dump_state(client, s.redis.prefix) == first
    skipped = metrics.registry.get_sample_value("fusionrec_state_replay_skipped_total")
    assert skipped == len(ds.events)


def test_recommendations_are_readable_and_metrics_are_recorded(settings):
    ds = datasets.completejourney(households=20).head(3000)
    with EventProducer(settings) as p:
        replay(ds, p, progress=False)
    metrics = Metrics(CollectorRegistry())
    lags: dict[str, float] = {}
    consume_until(settings, len(ds.events) + len(ds.items), metrics=metrics, lag_at_end=lags)
    reader = RecommendationReader(connect(settings), settings)
    user = ds.events.user_id.value_counts().index[0]
    recs = reader.top_k(user, 10)
    assert not recs.fallback and len(recs.items) == 10
    assert all(r.sources and set(r.sources) <= {"repeat", "covis", "popular"} for r in recs.items)
    stored = msgspec.json.decode(connect(settings).get(reader.keys.user_rec(user)))
    assert stored["event_ts"] == int(ds.events[ds.events.user_id == user].ts.max())
    reg = metrics.registry
    assert reg.get_sample_value("fusionrec_stream_events_total",
                                {"topic": settings.kafka.topic_events, "type": "purchase"}) == len(ds.events)
    assert reg.get_sample_value("fusionrec_state_freshness_seconds_count") > 0
    assert reg.get_sample_value("fusionrec_recs_written_total") > 0
    # every partition that delivered data reports its lag, and the consumer caught up (within the timeout)
    assert len(lags) >= 2 and all(v == 0 for v in lags.values())


def test_pseudonymous_user_ids_never_reach_redis(services):
    key = "pseudonym-key-for-the-stream-test"
    s = make_settings(services, user_id_key=key, rec_ranker="simple")
    ensure_topics(s)
    raw_ids = [f"customer-{n}@example" for n in range(5)]
    with EventProducer(s) as producer:
        for n in range(40):
            producer.user_event({"event_id": f"e{n}", "type": "purchase", "user_id": raw_ids[n % 5],
                                 "item_id": str(n % 7), "ts": 1_700_000_000_000 + n})
    with consume_until(s, 40) as pipeline:
        client = pipeline.redis
        state = dump_state(client, s.redis.prefix)
        dumped = repr(state) + repr([client.get(k) for k in client.scan_iter(match=f"{s.redis.prefix}:*:rec")])
        assert not any(raw in dumped for raw in raw_ids)
        pseudo = Pseudonyms(key)
        assert any(pseudo(raw_ids[0]) in k for k in state)
        recs = RecommendationReader(client, s).top_k(raw_ids[0])
        assert not recs.fallback and recs.user_id == raw_ids[0]  # asked and answered by the real id
        assert RecommendationReader(client, s.replace(user_id_key=None)).top_k(raw_ids[0]).fallback


def test_a_list_ranked_from_older_events_never_replaces_a_newer_one(settings, rclient):
    from fusionrec.online.ranking.ranker import SimpleRanker
    from fusionrec.online.ranking.writer import RecommendationWriter
    from fusionrec.online.serving.reader import RecommendationReader
    from fusionrec.streams.state import UserTouch

    writer = RecommendationWriter(rclient, settings, ranker=SimpleRanker())
    rclient.zadd(writer.keys.popularity(), {"p1": 3.0, "p2": 2.0})
    reader = RecommendationReader(rclient, settings)
    writer.refresh({"u1": UserTouch(recent=[], last_ts=200)})
    writer.refresh({"u1": UserTouch(recent=[], last_ts=100)})  # e.g. a previous owner, late
    assert reader.top_k("u1").event_ts == 200
    writer.refresh({"u1": UserTouch(recent=[], last_ts=200)})  # the same events ranked again: written
    writer.refresh({"u1": UserTouch(recent=[], last_ts=300)})
    assert reader.top_k("u1").event_ts == 300 and [r.item_id for r in reader.top_k("u1").items] == ["p1", "p2"]
