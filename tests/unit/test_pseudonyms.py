"""Keyed pseudonyms: deterministic per key, id-shaped, and applied by the validator."""

import pytest

from fusionrec.core.errors import ConfigError
from fusionrec.core.keys import ID_PATTERN
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.contract import Validator

KEY = "a-key-of-32-characters-for-tests"


def test_pseudonyms_are_keyed_stable_and_valid_ids():
    p, other = Pseudonyms(KEY), Pseudonyms(KEY[::-1])
    assert p("42") == p("42") != p("43")
    assert p("42") != other("42")
    assert ID_PATTERN.match(p("42")) and len(p("42")) == 33 and "42" not in p("42")[1:3]
    assert Pseudonyms(None)("42") == "42" and not Pseudonyms(None).enabled


def test_the_validator_replaces_user_ids_but_not_item_ids():
    v = Validator(max_bytes=4096, max_future_skew_ms=86_400_000, max_items_shown=5, pseudonyms=Pseudonyms(KEY))
    e = v.user_event(b'{"event_id":"e1","type":"view","user_id":42,"item_id":"i9","ts":1700000000000}')
    assert e.user_id == Pseudonyms(KEY)("42") and e.item_id == "i9"


def test_the_key_is_a_masked_secret_of_some_length():
    with pytest.raises(ConfigError, match="USER_ID_KEY"):
        Settings.from_env({"FUSIONREC_USER_ID_KEY": "short"})
    s = Settings.from_env({"FUSIONREC_USER_ID_KEY": KEY})
    assert s.masked()["contract"]["user_id_key"] == "***" and KEY not in repr(s.masked())
