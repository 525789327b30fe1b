"""The fronts MAP is measured against: a grid of evaluated merges (dense, it is the ground truth; coarse,
a baseline at MAP's budget), and task arithmetic with one shared coefficient, theta_0 + c sum_n tau_n."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .evaluation import Evaluations, Objective, evaluations
from .front import non_dominated
from .objectives import Metric, check_metrics, table
from .result import FrontResult
from .search import box_grid


def _measured_front(name, ev, C, metrics, bounds, details) -> FrontResult:
    rows = [ev(c) for c in C]
    F = table(rows, metrics)
    evaluated = [{"c": c.tolist(), "metrics": r} for c, r in zip(C, rows)]
    front = [{"c": C[i].tolist(), "predicted": None, "measured": rows[i]} for i in non_dominated(F, metrics)]
    return FrontResult(name, metrics, tuple(bounds), evaluated, front, {}, details)


def grid_front(objective: Objective | Evaluations, metrics: Sequence[Metric], n_vars: int, *, steps: int = 11,
               bounds: tuple[float, float] = (0.0, 1.0)) -> FrontResult:
    """Every merge on a grid of ``steps`` values per coefficient (steps ** n_vars evaluations), and the
    non-dominated ones among them."""
    metrics = check_metrics(metrics)
    ev = evaluations(objective, n_vars, bounds)
    return _measured_front("grid", ev, box_grid(n_vars, steps, bounds), metrics, bounds, {"steps": steps})


def shared_coefficient_front(objective: Objective | Evaluations, metrics: Sequence[Metric], n_vars: int, *,
                             steps: int = 11, bounds: tuple[float, float] = (0.0, 1.0)) -> FrontResult:
    """Task arithmetic with one coefficient for all task vectors: c = (l, ..., l) for ``steps`` values
    of l, and the non-dominated ones among them."""
    metrics = check_metrics(metrics)
    ev = evaluations(objective, n_vars, bounds)
    C = np.repeat(np.linspace(bounds[0], bounds[1], steps)[:, None], n_vars, axis=1)
    return _measured_front("task-arithmetic", ev, C, metrics, bounds, {"steps": steps})
