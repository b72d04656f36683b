"""The ranking stage in a process of its own (``FUSIONREC_REC_PROCESS``, on by default).

Ranking costs about a millisecond of Python per user; in the consuming process it competes with
ingest for one interpreter. :class:`RankProcess` has the same ``refresh(users)`` as
:class:`~fusionrec.online.ranking.writer.RecommendationWriter`, which the ranking scheduler calls,
and runs that writer in a child process:

0. the child is spawned when the consumer starts and gets ready (imports, connections) beside it;
   the first ranking waits for it. It runs ``FUSIONREC_REC_NICE`` below the consumer's CPU priority:
   where cores are short, ingest goes first and the ranking takes what is left (a user's events
   meanwhile merge into one ranking);
1. the scheduler's thread sends a chunk of touched users (their merged touches) through a pipe and
   waits, without holding the interpreter;
2. the child reads their candidates, ranks them with the served fusion model (it loads and
   hot-reloads checkpoints itself), writes the lists and profile vectors to Redis, and encodes the
   feedback decisions;
3. the reply carries the encoded decisions, which this process produces through its
   :class:`~fusionrec.online.learning.feedback.FeedbackPublisher`.

With ``FUSIONREC_REC_PROCESSES`` above 1, :class:`RankProcess` keeps that many children and the
scheduler hands it a chunk for each: the chunk is split among them by whole buckets, sent to all, and
their answers awaited together, so they rank at once. The decisions are produced only when every
child answered without an error; a child's error or loss is raised after the others answered (each
pipe stays in step), and the retry ranks the whole chunk again.

Nothing about exactly once changes: the scheduler still holds each user's events offsets back
until the list is written (the reply comes after the write) and the decision acknowledged (the
publisher lives here, with the offsets it holds back). An error in the child comes back as itself
and is handled as in a thread (transient ones are retried). A child that dies or stops answering
raises :class:`RankProcessLost`, which the scheduler retries like a lost connection; the next call
starts a new child. The child exits when its pipe closes or this process is gone, so it never
outlives this process.

The child's metrics (lists written, ranking time, the served model) are relayed with its replies
and exposed by this process's registry, so one scrape shows them as before.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from fusionrec.core.collector import fewer_collections
from fusionrec.core.errors import WorkerLostError
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import Metrics, MetricSet, counter
from fusionrec.core.settings import Settings
from fusionrec.online.learning.feedback import Encoded, encode_feedback
from fusionrec.streams.state import UserTouch

if TYPE_CHECKING:
    from fusionrec.online.ranking.writer import RecommendationWriter

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # spawning imports torch, river and the model code
RELAY_EVERY_S = 1.0  # the child's metrics come back with a reply at most this often


class RankProcessLost(WorkerLostError):
    """The ranking process died or stopped answering; the next call starts a new one."""


class RankProcessMetrics(MetricSet):
    component = "ranking process (fusionrec.online.ranking.process)"
    starts = counter("fusionrec_recs_rank_process_starts_total",
                     "Ranking processes started by this consumer (more than FUSIONREC_REC_PROCESSES: a child "
                     "died or hung)")


class _Relayed:
    """The child's latest metric families, collected by this process's registry."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)

    def describe(self) -> list[Metric]:
        return []  # names are the child's: nothing to check against this registry


@dataclass
class _Child:
    """One ranking process as its parent sees it."""

    proc: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False  # the child said it is ready
    families: list[Metric] = field(default_factory=list)  # its metrics, as last relayed


