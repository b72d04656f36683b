"""With pseudonyms on, a user events dead letter carries no raw user id and still says what went wrong."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from fusionrec.core.errors import InvalidEventError
from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.consumer import BatchHandler, EventsProcessor
from fusionrec.streams.contract import Validator
from fusionrec.streams.dlq import NON_UTF8_KEY, DeadLetter, DeadLetterPublisher, _size
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.runtime import ConsumeRuntime

KEY = "a-key-of-32-characters-for-tests"
P = Pseudonyms(KEY)
RAW = "alice-raw-42"
NOW = 1_700_000_000_000
LIMIT = 16_384
V = Validator(max_bytes=LIMIT, max_future_skew_ms=86_400_000, max_items_shown=5, pseudonyms=P)


def ev(**kw: Any) -> bytes:
    base = {"event_id": "e1", "type": "click", "user_id": RAW, "item_id": "i1", "ts": NOW}
    base.update(kw)
    return json.dumps(base).encode()


def dead(value: bytes | None, key: bytes | None = RAW.encode()) -> DeadLetter:
    """The letter the runtime makes of ``value``, pseudonymised."""
    try:
        V.user_event(value, now_ms=NOW)
    except InvalidEventError as exc:
        letter = DeadLetter(topic="events", partition=1, offset=7, key=key, value=value,
                            headers=[("origin", b"app")], reason=exc.reason, detail=exc.detail)
        return letter.pseudonymised(P, LIMIT)
    raise AssertionError("the event is valid")


def raw_id_in(letter: DeadLetter, raw: str = RAW) -> bool:
    """Whether ``raw`` appears anywhere the letter goes: key, value, any header, or its log line."""
    key, value, headers = letter.fitted(900_000)
    sent = [key or b"", value or b"", *(n.encode() + v for n, v in headers), letter.shown_key().encode()]
    return any(raw.encode() in part for part in sent)


def test_the_key_becomes_the_pseudonym_the_state_is_stored_under() -> None:
    letter = dead(ev(type="hover"))
    stored = V.user_event(ev(), now_ms=NOW).user_id
    assert letter.key == stored.encode() == P(RAW).encode() and not raw_id_in(letter)
    assert letter.reason == "unknown_type" and "hover" in letter.detail  # what is wrong stays readable


def test_a_key_that_is_no_utf8_gets_a_marker_and_a_keyed_fingerprint() -> None:
    raw = "josé".encode("latin-1")
    letter = dead(ev(type="hover"), key=raw)
    assert letter.key == NON_UTF8_KEY + hmac.new(KEY.encode(), raw, hashlib.sha256).hexdigest()[:32].encode()
    assert hashlib.sha256(raw).hexdigest()[:32].encode() not in (letter.key or b"")  # no plain hash to guess at
    assert dead(ev(type="hover"), key=None).key is None and dead(ev(type="hover"), key=b"").key == b""


@pytest.mark.parametrize("user_id", [RAW, 42, "\\u0061lice-raw-42"])
def test_a_json_event_keeps_every_field_but_its_user_id_which_is_pseudonymised(user_id: Any) -> None:
    value = ev(type="hover", user_id=user_id, extra={"nested": [1.5, "x"]})
    value = value.replace(b"\\\\u0061", b"\\u0061").replace(b"1.5", b"1.50")
    letter = dead(value)
    sent = json.loads(letter.value or b"")
    original = json.loads(value)
    assert sent.pop("user_id") == P(str(original.pop("user_id")))
    assert sent == original and b'"nested": [1.50, "x"]' in (letter.value or b"")  # other fields byte for byte
    assert dict(letter.fitted(900_000)[2])["fusionrec.dlq.value"] == b"pseudonymised"
    assert not raw_id_in(letter)


def test_invalid_utf8_outside_the_user_id_is_kept_as_it_came() -> None:
    value = ev(item_id="caf\u00e9").replace(b"\\u00e9", b"\xe9")
    letter = dead(value)
    assert letter.reason == "not_json" and b'"item_id":"caf\xe9"' in (letter.value or b"")
    assert letter.withheld is False and not raw_id_in(letter)


@pytest.mark.parametrize("value, reason", [
    (f"user {RAW} clicked i1".encode(), "not_json"),
    (ev(type="view", x=None).replace(b"null", b"[" * 3000 + b"]" * 3000), "too_deep"),
    (ev(type="view", user_id=RAW + "\u00e9").replace(b"\\u00e9", b"\xe9"), "not_json"),
    (ev(type="view", x="a" * LIMIT), "oversize"),
    (json.dumps([RAW]).encode(), "wrong_type"),
    (json.dumps({"event_id": "e", "type": "view", "userId": RAW, "ts": NOW}).encode(), "missing_field"),
    (ev(user_id=[RAW]), "wrong_type"),
])
def test_a_value_whose_user_id_cannot_be_found_is_withheld_with_its_size_and_keyed_fingerprint(
        value: bytes, reason: str) -> None:
    letter = dead(value)
    h = dict(letter.fitted(900_000)[2])
    assert letter.reason == reason and letter.value == b"" and h["fusionrec.dlq.value"] == b"withheld"
    assert h["fusionrec.dlq.value_bytes"] == str(len(value)).encode()
    assert h["fusionrec.dlq.value_hmac"] == P.digest_of(value).encode() != hashlib.sha256(value).hexdigest().encode()
    assert h["origin"] == b"app" and h["fusionrec.source.offset"] == b"7"
    assert not raw_id_in(letter)


def test_a_message_without_a_value_stays_without_one() -> None:
    letter = dead(None)
    assert letter.value is None and letter.reason == "empty"
    assert "fusionrec.dlq.value" not in dict(letter.fitted(900)[2])


@pytest.mark.parametrize("user_id", ["alice raw-42", "alice\traw-42", "alice raw-42-" + "x" * 60])
def test_the_detail_quotes_the_pseudonym_of_an_invalid_user_id(user_id: str) -> None:
    letter = dead(ev(user_id=user_id), key=b"other-key")
    assert letter.reason == "invalid_id" and f"user_id '{P(user_id)}'" in letter.detail
    assert not raw_id_in(letter, user_id[:12]) and not raw_id_in(letter, "alice")


def test_the_detail_keeps_item_ids_and_numbers_that_merely_contain_an_id() -> None:
    letter = dead(ev(item_id="bad item"))
    assert letter.reason == "invalid_id" and "item_id 'bad item'" in letter.detail
    ts = 420_000_000_000_042  # starts and ends with the user id's digits
    assert dead(ev(ts=ts, user_id=42), key=b"42").detail.startswith(f"ts {ts} is more than")


def test_a_withheld_letter_that_is_crowded_out_is_not_described_twice() -> None:
    crowded = [(f"h{n}", b"v" * 1000) for n in range(40)]
    letter = DeadLetter(topic="events", partition=0, offset=1, key=RAW.encode(), value=b"x" * 100, headers=crowded,
                        reason="not_json", detail="JSON is malformed").pseudonymised(P, LIMIT)
    key, value, headers = letter.fitted(16 * 1024)
    names = [name for name, _ in headers]
    assert names.count("fusionrec.dlq.value_bytes") == 1 and "fusionrec.dlq.truncated" not in names
    assert _size(key, value, headers) <= 16 * 1024 and dict(headers)["fusionrec.dlq.value_bytes"] == b"100"
    assert letter.pseudonymised(P, LIMIT) is letter  # once is enough


# --------------------------------------------------------------------------- the user-state stage and the log
@dataclass
class Msg:
    _topic: str
    _offset: int
    _value: bytes | None
    _key: bytes | None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, NOW)

    def error(self) -> None:
        return None


@dataclass
class Produced:
    sent: list[dict[str, Any]] = field(default_factory=list)

    def produce(self, topic: str, **kw: Any) -> None:
        self.sent.append(kw)
        kw["on_delivery"](None, None)

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        return 0


def decoded(env: dict[str, str], msgs: list[Msg]) -> list[DeadLetter]:
    """The dead letters the user-state stage's runtime makes of ``msgs``."""
    settings = Settings.from_env(env)
    metrics = Metrics()
    proc = EventsProcessor(settings, cast(BatchHandler, None), metrics.of(StreamMetrics))
    runtime = ConsumeRuntime(settings, proc, metrics, group_id="g", topics=["events", "catalog"],
                             consumer=cast(Any, object()), dead_letters=cast(Any, object()))
    batch = runtime._decode(cast(Any, msgs))
    assert [r.value.user_id for r in batch.records] == [P(RAW) if env else RAW]
    return batch.dead


