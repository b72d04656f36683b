"""Prequential evaluation of every method over a dataset: state before the basket, then learn.

:func:`run_evaluation` is the entry point (``fusionrec evaluate``); :class:`~.evaluator.Evaluator`
replays the events through the production writer, joiner and learner.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_evaluation"]


def __getattr__(name: str) -> Any:
    # imported on first use: the published methods' worker process loads this package without the
    # system's models
    if name == "run_evaluation":
        from fusionrec.apps.evaluation.runner import run_evaluation

        return run_evaluation
    raise AttributeError(name)
