"""Folders the tests read, found from this file so that a test module's depth in ``tests/`` does not matter."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SHARED_DATA = REPO.parent / "shared" / "data"  # the sample clickstreams that sit beside the checkout