def test_the_user_state_stage_pseudonymises_its_events_letters_only_with_a_key() -> None:
    msgs = [Msg("events", 0, b"not json " + RAW.encode(), RAW.encode()), Msg("events", 1, ev(), RAW.encode()),
            Msg("catalog", 0, b'{"item_id":"i 1","op":"delete","ts":1}', b"i 1")]
    events, catalog = decoded({"FUSIONREC_USER_ID_KEY": KEY}, msgs)
    assert events.pseudonymous and events.key == P(RAW).encode() and not raw_id_in(events)
    assert not catalog.pseudonymous and (catalog.key, catalog.value) == (b"i 1", msgs[2].value())
    plain, _ = decoded({}, msgs)
    assert (plain.key, plain.value, plain.shown_key()) == (RAW.encode(), msgs[0].value(), "")


def test_the_log_line_about_a_dead_letter_shows_the_pseudonymised_key(caplog: pytest.LogCaptureFixture) -> None:
    producer = Produced()
    publisher = DeadLetterPublisher(Settings(), Metrics(), producer=cast(Any, producer))
    letter = dead(ev(user_id="alice raw-42"), key=b"alice raw-42")
    with caplog.at_level(logging.WARNING, logger="fusionrec.streams.dlq"):
        publisher.publish([letter])
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dead letter")]
    assert f"events[1]@7 key {P('alice raw-42')}: invalid_id" in line and "alice" not in line
    assert producer.sent[0]["key"] == P("alice raw-42").encode()


def test_digests_of_bytes_are_keyed_and_need_a_key() -> None:
    assert P.digest_of(b"x") == hmac.new(KEY.encode(), b"x", hashlib.sha256).hexdigest()
    assert P.digest_of(b"x") != Pseudonyms("k" * 32).digest_of(b"x")
    with pytest.raises(ValueError, match="no user-id key"):
        Pseudonyms(None).digest_of(b"x")
