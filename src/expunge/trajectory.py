"""The cached training trajectory DeltaGrad replays: w_t and g_t for every iteration t.

``g_t`` is the mean gradient of the data loss over iteration t's batch at ``w_t`` (the L2 term is
left out: update methods add it exactly). Both live in .npy files opened memory-mapped, so a long
trajectory is read from disk an iteration at a time instead of sitting in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import ExpungeError

FILES = ("params.npy", "grads.npy")


class Trajectory:
    def __init__(self, params: np.ndarray, grads: np.ndarray, folder: Path | None = None):
        self.params, self.grads, self.folder = params, grads, folder

    @classmethod
    def create(cls, folder, n_iterations: int, n_params: int, dtype) -> "Trajectory":
        """A writable trajectory on disk (``folder``) or, with ``folder=None``, in memory."""
        np_dtype = np.float64 if dtype in (torch.float64, "float64") else np.float32
        shape = (n_iterations, n_params)
        if folder is None:
            return cls(np.zeros(shape, np_dtype), np.zeros(shape, np_dtype))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = [np.lib.format.open_memmap(folder / f, "w+", np_dtype, shape) for f in FILES]
        return cls(*arrays, folder)

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
        return cls(*arrays, folder)

    def __len__(self) -> int:
        return len(self.params)

    def write(self, t: int, w: torch.Tensor, g: torch.Tensor) -> None:
        self.params[t] = w.detach().cpu().numpy()
        self.grads[t] = g.detach().cpu().numpy()

    def at(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.params[t])), torch.from_numpy(np.array(self.grads[t]))

    def flush(self) -> None:
        """Push a disk trajectory to stable storage (flush the maps, then fsync the files)."""
        if self.folder is None:
            return
        for arr, name in zip((self.params, self.grads), FILES):
            if isinstance(arr, np.memmap):
                arr.flush()
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
