"""The reference trainer: (mini-batch) gradient descent on a flat parameter vector.

Each iteration t takes the batch the plan gives, computes the mean data-loss gradient g_t at w_t
and steps w_{t+1} = w_t - lr_t (g_t + lambda w_t). When a trajectory is passed it records (w_t, g_t),
which is all DeltaGrad needs. Exact retraining is this same function on the changed data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models import FlatModel
from .progress import track
from .recipe import BatchPlan, TrainRecipe
from .trajectory import Trajectory


@dataclass
class Workspace:
    """Everything training and updates need in memory: the row universe as tensors, the model,
    the recipe and the plan. Rows 0..n_base-1 are the original training set."""

    flat: FlatModel
    recipe: TrainRecipe
    plan: BatchPlan
    X: torch.Tensor
    y: torch.Tensor
    ids: np.ndarray

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows)
        return self.X.index_select(0, index), self.y.index_select(0, index)

    def grad_sum(self, w: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return self.flat.grad_sum(w, *self.batch(rows)) if len(rows) else torch.zeros_like(w)


def sgd_step(w: torch.Tensor, g_mean: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    return w - lr * (g_mean + weight_decay * w)


def train(
    ws: Workspace,
    active: np.ndarray,
    w0: torch.Tensor,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Train from ``w0`` on the active rows following the plan; return the final weights."""
    w = w0.clone()
    plan = ws.plan.iterations(active, ws.ids)
    for t, rows in track(enumerate(plan), len(plan), "training", progress):
        if len(rows) == 0:  # every row of this batch was deleted: the step is skipped
            g = torch.zeros_like(w)
        else:
            g = ws.grad_sum(w, rows) / len(rows)
        if trajectory is not None:
            trajectory.write(t, w, g)
        if len(rows):
            w = sgd_step(w, g, ws.recipe.lr_at(ws.plan.epoch_of(t)), ws.recipe.weight_decay)
    return w
