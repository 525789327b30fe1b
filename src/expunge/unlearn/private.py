"""Private runs: a model trained with DP-SGD (or DP-Adam, any torch.optim) in an ordinary run directory.

`expunge train --dp --epsilon 3 --delta 1e-5` trains the recipe's model through `make_private`
(Poisson sampling at rate batch_size/n, per-sample clipping, Gaussian noise calibrated on dp-accounting)
and records the privacy parameters and the spent epsilon (PLD, with the RDP cross-check) in the
manifest. The exact update of such a run is private retraining on the remaining rows with the same
recipe, privacy settings and seed, so `expunge forget` keeps the model private. Methods that start from
the current weights (fisher, finetune, ascent, ...) are not private: a private run refuses them unless
the caller ends the privacy guarantee explicitly (``drop_privacy``, see run.py), which the manifest and
the ledger then record; a later private retraining makes the model private again.

With `--nproc N` the training runs data parallel in N processes (torch.multiprocessing, gloo, the model in
DistributedDataParallel; see expunge.privacy.distributed); this process writes the run directory from rank
0's result. The sampled batches, the noise and epsilon are those of one process with the same seed, with or
without a gradient transform (--dp-transform); retraining after a deletion uses the run's own count.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IndexedDataset
from ..errors import ExpungeError
from ..privacy import DOPPLER, DiceSGD, DiSK, make_private
from ..privacy.accounting import check_delta
from ..privacy.distributed import spawn
from ..privacy.engine import check_private_settings
from ..progress import track
from ..recipe import TrainRecipe
from ..train import Workspace
from .base import UpdateReport
from .fitted import Fitted


# transforms a private run can be trained with, by name (paper defaults; the Python API takes any settings)
TRANSFORMS = {"none": lambda: [], "disk": lambda: [DiSK()], "doppler": lambda: [DOPPLER()],
              "dicesgd": lambda: [DiceSGD()]}


class PrivateTraining:
    """The updater of private runs: trains (and retrains) with the private training engine."""

    name = "dp"
    writes_trajectory = False

    def __init__(self, epsilon: float | None = None, delta: float = 1e-5, noise_multiplier: float | None = None,
                 max_grad_norm: float = 1.0, clip_fn: str = "abadi", clipping: str = "all-layer",
                 physical_batch_size: int | None = None, accountant: str = "pld", transform: str = "none",
                 nproc: int = 1):
        check_private_settings(epsilon, noise_multiplier, delta, clip_fn, clipping)
        self.epsilon, self.delta, self.noise_multiplier = epsilon, delta, noise_multiplier
        self.max_grad_norm, self.clip_fn, self.clipping = max_grad_norm, clip_fn, clipping
        self.physical_batch_size, self.accountant = physical_batch_size, accountant
        if transform not in TRANSFORMS:
            raise ExpungeError(f"unknown --dp-transform {transform!r}; use one of {', '.join(TRANSFORMS)}")
        self.transform = transform
        if not isinstance(nproc, int) or nproc < 1:
            raise ExpungeError(f"--nproc must be a positive number of processes, got {nproc!r}")
        self.nproc = nproc

    def config(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "clip_fn": self.clip_fn, "clipping": self.clipping,
                "physical_batch_size": self.physical_batch_size, "accountant": self.accountant,
                "transform": self.transform, "nproc": self.nproc}

    def check(self, recipe: TrainRecipe, n_rows: int) -> None:
        """Everything that can be refused before a run directory is made."""
        if recipe.batch_size is None:
            raise ExpungeError("private training samples batches: give --batch-size (for example 256)")
        if recipe.batch_size > n_rows:
            raise ExpungeError(f"--batch-size {recipe.batch_size} is larger than the data ({n_rows} rows)")
        check_delta(self.delta, n_rows)

    def update(self, ws: Workspace, old_active, new_active, w0, old, new, progress=False, w=None):
        w, privacy = self.train(ws, new_active, w0, progress)
        return w, {"kind": "exact", "note": "private retraining on the remaining rows", "privacy": privacy}

    def train(self, ws: Workspace, active: np.ndarray, w0: torch.Tensor, progress: bool = False):
        """Train privately from w0 on the active rows; return the weights and the privacy summary."""
        recipe = ws.recipe
        rows = np.flatnonzero(active)
        self.check(recipe, len(rows))
        module = copy.deepcopy(ws.flat.module)
        torch.nn.utils.vector_to_parameters(w0.clone(), module.parameters())
        index = torch.from_numpy(rows)
        data = (ws.X.index_select(0, index), ws.y.index_select(0, index))
        if self.nproc == 1:
            return self._train(recipe, module, data, progress)
        return spawn(_train_rank, self.nproc, self, recipe, module, data, progress)

    def _train(self, recipe: TrainRecipe, module: torch.nn.Module, data, progress: bool, model=None):
        """The training loop; `model` is what the forward calls (module itself, or module in DDP)."""
        model = model if model is not None else module
        optimizer = getattr(torch.optim, recipe.optimizer)(module.parameters(), lr=recipe.lr,
                                                            weight_decay=recipe.weight_decay)
        engine = make_private(model, optimizer, data, batch_size=recipe.batch_size, target_epsilon=self.epsilon,
                              target_delta=self.delta, epochs=recipe.epochs, noise_multiplier=self.noise_multiplier,
                              max_grad_norm=self.max_grad_norm, clipping=self.clipping, clip_fn=self.clip_fn,
                              physical_batch_size=self.physical_batch_size, seed=recipe.seed,
                              accountant=self.accountant, transforms=TRANSFORMS[self.transform]())
        try:
            steps = ((epoch, batch) for epoch in range(recipe.epochs) for batch in engine.loader)
            for epoch, (x, y) in track(steps, recipe.epochs * len(engine.loader), "private training", progress):
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr_at(epoch)

                def closure(x=x, y=y):
                    engine.optimizer.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                engine.optimizer.step(closure)
        finally:
            engine.detach()
        privacy = engine.summary(self.delta)
        privacy["target_epsilon"] = self.epsilon
        return torch.nn.utils.parameters_to_vector(module.parameters()).detach(), privacy

    def fit(self, data: IndexedDataset, recipe: TrainRecipe, out=None, test=None, source=None, progress=False,
            preprocess=None, signing_key=None) -> "PrivateFitted":
        return PrivateFitted.train(data, recipe, self, out=out, test=test, source=source, progress=progress,
                                   preprocess=preprocess, signing_key=signing_key)


def _train_rank(rank: int, updater: PrivateTraining, recipe: TrainRecipe, module, data, progress: bool):
    """One process of `--nproc` training (privacy.distributed.spawn): trains its share in DDP; rank 0's result
    is the run's."""
    from torch.nn.parallel import DistributedDataParallel

    module = copy.deepcopy(module)  # spawn hands every rank the same shared-memory tensors: each needs its own
    return updater._train(recipe, module, data, progress and rank == 0, DistributedDataParallel(module))


