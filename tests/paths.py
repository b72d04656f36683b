"""Folders the tests read, found from this file so that a test module's depth in ``tests/`` does not matter."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SHARED_DATA = REPO.parent / "shared" / "data"  # the sample clickstreams that sit beside the checkout


def needs_shared_data(test):  # type: ignore[no-untyped-def]
    """Skip a test that reads the sample clickstreams when the checkout has no ../shared/data beside it."""
    import pytest

    reason = f"no sample clickstreams at {SHARED_DATA} (../shared/data beside the checkout)"
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=reason)(test)
