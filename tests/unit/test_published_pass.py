"""The published methods' worker process gives the scores of an in-process pass, and fails loudly."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fusionrec.apps.evaluation.metrics import basket_parts
from fusionrec.apps.evaluation.published_pass import Observed, PublishedPass, PublishedProcess, Scored


def steps(n_chunks: int = 40, seed: int = 3) -> list[tuple[list[Scored], list[Observed]]]:
    rnd = random.Random(seed)
    seen: dict[str, set[str]] = {}
    out = []
    for c in range(n_chunks):
        users = rnd.sample([f"u{i}" for i in range(15)], 4)
        scored, observed = [], []
        for u in users:
            basket = {f"i{rnd.randrange(30)}" for _ in range(rnd.randint(1, 5))}
            bought = {i for i in basket if rnd.random() < 0.7}
            if bought:
                scored.append(Scored(u, c * 86_400_000, basket_parts(bought, seen.get(u, set()), Counter())))
            observed.append(Observed(u, basket, bought, c * 86_400_000))
            seen.setdefault(u, set()).update(basket)
        out.append((scored, observed))
    return out


def summaries(scores: dict) -> dict:  # type: ignore[type-arg]
    return {name: {split: (s.n, s.summary()) for split, s in split_scores.splits.items()}
            for name, split_scores in scores.items()}


def test_worker_process_scores_equal_the_in_process_pass() -> None:
    local, worker = PublishedPass(), PublishedProcess()
    try:
        for scored, observed in steps():
            local.step(scored, observed)
            worker.step(scored, observed)
        remote = worker.results()
    finally:
        worker.close()
    assert set(remote) == {"tifu_knn", "tifu_knn_dunnhumby", "upcf", "repurchase"}
    assert summaries(remote) == summaries(local.results())
    assert remote["upcf"].splits["overall"].n > 50 and remote["upcf"].splits["overall"].hits > 0
    assert remote["repurchase"].splits["overall"].timeline == local.results()["repurchase"].splits["overall"].timeline


def test_a_failing_worker_raises_with_its_error() -> None:
    worker = PublishedProcess()
    try:
        worker.step([Scored("u", 0, {"overall": {"a"}})], [])  # rank fine (unknown user), then ...
        worker.step([], [Observed("u", {"a", 1}, {"a"}, 0)])  # type: ignore[arg-type]  # ids mixed: no order
        with pytest.raises(RuntimeError, match=r"(?s)worker stopped.*TypeError"):
            worker.results()
    finally:
        worker.close()
