"""limit_threads caps every numeric library of the process; checked in a fresh interpreter each time,
since the limits are process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, torch
from threadpoolctl import threadpool_info
from fusionrec.core.threads import limit_threads
limit_threads(int(sys.argv[1]))
print(json.dumps({"torch": torch.get_num_threads(), "pools": [p["num_threads"] for p in threadpool_info()]}))
"""


def probe(n: int) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(n)], check=True, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_thread_everywhere_and_zero_leaves_the_defaults():
    limited = probe(1)
    assert limited["torch"] == 1 and limited["pools"] and set(limited["pools"]) == {1}
    default = probe(0)  # the probe's environment asks for two
    assert default["torch"] == 2 and 2 in default["pools"]


BLOCK = """
import json, torch
from threadpoolctl import threadpool_info
from fusionrec.core.threads import fewer_threads
def counts():
    return {"torch": torch.get_num_threads(), "pools": sorted({p["num_threads"] for p in threadpool_info()})}
out = {}
with fewer_threads(1):
    out["inside"] = counts()
out["after"] = counts()
with fewer_threads(0):
    out["zero"] = counts()
print(json.dumps(out))
"""


def test_fewer_threads_holds_for_its_block_and_restores_the_counts():
    out = subprocess.run([sys.executable, "-c", BLOCK], check=True, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "PATH": ""})
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["inside"] == {"torch": 1, "pools": [1]}
    assert counts["after"] == counts["zero"] == {"torch": 2, "pools": [2]}
