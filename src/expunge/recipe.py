"""TrainRecipe (how a model is trained) and BatchPlan (which rows each iteration sees).

The batch plan is what makes exact retraining a true reference: the same seed gives the same
batches, minus removed rows, plus added rows in fixed slots. Rows of the original training set
keep their place in every epoch's permutation; an added row joins one batch per epoch chosen by a
keyed hash of (seed, epoch, id), so adding or removing one row never reshuffles the others.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ExpungeError

MODELS = ("logreg", "mlp", "cnn")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TrainRecipe:
    """Everything that decides the trained weights, given the data.

    ``batch_size=None`` means full-batch gradient descent. ``optimizer`` names a ``torch.optim`` class
    (``SGD``, ``Adam``, ...); DeltaGrad and exact retraining replay plain SGD, SISA takes any. ``lr_steps`` is a step schedule:
    ``((10, 0.05),)`` switches the learning rate to 0.05 from epoch 10 on. ``weight_decay`` is the
    L2 coefficient lambda of the objective mean_i loss_i + lambda/2 ||w||^2 (all parameters).
    ``lr_auto``: GeN sets the rate (``expunge.optim.GeN``, started from ``lr``, an estimate every ``lr_every``
    iterations on the probe batches of ``BatchPlan.probes()``); train.py says how, and why exact retraining
    reproduces it.
    """

    model: str = "logreg"
    hidden: tuple[int, ...] = (64,)
    epochs: int = 20
    batch_size: int | None = None
    lr: float = 0.1
    lr_steps: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    weight_decay: float = 1e-4
    dtype: str = "float64"
    seed: int = 0
    optimizer: str = "SGD"
    lr_auto: bool = False
    lr_every: int = 4

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        steps = tuple(sorted((int(e), float(lr)) for e, lr in self.lr_steps))
        object.__setattr__(self, "lr_steps", steps)
        if self.model not in MODELS:
            raise ExpungeError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dtype not in DTYPES:
            raise ExpungeError(f"unknown dtype {self.dtype!r}; choose float32 or float64")
        if not (float(self.epochs).is_integer() and self.epochs >= 1):
            raise ExpungeError(f"epochs must be a whole number, at least 1; got {self.epochs}")
        object.__setattr__(self, "epochs", int(self.epochs))
        if self.batch_size is not None and self.batch_size < 1:
            raise ExpungeError(f"batch size must be positive (or omitted for full batch), got {self.batch_size}")
        if not all(math.isfinite(lr) and lr > 0 for lr in (self.lr, *(lr for _, lr in steps))):
            raise ExpungeError("learning rates must be positive, finite numbers")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ExpungeError(f"weight decay must be >= 0, got {self.weight_decay}")
        import torch

        optimizer = getattr(torch.optim, self.optimizer, None)
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise ExpungeError(f"unknown optimizer {self.optimizer!r}; name a torch.optim class such as SGD, Adam or AdamW")
        if self.seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {self.seed}")
        if not isinstance(self.lr_auto, bool):
            raise ExpungeError(f"lr_auto must be true or false, got {self.lr_auto!r}")
        if self.lr_auto and steps:
            raise ExpungeError("an automatic learning rate (GeN) and a step schedule exclude each other: drop --lr-step")
        if not (float(self.lr_every).is_integer() and self.lr_every >= 1):
            raise ExpungeError(f"lr_every (iterations between GeN estimates) must be a positive integer, got {self.lr_every}")
        object.__setattr__(self, "lr_every", int(self.lr_every))
        if any(h < 1 for h in self.hidden):
            raise ExpungeError(f"hidden layer sizes must be positive, got {self.hidden}")

    def lr_at(self, epoch: int) -> float:
        """The scheduled rate (with ``lr_auto``, GeN's starting rate: the applied ones are in the trajectory)."""
        lr = self.lr
        for start, value in self.lr_steps:
            if epoch >= start:
                lr = value
        return lr

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["lr_steps"] = [list(s) for s in self.lr_steps]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainRecipe":
        d = dict(d)
        d["hidden"] = tuple(d.get("hidden", (64,)))
        d["lr_steps"] = tuple(tuple(s) for s in d.get("lr_steps", ()))
        return cls(**d)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, platform-independent hash of uint64 values."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class BatchPlan:
    """Deterministic mini-batches over a growing row universe.

    Rows ``0..n_base-1`` of the universe are the original training set; later rows were added.
    ``iterations(active)`` lists, per iteration, the universe rows that iteration trains on.
    """

    n_base: int
    batch_size: int | None
    epochs: int
    seed: int
    stream: int = 0  # 0: the training batches; another stream: independent batches by the same rules (probes)

    @classmethod
    def for_recipe(cls, recipe: TrainRecipe, n_base: int) -> "BatchPlan":
        return cls(n_base, recipe.batch_size, recipe.epochs, recipe.seed)

    def probes(self) -> BatchPlan:
        """The plan of GeN's probe batches: the same rules on an independent stream, so a removed row leaves a
        hole in its probe batch and an added row joins one, exactly as in training."""
        return BatchPlan(self.n_base, self.batch_size, self.epochs, self.seed, stream=1)

    @property
    def base_batch(self) -> int:
        return min(self.batch_size or self.n_base, self.n_base)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_base / self.base_batch)

    @property
    def n_iterations(self) -> int:
        return self.epochs * self.batches_per_epoch

    def epoch_of(self, t: int) -> int:
        return t // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self.batches_per_epoch == 1:
            return np.arange(self.n_base)
        key = [self.seed, epoch] + ([self.stream] if self.stream else [])
        return np.random.default_rng(key).permutation(self.n_base)

    def iterations(self, active: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        """Universe rows per iteration, given the active mask and the universe's ids."""
        nb, bs = self.batches_per_epoch, self.base_batch
        added = np.flatnonzero(active[self.n_base :]) + self.n_base
        plan = []
        for epoch in range(self.epochs):
            # cut the *original* permutation into batches, so removed rows leave holes, not shifts
            perm = self._permutation(epoch)
            keep = active[perm]
            perm, slots = perm[keep], (np.arange(self.n_base) // bs)[keep]
            cuts = np.searchsorted(slots, np.arange(nb + 1))
            epoch_salt = _mix64(np.array([(self.seed * 1_000_003 + epoch) % 2**64], np.uint64))[0]
            if self.stream:
                epoch_salt = _mix64(np.array([epoch_salt ^ np.uint64(self.stream)], np.uint64))[0]
            added_slots = (_mix64(ids[added].astype(np.uint64) ^ epoch_salt) % np.uint64(nb)).astype(np.int64)
            for b in range(nb):
                rows = perm[cuts[b] : cuts[b + 1]]
                extra = added[added_slots == b]
                plan.append(np.concatenate([rows, extra]) if len(extra) else rows)
        return plan
