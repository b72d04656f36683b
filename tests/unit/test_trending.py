"""Item deltas counted once per source offset, whatever replays publish again, at no time ahead of now."""

import msgspec

from fusionrec.core.settings import Settings
from fusionrec.streams.state import BatchResult
from fusionrec.streams.trending import ItemDelta, ItemDeltaPublisher, fresh_counts


def test_fresh_counts_skip_the_offsets_already_counted():
    counts, nxt = fresh_counts({"a": [3, 5, 9], "b": [4]}, 0)
    assert counts == {"a": 3, "b": 1} and nxt == 10
    # a replay from offset 4 that goes further: only 10 and 11 are new
    counts, nxt = fresh_counts({"a": [5, 9, 10], "b": [4, 11]}, nxt)
    assert counts == {"a": 1, "b": 1} and nxt == 12
    assert fresh_counts({"a": [5, 9]}, nxt) == ({}, 12)


def test_a_delta_without_positions_decodes_with_defaults():
    old = msgspec.json.decode(b'{"ts": 1.0, "items": {"a": 2}, "categories": {}}', type=ItemDelta)
    assert old.source == -1 and old.offsets == {}


class Captured:
    """A producer that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []

    def produce(self, topic, value, key=None, headers=None, timestamp=0):
        self.sent.append((value, timestamp))

    def flush(self) -> None:
        pass


def test_a_batch_stamped_ahead_of_the_clock_counts_in_the_current_windows():
    now_ms = 1_700_000_000_000
    producer = Captured()
    publisher = ItemDeltaPublisher(Settings(), producer=producer, clock=lambda: now_ms / 1000)
    # a batch whose newest event claims to be four minutes ahead (within the contract's skew bound)
    publisher(BatchResult(item_offsets={0: {"a": [1, 2]}}, max_ts=now_ms + 240_000))
    # history and the present keep their own time
    publisher(BatchResult(item_offsets={0: {"a": [3]}}, max_ts=now_ms - 3_600_000))
    stamps = [(msgspec.json.decode(value, type=ItemDelta).ts, timestamp) for value, timestamp in producer.sent]
    assert stamps == [(now_ms / 1000, now_ms), ((now_ms - 3_600_000) / 1000, now_ms - 3_600_000)]
