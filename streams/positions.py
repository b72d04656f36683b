"""Where the user-state stream stands, kept in Redis beside the state it made, and reconciled with
Kafka's committed offsets whenever an events partition is assigned.

Kafka and Redis can disagree. The embedded broker is memory-only and a topic can be recreated, so
the broker may lose its committed offsets or its log; Redis may lose acknowledged writes (no
persistence, a failover to a replica that was behind). Each disagreement used to be silent: new
events at offsets at or below the old guards were skipped as replays, or state Kafka had committed
was simply gone.

So, before it stores an events offset, the consumer records in ``P:{g}:applied`` the last offset of
that partition whose state and outputs are done (:class:`AppliedPositions`, monotonic per field).
It is written to the same Redis as the state, after it: whatever Redis still holds of the record, it
holds the state up to it. On assignment :func:`reconcile` compares that position ``A`` with the
group's committed offset ``C`` and the partition's range ``[low, high)``:

==========================  =========================================================  ============
case                        start                                                      outcome
==========================  =========================================================  ============
``A >= high``               ``stream.offset_mismatch``: ``stop`` raises                ``topic_reset``
                            :class:`~fusionrec.core.errors.OffsetMismatchError`;
                            ``reset`` drops the partition's guards, starts at ``low``
``C`` unknown or ``< A+1``  ``A + 1``: Redis is ahead, nothing to redo                 ``redis_ahead``
``C == A + 1``              ``C``                                                      ``in_step``
``C > A + 1``               ``max(A + 1, low)``: replays what Redis lost; what the     ``redis_behind``
                            topic no longer holds is counted as unrecoverable
no ``A``, no guards, C>low  ``low``: Redis lost everything                             ``redis_empty``
no ``A`` otherwise          ``C`` (a new group, or state written before positions)     ``fresh``
==========================  =========================================================  ============

Starting after the position is safe because it only ever covers offsets whose every output is done
(:meth:`fusionrec.streams.consumer.EventsProcessor` records it where it stores offsets). It also
tells the state store which offsets no replay goes back to (``settle``), which is what lets it forget
remembered event ids without ever deciding a replayed duplicate differently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from fusionrec.core.errors import OffsetMismatchError
from fusionrec.core.keys import Keys
from fusionrec.core.metrics import MetricSet, counter
from fusionrec.core.scripts import HASH_MAX, register

log = logging.getLogger(__name__)


class PositionMetrics(MetricSet):
    component = "offset reconciliation (fusionrec.streams.positions)"
    reconciled = counter("fusionrec_stream_reconciled_partitions_total",
                         "Events partitions assigned, by how Redis' applied position compared with Kafka's",
                         ("outcome",))
    unrecoverable = counter("fusionrec_stream_unrecoverable_events_total",
                            "Events Redis lost that the topic no longer holds (retention passed them)")


@dataclass(frozen=True)
class Reconciled:
    """Where an assigned events partition starts (None: the committed offset) and why."""

    start: int | None
    outcome: str
    unrecoverable: int = 0


def reconcile(topic: str, partition: int, *, committed: int | None, applied: int | None, low: int, high: int,
              has_guards: bool, policy: str) -> Reconciled:
    """The start offset of one assigned events partition (see the module docstring's table).

    >>> reconcile("events", 0, committed=90, applied=120, low=0, high=200, has_guards=True, policy="stop")
    Reconciled(start=121, outcome='redis_ahead', unrecoverable=0)
    >>> reconcile("events", 0, committed=300, applied=120, low=150, high=400, has_guards=True, policy="stop")
    Reconciled(start=150, outcome='redis_behind', unrecoverable=29)
    """
    if applied is not None and applied >= high:
        if policy != "reset":
            raise OffsetMismatchError(
                f"{topic}[{partition}] ends at offset {high}, but Redis already applied offset {applied} of it: "
                f"the topic was recreated or lost data, and new events there would be skipped as replays. "
                f"Set FUSIONREC_OFFSET_MISMATCH=reset to drop that partition's offset guards and consume it "
                f"from its start ({low}), or point fusionrec at the topic that holds those offsets.")
        return Reconciled(low, "topic_reset")
    if applied is not None:
        if committed is None or committed < applied + 1:
            return Reconciled(max(applied + 1, low), "redis_ahead")
        if committed == applied + 1:
            return Reconciled(None, "in_step")
        return Reconciled(max(applied + 1, low), "redis_behind", max(0, low - (applied + 1)))
    if committed is not None and committed > low and not has_guards:
        return Reconciled(low, "redis_empty", low)
    return Reconciled(None, "fresh")


class AppliedPositions:
    """The ``P:{g}:applied`` record of one events topic, and the guards a reset drops."""

    def __init__(self, client: redis.Redis, keys: Keys, topic: str) -> None:
        self.redis = client
        self.keys = keys
        self.topic = topic
        self._max = register(client, HASH_MAX)

    def _field(self, partition: int) -> str:
        return f"{self.topic}:{partition}"

    def mark(self, done: Mapping[int, int]) -> None:
        """Record, per partition, the last offset whose state and outputs are done."""
        if done:
            self._max(keys=[self.keys.applied_positions()],
                      args=[x for p, o in sorted(done.items()) for x in (self._field(p), o)])

    def read(self, partitions: Sequence[int]) -> tuple[dict[int, int | None], dict[int, bool]]:
        """Each partition's recorded position, and whether any user bucket holds a guard for it."""
        if not partitions:
            return {}, {}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.applied_positions(), [self._field(p) for p in partitions])
        for bucket in range(self.keys.buckets):
            pipe.hmget(self.keys.user_guard(bucket), [str(p) for p in partitions])
        replies = pipe.execute()
        applied = {p: None if raw is None else int(raw) for p, raw in zip(partitions, replies[0], strict=True)}
        guarded = {p: any(reply[i] is not None for reply in replies[1:]) for i, p in enumerate(partitions)}
        return applied, guarded

    def reset(self, partitions: Sequence[int]) -> None:
        """Forget the partitions: their position and every offset guard (users, co-visitation, popularity)."""
        fields = [str(p) for p in partitions]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.applied_positions(), *(self._field(p) for p in partitions))
        for bucket in range(self.keys.buckets):
            pipe.hdel(self.keys.user_guard(bucket), *fields)
            pipe.hdel(self.keys.item_guard(bucket), *fields)
        pipe.hdel(self.keys.popularity_guard(), *fields)
        pipe.execute()
