"""The trade-off update: a run's model replaced by a chosen point theta_before + c (theta_after - theta_before)
of its forgetting trade-off front (found by expunge.merge.runs.tradeoff_run; `expunge tradeoff`).

The updater carries the model state already chosen (named tensors, as ``RunModel.model_state`` gives them) and
the evidence for it (the front as JSON and a plot, written into the new version's folder). Rows do not change.
No guarantee holds by construction: an interpolation between a model and its deletion is neither of them, so
the ledger row says so and records what was measured on the forget and retain sets.

``tradeoff`` updates zoo runs (their flat weights ``w``); ``lm-tradeoff`` (what ``tradeoff`` means on a
language-model run) loads the state into the run's model, which the run then saves as its next version.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ExpungeError
from .merged import evaluated_guarantee

TRADEOFF = "tradeoff"
NOT_AN_UPDATE = ("tradeoff is not a forget or add method: it replaces the model by a point of the forgetting "
                 "trade-off front; run `expunge tradeoff RUN --before V1 ...`")


class Tradeoff:
    name = TRADEOFF
    writes_trajectory = False  # the trajectory would not lead to this model: DeltaGrad needs a retrain after it

    def __init__(self, state: dict[str, torch.Tensor] | None = None, record: dict | None = None,
                 evidence: dict[str, bytes] | None = None):
        self.state, self.record, self.evidence = state, dict(record or {}), dict(evidence or {})

    def config(self) -> dict:
        return {}

    def guarantee(self) -> dict:
        return evaluated_guarantee(self.record.get("measured", {}),
                                   **{k: v for k, v in self.record.items() if k != "measured"})

    def update(self, ws, old_active, new_active, w0, old, new, progress=False, w=None):
        if self.state is None:
            raise ExpungeError(NOT_AN_UPDATE)
        if set(self.state) != {"w"}:
            raise ExpungeError(f"a zoo run's trade-off point is its flat weights 'w', not {sorted(self.state)[:3]}")
        weights = self.state["w"]
        if not np.array_equal(np.asarray(old_active), np.asarray(new_active)):
            raise ExpungeError("a trade-off point changes the model, not the rows; forget or add rows first")
        if w is not None and (weights.shape != w.shape or weights.dtype != w.dtype):
            raise ExpungeError(f"trade-off weights of shape {tuple(weights.shape)} {weights.dtype} do not "
                               f"fit this run's model ({tuple(w.shape)} {w.dtype})")
        return weights.clone(), self.guarantee()


class LMTradeoff(Tradeoff):
    """The trade-off point on a language-model run: LMRun updates the current model through ``unlearn`` (as it
    does for the unlearning methods), which here loads the chosen state."""

    name = "lm-tradeoff"
    private = False
    unlearns = True  # LMRun hands over its current model, not a retraining

    def check(self, recipe, n_rows: int) -> None:
        if self.state is None:
            raise ExpungeError(NOT_AN_UPDATE)
        if recipe.lora:
            raise ExpungeError("a trade-off point between two LoRA models is a full model, not a LoRA adapter, so "
                               "the LoRA run cannot hold it: train the run without --lora-rank (a full fine-tune) to "
                               "record trade-off points on it")

    def unlearn(self, model, forget, retain, progress: bool = False) -> tuple[dict, dict]:
        if len(forget):
            raise ExpungeError("a trade-off point changes the model, not the rows; forget rows first")
        try:
            model.load_state_dict(dict(self.state), strict=True)
        except RuntimeError as e:
            raise ExpungeError(f"the trade-off point does not fit this run's model ({e})") from None
        return self.guarantee(), {}
