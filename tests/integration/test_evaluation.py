"""``run_evaluation`` on the real Redis: published-method variants in place of the defaults, and half the
system's rankings in a worker process."""

from __future__ import annotations

import pytest

from fusionrec.apps.evaluation.published import UpCf
from fusionrec.apps.evaluation.rank_worker import RankWorker
from fusionrec.apps.evaluation.runner import run_evaluation


def test_published_variants_replace_the_defaults_on_the_same_baskets(settings):
    kw = {"source": "completejourney", "households": 12, "limit": 3000, "progress": False, "content": False}
    variants = run_evaluation(settings, **kw, published={"upcf": UpCf(), "upcf_self": UpCf(k=1)})
    default = run_evaluation(settings, **kw)
    assert {"upcf", "upcf_self"} <= set(variants["methods"]) and "tifu_knn" not in variants["methods"]
    assert variants["methods"]["upcf"] == default["methods"]["upcf"]  # the same method, the same baskets
    assert variants["methods"]["system"] == default["methods"]["system"]
    assert variants["methods"]["upcf_self"] != variants["methods"]["upcf"]  # neighbours change the lists


def test_half_the_rankings_in_a_worker_give_the_report_of_one_process(settings):
    """Without vectors a pass is exactly reproducible (with them, each run's index breaks ties of equal
    similarity its own way), so the two must agree figure for figure. The vector methods' path through
    the worker runs in ``test_cli.py``'s evaluation."""
    kw = {"source": "completejourney", "households": 12, "limit": 3000, "progress": False, "content": False}
    alone = run_evaluation(settings, **kw, published={"upcf": UpCf()}, rank_worker=False)
    split = run_evaluation(settings, **kw, published={"upcf": UpCf()})
    assert split["evaluated"] > 100 and split["learner"]["examples"] > 0
    for part in ("methods", "cold_start", "learner"):
        assert split[part] == alone[part], part


def test_a_rank_worker_that_fails_is_an_error_with_its_cause(settings):
    worker = RankWorker(settings, content_cache=0)
    try:
        worker.score({"u1": 1_000}, embedded=False)  # no models sent yet: the worker cannot rank
        with pytest.raises(RuntimeError, match=r"(?s)ranking worker stopped.*AttributeError"):
            worker.answer()
    finally:
        worker.close()
