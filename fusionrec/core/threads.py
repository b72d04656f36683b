"""Threads of the numeric libraries (torch's intra-op pool, OpenMP, BLAS) in one process.

Each library starts one thread per core. The ranking process scores pools of a few thousand rows at
a time, where a second thread gains little and takes a core from ingest, Redis and the broker beside
it: on two shared cores at 10,000 events/s, one thread in the ranking process brought the state
freshness p99 to 0.80× and the lists' to 0.74× (BENCHMARKS.md, "Ingest"). :func:`limit_threads` is
called by a process's entry point, from the ``*_THREADS`` settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def limit_threads(n: int) -> None:
    """At most ``n`` threads in each numeric library of this process; ``n <= 0`` leaves their default
    (one per core)."""
    if n <= 0:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)  # OpenMP and BLAS, for numpy's and scipy's calls too
    log.debug("numeric libraries limited to %d thread(s)", n)


@contextlib.contextmanager
def fewer_threads(n: int) -> Iterator[None]:
    """:func:`limit_threads` for the duration of a block, then each library's count as it was."""
    if n <= 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)
