"""The exact baseline: retrain from the same initial weights on the changed data, with the same
recipe and the same batch plan minus removed rows (plus added rows). Every other method is
measured against this."""

from __future__ import annotations

import numpy as np
import torch

from ..train import Workspace, train
from ..trajectory import Trajectory
from .fitted import FitMixin


class Retrain(FitMixin):
    name = "retrain"

    def config(self) -> dict:
        return {}

    def update(self, ws: Workspace, old_active: np.ndarray, new_active: np.ndarray, w0: torch.Tensor,
               old: Trajectory | None, new: Trajectory | None, progress: bool = False, w=None):
        w = train(ws, new_active, w0, trajectory=new, progress=progress)
        return w, {"kind": "exact", "iterations": ws.plan.n_iterations}
