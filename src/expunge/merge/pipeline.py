"""One call from task vectors to a front, and from a front to a merged model: what `expunge merge` runs.

``find_front(vectors, evaluate_state, metrics, method)`` with method one of
  map, bayesian-map, nested-map     MAP and its variants on the plain task vectors;
  ties, dare                        MAP on TIES- or DARE-processed task vectors;
  grid, task-arithmetic             the evaluated baselines.
``materialise(vectors, result, preferences)`` picks the front point the preferences favour and returns
the merged state dict, processing the plain vectors as the front's method did (TIES, DARE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import ExpungeError
from .baselines import grid_front, shared_coefficient_front
from .evaluation import StateEvaluator, merge_objective
from .map import bayesian_map_front, map_front, nested_map_front
from .objectives import Metric
from .result import FrontResult
from .ties_dare import dare, ties
from .vectors import TaskVectors

METHODS = ("map", "bayesian-map", "nested-map", "ties", "dare", "grid", "task-arithmetic")


def process(vectors: TaskVectors, method: str, density: float = 0.2, p: float = 0.5, seed: int = 0) -> TaskVectors:
    """The vectors ``method`` merges: TIES- or DARE-processed for those methods, else unchanged."""
    if method == "ties":
        return ties(vectors, density)
    if method == "dare":
        return dare(vectors, p, seed)
    return vectors


def find_front(vectors: TaskVectors, evaluate_state: StateEvaluator, metrics: Sequence[Metric], method: str = "map", *,
               bounds: tuple[float, float] = (0.0, 1.0), points: int | None = None, steps: int = 11,
               preferences: Mapping[str, float] | None = None, density: float = 0.2, p: float = 0.5,
               search: str = "auto", seed: int = 0) -> FrontResult:
    """The front of ``method`` over merges of ``vectors``; ``details["vectors"]`` records the (processed)
    task vectors' names, hashes and norms. ``steps``: per-coefficient grid size of the grid methods;
    ``preferences``: used by nested MAP while it merges (the others pick only in ``materialise``)."""
    if method not in METHODS:
        raise ExpungeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    merged = process(vectors, method, density, p, seed)
    objective = merge_objective(merged, evaluate_state, bounds)
    n = len(merged)
    if method in ("map", "ties", "dare"):
        result = map_front(objective, metrics, n, points=points, bounds=bounds, search=search, seed=seed)
    elif method == "bayesian-map":
        result = bayesian_map_front(objective, metrics, n, points=points, bounds=bounds, search=search, seed=seed)
    elif method == "nested-map":
        result = nested_map_front(objective, metrics, n, preferences=preferences, points=points, bounds=bounds,
                                  search=search, seed=seed)
    elif method == "grid":
        result = grid_front(objective, metrics, n, steps=steps, bounds=bounds)
    else:
        result = shared_coefficient_front(objective, metrics, n, steps=steps, bounds=bounds)
    result.method = method
    result.details["vectors"] = merged.describe()
    return result


def reprocess(vectors: TaskVectors, processing: Mapping) -> TaskVectors:
    """Plain ``vectors`` processed as ``processing`` (a TaskVectors.processing record) says."""
    if vectors.processing or not processing:
        return vectors
    if set(processing) - {"ties", "dare"}:
        raise ExpungeError(f"unknown task-vector processing {sorted(processing)}")
    if "ties" in processing:
        vectors = ties(vectors, **processing["ties"])
    if "dare" in processing:
        vectors = dare(vectors, **processing["dare"])
    return vectors


def materialise(vectors: TaskVectors, result: FrontResult,
                preferences: Mapping[str, float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(merged state dict, the chosen front point) for ``preferences`` ({metric: weight}).

    ``vectors``: the plain task vectors the front was found for (processed here as its method did), or
    the processed ones; either way their hashes must match the front's record."""
    point = result.choose(preferences)
    vectors = reprocess(vectors, result.details.get("vectors", {}).get("processing", {}))
    expected = result.details.get("vectors", {}).get("hashes")
    if expected is not None and expected != vectors.hashes():
        raise ExpungeError("these task vectors are not the ones the front was found for (their hashes differ): "
                           "build them from the same base and models")
    return vectors.merge(point["c"], result.bounds), point
