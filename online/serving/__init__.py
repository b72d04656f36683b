"""Serving: :class:`RecommendationReader` takes stored lists straight from Redis; the HTTP API and
search are built on it."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RecommendationReader"]


def __getattr__(name: str) -> Any:  # imported on first use: importing a submodule stays cheap
    if name == "RecommendationReader":
        return getattr(importlib.import_module("fusionrec.online.serving.reader"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
