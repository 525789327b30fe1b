"""Searching the surrogates for the predicted Pareto front.

``nsga2`` / ``nsga3``: pymoo's evolutionary multi-objective algorithms on the surrogates (cheap to
evaluate, so a few hundred generations cost little). ``grid``: a dense grid over the coefficient box
and pymoo's non-dominated filter, exact up to the grid's resolution, for a few coefficients only.
``auto``: the grid for up to 3 coefficients, else NSGA-II for up to 3 metrics and NSGA-III beyond
(NSGA-III's reference directions spread points evenly on many objectives, but leave gaps where a
front is flat in one metric, as accuracy fronts are near each fine-tuned model; NSGA-II's crowding
distance does not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import comb

import numpy as np

from ..errors import ExpungeError
from .front import non_dominated
from .objectives import Metric, signs

SEARCHES = ("auto", "grid", "nsga2", "nsga3")
GRID_MAX_POINTS = 200_000


def grid_resolution(n_vars: int) -> int:
    """Points per axis of the dense surrogate grid: at most GRID_MAX_POINTS in all (and 2001 per axis)."""
    return int(min(2001, np.floor(GRID_MAX_POINTS ** (1 / n_vars) + 1e-9)))


def box_grid(n_vars: int, per_axis: int, bounds: tuple[float, float]) -> np.ndarray:
    axis = np.linspace(bounds[0], bounds[1], per_axis)
    return np.stack(np.meshgrid(*([axis] * n_vars), indexing="ij"), -1).reshape(-1, n_vars)


def _partitions(n_obj: int, target: int = 100) -> int:
    """The fewest Das-Dennis partitions giving at least ``target`` reference directions."""
    p = 1
    while comb(p + n_obj - 1, n_obj - 1) < target:
        p += 1
    return p


def search_front(predict: Callable[[np.ndarray], np.ndarray], metrics: Sequence[Metric], n_vars: int,
                 bounds: tuple[float, float] = (0.0, 1.0), method: str = "auto", seed: int = 0,
                 generations: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(C, F): the non-dominated coefficient vectors of the predicted metrics ``predict(C)`` (rows:
    points, columns: metrics in the order of ``metrics``) and their predicted values."""
    if method not in SEARCHES:
        raise ExpungeError(f"unknown search {method!r}; choose one of {', '.join(SEARCHES)}")
    if len(metrics) < 2:
        raise ExpungeError("a Pareto front needs at least two metrics to trade off")
    if method == "auto":
        method = "grid" if n_vars <= 3 else ("nsga2" if len(metrics) <= 3 else "nsga3")
    if method == "grid":
        per_axis = grid_resolution(n_vars)
        if per_axis < 5:
            raise ExpungeError(f"a grid over {n_vars} coefficients would be too coarse; use search='nsga3'")
        C = box_grid(n_vars, per_axis, bounds)
        F = predict(C)
        keep = non_dominated(F, metrics)
        return C[keep], F[keep]

    from pymoo.core.problem import Problem
    from pymoo.optimize import minimize

    sign = signs(metrics)

    class Surrogates(Problem):
        def __init__(self):
            super().__init__(n_var=n_vars, n_obj=len(metrics), xl=np.full(n_vars, bounds[0]),
                             xu=np.full(n_vars, bounds[1]))

        def _evaluate(self, x, out, *args, **kwargs):
            out["F"] = predict(x) * sign

    if method == "nsga3":
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.util.ref_dirs import get_reference_directions

        directions = get_reference_directions("das-dennis", len(metrics), n_partitions=_partitions(len(metrics)))
        algorithm = NSGA3(ref_dirs=directions, pop_size=len(directions) + (-len(directions)) % 4)
    else:
        from pymoo.algorithms.moo.nsga2 import NSGA2

        algorithm = NSGA2(pop_size=100)
    result = minimize(Surrogates(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    C = np.atleast_2d(result.X).reshape(-1, n_vars)
    F = predict(C)
    keep = non_dominated(F, metrics)
    return C[keep], F[keep]
