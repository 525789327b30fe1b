"""Where the real datasets live for the slow end-to-end tests: ../shared/data beside the checkout,
or $EXPUNGE_DATA. Tests that need a file skip with the reason when it is absent."""

import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("EXPUNGE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def needs(relative: str):
    """Marks a test slow, and skips it when ``DATA/relative`` is missing."""
    path = DATA / relative
    return [pytest.mark.slow,
            pytest.mark.skipif(not path.exists(), reason=f"{path} not found (set EXPUNGE_DATA to the shared data folder)")]
