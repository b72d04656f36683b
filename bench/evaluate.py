"""Evaluation benchmark: one ``fusionrec evaluate`` pass over a Complete Journey slice, timed two ways.

Both runs do the same work on the same events (the first ``--households`` households, first
``--limit`` events in time order, catalog not embedded unless ``--content``): every method of the
report, the published next-basket methods included, through the production state store, writer and
learner on the embedded Redis.

1. baseline, same run: the published methods in the evaluator's process, one step after the
   system's (``published_worker=False``);
2. the default: the published methods in their worker process beside the system's pass.

Without ``--content`` the two reports must agree figure for figure (checked; the run fails otherwise).
With it they are not compared: each run builds its own vector index, whose approximate neighbours and
order among equally similar items differ from run to run.

Final JSON line: events, baskets, baseline_s, wall_s, events_per_s, baseline_events_per_s, ratio.

    python bench/evaluate.py --limit 150000
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from fusionrec.apps.evaluation.runner import run_evaluation
from fusionrec.core.settings import Settings


def timed(settings: Settings, args: argparse.Namespace, worker: bool) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    report = run_evaluation(settings, source="completejourney", households=args.households, limit=args.limit,
                            progress=False, content=args.content, published_worker=worker)
    return time.perf_counter() - start, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--households", type=int, default=None, help="first N households (default: all)")
    parser.add_argument("--limit", type=int, default=150_000, help="first N events in time order")
    parser.add_argument("--content", action="store_true", help="embed the catalog first (not timed apart)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env()
    baseline_s, baseline = timed(settings, args, worker=False)
    wall_s, report = timed(settings, args, worker=True)
    differ = baseline["methods"] != report["methods"] or baseline["cold_start"] != report["cold_start"]
    if differ and not args.content:
        raise SystemExit("the two runs' reports differ")
    events, baskets = report["events"], report["evaluated"]
    print(json.dumps({"households": args.households, "limit": args.limit, "content": args.content}))
    print(json.dumps({"events": events, "baskets": baskets, "baseline_s": round(baseline_s, 1),
                      "wall_s": round(wall_s, 1), "events_per_s": round(events / wall_s),
                      "baseline_events_per_s": round(events / baseline_s),
                      "ratio": round(baseline_s / wall_s, 2)}))


if __name__ == "__main__":
    main()
