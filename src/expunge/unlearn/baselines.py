"""The usual forgetting baselines beside Fisher scrubbing: fine-tuning on the remaining rows, and
gradient ascent on the forgotten rows ("negative gradient"). Neither carries a guarantee."""

from __future__ import annotations

import numpy as np

from ..errors import ExpungeError
from ..train import Workspace, sgd_step
from .fitted import FitMixin


def _batches(rows: np.ndarray, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(rows)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class FineTune(FitMixin):
    """``epochs`` of SGD on the remaining rows, from the current weights (lr: the recipe's last)."""

    name = "finetune"
    writes_trajectory = False

    def __init__(self, epochs: int = 1, lr: float | None = None, batch_size: int = 128, seed: int = 0):
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed

    def config(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}

    def update(self, ws: Workspace, old_active, new_active, w0, old, new, progress=False, w=None):
        if w is None:
            raise ExpungeError("fine-tuning starts from the current weights; call it through a run")
        lr = self.lr or ws.recipe.lr_at(ws.recipe.epochs - 1)
        rng = np.random.default_rng(self.seed)
        for _ in range(self.epochs):
            for rows in _batches(np.flatnonzero(new_active), self.batch_size, rng):
                w = sgd_step(w, ws.grad_sum(w, rows) / len(rows), lr, ws.recipe.weight_decay)
        return w, {"kind": "none", "epochs": self.epochs, "lr": lr}


class GradientAscent(FitMixin):
    """Gradient *ascent* on the forgotten rows' loss from the current weights: ``epochs`` passes,
    or ``max_steps`` batches if fewer (ascent diverges if run too long or too fast)."""

    name = "ascent"
    writes_trajectory = False

    def __init__(self, epochs: int = 1, lr: float | None = None, batch_size: int = 32, max_steps: int | None = None,
                 seed: int = 0):
        self.epochs, self.lr, self.batch_size, self.max_steps, self.seed = epochs, lr, batch_size, max_steps, seed

    def config(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "max_steps": self.max_steps,
                "seed": self.seed}

    def update(self, ws: Workspace, old_active, new_active, w0, old, new, progress=False, w=None):
        if w is None:
            raise ExpungeError("gradient ascent starts from the current weights; call it through a run")
        forgotten = np.flatnonzero(old_active[: len(new_active)] & ~new_active)
        if len(forgotten) == 0:
            raise ExpungeError("gradient ascent needs rows to forget; it cannot add rows")
        lr = self.lr or ws.recipe.lr_at(ws.recipe.epochs - 1)
        rng = np.random.default_rng(self.seed)
        batches = [b for _ in range(self.epochs) for b in _batches(forgotten, self.batch_size, rng)]
        for rows in batches[: self.max_steps]:
            w = w + lr * ws.grad_sum(w, rows) / len(rows)
        return w, {"kind": "none", "epochs": self.epochs, "lr": lr, "steps": len(batches[: self.max_steps])}
