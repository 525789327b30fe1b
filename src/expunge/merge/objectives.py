"""What a merge is scored on: named metrics, each to maximise or minimise, each with its surrogate link.

``Metric.accuracy("mnist")`` is maximised through a sigmoid link, ``Metric.loss("mnist")`` minimised
through softplus; a forgetting trade-off minimises the forget-set accuracy, ``Metric("forget",
goal="min", link="sigmoid")``. ``minimised`` turns a table of metric values into the all-minimise
form pymoo works in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ExpungeError
from .surrogate import LINKS


@dataclass(frozen=True)
class Metric:
    name: str
    goal: str = "max"
    link: str = "sigmoid"

    def __post_init__(self):
        if self.goal not in ("max", "min"):
            raise ExpungeError(f"metric {self.name!r}: goal must be 'max' or 'min', got {self.goal!r}")
        if self.link not in LINKS:
            raise ExpungeError(f"metric {self.name!r}: unknown link {self.link!r}; choose one of {', '.join(LINKS)}")

    @classmethod
    def accuracy(cls, name: str) -> "Metric":
        return cls(name, "max", "sigmoid")

    @classmethod
    def loss(cls, name: str) -> "Metric":
        return cls(name, "min", "softplus")

    def to_dict(self) -> dict:
        return {"name": self.name, "goal": self.goal, "link": self.link}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Metric":
        return cls(d["name"], d.get("goal", "max"), d.get("link", "sigmoid"))


def check_metrics(metrics: Sequence[Metric]) -> list[Metric]:
    metrics = list(metrics)
    if not metrics:
        raise ExpungeError("no metrics to trade off; give at least one Metric")
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ExpungeError(f"metric names must be distinct, got {names}")
    return metrics


def signs(metrics: Sequence[Metric]) -> np.ndarray:
    """-1 for metrics to maximise, +1 for metrics to minimise: ``F * signs`` is to be minimised."""
    return np.array([-1.0 if m.goal == "max" else 1.0 for m in metrics])


def minimised(F, metrics: Sequence[Metric]) -> np.ndarray:
    """Metric values (rows: points, columns: metrics) in the all-minimise orientation."""
    return np.atleast_2d(np.asarray(F, dtype=np.float64)) * signs(metrics)


def table(rows: Sequence[Mapping[str, float]], metrics: Sequence[Metric]) -> np.ndarray:
    """The (points x metrics) array of metric dicts, refusing missing metrics."""
    out = np.empty((len(rows), len(metrics)))
    for i, row in enumerate(rows):
        for j, m in enumerate(metrics):
            if m.name not in row:
                raise ExpungeError(f"the evaluation returned {sorted(row)} but not metric {m.name!r}")
            out[i, j] = float(row[m.name])
    return out
