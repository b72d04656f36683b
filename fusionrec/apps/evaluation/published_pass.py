"""The published methods' side of an evaluation, in process or in a worker process beside it.

For each chunk of units the evaluator hands over the scored baskets (user, time, target parts) and
the units to learn from (user, basket, purchases, time). :class:`PublishedPass` ranks every scored
user with every published method from the state before the chunk, scores the lists, then feeds the
units in order (:class:`~fusionrec.apps.evaluation.repurchase.Repurchase` learns from a basket's
purchases before it observes it). The methods need nothing from the system's pass, so
:class:`PublishedProcess` runs the same steps in a worker process: a step is queued, not waited for,
and the scores come back at the end, equal to an in-process pass over the same steps.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import IO, Any, NamedTuple, NoReturn

from fusionrec.apps.evaluation.metrics import RECALL_K, SplitScores
from fusionrec.apps.evaluation.published import TifuKnn, UpCf
from fusionrec.apps.evaluation.repurchase import Repurchase

Method = TifuKnn | UpCf | Repurchase


def published_methods() -> dict[str, Method]:
    """The published next-basket methods every run compares with, by report name."""
    return {"tifu_knn": TifuKnn(), "tifu_knn_dunnhumby": TifuKnn(**TifuKnn.DUNNHUMBY), "upcf": UpCf(),
            "repurchase": Repurchase()}


class Scored(NamedTuple):
    user: str
    ts: int
    parts: dict[str, set[str]]  # the basket's target items by split (metrics.basket_parts)


class Observed(NamedTuple):
    user: str
    basket: set[str]  # every item of the unit but impressions
    purchases: set[str]
    ts: int


class PublishedPass:
    """Every published method, ranked, scored and fed chunk by chunk."""

    def __init__(self, methods: dict[str, Method] | None = None) -> None:
        self.methods = published_methods() if methods is None else methods
        self.scores = {name: SplitScores() for name in self.methods}

    def step(self, scored: Sequence[Scored], observed: Sequence[Observed]) -> None:
        if scored:
            users, ts = [s.user for s in scored], [s.ts for s in scored]
            for name, method in self.methods.items():
                for s, ranked in zip(scored, method.rank(users, ts, RECALL_K), strict=True):
                    self.scores[name].add(ranked, s.parts, s.ts)
        for o in observed:
            if not o.basket:
                continue
            for method in self.methods.values():
                if o.purchases and isinstance(method, Repurchase):
                    method.learn(o.user, o.purchases, o.ts)
                method.observe(o.user, o.basket, o.ts)

    def results(self) -> dict[str, SplitScores]:
        return self.scores

    def close(self) -> None:
        pass


class PublishedProcess:
    """A :class:`PublishedPass` in a worker process (``python -m`` this module), fed through a pipe.

    Steps are written to the worker's standard input and not waited for: the pipe's buffer lets the
    evaluator run ahead, and blocks it when the worker falls behind. The worker is the evaluator's own
    child, so the frames are pickles; it is started as a module, never by re-importing the caller's
    ``__main__``.
    """

    def __init__(self) -> None:
        self._errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty worker never blocks on it
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._errors)

    def step(self, scored: Sequence[Scored], observed: Sequence[Observed]) -> None:
        self._send((list(scored), list(observed)))

    def results(self) -> dict[str, SplitScores]:
        """Every step's scores, once the worker has run them all."""
        self._send(None)
        assert self._proc.stdout is not None
        scores: dict[str, SplitScores] | None = _read(self._proc.stdout)
        if scores is None:
            self._failed()
        self._proc.wait()
        return scores

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout, self._errors):
            if pipe is not None:
                pipe.close()

    def _send(self, item: object) -> None:
        assert self._proc.stdin is not None
        try:
            _write(self._proc.stdin, item)
        except (BrokenPipeError, OSError):
            self._failed()

    def _failed(self) -> NoReturn:
        self._proc.kill()
        self._proc.wait()
        self._errors.seek(0)
        error = self._errors.read().decode(errors="replace").strip()[-4000:]
        raise RuntimeError(f"the published methods' worker stopped (exit code {self._proc.returncode}): {error}")


def _write(stream: IO[bytes], item: object) -> None:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _read(stream: IO[bytes]) -> Any:
    """The next frame; None at the end of the stream."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)  # noqa: S301 - frames from this module's own parent process


def _serve(source: IO[bytes], sink: IO[bytes]) -> None:
    work = PublishedPass()
    while (item := _read(source)) is not None:
        work.step(*item)
    _write(sink, work.results())


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
