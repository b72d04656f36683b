"""Ranking off the ingest path: what the scheduler merges, when it ranks, and which offsets it holds back."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from fusionrec.core.settings import Settings
from fusionrec.online.ranking.scheduler import CHUNK, RankScheduler
from fusionrec.streams.state import BatchResult, UserTouch


class FakeWriter:
    """Records what it was asked to rank; can fail, or block until released."""

    def __init__(self) -> None:
        self.calls: list[dict[str, UserTouch]] = []
        self.fail = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def refresh(self, users: dict[str, UserTouch]) -> int:
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            self.fail -= 1
            raise redis.ConnectionError("down")
        self.calls.append({u: UserTouch(t.recent, t.last_ts, list(t.actions), list(t.shown), list(t.positions),
                                        dict(t.upto)) for u, t in users.items()})
        return len(users)


def touch(user_events: list[tuple[str, int, int]]) -> UserTouch:
    """A touch from (item, partition, offset) purchases."""
    return UserTouch(recent=[i for i, _, _ in user_events], last_ts=max(o for _, _, o in user_events),
                     actions=[("purchase", i, o) for i, _, o in user_events],
                     positions=[(p, o) for _, p, o in user_events],
                     upto={p: o for _, p, o in sorted(user_events, key=lambda e: e[2])})


def result(**users: list[tuple[str, int, int]]) -> BatchResult:
    return BatchResult(users={u: touch(evs) for u, evs in users.items()})


def scheduler(writer: FakeWriter, **overrides: Any) -> RankScheduler:
    s = Settings.from_env({}, **{"rec_debounce_ms": 0, "rec_cycle_ms": 5, "rec_budget_ms": 50, **overrides})
    return RankScheduler(writer, s)  # type: ignore[arg-type]


def wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_users_touches_are_merged_and_ranked_once_with_every_action():
    w = FakeWriter()
    w.gate.clear()  # hold the thread so both batches arrive before the first ranking
    sch = scheduler(w, rec_debounce_ms=10_000)
    sch(result(u1=[("a", 0, 5)]))
    w.entered.wait(2)  # the thread took u1 into its first chunk and is blocked there
    sch(result(u1=[("b", 0, 9), ("c", 1, 3)]))
    sch(result(u1=[("b", 0, 9)]))  # a replay reports an event again: merged once
    w.gate.set()
    wait(lambda: len(w.calls) == 1)
    assert sch.floor() == {0: 9, 1: 3}  # the second touch waits for the debounce
    sch.flush()  # a flush ignores the debounce
    assert [c["u1"].actions for c in w.calls] == [[("purchase", "a", 5)],
                                                   [("purchase", "b", 9), ("purchase", "c", 3)]]
    assert w.calls[1]["u1"].upto == {0: 9, 1: 3} and sch.floor() == {}
    sch.close()


def test_the_floor_holds_offsets_of_users_being_ranked():
    w = FakeWriter()
    w.gate.clear()
    sch = scheduler(w)
    sch(result(u1=[("a", 0, 5)], u2=[("b", 1, 7)]))
    w.entered.wait(2)
    assert sch.floor() == {0: 5, 1: 7}  # taken out of the queue, but not written yet
    w.gate.set()
    wait(lambda: sch.floor() == {})
    sch.close()


def test_a_failed_ranking_puts_the_users_back_and_is_retried():
    w = FakeWriter()
    w.fail = 2
    sch = scheduler(w, retry_max_backoff_s=0.05)
    sch(result(u1=[("a", 0, 5)]))
    wait(lambda: len(w.calls) == 1)
    assert w.calls[0]["u1"].actions == [("purchase", "a", 5)]
    assert sch.floor() == {}
    sch.close()


def test_a_full_queue_stops_the_stream_and_lost_partitions_are_forgotten():
    w = FakeWriter()
    w.gate.clear()
    sch = scheduler(w, rec_max_dirty=2)
    sch(result(u1=[("a", 0, 1)]))
    w.entered.wait(2)
    sch(result(u2=[("a", 0, 2)], u3=[("a", 0, 3)]))
    assert not sch.accepting()
    w.gate.set()
    sch.drop()  # waits for the chunk in hand, then forgets the rest
    assert sch.accepting() and sch.floor() == {}
    sch.close()


def test_a_ranking_thread_that_dies_fails_the_stream():
    w = FakeWriter()

    def broken(users: dict[str, UserTouch]) -> int:
        raise KeyError("a bug")

    w.refresh = broken  # type: ignore[method-assign]
    sch = scheduler(w)
    sch(result(u1=[("a", 0, 1)]))
    wait(lambda: sch.failure is not None)
    with pytest.raises(RuntimeError, match="ranking thread failed"):
        sch(result(u2=[("a", 0, 2)]))
    sch.close()


class HeldOutput:
    """A pending output (the feedback log) whose messages the test acknowledges."""

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.flushed = self.dropped = 0

    def floor(self) -> dict[int, int]:
        return dict(self.held)

    def accepting(self) -> bool:
        return len(self.held) < 2

    def flush(self, timeout_s: float | None = None) -> None:
        self.flushed += 1
        self.held.clear()

    def drop(self) -> None:
        self.dropped += 1
        self.held.clear()


def test_unacknowledged_feedback_holds_the_offsets_after_the_ranking():
    w = FakeWriter()
    out = HeldOutput()
    sch = RankScheduler(w, Settings.from_env({}, rec_debounce_ms=0, rec_cycle_ms=5, rec_budget_ms=50),  # type: ignore[arg-type]
                        outputs=[out])
    try:
        sch(result(a=[("x", 0, 7)]))
        wait(lambda: len(w.calls) == 1 and not sch._inflight)
        out.held = {0: 7}  # the decision for "a" is produced, not acknowledged
        assert sch.floor() == {0: 7}
        out.held[1] = 3
        assert not sch.accepting()
        sch.flush(1.0)  # a revocation waits for the acknowledgements too
        assert out.flushed == 1 and sch.floor() == {} and sch.accepting()
        out.held = {0: 9}
        sch.drop()
        assert out.dropped == 1 and sch.floor() == {}
    finally:
        sch.close()


def test_a_flush_retries_transient_failures_while_it_has_time():
    w = FakeWriter()
    sch = scheduler(w, rec_debounce_ms=60_000)  # the thread leaves them to the flush
    sch._ranked_at["u1"] = sch._ranked_at["u2"] = time.monotonic()
    sch(result(u1=[("a", 0, 5)], u2=[("b", 1, 7)]))
    w.fail = 2  # the ranking process was lost twice, say
    sch.flush(5.0)
    assert [sorted(c) for c in w.calls] == [["u1", "u2"]] and w.fail == 0
    assert sch.floor() == {}
    assert sch.stream_metrics.retries.labels("rank")._value.get() == 2
    # out of time: the error propagates and the users stay pending, their offsets held back
    sch._ranked_at["u3"] = time.monotonic()
    sch(result(u3=[("c", 0, 9)]))
    w.fail = 100
    with pytest.raises(redis.ConnectionError):
        sch.flush(0.5)
    assert sch.floor() == {0: 9}
    sch.close()


def test_a_writer_ranking_with_several_processes_gets_a_chunk_for_each():
    class TwoAtOnce(FakeWriter):
        parallel = 2

    w = TwoAtOnce()
    sch = scheduler(w, rec_debounce_ms=10_000)  # nothing ranks on its own: the flush takes the chunks
    try:
        assert sch.chunk == 2 * CHUNK
        sch(BatchResult(users={f"u{i}": touch([("a", 0, i)]) for i in range(2 * CHUNK + 3)}))
        sch.flush(5)
        assert [len(c) for c in w.calls] == [2 * CHUNK, 3]
    finally:
        sch.close()


def test_ranking_processes_must_be_at_least_one():
    from fusionrec.core.errors import ConfigError

    with pytest.raises(ConfigError, match="FUSIONREC_REC_PROCESSES"):
        Settings.from_env({"FUSIONREC_REC_PROCESSES": "0"})


class Clock:
    """A monotonic clock that moves only when told (the scheduler's ``time`` in a test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class SlowWriter(FakeWriter):
    """Takes ``seconds`` of ``clock`` per chunk of users it ranks."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def refresh(self, users: dict[str, UserTouch]) -> int:
        self.clock.now += self.seconds
        return super().refresh(users)


def test_a_cycle_ranks_chunks_until_its_time_budget_is_spent(monkeypatch: pytest.MonkeyPatch):
    clock = Clock()
    w = SlowWriter(clock, 0.02)
    sch = scheduler(w, rec_budget_ms=15)
    sch.close()  # no thread: the cycles below run here, one at a time
    monkeypatch.setattr("fusionrec.online.ranking.scheduler.time", clock)
    sch(result(**{f"u{n}": [("a", 0, n)] for n in range(10 * CHUNK)}))
    sch._cycle(clock.monotonic())
    # a chunk of 20 ms overran the 15 ms budget: the cycle ends after it, the rest waits for the next
    assert [len(c) for c in w.calls] == [CHUNK]
    assert len(sch._pending) == 9 * CHUNK
    sch.budget_s = 0.05
    sch._cycle(clock.monotonic())
    # 50 ms: chunks start at 0, 20 and 40 ms; none starts after the budget is spent; the oldest users first
    assert [len(c) for c in w.calls] == [CHUNK] * 4
    assert sch.floor() == {0: 4 * CHUNK}
