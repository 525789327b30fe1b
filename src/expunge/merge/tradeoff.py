"""The forgetting trade-off: how much utility each increment of forgetting costs.

The merges theta(c) = theta_before + c (theta_after - theta_before) of a model before a deletion and
after it form a one-coefficient family: c = 0 is the model before, c = 1 the one after, c > 1
extrapolates past the deletion. Scored on a forget metric (to minimise, e.g. accuracy on the deleted
rows) and a retain metric (to maximise, e.g. test accuracy), its front is the trade-off curve. MAP
fits it from a few evaluated merges; ``measured_tradeoff`` evaluates a grid of c for the true curve.
``pipeline.materialise(interpolation(before, after), result, preferences)`` gives the chosen model.
"""

from __future__ import annotations

from torch import nn

from ..errors import ExpungeError
from .baselines import grid_front
from .evaluation import StateEvaluator, merge_objective
from .map import map_front
from .objectives import Metric
from .result import FrontResult
from .vectors import State, interpolation


def _check(forget: Metric, retain: Metric, bounds) -> None:
    if forget.name == retain.name:
        raise ExpungeError("the forget and retain metrics need different names")
    if not (bounds[0] <= 0 and bounds[1] >= 1):
        raise ExpungeError(f"the trade-off runs from the model before (c = 0) to the one after (c = 1); bounds "
                           f"{bounds} must contain [0, 1] (widen them to extrapolate)")


def tradeoff_front(before: nn.Module | State, after: nn.Module | State, evaluate_state: StateEvaluator,
                   forget: Metric, retain: Metric, *, bounds: tuple[float, float] = (0.0, 1.0),
                   points: int | None = None, heldout: int | None = None, seed: int = 0) -> FrontResult:
    """MAP on the before/after family: quadratic surrogates in c for ``forget`` and ``retain`` from
    ``points`` merges (default 6), the front on a dense grid of c. ``evaluate_state`` returns both
    metrics by name for a state dict."""
    _check(forget, retain, bounds)
    family = interpolation(before, after)
    result = map_front(merge_objective(family, evaluate_state, bounds), [forget, retain], 1, points=points,
                       heldout=heldout, bounds=bounds, search="grid", seed=seed)
    result.method = "tradeoff-map"
    result.details["vectors"] = family.describe()
    return result


def measured_tradeoff(before: nn.Module | State, after: nn.Module | State, evaluate_state: StateEvaluator,
                      forget: Metric, retain: Metric, *, bounds: tuple[float, float] = (0.0, 1.0),
                      steps: int = 21) -> FrontResult:
    """The trade-off measured at ``steps`` evenly spaced c (every one evaluated)."""
    _check(forget, retain, bounds)
    family = interpolation(before, after)
    result = grid_front(merge_objective(family, evaluate_state, bounds), [forget, retain], 1, steps=steps, bounds=bounds)
    result.method = "tradeoff-grid"
    result.details["vectors"] = family.describe()
    return result
