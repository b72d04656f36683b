import pandas as pd
import pytest

from fusionrec.core.errors import ConfigError
from fusionrec.streams import datasets
from fusionrec.streams.contract import Validator
from fusionrec.streams.datasets import Dataset
from tests.paths import SHARED_DATA, needs_shared_data

V = Validator(max_bytes=65536, max_future_skew_ms=86_400_000, max_items_shown=200)


@pytest.mark.parametrize("preset, name", [("rees46", "rees46-2019-oct-first-17k.csv"),
                                          ("taobao", "taobao-userbehavior-110k.csv")])
@needs_shared_data
def test_clickstream_presets_load_time_ordered_valid_events(preset, name):
    ds = datasets.load("files", events=str(SHARED_DATA / name), preset=preset)
    assert len(ds.events) > 10_000
    assert ds.events.ts.is_monotonic_increasing
    assert set(ds.events.type) <= {"view", "click", "add_to_cart", "purchase"}
    assert "purchase" in set(ds.events.type)
    import json

    for ev in list(ds.user_events())[:500]:
        V.user_event(json.dumps(ev).encode())
    for item in list(ds.catalog_events(ts=1))[:500]:
        V.catalog_event(json.dumps(item).encode())


def test_completejourney_products_become_catalog_text():
    ds = datasets.completejourney(households=5)
    assert (ds.events.type == "purchase").all()
    assert ds.events.ts.is_monotonic_increasing
    assert set(ds.events.item_id) <= set(ds.items.item_id)
    assert ds.items.title.str.contains(" / ").mean() > 0.9


def test_unmapped_event_types_and_missing_columns_are_clear_errors(tmp_path):
    f = tmp_path / "e.csv"
    f.write_text("u,i,t,kind\n1,2,3,teleport\n")
    with pytest.raises(ConfigError, match="teleport"):
        datasets.load_files(f, columns=datasets.ColumnMap(events={"user_id": "u", "item_id": "i", "ts": "t",
                                                                  "type": "kind"}, types={"view": "view"}))
    with pytest.raises(ConfigError, match="not in file"):
        datasets.load_files(f, columns=datasets.ColumnMap(events={"user_id": "nope"}))


def test_event_ids_are_fixed_at_load_so_any_part_replayed_later_resends_the_same_ids():
    events = pd.DataFrame({"user_id": ["u1", "u2", "u1", "u3"], "item_id": ["a", "b", "c", "d"],
                           "ts": [1, 2, 3, 4], "type": "purchase"})
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"]})
    ds = Dataset("shop", events, items)
    whole = [e["event_id"] for e in ds.user_events()]
    assert whole == ["shop-0", "shop-1", "shop-2", "shop-3"]
    rest = Dataset(ds.name, ds.events.iloc[2:].reset_index(drop=True), ds.items)
    assert [e["event_id"] for e in ds.head(2).user_events()] + [e["event_id"] for e in rest.user_events()] == whole
