"""Online learning: :class:`LearnerLoop` joins logged decisions with what users did next, updates the
fusion model (predict, then learn) and checkpoints it for the rankers to hot-reload."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LearnerLoop"]


def __getattr__(name: str) -> Any:  # imported on first use: importing a submodule stays cheap
    if name == "LearnerLoop":
        return getattr(importlib.import_module("fusionrec.online.learning.loop"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
