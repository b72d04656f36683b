"""Keyed pseudonyms for user ids (``FUSIONREC_USER_ID_KEY``).

With a key set, the user-state consumer replaces every event's user id by
``"p" + HMAC-SHA256(key, id)[:32 hex]`` (128 bits) as it validates the event, so Redis, the feedback
topic, checkpoints and logs downstream only ever hold the pseudonym; readers apply the same function
to the id they are asked about. Without the key the id is used as it is. The key is a secret: anyone
holding it can test a guessed id, and changing it orphans every stored user (a new prefix is cleaner).

>>> Pseudonyms("k" * 32)("42")
'p09b9733fee8d8c0058bb9267ee6883b7'
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusionrec.core.settings import Settings


class Pseudonyms:
    def __init__(self, key: str | None) -> None:
        self._key = key.encode() if key else None
        self.enabled = self._key is not None
        self._cached = functools.lru_cache(maxsize=1 << 16)(self._digest)

    @classmethod
    def for_settings(cls, settings: Settings) -> Pseudonyms:
        return cls(settings.contract.user_id_key)

    def __call__(self, user_id: str) -> str:
        return self._cached(user_id) if self._key is not None else user_id

    def digest_of(self, data: bytes) -> str:
        """HMAC-SHA256(key, data) in hex: a keyed fingerprint of bytes that may hold a raw user id (a
        dead letter's withheld value or undecodable key), where a plain hash would let anyone confirm a
        guessed id. Only with a key."""
        if self._key is None:
            raise ValueError("no user-id key: nothing to fingerprint with")
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def _digest(self, user_id: str) -> str:
        assert self._key is not None
        return "p" + hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:32]
