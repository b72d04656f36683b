"""The roof: what wires the stages into processes — the CLI, the demo, the pipeline wiring, the
embedded services launcher and the evaluation. Nothing below imports from here."""

from fusionrec.apps.cli import main

__all__ = ["main"]
