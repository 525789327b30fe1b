"""Reproducibility: seeded blocks that leave the caller's random state alone, and deterministic kernels.

Exact retraining compares weights bit for bit, so everything random in training (initial weights, LoRA
adapters, dropout masks) is drawn inside ``seeded(...)`` from a seed the recipe fixes, and training runs
under ``deterministic()``. On CPU, torch's kernels give the same bits for the same inputs and thread count;
on CUDA, deterministic algorithms also need ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which ``deterministic()`` sets
when it is unset (it counts only if cuBLAS has not started yet in the process).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's generators (CPU and every visible GPU) seeded; restore them afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def step_seed(seed: int, step: int) -> int:
    """A seed for one step of training, independent of what earlier steps drew (a removed row changes the
    shapes, and so the draws, of its own step only)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def deterministic():
    """Deterministic torch algorithms for the block (warn, rather than fail, where an op has none)."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts; no effect on CPU
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextlib.contextmanager
def num_threads(threads: int | None):
    """Run the block on ``threads`` CPU threads (None: as they are), restoring the count afterwards: CPU kernels
    sum in an order that depends on it, so exact retraining uses the thread count the run was trained with."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
