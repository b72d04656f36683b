"""The references in docs/ are generated from the code; these fail when they drift."""

import pytest

from fusionrec.apps.docs import generated, metric_sets
from fusionrec.core.metrics import Metrics
from fusionrec.core.settings import Settings
from tests.paths import REPO

DOCS = REPO / "docs"


@pytest.mark.parametrize("name", sorted(generated()))
def test_committed_reference_matches_the_code(name: str):
    assert (DOCS / name).read_text() == generated()[name], (
        f"docs/{name} is out of date: run `python -m fusionrec.apps.docs` from the repository root")


def test_every_setting_and_every_metric_is_in_the_references():
    text = generated()
    for _, field in Settings.fields():
        assert f"`FUSIONREC_{field.metadata['env']}`" in text["configuration.md"]
    metrics = Metrics()
    for kind in metric_sets():
        metrics.of(kind)  # two sets declaring one name would fail here (duplicated timeseries)
    families = {family.name for family in metrics.registry.collect()}
    assert families and all(f"`{name}" in text["metrics.md"] for name in families)


def test_every_metric_set_is_in_the_reference():
    import re
    from pathlib import Path

    from fusionrec.apps.docs import METRIC_MODULES

    root = Path(__file__).resolve().parents[2]
    declaring = set()
    for path in root.glob("*/**/*.py"):
        if path.parts[len(root.parts)] in {"fusionrec", "streams", "models", "online"} and \
                re.search(r"^class \w+\(MetricSet\):", path.read_text(), re.M):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts if rel.parts[0] == "fusionrec" else ("fusionrec", *rel.parts)
            declaring.add(".".join(parts))
    assert declaring and declaring <= set(METRIC_MODULES), declaring - set(METRIC_MODULES)
