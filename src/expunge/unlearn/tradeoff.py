"""The trade-off update: a run's model replaced by a chosen point theta_before + c (theta_after - theta_before)
of its forgetting trade-off front (found by expunge.merge.runs.tradeoff_run; `expunge tradeoff`).

The updater carries the weights already chosen and the evidence for them (the front as JSON and a plot,
written into the new version's folder). Rows do not change. No guarantee holds by construction: an
interpolation between a model and its deletion is neither of them, so the ledger row says so and records
what was measured on the forget and retain sets.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ExpungeError
from .merged import evaluated_guarantee

TRADEOFF = "tradeoff"


class Tradeoff:
    name = TRADEOFF
    writes_trajectory = False  # the trajectory would not lead to this model: DeltaGrad needs a retrain after it

    def __init__(self, weights: torch.Tensor | None = None, record: dict | None = None,
                 evidence: dict[str, bytes] | None = None):
        self.weights, self.record, self.evidence = weights, dict(record or {}), dict(evidence or {})

    def config(self) -> dict:
        return {}

    def update(self, ws, old_active, new_active, w0, old, new, progress=False, w=None):
        if self.weights is None:
            raise ExpungeError("tradeoff is not a forget or add method: it replaces the model by a point of the "
                               "forgetting trade-off front; run `expunge tradeoff RUN --before V1 ...`")
        if not np.array_equal(np.asarray(old_active), np.asarray(new_active)):
            raise ExpungeError("a trade-off point changes the model, not the rows; forget or add rows first")
        if w is not None and (self.weights.shape != w.shape or self.weights.dtype != w.dtype):
            raise ExpungeError(f"trade-off weights of shape {tuple(self.weights.shape)} {self.weights.dtype} do not "
                               f"fit this run's model ({tuple(w.shape)} {w.dtype})")
        return self.weights.clone(), evaluated_guarantee(self.record.get("measured", {}),
                                                         **{k: v for k, v in self.record.items() if k != "measured"})
