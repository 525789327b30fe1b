"""Evaluating merges: c -> merged state -> metrics, counted and cached.

The search methods (map.py) only see a callable c -> {metric: value}. ``merge_objective`` builds it
from task vectors and a state evaluator; ``module_evaluator`` builds a state evaluator from a module
and one scoring function per metric. ``Evaluations`` wraps any such callable so that every distinct c
is evaluated once and counted: the count is the cost the benchmark reports.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExpungeError
from .vectors import State, TaskVectors, check_bounds

Objective = Callable[[np.ndarray], Mapping[str, float]]
StateEvaluator = Callable[[dict[str, torch.Tensor]], Mapping[str, float]]


class Evaluations:
    """A counted, cached objective over coefficient vectors of length ``n_vars`` inside ``bounds``.

    ``records`` lists every distinct evaluation in order as ``{"c": [...], "metrics": {...}}``."""

    def __init__(self, objective: Objective, n_vars: int, bounds: tuple[float, float] = (0.0, 1.0)):
        if n_vars < 1:
            raise ExpungeError("a merge family needs at least one coefficient")
        self.objective, self.n_vars, self.bounds = objective, n_vars, tuple(bounds)
        self.records: list[dict] = []
        self._cache: dict[tuple, dict[str, float]] = {}

    def __call__(self, c) -> dict[str, float]:
        c = check_bounds(c, self.n_vars, self.bounds)
        key = tuple(np.round(c, 12).tolist())
        if key not in self._cache:
            metrics = {str(k): float(v) for k, v in dict(self.objective(c)).items()}
            bad = [k for k, v in metrics.items() if not np.isfinite(v)]
            if bad:
                raise ExpungeError(f"the evaluation at c = {c.tolist()} returned non-finite {bad}")
            self._cache[key] = metrics
            self.records.append({"c": c.tolist(), "metrics": metrics})
        return dict(self._cache[key])

    def __len__(self) -> int:
        return len(self.records)


def evaluations(objective: Objective | Evaluations, n_vars: int, bounds: tuple[float, float]) -> Evaluations:
    """``objective`` itself when it already counts (so several searches can share one budget), else wrapped."""
    if isinstance(objective, Evaluations):
        if objective.n_vars != n_vars:
            raise ExpungeError(f"the evaluations are over {objective.n_vars} coefficient(s), not {n_vars}")
        if tuple(bounds) != objective.bounds:
            raise ExpungeError(f"the evaluations use bounds {objective.bounds}, the search {tuple(bounds)}; use one")
        return objective
    return Evaluations(objective, n_vars, bounds)


def merge_objective(vectors: TaskVectors, evaluate_state: StateEvaluator,
                    bounds: tuple[float, float] = (0.0, 1.0)) -> Objective:
    """c -> metrics of the merged model theta_0 + sum_n c_n tau_n."""
    return lambda c: evaluate_state(vectors.merge(c, bounds))


def module_evaluator(module: nn.Module, scorers: Mapping[str, Callable[[nn.Module], float]]) -> StateEvaluator:
    """A state evaluator that loads each merged state into one private copy of ``module`` (eval mode,
    no gradients) and calls every scorer on it: ``{"mnist": lambda m: accuracy(m, test)}``."""
    if not scorers:
        raise ExpungeError("no scorers given; name at least one metric and the function that computes it")
    work = copy.deepcopy(module).eval()

    def evaluate(state: State) -> dict[str, float]:
        work.load_state_dict(dict(state), strict=True)
        with torch.no_grad():
            return {name: float(score(work)) for name, score in scorers.items()}

    return evaluate
