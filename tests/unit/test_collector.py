"""The collector tuning that ranking and the evaluation run under: in effect inside, undone after."""

from __future__ import annotations

import gc

import pytest

from fusionrec.core.collector import THRESHOLDS, fewer_collections


def test_objects_are_frozen_and_collections_rarer_only_inside():
    before = gc.get_threshold()
    assert before != THRESHOLDS
    kept = [[i] for i in range(1000)]  # alive when the block starts: frozen
    with fewer_collections():
        assert gc.get_threshold() == THRESHOLDS
        assert gc.get_freeze_count() >= len(kept)
        cycle: list[object] = []
        cycle.append(cycle)  # cycles made inside are still collected
        del cycle
        assert gc.collect() >= 1
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_an_error_inside_still_restores_the_collector():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), fewer_collections((5_000, 5, 5)):
        assert gc.get_threshold() == (5_000, 5, 5)
        raise RuntimeError("boom")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
