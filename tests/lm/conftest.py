import importlib.util

import pytest
import torch

# expunge.lm needs the `lm` extra (transformers, tokenizers, peft, gguf); without it there is nothing to test here
missing = [m for m in ("transformers", "tokenizers", "peft", "gguf") if importlib.util.find_spec(m) is None]
collect_ignore_glob = ["test_*.py"] if missing else []


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on shared cores a second one mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
