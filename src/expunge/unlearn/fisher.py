"""Fisher forgetting (Golatkar, Achille, Soatto, "Eternal Sunshine of the Spotless Net", CVPR 2020).

The weights are scrubbed with noise shaped by the diagonal Fisher information F of the remaining
data: w <- w + (lambda sigma_h^2)^(1/4) F^(-1/4) * n, n ~ N(0, I). Directions the remaining data
pins down (large F) barely move; directions only the forgotten rows cared about (small F) are
drowned. F is the true Fisher (labels from the model's own predictive distribution, one draw per
row, on a sample of the remaining rows), plus the L2 coefficient (the regulariser's curvature), which is
also the floor that keeps the noise finite where F is tiny. ``lam`` below is the product
lambda * sigma_h^2. The Newton variant first takes the step -|H|^-1 grad L_D'(w) with the full
Hessian of the remaining data's loss (|H|: eigenvalues by magnitude, as the Hessian of a deep net
can be indefinite), for models small enough to afford it.

When a request removes every row of a class, the output layer's row for that class is also set to
zero before scrubbing (``drop_removed_classes``), as the authors' code does for class forgetting:
the Fisher of the remaining data says nothing about that row, so noise alone would leave it intact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, vmap

from ..errors import ExpungeError
from ..train import Workspace
from .fitted import FitMixin

NEWTON_MAX_PARAMS = 4000


def diag_fisher(ws: Workspace, w: torch.Tensor, rows: np.ndarray, chunk: int = 64, seed: int = 0) -> torch.Tensor:
    """Mean over ``rows`` of (d log p_y(x) / dw)^2 per coordinate, with y drawn from the model's own
    predictive distribution p(.|x): an unbiased estimate of the true (not empirical) Fisher diagonal,
    at one per-sample gradient per row instead of one per class."""
    flat = ws.flat

    def log_prob(w_, x, onehot):  # log p_y(x), with y given as a one-hot row (vmap cannot index by tensor)
        return (torch.log_softmax(flat.logits(w_, x[None]), 1)[0] * onehot).sum()

    per_row = vmap(grad(log_prob), in_dims=(None, 0, 0))
    generator = torch.Generator().manual_seed(seed)
    fisher = torch.zeros_like(w)
    for i in range(0, len(rows), chunk):
        X, _ = ws.batch(rows[i : i + chunk])
        with torch.no_grad():
            probs = torch.softmax(flat.logits(w, X), 1)
        y = torch.multinomial(probs, 1, generator=generator)[:, 0]
        g = per_row(w, X, torch.nn.functional.one_hot(y, probs.shape[1]).to(w.dtype))
        fisher += (g * g).sum(0)
    return fisher / max(len(rows), 1)


class Fisher(FitMixin):
    """Fisher scrubbing of the model trained on the remaining rows' neighbourhood.

    ``lam``: lambda * sigma_h^2 (0 leaves the weights unchanged); ``fisher_rows``: remaining rows
    sampled to estimate F; ``newton``: take the Newton step on the remaining data first."""

    name = "fisher"
    writes_trajectory = False

    def __init__(self, lam: float = 1e-9, fisher_rows: int = 1000, newton: bool = False,
                 drop_removed_classes: bool = True, seed: int = 0):
        if not lam >= 0:
            raise ExpungeError(f"lam (lambda * sigma_h^2) must be >= 0, got {lam}")
        self.lam, self.fisher_rows, self.newton, self.seed = lam, fisher_rows, newton, seed
        self.drop_removed_classes = drop_removed_classes

    def config(self) -> dict:
        return {"lam": self.lam, "fisher_rows": self.fisher_rows, "newton": self.newton,
                "drop_removed_classes": self.drop_removed_classes, "seed": self.seed}

    def noise_std(self, fisher: torch.Tensor, weight_decay: float) -> torch.Tensor:
        """(lam)^(1/4) (F + lambda_L2)^(-1/4), with F floored at 1e-8 where there is no L2 term."""
        return self.lam**0.25 * (fisher + max(weight_decay, 1e-8)) ** -0.25

    def update(self, ws: Workspace, old_active, new_active, w0, old, new, progress=False, w=None):
        if w is None:
            raise ExpungeError("Fisher forgetting scrubs the current weights; call it through a run")
        remaining = np.flatnonzero(new_active)
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(remaining, min(self.fisher_rows, len(remaining)), replace=False))
        w = w.clone()
        gone = self._removed_classes(ws, old_active, new_active) if self.drop_removed_classes else []
        if gone:
            w = self._zero_output_rows(ws, w, gone)
        if self.newton:
            w = w - self._newton_step(ws, w, remaining)
        fisher = diag_fisher(ws, w, sample, seed=self.seed)
        std = self.noise_std(fisher, ws.recipe.weight_decay)
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(self.seed), dtype=w.dtype)
        scrubbed = w + std * noise if self.lam > 0 else w
        return scrubbed, {"kind": "scrubbed", "lam": self.lam, "fisher_rows": len(sample), "newton": self.newton,
                          "classes_dropped": gone,
                          "noise_norm": float((scrubbed - w).norm()), "mean_noise_std": float(std.mean())}

    @staticmethod
    def _removed_classes(ws: Workspace, old_active, new_active) -> list[int]:
        """Classes the request removes completely (present before, absent after)."""
        y = ws.y.numpy()
        before, after = set(y[old_active[: len(y)]].tolist()), set(y[new_active].tolist())
        return sorted(int(k) for k in before - after)

    @staticmethod
    def _zero_output_rows(ws: Workspace, w: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """Zero the last layer's weight row and bias of each class (the layer whose first dimension
        is the number of classes)."""
        chunks = list(torch.split(w.clone(), ws.flat.sizes))
        n_classes = ws.flat.shapes[-1][0]
        for i in (len(chunks) - 2, len(chunks) - 1):  # the output layer's weight and bias
            shape = ws.flat.shapes[i]
            if shape[0] == n_classes:
                view = chunks[i].view(shape)
                view[classes] = 0
        return torch.cat(chunks)

    def _newton_step(self, ws: Workspace, w: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        if ws.flat.n_params > NEWTON_MAX_PARAMS:
            raise ExpungeError(f"the Newton variant builds the full {ws.flat.n_params}x{ws.flat.n_params} Hessian; "
                               f"it is for models of at most {NEWTON_MAX_PARAMS} parameters (use newton=False)")
        X, y = ws.batch(rows)
        decay = ws.recipe.weight_decay

        def objective(w_):
            loss = torch.nn.functional.cross_entropy(ws.flat.logits(w_, X), y)
            return loss + decay / 2 * (w_ * w_).sum()

        g = torch.autograd.functional.jacobian(objective, w)
        H = torch.autograd.functional.hessian(objective, w)
        # a deep net's Hessian can be indefinite: step with |H| (eigenvalues' magnitudes, floored at the
        # L2 coefficient), so the step goes downhill in every direction instead of towards a saddle
        values, vectors = torch.linalg.eigh((H + H.T) / 2)
        step = vectors @ ((vectors.T @ g) / values.abs().clamp_min(max(decay, 1e-6)))
        with torch.no_grad():  # backtrack: far from a quadratic bowl the full step can overshoot
            start = objective(w)
            for _ in range(30):
                if objective(w - step) < start:
                    break
                step = step / 2
        return step
