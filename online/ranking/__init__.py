"""Ranking: :class:`RecommendationWriter` ranks the users a batch touched with the served fusion model
and writes their explained top-K lists to Redis."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RecommendationWriter"]


def __getattr__(name: str) -> Any:  # imported on first use: importing a submodule stays cheap
    if name == "RecommendationWriter":
        return getattr(importlib.import_module("fusionrec.online.ranking.writer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
