import importlib.util

import pytest

# expunge.lm needs the `lm` extra (transformers, tokenizers, peft, gguf); without it there is nothing to test here
missing = [m for m in ("transformers", "tokenizers", "peft", "gguf") if importlib.util.find_spec(m) is None]
collect_ignore_glob = ["test_*.py"] if missing else []


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (the fixture is in tests/conftest.py)."""
