"""Dead-letter publishing: bad input goes to ``<topic>.dlq`` with its original bytes and a reason.

Headers added to the original ones:

=============================  ====================================================
``fusionrec.dlq.reason``       low-cardinality reason (``not_json``, ``missing_field`` …)
``fusionrec.dlq.detail``       the validator's message (truncated to 500 bytes)
``fusionrec.source.topic``     topic the message was read from
``fusionrec.source.partition`` its partition
``fusionrec.source.offset``    its offset
``fusionrec.dlq.ts``           when it was dead-lettered (ms)
=============================  ====================================================

A dead letter always fits. One larger than ``FUSIONREC_DLQ_MAX_BYTES`` (key, value and headers, 900 kB
by default, below Kafka's default 1 MB limits: a message that just fitted the source topic no longer
fits once the headers above are added) keeps the first bytes of its value and says so:

=================================  ================================================
``fusionrec.dlq.truncated``        ``1``
``fusionrec.dlq.value_bytes``      the original value's size
``fusionrec.dlq.value_sha256``     the original value's SHA-256 (hex)
``fusionrec.dlq.key_bytes``        the original key's size, when the key was cut to 1 KiB
``fusionrec.dlq.headers_dropped``  how many original headers were left out, when they
                                   took more than a quarter of the room
=================================  ================================================

With pseudonymous user ids (``FUSIONREC_USER_ID_KEY``) a letter of the user events topic carries no
raw user id (:meth:`DeadLetter.pseudonymised`, applied by the user-state stage): its key is the key's
pseudonym, the detail quotes pseudonyms, and its value is either the event with its ``user_id``
pseudonymised or, where fusionrec cannot tell where an id is, withheld:

=================================  ================================================
``fusionrec.dlq.value``            ``pseudonymised`` or ``withheld``
``fusionrec.dlq.value_bytes``      the original value's size, when withheld
``fusionrec.dlq.value_hmac``       HMAC-SHA256(user-id key, original value), when withheld
=================================  ================================================

A letter the broker still refuses as too large (a DLQ topic with a lower limit) is sent again at
64 KiB. A DLQ topic that does not exist is :class:`~fusionrec.core.errors.MissingTopicError`, which
stops the consumer with the topic's name instead of retrying forever with every partition paused.

Delivery is at-least-once: the consumer flushes the DLQ before it stores the batch's offsets, so a
crash may repeat a dead letter but never loses one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from dataclasses import dataclass

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from fusionrec.core.errors import DeliveryError, MissingTopicError
from fusionrec.core.metrics import Metrics
from fusionrec.core.pseudonyms import Pseudonyms
from fusionrec.core.settings import Settings
from fusionrec.streams.metrics import StreamMetrics
from fusionrec.streams.producer import kafka_config

log = logging.getLogger(__name__)

SMALL_LETTER_BYTES = 64 * 1024  # for a letter the broker refused as too large at the configured size
KEY_BYTES = 1024
_MISSING = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError.TOPIC_AUTHORIZATION_FAILED)
_TOO_LARGE = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE)
Header = tuple[str, bytes]
VALUE_HEADER = "fusionrec.dlq.value"
PSEUDONYMISED, WITHHELD = b"pseudonymised", b"withheld"
NON_UTF8_KEY = b"non-utf8:"  # + keyed fingerprint: the key of a letter whose key was no UTF-8 text
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])  # top level decoded, every value kept as its bytes
_user_id = msgspec.json.Decoder(str | int)


def _size(key: bytes | None, value: bytes | None, headers: list[Header]) -> int:
    """Bytes a record takes against Kafka's size limits, with room for the record's own framing."""
    return 64 + len(key or b"") + len(value or b"") + sum(len(n) + len(v) + 8 for n, v in headers)


def position(msg: Message) -> tuple[str, int, int]:
    """topic, partition, offset of a consumed message (always set on messages without error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("message has no position")
    return topic, partition, offset


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    reason: str
    detail: str
    marks: tuple[Header, ...] = ()  # fusionrec headers a rewrite added (``fusionrec.dlq.value`` …)
    pseudonymous: bool = False  # key, value and detail hold pseudonyms, never a raw user id

    @classmethod
    def of(cls, msg: Message, reason: str, detail: str) -> DeadLetter:
        topic, partition, offset = position(msg)
        headers = msg.headers() or []
        items = headers.items() if isinstance(headers, dict) else headers
        return cls(topic=topic, partition=partition, offset=offset, key=msg.key(), value=msg.value(),
                   headers=[(k, v if isinstance(v, bytes) else str(v or "").encode()) for k, v in items],
                   reason=reason, detail=detail)

    def dlq_headers(self) -> list[Header]:
        return [*self.headers, *self._own_headers()]

    def _own_headers(self) -> list[Header]:
        return [("fusionrec.dlq.reason", self.reason.encode()),
                ("fusionrec.dlq.detail", self.detail.encode()[:500]),
                ("fusionrec.source.topic", self.topic.encode()),
                ("fusionrec.source.partition", str(self.partition).encode()),
                ("fusionrec.source.offset", str(self.offset).encode()),
                ("fusionrec.dlq.ts", str(int(time.time() * 1000)).encode()),
                *self.marks]

    @property
    def withheld(self) -> bool:
        return (VALUE_HEADER, WITHHELD) in self.marks

    def shown_key(self) -> str:
        """`` key <pseudonym>`` for a log line where the key is a pseudonym; nothing otherwise, so that a
        raw user id never reaches the logs."""
        return f" key {self.key.decode(errors='replace')}" if self.pseudonymous and self.key else ""

    def pseudonymised(self, pseudonyms: Pseudonyms, max_value_bytes: int) -> DeadLetter:
        """This letter without a raw user id (a user events letter, pseudonyms on): the key becomes its
        pseudonym; a value that is a JSON object with a string or integer ``user_id`` keeps every other
        field byte for byte and gets that id's pseudonym (the validator's, so the letter joins the
        stored state); any other value (not JSON, too deep, invalid UTF-8, over ``max_value_bytes``, no
        such ``user_id``) may hold a raw id anywhere and is withheld: only its size and a keyed
        fingerprint stay. The detail quotes pseudonyms where it quoted the key or the ``user_id``."""
        if self.pseudonymous:
            return self
        value, user_id, marks = _pseudonymous_value(self.value, pseudonyms, max_value_bytes)
        raw_ids = [i for i in (_text(self.key), user_id) if i]
        return dataclasses.replace(self, key=_pseudonymous_key(self.key, pseudonyms), value=value,
                                   detail=_scrubbed(self.detail, raw_ids, pseudonyms),
                                   marks=(*self.marks, *marks), pseudonymous=True)

    def fitted(self, max_bytes: int) -> tuple[bytes | None, bytes | None, list[Header]]:
        """Key, value and headers within ``max_bytes``; a value that does not fit is cut and described."""
        headers = self.dlq_headers()
        if _size(self.key, self.value, headers) <= max_bytes:
            return self.key, self.value, headers
        value = self.value or b""
        marks: list[Header] = [] if self.withheld else [  # a withheld value is described already
            ("fusionrec.dlq.truncated", b"1"), ("fusionrec.dlq.value_bytes", str(len(value)).encode()),
            ("fusionrec.dlq.value_sha256", hashlib.sha256(value).hexdigest().encode())]
        key = self.key
        if key is not None and len(key) > KEY_BYTES:
            marks.append(("fusionrec.dlq.key_bytes", str(len(key)).encode()))
            key = key[:KEY_BYTES]
        originals = self.headers
        if _size(None, None, originals) > max_bytes // 4:
            marks.append(("fusionrec.dlq.headers_dropped", str(len(originals)).encode()))
            originals = []
        headers = [*originals, *self._own_headers(), *marks]
        room = max(0, max_bytes - _size(key, None, headers))
        return key, value[:room], headers


def _text(raw: bytes | None) -> str | None:
    try:
        return raw.decode() if raw else None
    except UnicodeDecodeError:
        return None


def _pseudonymous_key(key: bytes | None, pseudonyms: Pseudonyms) -> bytes | None:
    """The key's pseudonym; a key that is no UTF-8 (so never a user id) gets a marker and a keyed
    fingerprint, which still groups a producer's letters but, unlike a plain hash, confirms no guess."""
    if not key:
        return key
    text = _text(key)
    return pseudonyms(text).encode() if text is not None else NON_UTF8_KEY + pseudonyms.digest_of(key)[:32].encode()


def _pseudonymous_value(value: bytes | None, pseudonyms: Pseudonyms,
                        max_bytes: int) -> tuple[bytes | None, str | None, tuple[Header, ...]]:
    """The value with its ``user_id`` pseudonymised, the raw id, and the marks; or withheld."""
    if not value:  # nothing that could hold an id
        return value, None, ()
    found = _with_pseudonymous_user_id(value, pseudonyms) if len(value) <= max_bytes else None
    if found is not None:
        return found[0], found[1], ((VALUE_HEADER, PSEUDONYMISED),)
    return b"", None, ((VALUE_HEADER, WITHHELD), ("fusionrec.dlq.value_bytes", str(len(value)).encode()),
                       ("fusionrec.dlq.value_hmac", pseudonyms.digest_of(value).encode()))


def _with_pseudonymous_user_id(value: bytes, pseudonyms: Pseudonyms) -> tuple[bytes, str] | None:
    """A JSON object re-encoded with its ``user_id`` pseudonymised (every other field's bytes kept), and
    the raw id; None for any other value."""
    try:
        fields = _fields.decode(value)
        user_id = str(_user_id.decode(fields["user_id"]))
        fields["user_id"] = msgspec.Raw(msgspec.json.encode(pseudonyms(user_id)))
        return msgspec.json.encode(fields), user_id
    except Exception:  # not JSON, no object, too deep, invalid UTF-8, no id, an int too long to print …
        return None


def _scrubbed(detail: str, raw_ids: list[str], pseudonyms: Pseudonyms) -> str:
    """``detail`` with each raw id replaced by its pseudonym, also as the validator quotes one (its first
    40 characters, escaped as ``repr`` does), where it stands apart from letters and digits."""
    table = {form: pseudonyms(raw) for raw in raw_ids
             for form in (raw, raw[:40], repr(raw)[1:-1], repr(raw[:40])[1:-1])}
    if not table:
        return detail
    forms = "|".join(re.escape(form) for form in sorted(table, key=len, reverse=True))
    return re.sub(f"(?<![0-9A-Za-z])(?:{forms})(?![0-9A-Za-z])", lambda m: table[m.group()], detail)


class DeadLetterPublisher:
    """Produces dead letters and confirms their delivery before the caller commits."""

    def __init__(self, settings: Settings, metrics: Metrics, producer: Producer | None = None) -> None:
        self.settings = settings
        self.metrics = metrics.of(StreamMetrics)
        # No auto-creation: a dead-letter topic is created at startup with the others (``ensure_topics``),
        # so a missing one is a clear error rather than a topic the broker invents with its defaults.
        self._producer = producer if producer is not None else Producer(kafka_config(settings, **{
            "enable.idempotence": True, "acks": "all", "linger.ms": 5, "allow.auto.create.topics": False}))
        self._failed: list[DeadLetter] = []
        self._missing: set[str] = set()
        self._small: set[tuple[str, int, int]] = set()  # letters the broker refused at the configured size

    def publish(self, letters: list[DeadLetter], timeout: float = 30.0) -> None:
        """Send and wait for acknowledgement of every letter; raises DeliveryError otherwise (retried by
        the caller), MissingTopicError when a DLQ topic does not exist."""
        if not letters:
            return
        self._failed, self._missing = [], set()
        for letter in letters:
            log.warning("dead letter %s[%d]@%d%s: %s (%s)", letter.topic, letter.partition, letter.offset,
                        letter.shown_key(), letter.reason, letter.detail[:200])
            self._produce(letter)
        remaining = self._producer.flush(timeout)
        if remaining:  # left queued, a retry would send them twice: drop them, the retry sends them again
            self._producer.purge(in_queue=True, in_flight=False)
            self._producer.poll(0)
            self._missing |= self._absent({self.settings.dlq_topic(letter.topic) for letter in letters})
        if self._missing:
            raise MissingTopicError(f"dead-letter topic {', '.join(sorted(self._missing))} does not exist on the "
                                    "broker: create it (fusionrec creates its topics at startup where it may)")
        if remaining or self._failed:
            raise DeliveryError(f"{len(self._failed)} dead letters failed, {remaining} undelivered")
        for letter in letters:
            self.metrics.dead_letters.labels(letter.topic, letter.reason).inc()

    def _absent(self, topics: set[str]) -> set[str]:
        try:
            known = set(self._producer.list_topics(timeout=10).topics)
        except KafkaException as exc:  # the broker is unreachable: a delivery problem, retried
            log.debug("cannot list topics: %s", exc)
            return set()
        return topics - known

    def _produce(self, letter: DeadLetter) -> None:
        topic = self.settings.dlq_topic(letter.topic)
        where = (letter.topic, letter.partition, letter.offset)

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._failed.append(letter)
                self.metrics.delivery_failures.labels(topic).inc()
                if err.code() in _MISSING:
                    self._missing.add(topic)
                elif err.code() in _TOO_LARGE:
                    self._small.add(where)

        budget = SMALL_LETTER_BYTES if where in self._small else self.settings.kafka.dlq_max_bytes
        key, value, fitted = letter.fitted(budget)
        headers: list[tuple[str, str | bytes | None]] = list(fitted)
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as exc:  # refused before sending (larger than the producer's own limit)
                self._failed.append(letter)
                if exc.args[0].code() in _TOO_LARGE:
                    self._small.add(where)
                log.warning("dead letter %s[%d]@%d not produced: %s", *where, exc)
                break
        self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(10)
