"""Where MAP evaluates merges: the one-hot points (each fine-tuned model alone) plus a space-filling
set in the coefficient box (a scrambled Sobol sequence, scipy.stats.qmc)."""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

from ..errors import ExpungeError
from .surrogate import n_coefficients


def default_points(n_vars: int) -> int:
    """About twice the number of surrogate coefficients, as MAP prescribes."""
    return 2 * n_coefficients(n_vars)


def default_heldout(points: int) -> int:
    """Held-out points for the surrogates' R^2: a quarter of the design, at least 2."""
    return max(2, -(-points // 4))


def space_filling(n: int, n_vars: int, bounds: tuple[float, float], seed: int) -> np.ndarray:
    """``n`` points spread over [lo, hi]^n_vars: the first n of a scrambled Sobol sequence (seeded)."""
    if n <= 0:
        return np.zeros((0, n_vars))
    lo, hi = bounds
    sobol = qmc.Sobol(d=n_vars, scramble=True, rng=np.random.default_rng(seed))
    unit = sobol.random_base2(int(np.ceil(np.log2(n))))[:n]
    return lo + (hi - lo) * unit


def one_hot_points(n_vars: int, bounds: tuple[float, float]) -> np.ndarray:
    """e_1..e_T when the box holds them (lo <= 0 and hi >= 1), else none."""
    lo, hi = bounds
    return np.eye(n_vars) if lo <= 0 <= 1 <= hi else np.zeros((0, n_vars))


def design_points(n_vars: int, points: int | None = None, bounds: tuple[float, float] = (0.0, 1.0),
                  seed: int = 0) -> np.ndarray:
    """The one-hot points, then space-filling points up to ``points`` in all."""
    points = default_points(n_vars) if points is None else int(points)
    needed = n_coefficients(n_vars)
    if points < needed:
        raise ExpungeError(f"{points} design point(s) cannot fit a full quadratic in {n_vars} coefficient(s), "
                           f"which has {needed} parameters; use at least {needed} (MAP's default is {2 * needed})")
    corners = one_hot_points(n_vars, bounds)
    return np.vstack([corners, space_filling(points - len(corners), n_vars, bounds, seed)])
