"""The Updater protocol and the UpdateReport every update returns.

An Updater knows how to turn a model trained on one set of rows into the model trained on another.
``fit`` trains and returns a run (see fitted.py); ``update`` is the method itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from ..train import Workspace
    from ..trajectory import Trajectory


@dataclass
class UpdateReport:
    """What one request did: JSON-serialisable, and the row the ledger keeps.

    ``guarantee`` says how close to retraining the result is by construction: ``{"kind": "exact"}``
    for retraining, ``{"kind": "approximate", ...}`` with the figures of the approximation for
    DeltaGrad. ``metrics`` holds what was measured (distances, accuracies, the retrain time when
    compared side by side).
    """

    method: str
    kind: str  # "train", "forget" or "add"
    ids: list[int]
    seconds: float
    model_hash_before: str | None
    model_hash_after: str
    guarantee: dict
    metrics: dict = field(default_factory=dict)
    version: int | None = None
    notes: list[str] = field(default_factory=list)  # what the run repaired before this request

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class Updater(Protocol):
    name: str

    def config(self) -> dict: ...

    def update(
        self,
        ws: "Workspace",
        old_active: np.ndarray,
        new_active: np.ndarray,
        w0: torch.Tensor,
        old: "Trajectory | None",
        new: "Trajectory | None",
        progress: bool,
        w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Return the weights for ``new_active`` (writing the new trajectory into ``new``, unless the
        updater sets ``writes_trajectory = False``) and the guarantee figures. ``w`` is the current
        model, for methods that start from it."""
        ...
