"""Remembered content searches (``FUSIONREC_REC_CONTENT_CACHE``) on the real Redis: a search is
answered from memory only while the version's vectors are the ones it ran on."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from fusionrec.apps.services import RunningServices
from fusionrec.core.redis_client import connect
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorOp, VectorStore
from fusionrec.online.candidates.content import ContentIndex
from tests.integration.helpers import make_settings

DIM = 16
VERSION = "v1"


def _vectors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {str(i): (v / np.linalg.norm(v)).astype(np.float32) for i, v in enumerate(rng.normal(size=(n, DIM)))}


def _write(client: redis.Redis, s: Settings, vectors: dict[str, np.ndarray], op: str = "upsert") -> None:
    VectorStore(client, s).apply(VERSION, [VectorOp(i, 1000, op, f"h{i}", v) for i, v in vectors.items()])


def test_a_remembered_search_answers_until_the_vectors_change(services: RunningServices) -> None:
    s = make_settings(services, rec_content_cache=2)
    client = connect(s)
    _write(client, s, _vectors(60))
    cached, plain = ContentIndex(client, s), ContentIndex(client, s.replace(rec_content_cache=0))
    queries = list(_vectors(3, seed=1).values())

    first = cached.nearest(VERSION, queries[:2], 10)
    assert first == plain.nearest(VERSION, queries[:2], 10) and cached.searches == 2
    assert cached.nearest(VERSION, queries[:2], 10) == first and cached.searches == 2  # both remembered
    assert cached.nearest(VERSION, queries[:2], 5) == plain.nearest(VERSION, queries[:2], 5)  # another count
    assert cached.searches == 4

    # a new item right at the first query: the remembered answers are of vectors that changed
    _write(client, s, {"new": queries[0]})
    again = cached.nearest(VERSION, queries[:1], 10)
    assert again[0][0][0] == "new" and again == plain.nearest(VERSION, queries[:1], 10) and cached.searches == 5
    _write(client, s, {"new": queries[0]}, op="delete")
    assert cached.nearest(VERSION, queries[:1], 10) == first[:1] and cached.searches == 6

    # at most ``rec.content_cache`` searches are kept, the least recently used go first
    cached.nearest(VERSION, queries, 10)
    assert len(cached._found) == 2
    before = cached.searches
    cached.nearest(VERSION, queries[2:], 10)
    assert cached.searches == before


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
