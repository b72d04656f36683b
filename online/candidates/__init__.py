"""The one read side: :class:`CandidateReader` turns users' live state into named candidate contexts,
the same for the writer, search and the evaluator; the pool features built from them live here too."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CandidateReader"]


def __getattr__(name: str) -> Any:  # imported on first use: importing a submodule stays cheap
    if name == "CandidateReader":
        return getattr(importlib.import_module("fusionrec.online.candidates.context"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
