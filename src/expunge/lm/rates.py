"""Step rates: how far an unlearning step moves along its base optimizer's update.

The update loop (unlearning.py) lets the base optimizer (AdamW or SGD) take its step at the current rate
``lr``; the step it took, divided by ``lr``, is the update per unit rate ``u`` (AdamW and SGD with momentum
are linear in the rate given their state). A rate rule then picks the rate actually used:

    rule(update, loss_along, lr) -> rate       # the weights become theta_0 + rate * u

``update`` is the list of tensors u (one per trainable parameter); ``loss_along(eta)`` evaluates the chosen
loss at theta_0 + eta * u (no gradients; the model is restored afterwards). The rate returned is also the
``lr`` of the next step. A rule may ignore either argument.

- ``fixed_rate``: the optimizer's own step (no extra forward pass).
- ``QuadraticFitRate``: a three-point fit, the finite-difference form of GeN (Bu & Xu 2024, "Automatic
  gradient descent with generalized Newton's method"): with L0 = loss_along(0), L+ = loss_along(lr),
  L- = loss_along(-lr), the parabola through them has its minimum at ``lr * (L- - L+) / (2 (L+ - 2 L0 + L-))``.
  When the curvature is not positive (or not finite) the fit has no minimum and the rate is kept; the
  factor by which one step may change the rate is bounded by ``max_factor`` (the fit extrapolates). No
  smoothing: on SmolLM2 it doubled NGDiff's rate step after step, from 2e-4 to 1.2e-2 in 10 steps, and the
  model lost its answers (the run of commit 3f28ee4); prefer ``gen``, NGDiff's default.
- ``GeNRate`` (``gen``): GeN's own decision (expunge.optim.gen.fit_rate: a descent direction, curvature above
  the loss's floating-point resolution) and its smoothed update of the rate, eta <- s eta + (1 - s)
  clip(eta*, eta/c, c eta) with s = 0.9 and c = 2 as in the paper (at most x1.1 a step); an estimate that is
  not accepted keeps the rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ExpungeError

RateRule = Callable[[Sequence[torch.Tensor], Callable[[float], float], float], float]


def fixed_rate(update, loss_along, lr: float) -> float:
    """Keep the optimizer's rate."""
    return lr


fixed_rate.evaluates_loss = False  # the loop skips staging the step when the rule never looks at the loss


class QuadraticFitRate:
    """The minimum of the parabola through the loss at -lr, 0 and +lr along the update (see the module
    docstring); the rate changes by at most ``max_factor`` (and at least ``1/max_factor``) per step."""

    evaluates_loss = True

    def __init__(self, max_factor: float = 2.0):
        if not (math.isfinite(max_factor) and max_factor >= 1):
            raise ExpungeError(f"max_factor must be a finite number >= 1, got {max_factor}")
        self.max_factor = float(max_factor)

    def __call__(self, update, loss_along, lr: float) -> float:
        l0, plus, minus = loss_along(0.0), loss_along(lr), loss_along(-lr)
        curvature = plus - 2 * l0 + minus
        if not (math.isfinite(curvature) and curvature > 0 and math.isfinite(plus - minus)):
            return lr
        factor = (minus - plus) / (2 * curvature)
        return lr * min(max(factor, 1 / self.max_factor), self.max_factor)

    def __repr__(self) -> str:
        return f"QuadraticFitRate(max_factor={self.max_factor})"


class GeNRate:
    """GeN's rate along the step (see the module docstring): fit_rate on the loss at -lr, 0, +lr, then the smoothed,
    clipped move towards the accepted estimate."""

    evaluates_loss = True

    def __init__(self, smoothing: float = 0.9, clip: float = 2.0):
        if not 0 <= smoothing < 1:
            raise ExpungeError(f"smoothing must be in [0, 1), got {smoothing}")
        if not (math.isfinite(clip) and clip > 1):
            raise ExpungeError(f"clip must be a finite number > 1, got {clip}")
        self.smoothing, self.clip = float(smoothing), float(clip)

    def __call__(self, update, loss_along, lr: float) -> float:
        from ..optim.gen import ROUNDING, fit_rate

        losses = np.array([loss_along(-lr), loss_along(0.0), loss_along(lr)])
        finite = np.abs(losses[np.isfinite(losses)])
        noise = ROUNDING * np.finfo(np.float32).eps * (float(finite.max()) if finite.size else 1.0)
        fit = fit_rate([-1.0, 0.0, 1.0], losses, noise, clip=self.clip)
        if not fit.accepted:
            return lr
        proposal = lr * min(max(fit.ratio, 1 / self.clip), self.clip)
        return self.smoothing * lr + (1 - self.smoothing) * proposal

    def __repr__(self) -> str:
        return f"GeNRate(smoothing={self.smoothing}, clip={self.clip})"


RATE_RULES: dict[str, Callable[[], RateRule]] = {"fixed": lambda: fixed_rate, "quadratic": QuadraticFitRate,
                                                 "gen": GeNRate}


def rate_rule(spec: str | RateRule) -> RateRule:
    """A rule by name (``fixed``, ``quadratic``) or the callable itself."""
    if callable(spec):
        return spec
    if spec not in RATE_RULES:
        raise ExpungeError(f"unknown rate rule {spec!r}; choose one of {', '.join(RATE_RULES)} (or pass a callable)")
    return RATE_RULES[spec]()
