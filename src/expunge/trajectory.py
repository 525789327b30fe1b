"""The cached training trajectory DeltaGrad replays: w_t and g_t for every iteration t.

``g_t`` is the mean gradient of the data loss over iteration t's batch at ``w_t`` (the L2 term is
left out: update methods add it exactly). Both live in .npy files opened memory-mapped, so a long
trajectory is read from disk an iteration at a time instead of sitting in RAM. ``rates`` holds the learning rate
applied at each iteration (``rates.npy``; the recipe's schedule, or GeN's rates in an ``--lr auto`` run);
trajectories written before it was recorded have none (``rates`` is None).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import ExpungeError

FILES = ("params.npy", "grads.npy")
RATES = "rates.npy"


class Trajectory:
    def __init__(self, params: np.ndarray, grads: np.ndarray, folder: Path | None = None,
                 rates: np.ndarray | None = None):
        self.params, self.grads, self.folder, self.rates = params, grads, folder, rates

    @classmethod
    def create(cls, folder, n_iterations: int, n_params: int, dtype) -> "Trajectory":
        """A writable trajectory on disk (``folder``) or, with ``folder=None``, in memory."""
        np_dtype = np.float64 if dtype in (torch.float64, "float64") else np.float32
        shape = (n_iterations, n_params)
        if folder is None:
            return cls(np.zeros(shape, np_dtype), np.zeros(shape, np_dtype), rates=np.zeros(n_iterations))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = [np.lib.format.open_memmap(folder / f, "w+", np_dtype, shape) for f in FILES]
        rates = np.lib.format.open_memmap(folder / RATES, "w+", np.float64, (n_iterations,))
        return cls(*arrays, folder, rates)

    @classmethod
    def open(cls, folder) -> "Trajectory":
        folder = Path(folder)
        arrays = []
        for name in FILES:
            try:
                arrays.append(np.load(folder / name, mmap_mode="r"))
            except (OSError, ValueError, EOFError) as e:
                raise ExpungeError(
                    f"trajectory file {folder / name} is missing or truncated ({e}); "
                    "update with --method retrain, which rebuilds the trajectory"
                ) from e
        if arrays[0].shape != arrays[1].shape:
            raise ExpungeError(
                f"trajectory in {folder} is inconsistent: params {arrays[0].shape} vs grads {arrays[1].shape}; "
                "update with --method retrain, which rebuilds it"
            )
        rates = None
        if (folder / RATES).exists():
            try:
                rates = np.load(folder / RATES, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise ExpungeError(f"trajectory file {folder / RATES} is truncated ({e}); update with --method "
                                   "retrain, which rebuilds it") from e
            if rates.shape != arrays[0].shape[:1]:
                raise ExpungeError(f"trajectory in {folder} is inconsistent: {len(rates)} rates for "
                                   f"{len(arrays[0])} iterations; update with --method retrain, which rebuilds it")
        return cls(*arrays, folder, rates)

    def __len__(self) -> int:
        return len(self.params)

    def write(self, t: int, w: torch.Tensor, g: torch.Tensor, lr: float | None = None) -> None:
        self.params[t] = w.detach().cpu().numpy()
        self.grads[t] = g.detach().cpu().numpy()
        if lr is not None and self.rates is not None:
            self.rates[t] = lr

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.params[t])), torch.from_numpy(np.array(self.grads[t]))

    def flush(self) -> None:
        """Push a disk trajectory to stable storage (flush the maps, then fsync the files)."""
        if self.folder is None:
            return
        pairs = list(zip((self.params, self.grads), FILES)) + ([(self.rates, RATES)] if self.rates is not None else [])
        for arr, name in pairs:
            if isinstance(arr, np.memmap):
                arr.flush()
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
