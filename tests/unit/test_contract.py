import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusionrec.core.errors import InvalidEventError
from fusionrec.core.settings import Settings
from fusionrec.streams.consumer import validator_for
from fusionrec.streams.contract import Validator

NOW = 1_700_000_000_000
V = Validator(max_bytes=4096, max_future_skew_ms=86_400_000, max_items_shown=5)


def ev(**kw):
    base = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i1", "ts": NOW}
    base.update(kw)
    return json.dumps(base).encode()


def test_valid_event_normalises_numeric_ids():
    e = V.user_event(ev(user_id=42, item_id=7, quantity=2, price=1.5), now_ms=NOW)
    assert (e.user_id, e.item_id, e.quantity, e.price) == ("42", "7", 2.0, 1.5)


def test_impression_carries_items_shown():
    e = V.user_event(ev(type="impression", item_id=None, items_shown=["a", 2]), now_ms=NOW)
    assert e.items_shown == ["a", "2"]


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not_json"),
    (None, "empty"),
    (ev(type="hover"), "unknown_type"),
    (json.dumps({"event_id": "e", "type": "view", "user_id": "u", "ts": NOW}).encode(), "missing_field"),
    (ev(ts="yesterday"), "wrong_type"),
    (ev(price=-1), "invalid_value"),
    (ev(price=1.0).replace(b"1.0", b"1e999"), "non_finite"),
    (ev(ts=NOW + 2 * 86_400_000), "future_ts"),
    (ev(user_id="has space"), "invalid_id"),
    (ev(item_id="{tag}"), "invalid_id"),
    (ev(user_id="u1\n"), "invalid_id"),  # a trailing newline (a `$` would let it through)
    (ev(user_id="u\u0000"), "invalid_id"),  # NUL
    (ev(item_id="sku\u001b[31m"), "invalid_id"),  # a terminal escape
    (ev(item_id="sku\u0085"), "invalid_id"),  # C1 control
    (ev(user_id="abc\u202edcba"), "invalid_id"),  # right-to-left override: displays as another id
    (ev(user_id="\u2066u1\u2069"), "invalid_id"),  # bidi isolates
    (ev(v=2), "unsupported_version"),
    (ev(type="impression", item_id=None), "missing_field"),
    (ev(type="impression", items_shown=list("abcdef")), "oversize"),
    (ev(title="x" * 5000), "oversize"),
])
def test_invalid_events_have_a_reason(raw, reason):
    with pytest.raises(InvalidEventError) as info:
        V.user_event(raw, now_ms=NOW)
    assert info.value.reason == reason


@pytest.mark.parametrize("ident", ["sku:1", "café-2", "用户-3", "a/b", "x" * 128])
def test_ids_with_colons_slashes_and_other_scripts_are_valid(ident):
    e = V.user_event(ev(user_id=ident, item_id=ident), now_ms=NOW)
    assert (e.user_id, e.item_id) == (ident, ident)


def test_catalog_upsert_needs_title_and_delete_does_not():
    assert V.catalog_event(b'{"item_id": 5, "op": "delete", "ts": 1}', now_ms=NOW).item_id == "5"
    with pytest.raises(InvalidEventError, match="missing_field"):
        V.catalog_event(b'{"item_id": "5", "op": "upsert", "ts": 1, "title": "  "}', now_ms=NOW)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_other_errors(raw):
    for decode in (V.user_event, V.catalog_event):
        try:
            decode(raw, now_ms=NOW)
        except InvalidEventError as exc:
            assert exc.reason


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=8)


@given(st.dictionaries(st.sampled_from(["event_id", "type", "user_id", "item_id", "ts", "price", "quantity",
                                        "items_shown", "v", "session_id"]), json_values))
def test_arbitrary_json_objects_are_accepted_or_rejected_with_a_reason(obj):
    try:
        e = V.user_event(json.dumps(obj).encode(), now_ms=NOW)
    except InvalidEventError as exc:
        assert exc.reason
    else:
        assert e.user_id and (e.item_id or e.items_shown)


NESTED = b'{"event_id": "e", "type": "view", "user_id": "u", "item_id": "i", "ts": 1, "op": "upsert", "title": "t",' \
         b' "extra": ' + b"[" * 3000 + b"]" * 3000 + b"}"


@pytest.mark.parametrize("raw, reason", [
    (NESTED, "too_deep"),  # in a field nobody reads: the decoder's stack still overflows
    (b'{"event_id": "e", "type": "view", "user_id": "\xff\xfe", "item_id": "i", "ts": 1}', "not_json"),
    (b'{"event_id": "e", "type": "view", "user_id": 1.5, "item_id": "i", "ts": 1}', "wrong_type"),
])
def test_hostile_inputs_are_invalid_events_with_their_reason(raw, reason):
    roomy = Validator(max_bytes=65_536, max_future_skew_ms=86_400_000, max_items_shown=5)
    with pytest.raises(InvalidEventError) as caught:
        roomy.user_event(raw, now_ms=NOW)
    assert caught.value.reason == reason
    if reason == "too_deep":
        with pytest.raises(InvalidEventError, match="too_deep"):
            roomy.catalog_event(raw, now_ms=NOW)


def test_whatever_a_message_makes_validation_raise_is_an_invalid_event():
    def broken(user_id: str) -> str:
        raise ValueError(f"cannot map {user_id}")

    strict = Validator(max_bytes=65536, max_future_skew_ms=86_400_000, max_items_shown=200, pseudonyms=broken)
    with pytest.raises(InvalidEventError) as caught:
        strict.user_event(b'{"event_id": "e", "type": "view", "user_id": "u", "item_id": "i", "ts": 1}', now_ms=NOW)
    assert caught.value.reason == "invalid_value" and "ValueError: cannot map u" in caught.value.detail


@pytest.mark.parametrize("decode, raw", [
    ("user_event", lambda ts: ev(ts=ts)),
    ("catalog_event", lambda ts: json.dumps({"item_id": "i1", "op": "upsert", "ts": ts, "title": "t"}).encode()),
])
def test_the_default_skew_bound_admits_ts_up_to_five_minutes_ahead_for_user_and_catalog_events(decode, raw):
    validate = getattr(validator_for(Settings()), decode)
    assert validate(raw(NOW + 300_000), now_ms=NOW).ts == NOW + 300_000
    assert validate(raw(NOW - 10 * 365 * 86_400_000), now_ms=NOW)  # replayed history: never too old
    with pytest.raises(InvalidEventError) as caught:
        validate(raw(NOW + 300_001), now_ms=NOW)
    assert caught.value.reason == "future_ts"
