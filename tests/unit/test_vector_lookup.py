"""The item-vector cache in front of Redis (``VectorLookup``): least recently used go first, per version."""

from __future__ import annotations

import numpy as np

from fusionrec.models.vectors import VectorLookup


def _lookup(capacity: int) -> tuple[VectorLookup, list[tuple[str, list[str]]]]:
    reads: list[tuple[str, list[str]]] = []

    def fetch(version: str, ids: list[str]) -> dict[str, np.ndarray]:
        reads.append((version, list(ids)))
        return {i: np.full(2, float(len(version) + int(i)), dtype=np.float32) for i in ids if i != "9"}

    return VectorLookup(fetch, capacity=capacity), reads


def test_least_recently_used_items_go_first_and_no_vector_is_remembered_too() -> None:
    lookup, reads = _lookup(capacity=3)
    assert set(lookup.get("v", ["1", "2", "9"])) == {"1", "2"}
    lookup.get("v", ["1"])  # 1 used last: 2 is the oldest
    lookup.get("v", ["3"])  # four items for three places: 2 goes
    reads.clear()
    assert set(lookup.get("v", ["1", "3", "9"])) == {"1", "3"} and reads == []
    lookup.get("v", ["2"])
    assert reads == [("v", ["2"])]


def test_the_last_versions_asked_for_are_kept() -> None:
    lookup, reads = _lookup(capacity=10)
    for version in ("a", "bb", "a", "ccc"):  # a was asked for after bb: bb is the one dropped
        lookup.get(version, ["1"])
    reads.clear()
    assert lookup.get("a", ["1"])["1"][0] == 2.0 and lookup.get("ccc", ["1"])["1"][0] == 4.0 and reads == []
    assert lookup.get("bb", ["1"])["1"][0] == 3.0 and reads == [("bb", ["1"])]
