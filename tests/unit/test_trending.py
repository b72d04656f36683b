"""Item deltas counted once per source offset, whatever replays publish again."""

from fusionrec.streams.trending import ItemDelta, fresh_counts


def test_fresh_counts_skip_the_offsets_already_counted():
    counts, nxt = fresh_counts({"a": [3, 5, 9], "b": [4]}, 0)
    assert counts == {"a": 3, "b": 1} and nxt == 10
    # a replay from offset 4 that goes further: only 10 and 11 are new
    counts, nxt = fresh_counts({"a": [5, 9, 10], "b": [4, 11]}, nxt)
    assert counts == {"a": 1, "b": 1} and nxt == 12
    assert fresh_counts({"a": [5, 9]}, nxt) == ({}, 12)


def test_a_delta_without_positions_decodes_with_defaults():
    import msgspec

    old = msgspec.json.decode(b'{"ts": 1.0, "items": {"a": 2}, "categories": {}}', type=ItemDelta)
    assert old.source == -1 and old.offsets == {}
