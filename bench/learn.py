"""Learner benchmark: training examples per second, and update → serving lag, on the embedded Redis.

1. mini-batches: labelled decisions (30-candidate pools with 384-d profile and item vectors, the
   shape MiniLM gives) go through :meth:`Learner.learn` (river scorer + torch head + fusion, one
   predict-then-learn step per mini-batch of decisions, plus the learned share of new items'
   replay of each decision's whole pool) with checkpoints to Redis every
   ``learn_checkpoint_s``, as ``fusionrec learner`` runs them. examples/s over the whole run,
   checkpoint writes included.
2. baseline, same run: the same learners updated one example at a time (``learn_one`` of each).
3. lag: while (1) runs, a ranker's :class:`ServingModel` polls for new checkpoints every
   ``learn_reload_s``; for every checkpoint it loads, the time from the oldest update the checkpoint
   contains to the moment the ranker serves it. p50/p99.

Prints a final JSON line: examples_per_s, baseline_examples_per_s, ratio, lag_p50_ms, lag_p99_ms.

    python bench/learn.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import numpy as np
import torch

from fusionrec.apps.evaluation.runner import scratch_redis
from fusionrec.core.settings import Settings
from fusionrec.models.vectors import VectorLookup
from fusionrec.online.candidates.features import FEATURES, INDEX, CandidatePool
from fusionrec.online.learning.checkpoints import CheckpointStore, ServingModel
from fusionrec.online.learning.feedback import Group
from fusionrec.online.learning.learner import Learner
from fusionrec.online.learning.model import FusionModel

DIM = 384


def decisions(n: int, pool: int, seed: int) -> tuple[list[Group], dict[str, np.ndarray]]:
    """Pools whose positive aligns with the profile vector and has a high repeat feature."""
    rng = np.random.default_rng(seed)
    vectors: dict[str, np.ndarray] = {}
    groups = []
    for g in range(n):
        X = (rng.random((pool, len(FEATURES))) * (rng.random((pool, len(FEATURES))) < 0.3)).astype(np.float32)
        profile = rng.normal(size=DIM).astype(np.float32)
        profile /= np.linalg.norm(profile)
        items = [f"i{g}-{r}" for r in range(pool)]
        for item in items:
            v = rng.normal(size=DIM).astype(np.float32)
            vectors[item] = v / np.linalg.norm(v)
        best = int(np.argmax(X[:, INDEX["repeat"]]))
        vectors[items[best]] = (profile + vectors[items[best]]) / np.linalg.norm(profile + vectors[items[best]])
        y = np.zeros(pool)
        y[best] = 1.0
        pool_ = CandidatePool(user_id=f"u{g}", ts=g, items=items, X=X, profile=("v1", profile))
        # the whole pool goes along, as the joiner sends it (the learned share of new items replays it)
        groups.append(Group(pool=pool_, y=y, shown=20, full=pool_, positive=y))
    return groups, vectors


def lookup_of(vectors: dict[str, np.ndarray]) -> VectorLookup:
    return VectorLookup(lambda _v, ids: {i: vectors[i] for i in ids if i in vectors}, capacity=len(vectors) + 1)


def minibatch_run(settings: Settings, groups: list[Group], vectors: dict[str, np.ndarray],
                  per_step: int) -> tuple[float, int, list[float]]:
    """examples/s with checkpoints, examples, lag samples (s) seen by a polling ranker."""
    with scratch_redis(settings) as (client, scoped):
        store = CheckpointStore(client, scoped)
        learner = Learner(scoped, store, lookup_of(vectors))
        serving = ServingModel(store, scoped, reload_s=0.0)
        lags: list[float] = []
        stop = threading.Event()

        def ranker() -> None:
            seen = 0
            while not stop.is_set():
                number, _ = serving.current()
                if number != seen and serving.last_lag_s is not None:
                    lags.append(serving.last_lag_s)
                    seen = number
                stop.wait(scoped.learn.reload_s)

        poller = threading.Thread(target=ranker, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        for i in range(0, len(groups), per_step):
            learner.learn(groups[i: i + per_step])
            learner.maybe_checkpoint()
        learner.maybe_checkpoint(force=True)
        elapsed = time.perf_counter() - t0
        time.sleep(scoped.learn.reload_s * 2)
        stop.set()
        poller.join()
        return learner.model.examples / elapsed, learner.model.examples, lags


def one_at_a_time(groups: list[Group], vectors: dict[str, np.ndarray], limit: int) -> float:
    model = FusionModel(seed=0)
    assert model.torch is not None
    names = model.fusion.names
    n, t0 = 0, time.perf_counter()
    for g in groups:
        for r, item in enumerate(g.pool.items):
            x = dict(zip(FEATURES, g.pool.X[r].tolist(), strict=True))
            assert g.pool.profile is not None
            dense = {"profile": g.pool.profile[1], "item": vectors[item], "features": g.pool.X[r]}
            y = bool(g.y[r])
            river_p = model.river.predict_proba_one(x)[True]
            torch_p = model.torch.predict_proba_one(dense, version="v1")[True]
            inputs = {name: x.get(name, 0.0) for name in names}
            inputs["river"] = float(np.log(river_p / (1 - river_p)))
            inputs["torch_head"] = float(np.log(torch_p / (1 - torch_p)))
            model.fusion.learn_one(inputs, y)
            model.river.learn_one(x, y)
            model.torch.learn_one(dense, y, version="v1")
            n += 1
            if n >= limit:
                return n / (time.perf_counter() - t0)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer decisions (about a minute)")
    ap.add_argument("--decisions", type=int, default=0, help="labelled decisions to learn (default 8000, quick 2500)")
    ap.add_argument("--per-step", type=int, default=64, help="decisions per predict-then-learn step")
    ap.add_argument("--baseline", type=int, default=0, help="examples for the one-at-a-time baseline")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.decisions or (2500 if args.quick else 8000)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = Settings.from_env(learn_rollback_min_groups=10**9)  # no rollbacks on synthetic data
    groups, vectors = decisions(n, pool=30, seed=1)
    per_s, examples, lags = minibatch_run(settings, groups, vectors, args.per_step)
    base = one_at_a_time(groups, vectors, args.baseline or (1500 if args.quick else 4000))
    lag_ms = np.array(lags) * 1000 if lags else np.array([float("nan")])
    print(json.dumps({
        "examples_per_s": round(per_s, 1), "baseline_examples_per_s": round(base, 1),
        "ratio": round(per_s / base, 2),
        "lag_p50_ms": round(float(np.percentile(lag_ms, 50)), 1),
        "lag_p99_ms": round(float(np.percentile(lag_ms, 99)), 1),
        "examples": examples, "checkpoints_served": len(lags), "decisions_per_step": args.per_step,
        "checkpoint_s": settings.learn.checkpoint_s, "reload_s": settings.learn.reload_s,
        "torch_threads": torch.get_num_threads(), "device": "cpu",
    }))


if __name__ == "__main__":
    main()
