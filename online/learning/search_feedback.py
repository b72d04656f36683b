"""Search feedback: served search lists on the feedback topic, and their labels for the search mix.

The reader API logs each served list (:class:`SearchLog`, msgpack, header ``kind: search``);
:class:`SearchJoiner` labels a user's latest list with the clicks, carts and purchases of shown items
that the user's next decisions carry, and hands :class:`SearchExamples` to
:class:`~fusionrec.online.learning.scorers.SearchMix`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import msgspec
import numpy as np

from fusionrec.core.errors import InvalidEventError
from fusionrec.online.learning.feedback import POSITIVE_TYPES, Snapshot, decode_feedback

KIND_HEADER = "kind"
KIND_SEARCH = b"search"


class SearchLog(msgspec.Struct, frozen=True, array_like=True):
    """One served search result list (msgpack on the feedback topic, header ``kind: search``)."""

    user_id: str
    ts: int  # wall ms when served
    items: list[str]  # shown, in ranked order
    f_item: list[float]
    f_query: list[float]
    model: int  # checkpoint whose mix ranked


encode_search_log = msgspec.msgpack.Encoder().encode
_log_decoder = msgspec.msgpack.Decoder(SearchLog)


def decode_search_log(raw: bytes) -> SearchLog:
    """A served search list whose columns agree; anything else raises :class:`InvalidEventError`."""
    entry = decode_feedback(_log_decoder, raw)
    if not len(entry.items) == len(entry.f_item) == len(entry.f_query):
        raise InvalidEventError("invalid_value", f"{len(entry.items)} items with {len(entry.f_item)} f_item "
                                                 f"and {len(entry.f_query)} f_query scores")
    if not all(math.isfinite(v) for v in (*entry.f_item, *entry.f_query)):
        raise InvalidEventError("non_finite", "a search score is not finite")
    return entry


@dataclass
class SearchExamples:
    """Labelled rows for :class:`SearchMix`: columns (f_item, f_query), labels 0/1."""

    M: np.ndarray
    y: np.ndarray


class SearchJoiner:
    """Labels each user's latest search with the positives that user's next decisions carry."""

    def __init__(self, window_ms: int, max_users: int = 100_000) -> None:
        self.window_ms = window_ms
        self.max_users = max_users
        self.pending: dict[str, SearchLog] = {}
        self.outcomes: Counter[str] = Counter()

    def add(self, entry: SearchLog) -> None:
        if self.pending.pop(entry.user_id, None) is not None:
            self.outcomes["replaced"] += 1
        self.pending[entry.user_id] = entry
        while len(self.pending) > self.max_users:
            self.pending.pop(next(iter(self.pending)))
            self.outcomes["evicted"] += 1

    def observe(self, snapshots: list[Snapshot]) -> SearchExamples | None:
        """Label pending searches from these decisions' actions; returns the examples (or None)."""
        rows: list[tuple[float, float]] = []
        labels: list[float] = []
        for snap in snapshots:
            entry = self.pending.get(snap.user_id)
            if entry is None:
                continue
            if snap.ts > entry.ts + self.window_ms:
                del self.pending[snap.user_id]
                self.outcomes["expired"] += 1
                continue
            acted = {item for kind, item, ts in snap.actions
                     if kind in POSITIVE_TYPES and entry.ts <= ts <= entry.ts + self.window_ms}
            hits = acted.intersection(entry.items)
            if not hits:
                continue
            del self.pending[snap.user_id]
            self.outcomes["labelled"] += 1
            for item, fi, fq in zip(entry.items, entry.f_item, entry.f_query, strict=True):
                rows.append((fi, fq))
                labels.append(1.0 if item in hits else 0.0)
        if not rows:
            return None
        return SearchExamples(M=np.array(rows, dtype=np.float64), y=np.array(labels))
