"""Item deltas counted once per source offset, whatever replays publish again, at no time ahead of now;
produced without waiting, holding the stream's offsets until acknowledged, and produced again in order
after a failed delivery."""

import msgspec
import pytest

from fusionrec.core.errors import DeliveryError
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
    """A producer that keeps what it is given; outcomes are reported when the test says, on a poll
    (as librdkafka reports them)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.waiting: list = []  # delivery callbacks not reported yet
        self.outcomes: list = []  # outcomes to report at the next poll: None (delivered) or an error

    def produce(self, topic, value, key=None, headers=None, timestamp=0, on_delivery=None):
        self.sent.append((value, timestamp))
        self.waiting.append(on_delivery)

    def poll(self, timeout=0):
        n = min(len(self.outcomes), len(self.waiting))
        for callback, err in zip(self.waiting[:n], self.outcomes[:n], strict=True):
            callback(err, None)
        del self.waiting[:n], self.outcomes[:n]
        return n

    def drain(self, timeout=30.0):
        self.poll()
        return len(self.waiting)

    def settle(self, *outcomes):
        self.outcomes.extend(outcomes)


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


def _counts(publisher, offsets):
    publisher(BatchResult(item_offsets={0: offsets}, max_ts=1_700_000_000_000))


def _sources(producer):
    return [sorted(msgspec.json.decode(value, type=ItemDelta).offsets.items()) for value, _ in producer.sent]


def test_unacknowledged_deltas_hold_the_offsets_they_count():
    producer = Captured()
    publisher = ItemDeltaPublisher(Settings(), producer=producer, max_pending=2)
    _counts(publisher, {"a": [5, 7]})
    _counts(publisher, {"a": [9]})
    assert publisher.floor() == {0: 5} and not publisher.accepting()
    producer.settle(None)
    assert publisher.floor() == {0: 9} and publisher.accepting()
    with pytest.raises(DeliveryError, match="1 messages to .* still unacknowledged"):
        publisher.flush(0.1)
    producer.settle(None)
    publisher.flush(0.1)
    assert publisher.floor() == {}


def test_a_failed_delta_is_produced_again_with_those_behind_it_in_order():
    producer = Captured()
    publisher = ItemDeltaPublisher(Settings(), producer=producer)
    _counts(publisher, {"a": [1, 2]})
    _counts(publisher, {"a": [3]})
    _counts(publisher, {"a": [4]})
    producer.settle(None, "timed out", "timed out")  # gapless: what queued behind a failure fails too
    assert publisher.floor() == {0: 3}
    _counts(publisher, {"a": [5]})  # the next batch first produces the failed ones again
    assert _sources(producer) == [[("a", [1, 2])], [("a", [3])], [("a", [4])],
                                  [("a", [3])], [("a", [4])], [("a", [5])]]
    assert publisher.floor() == {0: 3}
    producer.settle(None, None, None)
    publisher.flush(0.1)
    assert publisher.floor() == {}


def test_lost_partitions_forget_what_is_pending():
    producer = Captured()
    publisher = ItemDeltaPublisher(Settings(), producer=producer)
    _counts(publisher, {"a": [1]})
    publisher.drop()
    assert publisher.floor() == {}
    publisher.flush(0.1)  # nothing is waited for: the new owner derives the deltas again


def test_an_idle_stream_produces_a_failed_delta_again():
    producer = Captured()
    publisher = ItemDeltaPublisher(Settings(), producer=producer)
    _counts(publisher, {"a": [1]})
    _counts(publisher, {"a": [2]})
    producer.settle("timed out")
    assert publisher.floor() == {0: 1} and len(producer.sent) == 2  # the second's outcome is not in yet
    producer.settle("timed out")
    assert publisher.floor() == {0: 1} and _sources(producer)[2:] == [[("a", [1])], [("a", [2])]]
    producer.settle(None, None)
    assert publisher.floor() == {}
