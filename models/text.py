"""The text an item is embedded from, and its content hash.

Template (version 1): the title, then ``brand: <brand>``, ``category: <category>`` and the
description, joined with ``". "``. Empty fields and fields whose text already appears in the title
are left out, so catalogs whose titles already name the brand do not pay for it twice in tokens.

>>> item_text("Organic whole milk 1 gal", description="Fresh dairy", category="Dairy", brand="Acme")
'Organic whole milk 1 gal. brand: Acme. category: Dairy. Fresh dairy'
>>> item_text("ACME cola 12 oz", brand="acme")
'ACME cola 12 oz'
"""

from __future__ import annotations

import hashlib

TEMPLATE_VERSION = 1


def item_text(title: str, *, description: str | None = None, category: str | None = None,
              brand: str | None = None) -> str:
    head = " ".join(title.split())
    lowered = head.lower()
    parts = [head]
    for label, value in (("brand", brand), ("category", category), ("", description)):
        text = " ".join((value or "").split())
        if text and text.lower() not in lowered:
            parts.append(f"{label}: {text}" if label else text)
    return ". ".join(parts)


def text_hash(text: str) -> str:
    """Content hash kept next to a vector: unchanged text is never re-embedded."""
    return hashlib.blake2b(f"{TEMPLATE_VERSION}\0{text}".encode(), digest_size=10).hexdigest()
