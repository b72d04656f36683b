"""A dead letter always fits its size limit, and says what it lost."""

from __future__ import annotations

import hashlib

from fusionrec.streams.dlq import DeadLetter, _size


def letter(value: bytes, key: bytes | None = b"k", headers: list[tuple[str, bytes]] | None = None) -> DeadLetter:
    return DeadLetter(topic="events", partition=2, offset=41, key=key, value=value,
                      headers=headers if headers is not None else [("origin", b"app")], reason="oversize",
                      detail="event is 2000000 bytes, the limit is 65536")


def test_a_letter_that_fits_is_sent_as_it_came() -> None:
    dead = letter(b"x" * 1000)
    key, value, headers = dead.fitted(10_000)
    assert (key, value) == (b"k", b"x" * 1000) and ("origin", b"app") in headers
    assert not any(name.startswith("fusionrec.dlq.truncated") for name, _ in headers)


def test_a_large_letter_keeps_its_start_with_size_and_hash_within_the_limit() -> None:
    big = bytes(range(256)) * 8000
    dead = letter(big, key=b"u" * 5000)
    key, value, headers = dead.fitted(100_000)
    h = dict(headers)
    assert _size(key, value, headers) <= 100_000 and len(value) > 90_000 and big.startswith(value)
    assert h["fusionrec.dlq.truncated"] == b"1" and int(h["fusionrec.dlq.value_bytes"]) == len(big)
    assert h["fusionrec.dlq.value_sha256"] == hashlib.sha256(big).hexdigest().encode()
    assert key == b"u" * 1024 and h["fusionrec.dlq.key_bytes"] == b"5000"
    assert h["origin"] == b"app" and h["fusionrec.dlq.reason"] == b"oversize"
    assert h["fusionrec.source.offset"] == b"41"


def test_original_headers_that_crowd_the_letter_out_are_dropped_and_counted() -> None:
    crowded = [(f"h{n}", b"v" * 1000) for n in range(40)]  # 40 kB of headers
    key, value, headers = letter(b"x" * 200_000, headers=crowded).fitted(64 * 1024)
    h = dict(headers)
    assert h["fusionrec.dlq.headers_dropped"] == b"40" and "h0" not in h
    assert _size(key, value, headers) <= 64 * 1024 and len(value) > 60_000
    assert h["fusionrec.dlq.value_bytes"] == b"200000"


def test_an_empty_value_and_no_key_still_fit() -> None:
    key, value, headers = letter(b"", key=None, headers=[("big", b"v" * 5000)]).fitted(2000)
    assert key is None and value == b"" and _size(key, value, headers) <= 2000