class RankProcess:
    """``refresh(users)`` done by ``processes`` child processes (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 sink: Callable[[list[Encoded]], None] | None = None, *, answer_timeout_s: float = 300.0,
                 processes: int | None = None) -> None:
        self.settings = settings
        self.sink = sink  # produces the encoded decisions (FeedbackPublisher.publish); None: none logged
        self.answer_timeout_s = answer_timeout_s
        self.keys = Keys.for_settings(settings)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._children = [_Child() for _ in range(processes or settings.rec.processes)]
        self._relay = _Relayed()
        self.metrics = metrics.of(RankProcessMetrics) if metrics is not None else None
        if metrics is not None:
            metrics.registry.register(self._relay)
        self.started = 0  # children started, the first ones included
        for i in range(len(self._children)):
            self._start(i)

    @property
    def parallel(self) -> int:
        """How many children rank at once."""
        return len(self._children)

    @property
    def pid(self) -> int | None:
        """The first child's process id."""
        return self.pids[0]

    @property
    def pids(self) -> list[int | None]:
        return [c.proc.pid if c.proc is not None else None for c in self._children]

    def wait_ready(self) -> None:
        """Block until every child is ready to rank (a ranking does this itself)."""
        with self._lock:
            for i in range(len(self._children)):
                self._ensure(i)

    def refresh(self, users: dict[str, UserTouch]) -> int:
        """Rank and write the users' lists: each child ranks the users of its share of the buckets, all
        at once. Any child's error (or loss) is raised once every other child has answered; the
        decisions go to the sink only when all of them succeeded (a retry ranks every user again)."""
        with self._lock:
            parts = self._split(users)
            for i in parts:
                self._ensure(i)
            for i, part in parts.items():
                conn = self._children[i].conn
                assert conn is not None
                with contextlib.suppress(OSError):  # a dead child: the receive reports it
                    conn.send(part)
            replies: list[tuple[int, tuple[Any, ...]]] = []
            lost: RankProcessLost | None = None
            for i in parts:  # every child that was sent a chunk answers before anything is raised
                try:
                    replies.append((i, self._receive(i, self.answer_timeout_s, "ranking")))
                except RankProcessLost as exc:
                    lost = lost or exc
            for i, reply in replies:
                if reply[0] == "ok" and reply[3] is not None:
                    self._children[i].families = reply[3]
            self._relay.families = self._families()
        if lost is not None:
            raise lost
        for _i, reply in replies:
            if reply[0] == "error":
                raise reply[1]
        messages = [m for _i, reply in replies for m in reply[2]]
        if self.sink is not None and messages:
            self.sink(messages)
        return sum(int(reply[1]) for _i, reply in replies)

    def close(self) -> None:
        with self._lock:
            for i in range(len(self._children)):
                self._stop(i)

    def _split(self, users: dict[str, UserTouch]) -> dict[int, dict[str, UserTouch]]:
        """Child -> its users: whole buckets per child (each ranks with one call per bucket, as one child
        would), the largest buckets first to the child with the fewest users so far. Not by bucket number:
        a chunk often comes from one events partition, and partitions are whole buckets too."""
        n = len(self._children)
        if n == 1:
            return {0: users}
        by_bucket: dict[int, dict[str, UserTouch]] = {}
        for uid, touch in users.items():
            by_bucket.setdefault(self.keys.bucket(uid), {})[uid] = touch
        loads = [0] * n
        parts: dict[int, dict[str, UserTouch]] = {}
        for group in sorted(by_bucket.values(), key=len, reverse=True):
            i = loads.index(min(loads))
            parts.setdefault(i, {}).update(group)
            loads[i] += len(group)
        return parts

    def _families(self) -> list[Metric]:
        """The children's metrics as one set of families; with several children each sample is labelled
        with its child's index (``ranker``)."""
        if len(self._children) == 1:
            return self._children[0].families
        merged: dict[str, Metric] = {}
        for i, child in enumerate(self._children):
            for family in child.families:
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples.extend(sample._replace(labels={**sample.labels, "ranker": str(i)})
                                   for sample in family.samples)
        return list(merged.values())

    # ------------------------------------------------------------------ the children's lifetimes
    def _ensure(self, i: int) -> None:
        child = self._children[i]
        if child.conn is None:
            self._start(i)
        if not child.ready:
            self._await_ready(i)

    def _receive(self, i: int, timeout_s: float, doing: str) -> tuple[Any, ...]:
        """Child ``i``'s next message; a child that is gone or silent for ``timeout_s`` is stopped and
        reported lost."""
        child = self._children[i]
        assert child.conn is not None
        proc = child.proc
        try:
            if child.conn.poll(timeout_s):
                reply: tuple[Any, ...] = child.conn.recv()
                return reply
            problem = f"did not answer within {timeout_s:.0f}s while {doing}"
        except (EOFError, OSError):
            problem = f"is gone while {doing} (exit code {proc.exitcode if proc is not None else None})"
        self._stop(i)
        raise RankProcessLost(f"the ranking process (pid {proc.pid if proc is not None else None}) {problem}")

    def _start(self, i: int) -> None:
        """Spawn child ``i``; it gets ready (imports, connections) while this process goes on."""
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=rank_main, args=(self.settings, child, self.sink is not None),
                                 name=f"fusionrec-ranker-{i}", daemon=True)
        proc.start()
        child.close()  # the child holds its end: EOF here when it exits
        self._children[i] = _Child(proc, parent, False, self._children[i].families)
        self.started += 1
        if self.metrics is not None:
            self.metrics.starts.inc()

    def _await_ready(self, i: int) -> None:
        ready = self._receive(i, START_TIMEOUT_S, "starting")
        if ready[0] == "error":
            self._stop(i)
            raise ready[1]
        self._children[i].ready = True
        log.info("ranking process %d started", ready[1])

    def _stop(self, i: int) -> None:
        child = self._children[i]
        conn, proc = child.conn, child.proc
        child.conn, child.proc, child.ready = None, None, False
        if conn is not None:
            conn.close()  # the child sees EOF and exits
        if proc is not None:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def rank_main(settings: Settings, conn: Connection, feedback: bool) -> None:
    """Entry point of the ranking process: rank what arrives until the pipe closes."""
    logging.basicConfig(level=settings.ops.log_level.upper(),
                        format="%(asctime)s %(levelname)s ranker %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (it closes the pipe)
    parent = os.getppid()

    def orphaned() -> None:  # a forked sibling may hold the pipe open: EOF alone is not enough
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the consuming process %d is gone: stopping", parent)
        os._exit(0)

    threading.Thread(target=orphaned, name="orphaned", daemon=True).start()
    from fusionrec.core.redis_client import connect
    from fusionrec.core.threads import limit_threads
    from fusionrec.online.learning.feedback import Snapshot
    from fusionrec.online.ranking.writer import RecommendationWriter

    encoded: list[Encoded] = []

    def collect(snapshots: list[Snapshot]) -> None:
        encoded.extend(encode_feedback(snapshots))

    try:
        if settings.rec.nice:
            os.nice(settings.rec.nice)  # ingest first (see RecSettings.nice)
        limit_threads(settings.rec.threads)
        metrics = Metrics()
        client = connect(settings)
        writer = RecommendationWriter(client, settings, metrics=metrics, sink=collect if feedback else None)
    except Exception as exc:
        log.exception("the ranking process could not start")
        with contextlib.suppress(EOFError, OSError):
            conn.send(("error", _portable(exc)))
        return
    try:
        conn.send(("ready", os.getpid()))
    except (EOFError, OSError):
        return
    with fewer_collections():  # 0.45 → 0.27 ms per ranked user (see fusionrec.core.collector)
        _serve(conn, writer, metrics, encoded)
    client.close()


def _serve(conn: Connection, writer: RecommendationWriter, metrics: Metrics, encoded: list[Encoded]) -> None:
    """Rank each chunk that arrives and answer, until the pipe closes."""
    relayed = 0.0
    while True:
        try:
            users = conn.recv()
        except (EOFError, OSError):
            break
        encoded.clear()
        try:
            n = writer.refresh(users)
        except Exception as exc:
            log.warning("ranking failed: %s: %s", type(exc).__name__, exc)
            reply: tuple[Any, ...] = ("error", _portable(exc))
        else:
            families = None
            if time.monotonic() - relayed >= RELAY_EVERY_S:
                families, relayed = list(metrics.registry.collect()), time.monotonic()
            reply = ("ok", n, list(encoded), families)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            break


def _portable(exc: BaseException) -> BaseException:
    """The exception itself where it survives pickling (its type decides retries), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301  (bytes made on the line, never read from outside)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
