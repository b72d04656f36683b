"""The stored user state's format: fields are only ever appended, so versions read each other's states."""

from __future__ import annotations

import msgspec
import pytest

from fusionrec.core.errors import StateStoreError
from fusionrec.streams.state import UserState, decode_user_state


def test_a_state_round_trips_exactly():
    state = UserState(last_seen=5, counts={"view": 2, "purchase": 1}, recent=["b", "a"],
                      items={"a": 0.1 + 0.2, "b": 1e-300}, affinity={"c:dairy": 3.5}, buys={"a": (1, 4, 5)},
                      seen=[(4, 0, 7, "e1", 0, 9)])
    assert decode_user_state(msgspec.msgpack.encode(state)) == state


def test_an_earlier_state_gets_the_defaults_and_a_later_one_keeps_what_this_version_knows():
    earlier = msgspec.msgpack.encode([7, {"view": 1}])  # written before the other fields existed
    assert decode_user_state(earlier) == UserState(last_seen=7, counts={"view": 1})
    state = UserState(last_seen=9, recent=["x"], items={"x": 1.0})
    later = msgspec.msgpack.encode([*msgspec.msgpack.decode(msgspec.msgpack.encode(state)), {"new": "field"}])
    assert decode_user_state(later) == state


@pytest.mark.parametrize("raw", [b"not a state", msgspec.msgpack.encode({"last_seen": 1}),
                                 msgspec.msgpack.encode(["ts", {}])])
def test_anything_else_is_a_clear_error(raw):
    with pytest.raises(StateStoreError, match="not a stored user state"):
        decode_user_state(raw)


def test_no_state_is_an_empty_one():
    assert decode_user_state(None) == UserState()
