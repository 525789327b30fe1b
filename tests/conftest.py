import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N runs N worker processes side by side: one intra-op thread each keeps them from stalling on each
    # other's threads (see one_thread)
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One intra-op thread, as the benchmarks train: tiny models run fastest on one, and on shared cores two
    threads can run many times slower (each small product waits for the slower thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
