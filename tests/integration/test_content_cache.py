"""Remembered content searches (``FUSIONREC_REC_CONTENT_CACHE``) on the real Redis: a search is
answered from memory only while the version's vectors are the ones it ran on."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from fusionrec.apps.services import RunningServices
from fusionrec.core.keys import Keys
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorLookup, VectorOp, VectorStore
from fusionrec.online.candidates.content import ContentIndex
from tests.integration.helpers import make_settings

DIM = 16
VERSION = "v1"


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {str(i): (v / np.linalg.norm(v)).astype(np.float32) for i, v in enumerate(rng.normal(size=(n, DIM)))}


def _write(client: redis.Redis, s: Settings, vectors: dict[str, np.ndarray], op: str = "upsert") -> None:
    VectorStore(client, s).apply(VERSION, [VectorOp(i, 1000, op, f"h{i}", v) for i, v in vectors.items()])


@pytest.fixture
def setup(services: RunningServices) -> tuple[redis.Redis, Settings, ContentIndex, ContentIndex, list[np.ndarray]]:
    s = make_settings(services, rec_content_cache=2)
    client = connect(s)
    _write(client, s, _vectors(60))
    queries = list(_vectors(3, seed=1).values())
    return client, s, ContentIndex(client, s), ContentIndex(client, s.replace(rec_content_cache=0)), queries


def test_a_remembered_search_answers_until_the_vectors_change(setup) -> None:
    client, s, cached, plain, queries = setup
    first = cached.nearest(VERSION, queries[:2], 10)
    assert first == plain.nearest(VERSION, queries[:2], 10) and cached.searches == 2
    assert cached.nearest(VERSION, queries[:2], 10) == first and cached.searches == 2  # both remembered
    five = cached.nearest(VERSION, queries[:2], 5)
    assert five == plain.nearest(VERSION, queries[:2], 5) and cached.searches == 4  # another count

    # a touch (same content, newer event time) changes no vector: still remembered
    VectorStore(client, s).apply(VERSION, [VectorOp("0", 2000, "touch", "h0")])
    assert cached.nearest(VERSION, queries[:2], 5) == five and cached.searches == 4

    # a new item right at the first query: the remembered answer is of vectors that changed
    _write(client, s, {"new": queries[0]})
    again = cached.nearest(VERSION, queries[:1], 10)
    assert again[0][0][0] == "new" and again == plain.nearest(VERSION, queries[:1], 10) and cached.searches == 5
    _write(client, s, {"new": queries[0]}, op="delete")
    assert cached.nearest(VERSION, queries[:1], 10) == plain.nearest(VERSION, queries[:1], 10)
    assert cached.searches == 6


def test_at_most_the_setting_s_searches_are_kept_least_recently_used_first(setup) -> None:
    _, _, cached, _, (a, b, c) = setup
    cached.nearest(VERSION, [a, b], 10)
    cached.nearest(VERSION, [a], 10)  # a used last: b is the one to go
    cached.nearest(VERSION, [c], 10)
    before = cached.searches
    cached.nearest(VERSION, [a, c], 10)
    assert cached.searches == before
    cached.nearest(VERSION, [b], 10)
    assert cached.searches == before + 1


def test_a_counter_that_starts_anew_never_returns_to_a_value_it_had(setup) -> None:
    """The version's keys can expire (a retired version) or be lost with Redis: the new counter starts
    above the old one's values, so a remembered search of the old vectors cannot answer."""
    client, s, cached, plain, queries = setup
    store = VectorStore(client, s)
    old = store.seq(VERSION)
    cached.nearest(VERSION, queries[:1], 10)
    client.delete(Keys.for_settings(s).vector_seq(VERSION))
    _write(client, s, {"new": queries[0]})
    assert store.seq(VERSION) > old
    assert cached.nearest(VERSION, queries[:1], 10) == plain.nearest(VERSION, queries[:1], 10)
    assert cached.searches == 2


def test_a_search_that_a_write_overtook_is_not_kept(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter is read again right after the searches: a write between the two reads (here, the
    first read made to see an older counter) leaves the answer unremembered."""
    client, s, cached, _, queries = setup
    current = cached.store.seq(VERSION)
    monkeypatch.setattr(cached.store, "seq", lambda version: current - 1)
    cached.nearest(VERSION, queries[:1], 10)
    monkeypatch.undo()
    cached.nearest(VERSION, queries[:1], 10)
    cached.nearest(VERSION, queries[:1], 10)
    assert cached.searches == 2  # the first was not kept, the second was


@pytest.mark.parametrize("overrides", [{}, {"vector_index": "local", "rec_content_cache": 10}],
                         ids=["no cache", "local index"])
def test_without_a_cache_every_search_runs(services: RunningServices, overrides: dict[str, object]) -> None:
    """No cache, or the in-process index (it reloads changed vectors on its own clock): every search runs."""
    s = make_settings(services, **overrides)
    client = connect(s)
    _write(client, s, _vectors(20))
    index = ContentIndex(client, s)
    query = list(_vectors(1, seed=1).values())
    assert index.nearest(VERSION, query, 5) == index.nearest(VERSION, query, 5)
    assert index.searches == 2 and not index._found


def test_cached_item_vectors_are_read_again_once_the_version_changed(services: RunningServices) -> None:
    """The rankers' item-vector cache (``VectorLookup``): an item re-embedded in place is never served
    with its old vector, and an unchanged version is served from memory."""
    s = make_settings(services)
    client = connect(s)
    store = VectorStore(client, s)
    vectors = _vectors(4)
    _write(client, s, vectors)
    reads: list[list[str]] = []

    def fetch(version: str, ids: list[str]) -> dict[str, np.ndarray]:
        reads.append(list(ids))
        return store.vectors(version, ids)

    lookup = VectorLookup(fetch, capacity=10, seq=store.seq)
    got = lookup.get(VERSION, ["0", "1", "missing"])
    assert set(got) == {"0", "1"} and np.array_equal(got["0"], vectors["0"]) and reads == [["0", "1", "missing"]]
    assert set(lookup.get(VERSION, ["0", "1", "missing"])) == {"0", "1"} and len(reads) == 1  # all remembered

    moved = (-vectors["3"]).astype(np.float32)
    _write(client, s, {"0": moved})  # re-embedded in place, same version
    again = lookup.get(VERSION, ["0", "1"])
    assert np.array_equal(again["0"], moved) and reads[-1] == ["0", "1"]

    unchecked = VectorLookup(fetch, capacity=10)  # without the counter: whatever it read first, until evicted
    unchecked.get(VERSION, ["0"])
    _write(client, s, {"0": vectors["0"]})
    assert np.array_equal(unchecked.get(VERSION, ["0"])["0"], moved)
    assert np.array_equal(lookup.get(VERSION, ["0"])["0"], vectors["0"])
