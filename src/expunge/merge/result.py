"""FrontResult: what every front method returns, JSON-serialisable for manifests and reports.

``evaluated``: the merges the method evaluated (its cost), as ``{"c": [...], "metrics": {...}}``.
``front``: the front it proposes, ``{"c": [...], "predicted": {...} | None, "measured": {...} | None}``
(MAP predicts from its surrogates; grid methods measure). ``surrogates``: per metric the fitted
quadratic and its R^2 on held-out points (MAP methods only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ExpungeError
from .front import pick
from .objectives import Metric


@dataclass
class FrontResult:
    method: str
    metrics: list[Metric]
    bounds: tuple[float, float]
    evaluated: list[dict]
    front: list[dict]
    surrogates: dict[str, dict] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def n_evaluations(self) -> int:
        return len(self.evaluated)

    def front_c(self) -> np.ndarray:
        return np.array([p["c"] for p in self.front], dtype=np.float64).reshape(len(self.front), -1)

    def front_values(self, which: str = "auto") -> np.ndarray:
        """The front's metric table: ``measured`` where present (``auto``), else ``predicted``."""
        rows = []
        for p in self.front:
            values = p.get("measured") if which in ("auto", "measured") else None
            if values is None and which in ("auto", "predicted"):
                values = p.get("predicted")
            if values is None:
                raise ExpungeError(f"front point c = {p['c']} has no {which} metrics")
            rows.append([values[m.name] for m in self.metrics])
        return np.array(rows, dtype=np.float64).reshape(len(rows), len(self.metrics))

    def r_squared(self) -> dict[str, float | None]:
        return {name: s.get("r2_heldout") for name, s in self.surrogates.items()}

    def choose(self, preferences: Mapping[str, float] | None = None) -> dict:
        """The front point that best fits ``preferences`` ({metric: weight}; None weighs all equally)."""
        return self.front[pick(self.front_values(), self.metrics, preferences)]

    def to_dict(self) -> dict:
        return {"method": self.method, "metrics": [m.to_dict() for m in self.metrics], "bounds": list(self.bounds),
                "n_evaluations": self.n_evaluations, "evaluated": self.evaluated, "front": self.front,
                "surrogates": self.surrogates, "details": self.details}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FrontResult":
        return cls(d["method"], [Metric.from_dict(m) for m in d["metrics"]], tuple(d["bounds"]), list(d["evaluated"]),
                   list(d["front"]), dict(d.get("surrogates", {})), dict(d.get("details", {})))
