"""The package's layers only point down: core ← streams ← models ← online ← apps, and inside online
candidates ← learning ← ranking ← serving. The contracts live in pyproject.toml ([tool.importlinter])."""

from importlinter import configuration
from importlinter.application import use_cases

from tests.paths import REPO

PYPROJECT = REPO / "pyproject.toml"


def test_import_contracts_are_kept(capsys):
    configuration.configure()
    kept = use_cases.lint_imports(config_filename=str(PYPROJECT), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out
