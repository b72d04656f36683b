"""The online fusion layer, in four layers that only point down: ``candidates`` (the one read side of
user and item state) ← ``learning`` (scorers, fusion model, feedback join, learner loop, checkpoints)
← ``ranking`` (the fusion ranker and the recommendation writer) ← ``serving`` (reader client, HTTP
API, search). Its product is :class:`~fusionrec.online.ranking.writer.RecommendationWriter`: fresh
top-K lists, each item with the scorers that explain it."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RecommendationWriter"]


def __getattr__(name: str) -> Any:  # imported on first use: importing a submodule stays cheap
    if name == "RecommendationWriter":
        return getattr(importlib.import_module("fusionrec.online.ranking.writer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
