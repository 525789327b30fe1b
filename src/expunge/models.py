"""The small model zoo, and FlatModel: any nn.Module seen as a function of one flat vector.

Update methods (DeltaGrad, retraining) work on the flat parameter vector w; FlatModel computes
the loss and its gradient at any w without touching the module's own parameters.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.func import functional_call

from .errors import ExpungeError
from .recipe import TrainRecipe

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(recipe: TrainRecipe, n_features: int, n_classes: int) -> nn.Module:
    """Logistic regression (multinomial) starts at zero, as convex problems usually do; the MLP
    starts from PyTorch's default initialisation seeded by the recipe."""
    dtype = DTYPES[recipe.dtype]
    if recipe.model == "logreg":
        model = nn.Linear(n_features, n_classes, dtype=dtype)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(recipe.seed)
    try:
        if recipe.model == "cnn":
            return small_cnn(n_features, n_classes, dtype)
        layers, width = [], n_features
        for h in recipe.hidden:
            layers += [nn.Linear(width, h, dtype=dtype), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, n_classes, dtype=dtype))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)


def small_cnn(n_features: int, n_classes: int, dtype=torch.float32) -> nn.Module:
    """Two 3x3 conv layers with max-pooling and a linear head, for square one-channel images given
    as flat rows (MNIST, Fashion-MNIST, digits)."""
    side = int(round(n_features**0.5))
    if side * side != n_features or side < 4:
        raise ExpungeError(f"the cnn takes square one-channel images of at least 4x4 as flat rows; {n_features} features "
                           "are not one (use logreg or mlp)")
    return nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, 8, 3, padding=1, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (side // 4) ** 2, n_classes, dtype=dtype),
    )


class FlatModel:
    """Wraps a module so that losses and gradients are functions of a flat parameter vector."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.dtype = next(module.parameters()).dtype
        self.n_params = sum(self.sizes)

    def get_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).clone()

    def set_flat(self, w: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            for p, chunk in zip(self.module.parameters(), torch.split(w, self.sizes)):
                p.copy_(chunk.view_as(p))
        return self.module

    def _params(self, w: torch.Tensor) -> dict:
        return {n: c.view(s) for n, c, s in zip(self.names, torch.split(w, self.sizes), self.shapes)}

    def logits(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self._params(w), (X,))

    def grad_sum(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of the summed cross-entropy over the rows (X, y) at w (no regulariser)."""
        if len(y) == 0:
            return torch.zeros_like(w)
        w = w.detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(self.logits(w, X), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, w)
        return g

    @torch.no_grad()
    def predict(self, w: torch.Tensor, X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        return torch.cat([self.logits(w, X[i : i + chunk]).argmax(1) for i in range(0, len(X), chunk)])


def weights_hash(w: torch.Tensor) -> str:
    """SHA-256 of a flat weight vector's bytes, for reports and the ledger (whole: a hash cut short would let
    someone prepare two models that share it)."""
    return hashlib.sha256(w.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
