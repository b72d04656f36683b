"""Half of the system's rankings in a worker process beside the evaluator (``Evaluator(rank_worker=True)``).

Each chunk of an evaluation ranks its users twice: the scored baskets' users before the chunk is
applied (every learned method's list), and every user of the chunk after it, by the recommendation
writer (the lists readers get and the decisions the learner learns from). Users are split by a hash of
their id: the evaluator ranks one half and :class:`RankWorker` the other, at the same time, from the
same Redis state and with the same models, so the report is the one a single process gives. A user is
always ranked by the same process, so the content searches a process remembers from the writer's
ranking still answer the user's next scoring.

Per chunk the evaluator sends the models as they are (pickled after the chunk's learning step; both
rankings of a chunk use the models from before it), then its requests:

* ``score``: the users and their decision times → each user's lists of the learned and candidate-source
  methods (:func:`method_lists`);
* ``write``: the users' touches → :meth:`RecommendationWriter.refresh` of them, which writes their lists
  and profile vectors → the decisions it logged (:class:`~fusionrec.online.learning.feedback.Snapshot`).
"""

from __future__ import annotations

import pickle
import sys
import zlib
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from fusionrec.apps.evaluation.metrics import RECALL_K
from fusionrec.apps.evaluation.published_pass import WorkerProcess, read_frame, write_frame
from fusionrec.core.settings import Settings
from fusionrec.online.candidates.features import CandidatePool
from fusionrec.online.learning.feedback import Snapshot
from fusionrec.online.learning.model import FusionModel, Rows, pool_segments
from fusionrec.online.ranking.fusion import FusionRanker
from fusionrec.online.ranking.writer import RecommendationWriter
from fusionrec.streams.state import UserTouch


def theirs(user: str) -> bool:
    """Whether the worker ranks this user (a stable hash of the id: about half the users)."""
    return zlib.crc32(user.encode()) & 1 == 1


def method_lists(writer: RecommendationWriter, ranker: FusionRanker, system: FusionModel,
                 no_llm: FusionModel | None, at: Mapping[str, int], embedded: bool) -> dict[str, dict[str, list[str]]]:
    """Each user's top items by every learned method and candidate source, decided at ``at[user]`` from the
    stored state: ``system``, ``river``, and with an ``embedded`` catalog ``torch_head``, ``fusion_no_llm``
    (``no_llm``), ``content`` and ``fresh``; ``covisitation`` always."""
    if not at:
        return {}
    contexts = writer.candidates.for_stored_users(at)
    pools = ranker.pools(contexts)
    pred = system.predict(Rows.of_pools(pools, ranker.lookup))
    segments = pool_segments(pools)
    # the fused models rank as they serve: each pool in its segment's chosen order
    scores = {"system": system.served_scores(pools, pred, segments)[0], "river": pred.scorers["river"]}
    if embedded and no_llm is not None:
        scores["torch_head"] = pred.scorers.get("torch_head", np.full(len(pred.fused), 0.5))
        plain = no_llm.predict(Rows.of_pools(pools, None))
        scores["fusion_no_llm"] = no_llm.served_scores(pools, plain, segments)[0]
    # the fused models serve their lists with the share of new items they learned, as the ranker does
    fused = {"system": system, "fusion_no_llm": no_llm}
    out: dict[str, dict[str, list[str]]] = {}
    start = 0
    for ctx, pool, segment in zip(contexts, pools, segments, strict=True):
        end = start + len(pool)
        ranked = {name: top_items(pool, s[start:end], fused.get(name), segment) for name, s in scores.items()}
        covis = pool.column("covis")
        ranked["covisitation"] = [pool.items[r] for r in np.argsort(-covis, kind="stable")[:RECALL_K]
                                  if covis[r] > 0]
        if embedded:  # the pool's own content search
            ranked["content"] = [i for i, _ in ctx.content[:RECALL_K]]
            ranked["fresh"] = [i for i, _ in ctx.fresh]
        out[ctx.user_id] = ranked
        start = end
    return out


def top_items(pool: CandidatePool, scores: np.ndarray, model: FusionModel | None = None,
              segment: int | None = None) -> list[str]:
    """The pool's best ``RECALL_K`` items by score, ties in pool order (the fixed blend); a fused
    ``model`` arranges them with its learned share of new items (``segment``: the pool's, if known)."""
    order = np.argsort(-scores, kind="stable").tolist()
    if model is not None:
        order = model.arrange(pool, order, segment)
    return [pool.items[r] for r in order[:RECALL_K]]


class RankWorker:
    """The worker process's side as the evaluator sees it: requests are sent, then answered in order."""

    def __init__(self, settings: Settings, content_cache: int) -> None:
        self._worker = WorkerProcess(__name__, "system's ranking")
        self._worker.send((settings, content_cache))
        self._models: bytes | None = None

    def models(self, system: FusionModel, no_llm: FusionModel | None) -> None:
        """The models the next requests rank with (sent with the next request)."""
        self._models = pickle.dumps((system, no_llm), protocol=pickle.HIGHEST_PROTOCOL)

    def score(self, at: Mapping[str, int], embedded: bool) -> None:
        self._send("score", (dict(at), embedded))

    def write(self, users: Mapping[str, UserTouch]) -> None:
        self._send("write", dict(users))

    def answer(self) -> Any:
        """The answer to the oldest request not yet answered."""
        return self._worker.receive()

    def close(self) -> None:
        """Stop the worker (it keeps nothing that needs a goodbye)."""
        self._worker.close()

    def _send(self, kind: str, payload: object) -> None:
        self._worker.send((kind, self._models, payload))
        self._models = None


class _Held:
    """The models the last request sent (a ``ServingModel`` for the ranker)."""

    system: FusionModel
    no_llm: FusionModel | None = None

    def current(self) -> tuple[int, FusionModel]:
        return 0, self.system


def _serve(source: IO[bytes], sink: IO[bytes]) -> None:
    from fusionrec.core.collector import fewer_collections
    from fusionrec.core.redis_client import connect
    from fusionrec.core.threads import fewer_threads

    settings, content_cache = read_frame(source)
    client = connect(settings)
    held = _Held()
    ranker = FusionRanker(client, settings, held)  # type: ignore[arg-type]
    logged: list[Snapshot] = []
    writer = RecommendationWriter(client, settings, ranker=ranker, sink=logged.extend)
    writer.candidates.content.cache_size = content_cache
    with fewer_collections(), fewer_threads(settings.rec.threads):  # as the evaluator's own pass
        while (frame := read_frame(source)) is not None:
            kind, models, payload = frame
            if models is not None:
                held.system, held.no_llm = pickle.loads(models)  # noqa: S301 - from this module's own parent
            if kind == "score":
                write_frame(sink, method_lists(writer, ranker, held.system, held.no_llm, *payload))
            else:
                logged.clear()
                writer.refresh(payload)
                write_frame(sink, list(logged))
    client.close()


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
