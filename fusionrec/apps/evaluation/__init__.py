"""Prequential evaluation of every method over a dataset: state before the basket, then learn.

:func:`run_evaluation` is the entry point (``fusionrec evaluate``); :class:`~.evaluator.Evaluator`
replays the events through the production writer, joiner and learner.
"""

from fusionrec.apps.evaluation.runner import run_evaluation

__all__ = ["run_evaluation"]
