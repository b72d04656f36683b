"""The consume runtime's commit order, against a fake consumer (no broker): what is stored, when."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from confluent_kafka import TopicPartition

from fusionrec.core.errors import DeliveryError, InvalidEventError
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from fusionrec.streams.dlq import DeadLetter
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import BaseProcessor, ConsumeRuntime, Offsets, Polled

TOPIC = "t"


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _value: bytes

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return None

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000 + self._offset)

    def error(self) -> None:
        return None


@dataclass
class FakeConsumer:
    """A consumer over in-memory partitions; ``log`` records every call the runtime makes, in order."""

    logs: dict[int, list[bytes]]
    log: list[tuple[Any, ...]] = field(default_factory=list)
    # run before the n-th consume() / poll() call: rebalances, stops
    before_consume: dict[int, Callable[[FakeConsumer], None]] = field(default_factory=dict)
    before_poll: dict[int, Callable[[FakeConsumer], None]] = field(default_factory=dict)
    stored: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    position: dict[int, int] = field(default_factory=dict)
    paused: set[int] = field(default_factory=set)
    assigned: set[int] = field(default_factory=set)
    callbacks: dict[str, Callable[..., None]] = field(default_factory=dict)
    timeouts: list[float] = field(default_factory=list)  # each consume()'s timeout
    consumes = 0
    polls = 0
    closed = False

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks
        self.assign(sorted(self.logs))

    def assign(self, partitions: list[int]) -> None:
        self.callbacks["on_assign"](self, [TopicPartition(TOPIC, p) for p in partitions])

    def revoke(self, partitions: list[int]) -> None:
        self.callbacks["on_revoke"](self, [TopicPartition(TOPIC, p) for p in partitions])
        self._drop(partitions)

    def lose(self, partitions: list[int]) -> None:
        self.callbacks["on_lost"](self, [TopicPartition(TOPIC, p) for p in partitions])
        self._drop(partitions)

    def _drop(self, partitions: list[int]) -> None:
        for p in partitions:
            self.assigned.discard(p)
            self.paused.discard(p)
            self.stored.pop(p, None)

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.add(tp.partition)
            self.position[tp.partition] = tp.offset if tp.offset >= 0 else self.committed.get(tp.partition, 0)
        self.log.append(("assign", sorted(tp.partition for tp in partitions)))

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.consumes += 1
        self.timeouts.append(timeout)
        if hook := self.before_consume.get(self.consumes):
            hook(self)
        out: list[FakeMessage] = []
        for p in sorted(self.assigned - self.paused):
            while len(out) < num_messages and self.position[p] < len(self.logs[p]):
                out.append(FakeMessage(TOPIC, p, self.position[p], self.logs[p][self.position[p]]))
                self.position[p] += 1
        self.log.append(("consume", [(m.partition(), m.offset()) for m in out]))
        return out

    def poll(self, timeout: float = -1) -> None:
        self.polls += 1
        if hook := self.before_poll.get(self.polls):
            hook(self)
        return None

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}
        self.log.append(("pause", sorted(tp.partition for tp in partitions)))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}
        self.log.append(("resume", sorted(tp.partition for tp in partitions)))

    def seek(self, tp: TopicPartition) -> None:
        self.position[tp.partition] = tp.offset
        self.log.append(("seek", tp.partition, tp.offset))

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TOPIC, p) for p in sorted(self.assigned)]

    def store_offsets(self, *, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            if tp.partition in self.assigned:
                self.stored[tp.partition] = tp.offset
        self.log.append(("store", {tp.partition: tp.offset for tp in offsets}))

    def commit(self, *, asynchronous: bool = True) -> None:
        self.committed.update(self.stored)
        self.log.append(("commit", dict(self.stored)))

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, len(self.logs[tp.partition])

    def close(self) -> None:
        self.closed = True
        self.log.append(("close",))


@dataclass
class FakeDeadLetters:
    fail: int = 0  # how many publish calls raise DeliveryError first
    log: list[tuple[Any, ...]] | None = None
    letters: list[DeadLetter] = field(default_factory=list)

    def publish(self, letters: list[DeadLetter]) -> None:
        if letters and self.fail:
            self.fail -= 1
            raise DeliveryError("broker did not acknowledge")
        self.letters.extend(letters)
        if letters and self.log is not None:
            self.log.append(("dead_letters", [(d.partition, d.offset, d.reason) for d in letters]))

    def close(self) -> None:
        pass


class Recorder(BaseProcessor[str]):
    """Decodes ``b"ok:<x>"``; raises on anything else; ``process`` may fail a number of times first."""

    stage = "apply"

    def __init__(self, log: list[tuple[Any, ...]], fail: int = 0, error: type[Exception] = redis.ConnectionError,
                 during_failure: Callable[[], None] | None = None) -> None:
        self.log = log
        self.fail = fail
        self.error = error
        self.during_failure = during_failure
        self.applied: list[tuple[int, int, str]] = []
        self.revoked_calls: list[list[int]] = []
        self.lost_calls: list[list[int]] = []

    def decode(self, msg: Any, now_ms: int) -> str:
        raw = msg.value()
        if raw == b"deep":
            raise RecursionError("maximum recursion depth exceeded")
        if raw == b"bad":
            raise InvalidEventError("not_json", "not JSON")
        if not raw.startswith(b"ok:"):
            raise ValueError(f"unexpected {raw!r}")
        return raw[3:].decode()

    def process(self, batch: Polled[str]) -> None:
        if self.fail:
            self.fail -= 1
            if self.during_failure:
                self.during_failure()
            raise self.error("redis is down")
        self.applied.extend((r.partition, r.offset, r.value) for r in batch.records)
        self.log.append(("process", [(r.partition, r.offset) for r in batch.records]))

    def revoked(self, partitions: list[TopicPartition]) -> Offsets:
        self.revoked_calls.append([tp.partition for tp in partitions])
        return {}

    def lost(self, partitions: list[TopicPartition]) -> None:
        self.lost_calls.append([tp.partition for tp in partitions])


def runtime(consumer: FakeConsumer, processor: BaseProcessor[str], dlq: FakeDeadLetters | None = None,
            metrics: Metrics | None = None, max_messages: int = 10) -> ConsumeRuntime[str]:
    settings = Settings.from_env({"FUSIONREC_RETRY_MAX_BACKOFF_S": "0.2"})
    return ConsumeRuntime(settings, processor, metrics or Metrics(), group_id="g", topics=[TOPIC],
                          max_messages=max_messages, timeout_s=0.0, consumer=consumer,
                          dead_letters=dlq or FakeDeadLetters(log=consumer.log))


def until_consumed(consumer: FakeConsumer, calls: int) -> Callable[[], bool]:
    return lambda: consumer.consumes >= calls


def kinds(log: list[tuple[Any, ...]]) -> list[str]:
    return [entry[0] for entry in log if entry[0] != "consume" or entry[1]]


def test_offsets_are_stored_after_the_side_effect_and_the_dead_letters() -> None:
    consumer = FakeConsumer({0: [b"ok:a", b"bad", b"ok:b"], 1: [b"ok:c"]})
    proc = Recorder(consumer.log)
    runtime(consumer, proc).run(threading.Event(), until_consumed(consumer, 2))
    assert kinds(consumer.log) == ["assign", "consume", "process", "dead_letters", "store", "commit", "close"]
    assert consumer.log[4] == ("store", {0: 3, 1: 1})  # last offset + 1, the dead letter's included
    assert consumer.committed == {0: 3, 1: 1}
    assert proc.applied == [(0, 0, "a"), (0, 2, "b"), (1, 0, "c")]


def test_any_exception_a_message_causes_is_a_dead_letter_and_what_follows_is_applied() -> None:
    consumer = FakeConsumer({0: [b"deep", b"\xff\xfe", b"bad", b"ok:after"]})
    dlq = FakeDeadLetters(log=consumer.log)
    proc = Recorder(consumer.log)
    runtime(consumer, proc, dlq).run(threading.Event(), until_consumed(consumer, 2))
    assert [(d.offset, d.reason) for d in dlq.letters] == [(0, "invalid_value"), (1, "invalid_value"),
                                                           (2, "not_json")]
    assert "RecursionError" in dlq.letters[0].detail
    assert dlq.letters[1].value == b"\xff\xfe"  # the original bytes
    assert proc.applied == [(0, 3, "after")]
    assert consumer.committed == {0: 4}


def test_transient_errors_are_retried_while_paused_then_stored_once() -> None:
    consumer = FakeConsumer({0: [b"ok:a", b"ok:b"], 1: [b"ok:c"]})
    metrics = Metrics()
    proc = Recorder(consumer.log, fail=2)
    runtime(consumer, proc, metrics=metrics).run(threading.Event(), until_consumed(consumer, 2))
    assert kinds(consumer.log) == ["assign", "consume", "pause", "process", "resume", "store", "commit", "close"]
    assert consumer.log[2] == ("pause", [0, 1])
    retries = metrics.of(StreamMetrics).retries.labels("apply")._value.get()
    assert retries == 2
    assert proc.applied == [(0, 0, "a"), (0, 1, "b"), (1, 0, "c")]
    assert [e for e in consumer.log if e[0] == "store"] == [("store", {0: 2, 1: 1})]


def test_dead_letter_delivery_failures_are_retried_before_offsets_are_stored() -> None:
    consumer = FakeConsumer({0: [b"bad", b"ok:a"]})
    dlq = FakeDeadLetters(fail=1, log=consumer.log)
    runtime(consumer, Recorder(consumer.log), dlq).run(threading.Event(), until_consumed(consumer, 2))
    order = kinds(consumer.log)
    assert order.index("dead_letters") < order.index("store")
    assert len(dlq.letters) == 1 and consumer.committed == {0: 2}


def test_a_retry_abandoned_by_a_revoke_rewinds_the_partitions_still_owned() -> None:
    consumer = FakeConsumer({0: [b"ok:a", b"ok:b"], 1: [b"ok:c", b"ok:d"]})
    proc = Recorder(consumer.log, fail=1)
    consumer.before_poll[1] = lambda c: c.revoke([1])  # while the first attempt waits to retry
    runtime(consumer, proc).run(threading.Event(), until_consumed(consumer, 3))
    assert proc.revoked_calls == [[1]]
    assert ("seek", 0, 0) in consumer.log  # partition 0 is consumed again from the batch's start
    assert not any(e[0] == "seek" and e[1] == 1 for e in consumer.log)  # partition 1 is its new owner's
    assert proc.applied == [(0, 0, "a"), (0, 1, "b")]  # applied once, on the second pass
    stores = [e for e in consumer.log if e[0] == "store"]
    assert stores == [("store", {0: 2})]
    assert consumer.committed == {0: 2}


def test_lost_partitions_are_dropped_without_a_commit() -> None:
    consumer = FakeConsumer({0: [b"ok:a"], 1: [b"ok:b"]})
    proc = Recorder(consumer.log)
    consumer.before_consume[2] = lambda c: c.lose([0, 1])
    rt = runtime(consumer, proc)
    rt.run(threading.Event(), until_consumed(consumer, 2))
    assert proc.lost_calls == [[0, 1]]
    commits = [e for e in consumer.log if e[0] == "commit"]
    assert commits == [("commit", {})]  # only the final one, with nothing left to commit
    assert consumer.committed == {}


def test_revoke_commits_what_is_stored_before_the_partitions_go() -> None:
    consumer = FakeConsumer({0: [b"ok:a"], 1: [b"ok:b"]})
    proc = Recorder(consumer.log)
    consumer.before_consume[2] = lambda c: c.revoke([1])
    runtime(consumer, proc).run(threading.Event(), until_consumed(consumer, 2))
    revoke_commit = [e for e in consumer.log if e[0] == "commit"][0]
    assert revoke_commit == ("commit", {0: 1, 1: 1})
    assert proc.revoked_calls == [[1]]


def test_stop_during_a_retry_commits_nothing_of_the_batch_and_closes() -> None:
    consumer = FakeConsumer({0: [b"ok:a"]})
    stop = threading.Event()
    proc = Recorder(consumer.log, fail=10**6, during_failure=stop.set)
    runtime(consumer, proc).run(stop)
    assert consumer.committed == {} and consumer.closed
    assert not proc.applied


def test_a_processor_that_is_full_is_not_polled_and_its_partitions_pause() -> None:
    consumer = FakeConsumer({0: [b"ok:a", b"ok:b"]})

    class Full(Recorder):
        room = 0

        def accepting(self) -> bool:
            self.room += 1
            return self.room > 3  # full for the first three checks

    proc = Full(consumer.log)
    runtime(consumer, proc, max_messages=1).run(threading.Event(), until_consumed(consumer, 3))
    order = kinds(consumer.log)
    assert order[:3] == ["assign", "pause", "resume"]
    assert consumer.polls >= 3  # the group was served while paused
    assert proc.applied == [(0, 0, "a"), (0, 1, "b")]


def test_offsets_kept_in_a_checkpoint_are_stored_from_tick_and_sought_on_assignment() -> None:
    consumer = FakeConsumer({0: [b"ok:a", b"ok:b", b"ok:c"]})

    class Checkpointed(Recorder):
        position = 0

        def assigned(self, partitions: list[TopicPartition]) -> None:
            for tp in partitions:
                tp.offset = 1  # the checkpoint's position

        def process(self, batch: Polled[str]) -> None:
            super().process(batch)
            self.position = batch.next[(TOPIC, 0)]

        def completed(self, batch: Polled[str]) -> Offsets:
            return {}

        def tick(self) -> Offsets:
            return {(TOPIC, 0): self.position} if self.position else {}

    proc = Checkpointed(consumer.log)
    runtime(consumer, proc).run(threading.Event(), until_consumed(consumer, 2))
    assert proc.applied == [(0, 1, "b"), (0, 2, "c")]
    assert kinds(consumer.log)[:4] == ["assign", "consume", "process", "store"]
    assert [e for e in consumer.log if e[0] == "store"] == [("store", {0: 3})]  # from tick, not the batch
    assert consumer.committed == {0: 3}


def test_an_error_that_is_not_transient_ends_the_run_after_closing() -> None:
    consumer = FakeConsumer({0: [b"ok:a"]})
    proc = Recorder(consumer.log, fail=1, error=KeyError)  # a bug, not bad input: it must surface
    with pytest.raises(KeyError):
        runtime(consumer, proc).run(threading.Event())
    assert consumer.closed and consumer.committed == {}


class Due(Recorder):
    """A processor with work due at given times: its poll waits, one per poll."""

    def __init__(self, log: list[tuple[Any, ...]], waits: list[float | None]) -> None:
        super().__init__(log)
        self.waits = waits

    def poll_wait(self) -> float | None:
        return self.waits.pop(0) if self.waits else None


def test_a_poll_never_waits_past_the_processors_due_time() -> None:
    consumer = FakeConsumer({0: [b"ok:a"]})
    settings = Settings.from_env({"FUSIONREC_RETRY_MAX_BACKOFF_S": "0.2"})
    rt = ConsumeRuntime(settings, Due(consumer.log, [None, 0.03, 5.0, -0.01]), Metrics(), group_id="g",
                        topics=[TOPIC], max_messages=10, timeout_s=0.5, consumer=consumer,
                        dead_letters=FakeDeadLetters(log=consumer.log))
    rt.run(threading.Event(), until_consumed(consumer, 4))
    # the batch timeout when nothing is due, the due time when sooner, never below 0
    assert consumer.timeouts == [0.5, 0.03, 0.5, 0.0]


class Clocked(Recorder):
    """Records the clock reading each message was decoded with, by the batch it came in."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        super().__init__(log)
        self.decoded: list[int] = []
        self.batches: list[list[int]] = []

    def decode(self, msg: Any, now_ms: int) -> str:
        self.decoded.append(now_ms)
        return super().decode(msg, now_ms)

    def process(self, batch: Polled[str]) -> None:
        self.batches.append(self.decoded)
        self.decoded = []
        super().process(batch)


def test_a_batch_is_decoded_with_one_clock_read(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(1_000, 10**9, 1_000))  # every clock read one second later than the one before
    monkeypatch.setattr("fusionrec.streams.runtime.time.time", lambda: next(ticks))
    consumer = FakeConsumer({0: [b"ok:a", b"ok:b", b"ok:c"], 1: [b"ok:d", b"ok:e", b"ok:f"]})
    proc = Clocked(consumer.log)
    runtime(consumer, proc, max_messages=3).run(threading.Event(), until_consumed(consumer, 2))
    assert [len(b) for b in proc.batches] == [3, 3]
    # each batch's messages were checked against one reading of the clock; the next batch reads it anew
    assert all(len(set(b)) == 1 for b in proc.batches)
    assert proc.batches[0][0] < proc.batches[1][0]
