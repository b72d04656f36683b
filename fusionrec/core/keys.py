"""The Redis key schema: the only module that spells a key.

Keys carry a hash tag naming a *bucket* (``crc32(id) % buckets``), so one Lua script can update every
user (or item) of a bucket that a batch touched, atomically, in one Redis Cluster slot. A batch thus
costs at most ``buckets`` script calls per stage, whatever its size. ``buckets`` is fixed for the
lifetime of a deployment (``FUSIONREC_REDIS_BUCKETS``; changing it means a new prefix).

=================================  ====  ======================================================
key                                type  content
=================================  ====  ======================================================
``P:{u:B}:<uid>:s``                hash  the user's state, written whole by their partition's consumer:
                                         ``d`` msgpack :class:`~fusionrec.streams.state.UserState`
                                         (counters, recent items, decayed item weights and
                                         category/brand affinity, purchases, remembered event ids),
                                         ``v`` its version (compare-and-set), ``last_seen`` (ms)
``P:{u:B}:<uid>:rec``              str   JSON top-K recommendations with scores and sources
``P:{u:B}:<uid>:pv``               str   profile vector: msgpack ``[version, float32 bytes]``
``P:{u:B}:o``                      hash  offset guard per source partition for the bucket's users
``P:{i:B}:<iid>:meta``             hash  catalog fields (title, category, brand, price, ts, deleted)
``P:{i:B}:<iid>:covis``            zset  co-visitation neighbours with weights (capped)
``P:{i:B}:o``                      hash  offset guard per source partition for co-visitation
``P:{g}:pop``                      zset  decayed item popularity
``P:{g}:o``                        hash  offset guard per source partition for popularity
``P:{g}:deleted``                  set   deleted item ids (excluded from candidates)
``P:{g}:applied``                  hash  ``<topic>:<partition>`` -> last events offset whose state and outputs
                                         are done (reconciled with Kafka's offsets on assignment)
``P:{g}:trend``                    zset  trending items (faust hopping window counts)
``P:{g}:trend:c:<category>``       zset  trending items per category
``P:{g}:trend:categories``         zset  trending categories (window interaction counts)
``P:{m}:fusion:head``              str   number of the fusion checkpoint rankers load
``P:{m}:fusion:seq``               str   last checkpoint number handed out
``P:{m}:fusion:index``             zset  stored checkpoint numbers
``P:{m}:fusion:<n>``               str   checkpoint: signed pickled model (river, torch state_dict, fusion)
``P:{m}:learner:lease``            str   ``<name>:<token>`` of the one active learner process (TTL)
``P:{m}:learner:token``            str   last fencing token handed out with the lease
``P:{m}:active``                   str   the model version readers use
``P:{m}:versions``                 hash  version -> JSON (model id, dim, dtype, status, counts)
``P:{m}:backfill:<ver>``           str   lock held by the process re-embedding the catalog
``P:{m}:worker:<name>``            str   JSON status of a live embedding worker (partitions, counts)
``P:{m}:probe``                    —     never written: what feature probes read (``VCARD``)
``P:{v:<ver>}:e:<iid>``            hash  item vector ``v`` (bytes), text hash ``h``, event ``ts``,
                                         written ``at`` (ms), worker ``w``, embeddings ``n``; ``del``
``P:{v:<ver>}:set``                vset  Redis 8 vector set of the version (VADD/VSIM)
``P:{v:<ver>}:seq``                str   change counter (in-process indexes reload when it moves)
=================================  ====  ======================================================

``P`` is ``Settings.redis_prefix``; a test or an evaluation run uses its own prefix. A model version
keeps all its vectors in one hash slot (``{v:<ver>}``), like the vector set it feeds, so one script
writes an item's blob and its vector-set entry atomically.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from fusionrec.core.settings import Settings

# Ids are 1–128 characters without hash-tag braces, whitespace, control characters (NUL, C0, DEL, C1)
# or bidirectional formatting marks (which make an id display as another). The contract and the API
# apply the same rule; ids that break it never reach a key.
ID_EXCLUDED = r"{}\s\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# Python's `$` also matches before a trailing newline: `\Z` is the end of the string.
ID_PATTERN = re.compile(rf"[^{ID_EXCLUDED}]{{1,128}}\Z")
# The same rule for pydantic's (Rust) regex engine, where `$` is the end of the text.
ID_REGEX = rf"^[^{ID_EXCLUDED}]{{1,128}}$"


BUCKET_CACHE = 1 << 18  # ids whose bucket a Keys remembers (all forgotten beyond: computed again)

V = TypeVar("V")


class Remembered(dict[str, V], Generic[V]):
    """``build(id)`` per id, built at its first lookup (``memo[id]``) and remembered; beyond ``limit``
    ids everything is forgotten and built again. A lookup of a remembered id is one dict lookup.

    >>> lengths = Remembered(len, limit=2)
    >>> lengths["abc"], lengths["de"], len(lengths), lengths["f"], len(lengths)
    (3, 2, 2, 1, 1)
    """

    def __init__(self, build: Callable[[str], V], limit: int) -> None:
        super().__init__()
        self.build = build
        self.limit = limit

    def __missing__(self, ident: str) -> V:
        if len(self) >= self.limit:
            self.clear()
        value = self[ident] = self.build(ident)
        return value


class Keys:
    """Builds fusionrec's Redis keys under one prefix."""

    def __init__(self, prefix: str = "fr", buckets: int = 64) -> None:
        self.prefix = prefix
        self.buckets = buckets
        self._buckets = Remembered(self._hash_bucket, BUCKET_CACHE)

    @classmethod
    def for_settings(cls, settings: Settings) -> Keys:
        return cls(settings.redis.prefix, settings.redis.buckets)

    def bucket(self, ident: str) -> int:
        return self._buckets[ident]

    def _hash_bucket(self, ident: str) -> int:
        return zlib.crc32(ident.encode()) % self.buckets

    # --- per user
    def user_tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{u:{bucket}}}"

    def user(self, uid: str, kind: str) -> str:
        """``kind`` is one of ``s``, ``rec``, ``pv``."""
        return f"{self.user_tag(self.bucket(uid))}:{uid}:{kind}"

    def user_state(self, uid: str) -> str:
        return self.user(uid, "s")

    def user_rec(self, uid: str) -> str:
        return self.user(uid, "rec")

    def user_profile(self, uid: str) -> str:
        return self.user(uid, "pv")

    def user_guard(self, bucket: int) -> str:
        return f"{self.user_tag(bucket)}:o"

    # --- per item
    def item_tag(self, bucket: int) -> str:
        return f"{self.prefix}:{{i:{bucket}}}"

    def item_meta(self, iid: str) -> str:
        return f"{self.item_tag(self.bucket(iid))}:{iid}:meta"

    def item_covis(self, iid: str) -> str:
        return f"{self.item_tag(self.bucket(iid))}:{iid}:covis"

    def item_guard(self, bucket: int) -> str:
        return f"{self.item_tag(bucket)}:o"

    # --- global
    def popularity(self) -> str:
        return f"{self.prefix}:{{g}}:pop"

    def popularity_guard(self) -> str:
        return f"{self.prefix}:{{g}}:o"

    def deleted_items(self) -> str:
        return f"{self.prefix}:{{g}}:deleted"

    def applied_positions(self) -> str:
        return f"{self.prefix}:{{g}}:applied"

    def item_meta_pattern(self) -> str:
        """A SCAN pattern matching every item's catalog hash."""
        return f"{self.prefix}:{{i:*}}:*:meta"

    def item_id_from_meta(self, key: str) -> str:
        """The item id of an :meth:`item_meta` key; ids may hold ``:`` themselves (``sku:1``)."""
        head = f"{self.prefix}:{{i:"
        if not (key.startswith(head) and key.endswith(":meta")):
            raise ValueError(f"not an item catalog key: {key!r}")
        return key[key.index("}:", len(head)) + 2: -len(":meta")]

    def trending(self, category: str | None = None) -> str:
        return f"{self.prefix}:{{g}}:trend" + (f":c:{category}" if category else "")

    def trending_categories(self) -> str:
        return f"{self.prefix}:{{g}}:trend:categories"

    # --- fusion checkpoints
    def fusion(self, what: str | int) -> str:
        """``head``, ``seq`` or a checkpoint number."""
        return f"{self.prefix}:{{m}}:fusion:{what}"

    def learner_lease(self) -> str:
        return f"{self.prefix}:{{m}}:learner:lease"

    def learner_token(self) -> str:
        return f"{self.prefix}:{{m}}:learner:token"

    # --- model versions and vectors
    def active_model(self) -> str:
        return f"{self.prefix}:{{m}}:active"

    def model_versions(self) -> str:
        return f"{self.prefix}:{{m}}:versions"

    def backfill_lock(self, version: str) -> str:
        return f"{self.prefix}:{{m}}:backfill:{version}"

    def worker_status(self, name: str) -> str:
        return f"{self.prefix}:{{m}}:worker:{name}"

    def probe(self) -> str:
        """A key nothing writes, under the prefix: probes of what the server supports read it, so a
        user whose ACL allows only this prefix may run them."""
        return f"{self.prefix}:{{m}}:probe"

    def vec_tag(self, version: str) -> str:
        return f"{self.prefix}:{{v:{version}}}"

    def item_vector(self, version: str, iid: str) -> str:
        return f"{self.vec_tag(version)}:e:{iid}"

    def vector_set(self, version: str) -> str:
        return f"{self.vec_tag(version)}:set"

    def vector_seq(self, version: str) -> str:
        return f"{self.vec_tag(version)}:seq"

    def vector_pattern(self, version: str) -> str:
        return f"{self.vec_tag(version)}:*"

    def pattern(self) -> str:
        """A SCAN pattern matching every key under this prefix."""
        return f"{self.prefix}:*"
