"""DeltaGrad (Wu, Dobriban, Davidson, ICML 2020): replay the cached trajectory on changed data.

At iteration t the retrained model needs the gradient on the changed batch at its own iterate
w^I_t. DeltaGrad computes it exactly on "explicit" iterations (the first j0, then every T0-th) and
otherwise approximates the old batch's gradient by a Taylor step from the cached one,

    g_old(w^I_t) ~ g_old(w_t) + B_t (w^I_t - w_t),

with B_t the compact L-BFGS approximation (Byrd, Nocedal, Schnabel 1994) built from the last m
pairs (w^I - w, g_old(w^I) - g_old(w)) of the explicit iterations. The removed (or added) rows'
own gradients are always computed exactly and taken out of (or put into) the batch sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ExpungeError
from ..progress import track
from ..train import Workspace, sgd_step
from ..trajectory import Trajectory
from .fitted import FitMixin


class LBFGSHessian:
    """Compact L-BFGS Hessian approximation B = sigma I - W^T M^-1 W from the last m pairs."""

    def __init__(self, m: int):
        self.m = m
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._W = self._Minv = None
        self._sigma = 0.0

    def __len__(self) -> int:
        return len(self.pairs)

    def push(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Keep the pair if it satisfies the curvature condition s^T y > 0 (else it would make B
        indefinite); drop the oldest beyond m and rebuild the small middle matrix."""
        sy = float(s @ y)
        if not sy > 1e-12 * float(s.norm() * y.norm()):
            return False
        self.pairs = (self.pairs + [(s, y)])[-self.m :]
        S = torch.stack([p[0] for p in self.pairs])
        Y = torch.stack([p[1] for p in self.pairs])
        s_last, y_last = self.pairs[-1]
        self._sigma = float(s_last @ y_last) / float(s_last @ s_last)  # B0 = sigma I, as in DeltaGrad
        SY = S @ Y.T  # entries s_i^T y_j
        L = torch.tril(SY, -1)
        D = torch.diag(torch.diagonal(SY))
        M = torch.cat([torch.cat([self._sigma * S @ S.T, L], 1), torch.cat([L.T, -D], 1)], 0)
        self._W = torch.cat([self._sigma * S, Y], 0)
        self._Minv = torch.linalg.inv(M)
        return True

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._sigma * v - self._W.T @ (self._Minv @ (self._W @ v))


@dataclass(frozen=True)
class DeltaGradConfig:
    """``j0``: burn-in iterations computed explicitly; ``T0``: period of explicit iterations after
    it (T0=1 is exact retraining); ``m``: L-BFGS history length."""

    T0: int = 5
    j0: int = 20
    m: int = 2

    def __post_init__(self):
        if self.T0 < 1 or self.j0 < 0 or self.m < 1:
            raise ExpungeError(f"DeltaGrad needs T0 >= 1, j0 >= 0 and m >= 1; got T0={self.T0}, j0={self.j0}, m={self.m}")

    def is_explicit(self, t: int) -> bool:
        return t < self.j0 or (t - self.j0) % self.T0 == 0


def deltagrad(
    ws: Workspace,
    old_active: np.ndarray,
    new_active: np.ndarray,
    old: Trajectory,
    config: DeltaGradConfig = DeltaGradConfig(),
    new: Trajectory | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Update the model trained on ``old_active`` rows to the one trained on ``new_active`` rows.

    Returns the final weights and figures about the run. When ``new`` is given it receives the
    updated trajectory (w^I_t and the changed batch's gradient), so that the next request starts
    from it (online mode).
    """
    plan = ws.plan.iterations(old_active | new_active, ws.ids)
    if len(plan) != len(old):
        raise ExpungeError(
            f"the cached trajectory has {len(old)} iterations but the recipe plans {len(plan)}; "
            "it belongs to another recipe: update with --method retrain to rebuild it"
        )
    gone, came = old_active & ~new_active, new_active & ~old_active
    hessian = LBFGSHessian(config.m)
    w = torch.from_numpy(np.array(old.params[0]))
    explicit = 0
    for t, rows in track(enumerate(plan), len(plan), "deltagrad", progress):
        w_old, g_old = old.at(t)
        in_old, in_new = old_active[rows], new_active[rows]
        n_old, n_new = int(in_old.sum()), int(in_new.sum())
        removed, added = rows[gone[rows]], rows[came[rows]]
        if n_new == 0:  # the changed batch is empty: retraining skips this step too
            if new is not None:
                new.write(t, w, torch.zeros_like(w))
            continue
        if config.is_explicit(t) or len(hessian) == 0 or n_old == 0:
            explicit += 1
            g_kept = ws.grad_sum(w, rows[in_old & in_new])
            if n_old:
                g_old_at_w = (g_kept + ws.grad_sum(w, removed)) / n_old
                hessian.push(w - w_old, g_old_at_w - g_old)
            g_new = (g_kept + ws.grad_sum(w, added)) / n_new
        else:
            g_old_at_w = g_old + hessian.matvec(w - w_old)
            g_new = (n_old * g_old_at_w - ws.grad_sum(w, removed) + ws.grad_sum(w, added)) / n_new
        if new is not None:
            new.write(t, w, g_new)
        w = sgd_step(w, g_new, ws.recipe.lr_at(ws.plan.epoch_of(t)), ws.recipe.weight_decay)
    figures = {
        "kind": "approximate",
        "iterations": len(plan),
        "explicit_iterations": explicit,
        "speedup_bound": len(plan) / max(explicit, 1),
        "T0": config.T0,
        "j0": config.j0,
        "m": config.m,
    }
    return w, figures


class DeltaGrad(FitMixin):
    """The DeltaGrad updater: trains with the trajectory cached, then updates by ``deltagrad``."""

    name = "deltagrad"
    reads_trajectory = True

    def __init__(self, T0: int = 5, j0: int = 20, m: int = 2):
        self.settings = DeltaGradConfig(T0, j0, m)

    def config(self) -> dict:
        return {"T0": self.settings.T0, "j0": self.settings.j0, "m": self.settings.m}

    def update(self, ws, old_active, new_active, w0, old, new, progress=False, w=None):
        if old is None:
            raise ExpungeError("DeltaGrad needs the cached trajectory of the current model; update with --method retrain")
        return deltagrad(ws, old_active, new_active, old, self.settings, new=new, progress=progress)
