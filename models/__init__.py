"""The catalog embedding stage. Its core is :class:`EmbedPool`: workers (one per GPU, else a CPU pool)
that consume ``catalog`` and write versioned item vectors plus a Redis vector set, using
:class:`~fusionrec.models.encoder.TextEncoder` (tokenize → forward → pool). Imported lazily, so readers
of vectors (:mod:`fusionrec.models.vectors`) do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EmbedPool"]


def __getattr__(name: str) -> Any:
    if name == "EmbedPool":
        from fusionrec.models.pool import EmbedPool

        return EmbedPool
    raise AttributeError(name)
