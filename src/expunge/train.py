"""The reference trainer: (mini-batch) gradient descent on a flat parameter vector.

Each iteration t takes the batch the plan gives, computes the mean data-loss gradient g_t at w_t
and steps w_{t+1} = w_t - lr_t (g_t + lambda w_t). When a trajectory is passed it records (w_t, g_t),
which is all DeltaGrad needs. Exact retraining is this same function on the changed data.

With ``recipe.lr_auto`` (``expunge train --lr auto``) the rate lr_t is GeN's (``expunge.optim.GeN`` around
``torch.optim.SGD`` with the same step): every ``recipe.lr_every`` iterations it probes the objective (mean loss
plus lambda/2 |w|^2) along the step on iteration t's batch of ``plan.probes()``, a second deterministic batch plan
of the same rows. The rates are then a function of the active rows alone: a removed row leaves a hole in its
probe batch as in its training batch, so retraining after a deletion reproduces exactly the rates (and weights)
of training from scratch on the remaining rows, and the rates never carry a removed row's influence. The applied
rates are recorded in the trajectory (``Trajectory.rates``). DeltaGrad replays a fixed schedule, which GeN's
rates after a deletion are not, so such runs are updated by exact retraining.

The LM trainer (``expunge.lm.train_lm``, ``expunge train --task lm --lr auto``) takes the same rate the same
way: GeN around its optimizer, probing on its batch plan's probe stream with dropout off (expunge.lm.train).
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


class AutoRate:
    """GeN's rate for the reference trainer: ``step(t, w, g)`` takes iteration t's SGD step at GeN's rate."""

    def __init__(self, ws: Workspace, active: np.ndarray, w0: torch.Tensor):
        import torch.nn.functional as F

        from .optim import GeN

        self.ws, self.probes = ws, ws.plan.probes().iterations(active, ws.ids)
        self.w = torch.nn.Parameter(w0.clone())
        self.t = 0
        optimizer = torch.optim.SGD([self.w], lr=ws.recipe.lr, weight_decay=ws.recipe.weight_decay)

        def probe():  # the objective on iteration t's probe batch, at the weights GeN moves
            X, y = ws.batch(self.probes[self.t])
            return lambda: (F.cross_entropy(ws.flat.logits(self.w, X), y)
                            + 0.5 * ws.recipe.weight_decay * (self.w * self.w).sum())

        self.gen = GeN(optimizer, probe=probe, every=ws.recipe.lr_every)

    @property
    def lr(self) -> float:
        return self.gen.lr

    def step(self, t: int, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.t = t
        with torch.no_grad():
            self.w.copy_(w)
        self.w.grad = g.clone()
        self.gen.step()
        return self.w.detach().clone(), self.gen.rates[-1]


def train(
    ws: Workspace,
    active: np.ndarray,
    w0: torch.Tensor,
    trajectory: Trajectory | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Train from ``w0`` on the active rows following the plan; return the final weights. The trajectory, when
    passed, records w_t, g_t and the rate applied at t (the current one where a batch lost all its rows)."""
    w = w0.clone()
    plan = ws.plan.iterations(active, ws.ids)
    auto = AutoRate(ws, active, w0) if ws.recipe.lr_auto else None
    for t, rows in track(enumerate(plan), len(plan), "training", progress):
        if len(rows) == 0:  # every row of this batch was deleted: the step is skipped
            g = torch.zeros_like(w)
        else:
            g = ws.grad_sum(w, rows) / len(rows)
        w_t, lr = w, (auto.lr if auto is not None else ws.recipe.lr_at(ws.plan.epoch_of(t)))
        if len(rows):
            if auto is not None:
                w, lr = auto.step(t, w, g)
            else:
                w = sgd_step(w, g, lr, ws.recipe.weight_decay)
        if trajectory is not None:
            trajectory.write(t, w_t, g, lr)
    return w