class PrivateFitted(Fitted):
    """A run trained privately; `manifest["privacy"]` holds what the current model spent (and
    `manifest["privacy_ended"]` when a non-private update ended the guarantee)."""

    own_retraining = True  # "retrain" on a private run is private retraining

    @classmethod
    def train(cls, data: IndexedDataset, recipe: TrainRecipe, updater: PrivateTraining, out=None, test=None,
              source=None, progress=False, preprocess=None, signing_key=None) -> "PrivateFitted":
        updater.check(recipe, len(data))
        if recipe.lr_auto:
            raise ExpungeError("private runs do not set their rate with GeN yet (its probes would need privatising: "
                               "expunge.privacy.PrivateLossProbe): give a fixed --lr")

        def fit(fitted: "PrivateFitted", stage):
            w, privacy = updater.train(fitted.ws, fitted.active, fitted.w0, progress)
            return "dp", w, None, {"kind": "private", "privacy": privacy}

        return cls._train_run(data, recipe, updater, out, test, source, preprocess, fit, signing_key)

    @property
    def privacy(self) -> dict:
        return self.manifest.get("privacy", {})

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        if method == "retrain":  # retraining a private run means retraining it privately
            method = None
        return super()._update(kind, ids, universe, new_active, method, compare, progress)

    def _reference(self, ws: Workspace, new_active: np.ndarray, progress: bool) -> torch.Tensor:
        return self.updater.train(ws, new_active, self.w0, progress)[0]

