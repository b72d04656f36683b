"""models: the catalog text encoder and the embedding worker pool that keeps item vectors in Redis.

``TextEncoder`` turns item text into vectors (tokenize → forward → pool); ``EmbedPool`` runs the
workers that consume ``catalog`` and write versioned vectors plus a Redis vector set. Submodules are
imported lazily so readers of vectors (``models.vectors``) do not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EmbedPool", "TextEncoder"]


def __getattr__(name: str) -> Any:
    if name == "TextEncoder":
        from fusionrec.models.encoder import TextEncoder

        return TextEncoder
    if name == "EmbedPool":
        from fusionrec.models.pool import EmbedPool

        return EmbedPool
    raise AttributeError(name)
