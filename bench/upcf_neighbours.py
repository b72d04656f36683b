"""What UP-CF@r's neighbour users add to it: the same method with and without them, in one run.

UP-CF@r (Faggioli et al., 2020) scores an item by the user's own recency-aware popularity (the share of
their last r baskets that hold it) spread through their k most similar users. With ``k=1`` the only
"neighbour" is the user itself (similarity 1), so the difference between the two is what the
neighbour-user score is worth, measured on the same baskets, in the same order, in the same
``fusionrec evaluate`` pass (Complete Journey, first ``--households`` households, no catalog vectors).
A third variant, ``q=1``, keeps the neighbours but does not sharpen their similarities.

Final JSON line: baskets, system, upcf, upcf_self, upcf_q1, neighbour_gain (upcf - upcf_self, HitRate@10),
ratio (upcf / upcf_self).

    python bench/upcf_neighbours.py --households 600
"""

from __future__ import annotations

import argparse
import json
import logging

from fusionrec.apps.evaluation.published import UpCf
from fusionrec.apps.evaluation.runner import run_evaluation
from fusionrec.core.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--households", type=int, default=600, help="first N households (default: 600)")
    parser.add_argument("--limit", type=int, default=None, help="first N events in time order (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = run_evaluation(Settings.from_env(), source="completejourney", households=args.households,
                            limit=args.limit, progress=False, content=False,
                            published={"upcf": UpCf(), "upcf_self": UpCf(k=1), "upcf_q1": UpCf(q=1)})
    hr = {m: v["hit_rate@10"] for m, v in report["methods"].items()}
    print(json.dumps({m: {"hit_rate@10": v["hit_rate@10"], "repeat": v["repeat"]["hit_rate@10"],
                          "explore": v["explore"]["hit_rate@10"]} for m, v in report["methods"].items()}))
    print(json.dumps({"baskets": report["evaluated"], "system": hr["system"], "upcf": hr["upcf"],
                      "upcf_self": hr["upcf_self"], "upcf_q1": hr["upcf_q1"],
                      "neighbour_gain": round(hr["upcf"] - hr["upcf_self"], 4),
                      "ratio": round(hr["upcf"] / hr["upcf_self"], 4)}))


if __name__ == "__main__":
    main()
