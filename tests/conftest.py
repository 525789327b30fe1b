import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread, as the benchmarks train: tiny models run fastest on one, and on shared cores two
    threads can run many times slower (each small product waits for the slower thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
