"""``run_evaluation`` with published-method variants in place of the defaults, on the real Redis."""

from __future__ import annotations

from fusionrec.apps.evaluation.published import UpCf
from fusionrec.apps.evaluation.runner import run_evaluation


def test_published_variants_replace_the_defaults_on_the_same_baskets(settings):
    kw = {"source": "completejourney", "households": 12, "limit": 3000, "progress": False, "content": False}
    variants = run_evaluation(settings, **kw, published={"upcf": UpCf(), "upcf_self": UpCf(k=1)})
    default = run_evaluation(settings, **kw)
    assert {"upcf", "upcf_self"} <= set(variants["methods"]) and "tifu_knn" not in variants["methods"]
    assert variants["methods"]["upcf"] == default["methods"]["upcf"]  # the same method, the same baskets
    assert variants["methods"]["system"] == default["methods"]["system"]
    assert variants["methods"]["upcf_self"] != variants["methods"]["upcf"]  # neighbours change the lists
