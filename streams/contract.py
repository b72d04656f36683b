"""The event contract, version 1, and its validation.

User actions go to topic ``events`` keyed by user id; catalog changes go to topic ``catalog`` keyed by
item id. Both are JSON objects decoded by msgspec into typed structs; anything that does not decode,
or decodes but breaks a rule below, raises :class:`InvalidEventError` with a low-cardinality
``reason`` that becomes the DLQ reason header and metric label.

User and catalog events alike may be stamped at most ``max_future_skew_ms`` ahead of the validating
process's clock (``FUSIONREC_MAX_FUTURE_SKEW_S``, reason ``future_ts``): state guarded by event time
would otherwise hold a far-future event's values until then. Past timestamps are never refused.

>>> v = Validator(max_bytes=65536, max_future_skew_ms=300_000, max_items_shown=200)
>>> e = v.user_event(b'{"event_id":"e1","type":"view","user_id":"u1","item_id":"i9","ts":1700000000000}')
>>> (e.type, e.user_id, e.item_id)
('view', 'u1', 'i9')
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

import msgspec

from fusionrec.core.errors import InvalidEventError
from fusionrec.core.keys import ID_PATTERN

SCHEMA_VERSION = 1

EventType = Literal["view", "click", "add_to_cart", "purchase", "impression"]
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "impression")

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | int
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Money = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
Quantity = Annotated[float, msgspec.Meta(gt=0.0, le=1e6)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=10**15)]


class UserEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One user action. ``items_shown`` is required for (and only meaningful on) impressions."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    type: EventType
    user_id: Id
    ts: Millis
    item_id: Id | None = None
    quantity: Quantity | None = None
    price: Money | None = None
    session_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    items_shown: list[Id] | None = None
    v: int = SCHEMA_VERSION


class CatalogEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """An item upsert (title required) or delete."""

    item_id: Id
    op: Literal["upsert", "delete"]
    ts: Millis
    title: Text | None = None
    description: Annotated[str, msgspec.Meta(max_length=16384)] | None = None
    category: Text | None = None
    brand: Text | None = None
    price: Money | None = None
    v: int = SCHEMA_VERSION


_user_decoder = msgspec.json.Decoder(UserEvent)
_catalog_decoder = msgspec.json.Decoder(CatalogEvent)
encoder = msgspec.json.Encoder()


def _reason_for(exc: msgspec.ValidationError | msgspec.DecodeError) -> str:
    """Map msgspec's message to a stable reason label."""
    msg = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        if "missing required field" in msg:
            return "missing_field"
        if "Invalid enum value" in msg:
            return "unknown_type" if "`$.type`" in msg else "invalid_value"
        if "Number out of range" in msg:
            return "non_finite"
        if ", got `" in msg:
            return "wrong_type"
        return "invalid_value"
    return "not_json"


T = TypeVar("T")


def _only_invalid(check: Callable[[bytes | None, int | None], T], raw: bytes | None, now_ms: int | None) -> T:
    """Run a check so that whatever a message makes it raise comes out as :class:`InvalidEventError`:
    any exception a message can cause is bad input for the dead-letter topic, never a crashed loop."""
    try:
        return check(raw, now_ms)
    except InvalidEventError:
        raise
    except Exception as exc:
        raise InvalidEventError("invalid_value", f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _as_id(value: str | int, field: str) -> str:
    text = str(value)
    if not ID_PATTERN.match(text):
        raise InvalidEventError("invalid_id", f"{field} {text[:40]!r} is empty, too long or has braces, whitespace, "
                                              "control or bidirectional formatting characters")
    return text


class Validator:
    """Decodes and validates raw message values; stateless apart from its limits."""

    def __init__(self, *, max_bytes: int, max_future_skew_ms: int, max_items_shown: int,
                 pseudonyms: Callable[[str], str] | None = None) -> None:
        self.pseudonyms = pseudonyms  # user id -> pseudonym (fusionrec.core.pseudonyms), applied once validated
        self.max_bytes = max_bytes
        self.max_future_skew_ms = max_future_skew_ms
        self.max_items_shown = max_items_shown

    def _decode(self, raw: bytes | None, decoder: msgspec.json.Decoder) -> object:
        if raw is None:
            raise InvalidEventError("empty", "message has no value")
        if len(raw) > self.max_bytes:
            raise InvalidEventError("oversize", f"{len(raw)} bytes > limit {self.max_bytes}")
        try:
            return decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidEventError(_reason_for(exc), str(exc)[:300]) from exc
        except RecursionError as exc:  # nesting deeper than the decoder's stack, even in an unknown field
            raise InvalidEventError("too_deep", "JSON nested too deeply") from exc
        except UnicodeDecodeError as exc:
            raise InvalidEventError("not_json", f"invalid UTF-8: {exc}"[:300]) from exc

    def _check_common(self, v: int, ts: int, now_ms: int | None) -> None:
        if v != SCHEMA_VERSION:
            raise InvalidEventError("unsupported_version", f"v={v}, this consumer reads v{SCHEMA_VERSION}")
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if ts > now + self.max_future_skew_ms:
            raise InvalidEventError("future_ts", f"ts {ts} is more than {self.max_future_skew_ms} ms ahead")

    def user_event(self, raw: bytes | None, now_ms: int | None = None) -> UserEvent:
        """The validated event; any problem with ``raw`` raises :class:`InvalidEventError` with its reason."""
        return _only_invalid(self._user_event, raw, now_ms)

    def catalog_event(self, raw: bytes | None, now_ms: int | None = None) -> CatalogEvent:
        """The validated event; any problem with ``raw`` raises :class:`InvalidEventError` with its reason."""
        return _only_invalid(self._catalog_event, raw, now_ms)

    def _user_event(self, raw: bytes | None, now_ms: int | None) -> UserEvent:
        event = self._decode(raw, _user_decoder)
        assert isinstance(event, UserEvent)
        self._check_common(event.v, event.ts, now_ms)
        for name in ("quantity", "price"):
            value = getattr(event, name)
            if value is not None and not math.isfinite(value):
                raise InvalidEventError("non_finite", f"{name} is {value}")
        user_id = _as_id(event.user_id, "user_id")
        changes: dict[str, object] = {"user_id": self.pseudonyms(user_id) if self.pseudonyms else user_id}
        if event.type == "impression":
            shown = event.items_shown
            if not shown:
                raise InvalidEventError("missing_field", "impression needs a non-empty items_shown")
            if len(shown) > self.max_items_shown:
                raise InvalidEventError("oversize", f"{len(shown)} items_shown > {self.max_items_shown}")
            changes["items_shown"] = [_as_id(i, "items_shown[]") for i in shown]
            if event.item_id is not None:
                changes["item_id"] = _as_id(event.item_id, "item_id")
        else:
            if event.item_id is None:
                raise InvalidEventError("missing_field", f"{event.type} needs item_id")
            changes["item_id"] = _as_id(event.item_id, "item_id")
        return msgspec.structs.replace(event, **changes)

    def _catalog_event(self, raw: bytes | None, now_ms: int | None) -> CatalogEvent:
        event = self._decode(raw, _catalog_decoder)
        assert isinstance(event, CatalogEvent)
        self._check_common(event.v, event.ts, now_ms)
        if event.price is not None and not math.isfinite(event.price):
            raise InvalidEventError("non_finite", f"price is {event.price}")
        if event.op == "upsert" and not (event.title and event.title.strip()):
            raise InvalidEventError("missing_field", "upsert needs a non-empty title")
        return msgspec.structs.replace(event, item_id=_as_id(event.item_id, "item_id"))
