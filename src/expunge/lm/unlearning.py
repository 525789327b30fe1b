"""LM unlearning methods and their update loop: GradAscent, GradDiff, NPO, SimNPO and NGDiff.

    unlearner = NGDiff(lr=1e-5, epochs=2, batch_size=8, seed=0)
    result = unlearner.update(model, forget_data, retain_data)      # in place; an UnlearnResult
    unlearner.config()                               # JSON-able: make_unlearner(name, **config) rebuilds it

Every method updates the model's trainable parameters in place (all of them, or its LoRA adapters) and is
deterministic given its ``seed``, the model, the data, the device and the thread count. None gives a
guarantee by construction: each is judged by the evaluation (tofu.py, muse.py) against exact retraining.

The loop. ``epochs`` passes over the forget rows in a seeded order, cut into batches of ``batch_size`` (or
the first ``max_steps`` batches); each forget batch is paired with ``retain_batch_size`` retain rows drawn
from a seeded stream of retain permutations (a retain set far larger than the forget set is sampled, not
swept). One optimizer step (AdamW or SGD, as train.py) per pair; dropout, if any, draws from a seed of
(seed, step). ``max_grad_norm`` clips the step's gradient (or NGDiff's direction).

LoRA. A model that already carries adapters (``is_lora``) has only those updated. ``lora_rank > 0`` on a
plain model wraps it with fresh adapters (seeded) for the update and merges them into its weights at the end:
a low-rank change of the full model, which stays a plain model.

Failure. Before the first step the parameters the update may change are copied (to CPU); if anything raises,
they are put back, adapters added for the update are removed, and the error propagates: the caller's model is
as it was (``restore=False`` skips the copy for a caller that reloads the committed version instead). A run
commits the updated weights as a new version only after ``update`` returns.

NGDiff and its rate. The paper (Jin, Bu, Vinzamuri, Ramakrishna, Chang, Cevher, Hong, NAACL 2025) feeds the
normalised difference ``g_R/||g_R|| - g_F/||g_F||`` to the base optimizer in place of the gradient and sets the
learning rate automatically with GeN (Bu & Xu: the Newton step ``eta* = G'd / d'Hd`` along the optimizer's
update d, estimated from the loss at theta and theta +- eta d, then smoothed, eta <- 0.9 eta + 0.1 clip(eta*,
eta/2, 2 eta)), as we read it on the multi-task objective (the retain loss minus the forget loss). Here the base
optimizer likewise receives the direction and the rate is GeN's (``rate="gen"``, rates.GeNRate: GeN's acceptance
tests and its smoothing, so at most x1.1 and at least x0.95 a step), but fitted on the retain loss NLL_R alone:
the forget part -NLL_F is unbounded below, so a local quadratic model of the whole objective has no trustworthy
minimum along a direction that ascends NLL_F (its curvature is negative or vanishing, and the fitted rate would
grow without bound), while the retain loss is bounded below and is what the step must not spoil; the
direction's forget component still sets where the step goes. The retain loss is measured on rows the step's
gradient did not see (``rate_probe="fresh"``: the next rows of the seeded retain stream, as GeN probes on a
fresh batch): on the step's own rows the loss keeps falling along a step made to lower it, the optimum always
looks farther out, and the rate grew by its cap at every step on SmolLM2 (benchmarks/results/llm-unlearning.json:
x1.1 a step with ``gen``, x2 with the unsmoothed ``quadratic`` fit, which took 2e-4 to 1.2e-2 in 10 steps and
lost the answers). ``rate_probe="batch"`` measures on the step's rows; ``rate="fixed"`` keeps the optimizer's rate.
As GeN's own default (optim/gen.py, ``every=4``), the rate is estimated at the first step and every ``rate_every``
(4) steps after it and kept in between: an estimate costs three forward passes on the probe rows, which at every
step made NGDiff's update 1.6x the cost of GradDiff's on SmolLM2 (96 s against 58 s for 20 steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from ..errors import ExpungeError
from ..progress import track
from .data import TokenDataset
from .determinism import deterministic, seeded, step_seed
from .lora import apply_lora, is_lora
from .objectives import (Objective, ascent_loss, graddiff_loss, ngdiff_direction, npo_loss, sequence_logprobs,
                         simnpo_loss)
from .rates import RateRule, fixed_rate, rate_rule
from .train import row_losses, trainable_parameters

OPTIMIZERS = ("adamw", "sgd")
RATE_PROBES = ("fresh", "batch")


@dataclass
class UnlearnResult:
    """What an update did: optimizer ``steps``, wall ``seconds``, the forget and retain batches' mean NLL and
    the objective at each step (measured before that step's update), the rate each step used, and the input
    tokens processed (padding excluded)."""

    method: str
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    forget_nlls: list[float] = field(default_factory=list)
    retain_nlls: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def forget_nll(self) -> float | None:
        """The last step's forget-batch NLL."""
        return self.forget_nlls[-1] if self.forget_nlls else None

    @property
    def retain_nll(self) -> float | None:
        return self.retain_nlls[-1] if self.retain_nlls else None

    def to_dict(self) -> dict:
        return dict(asdict(self), forget_nll=self.forget_nll, retain_nll=self.retain_nll)


def paired_batches(n_forget: int, n_retain: int, batch_size: int, retain_batch_size: int, epochs: int, seed: int,
                   max_steps: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (forget rows, retain rows) of every step: forget rows in a seeded order per epoch, cut into batches
    (the last one of an epoch may be shorter); retain rows from a seeded stream of permutations, the same
    ``retain_batch_size`` per step (none when ``n_retain`` is 0)."""
    forget_rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    retain_rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    steps, stream = [], np.zeros(0, np.int64)
    for _ in range(epochs):
        order = forget_rng.permutation(n_forget)
        for start in range(0, n_forget, batch_size):
            if max_steps is not None and len(steps) >= max_steps:
                return steps
            retain = np.zeros(0, np.int64)
            if n_retain:
                while len(stream) < retain_batch_size:
                    stream = np.concatenate([stream, retain_rng.permutation(n_retain)])
                retain, stream = stream[:retain_batch_size], stream[retain_batch_size:]
            steps.append((order[start:start + batch_size], retain))
    return steps


@dataclass
class LMUnlearner:
    """Settings every method shares (see the module docstring); subclasses add their own and define
    ``objective`` (or ``step``). ``retain_batch_size`` defaults to ``batch_size``."""

    lr: float = 1e-5
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    retain_batch_size: int | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    max_grad_norm: float | None = None
    lora_rank: int = 0
    seed: int = 0

    name: ClassVar[str] = "lm-unlearner"
    uses_retain: ClassVar[bool] = True

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ExpungeError(f"the learning rate must be a positive, finite number, got {self.lr}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ExpungeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ExpungeError(f"max_steps must be at least 1 (or None for whole epochs), got {self.max_steps}")
        if self.retain_batch_size is not None and self.retain_batch_size < 1:
            raise ExpungeError(f"retain_batch_size must be at least 1, got {self.retain_batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ExpungeError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ExpungeError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ExpungeError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ExpungeError(f"max_grad_norm must be positive (or None), got {self.max_grad_norm}")
        if self.lora_rank < 0:
            raise ExpungeError(f"lora_rank must be >= 0 (0: update the model's trainable weights), got {self.lora_rank}")
        if self.seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {self.seed}")

    def config(self) -> dict:
        """The settings as JSON-able values (rebuild with ``make_unlearner(self.name, **config)``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    # -- the method: one of these two is overridden -------------------------------------------------------------

    def objective(self, model, forget: dict, retain: dict | None, forget_rows: np.ndarray) -> Objective:
        raise NotImplementedError

    def step(self, model, optimizer, params, forget: dict, retain: dict | None,
             forget_rows: np.ndarray, probe: dict | None = None, estimate: bool = True) -> tuple[Objective, float]:
        """One update: the objective's gradient, clipped, then the optimizer's step. Returns the objective
        (measured before the step) and the rate used. ``probe``: retain rows the step's gradient did not see
        (only for a method whose ``probe_size()`` is positive, on the steps it estimates its rate at);
        ``estimate``: whether this step estimates the rate (see ``estimates_rate``)."""
        optimizer.zero_grad(set_to_none=True)
        measured = self.objective(model, forget, retain, forget_rows)
        if not torch.isfinite(measured.loss):
            raise ExpungeError(f"{self.name}: the objective became {float(measured.loss)}; lower the learning rate")
        measured.loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()
        return measured, optimizer.param_groups[0]["lr"]

    def prepare(self, model, forget: TokenDataset) -> None:
        """Work done once before the first step, with the model as it was (NPO: the reference log-probs)."""

    def probe_size(self) -> int:
        """Retain rows drawn for each step beside its retain batch, for the step to measure its rate on (0: none)."""
        return 0

    def estimates_rate(self, step: int) -> bool:
        """Whether step ``step`` (from 0) estimates the rate (only methods with a rate rule estimate at all)."""
        return False

    # -- the loop -----------------------------------------------------------------------------------------------

    def update(self, model, forget: TokenDataset, retain: TokenDataset | None = None, *, progress: bool = False,
               restore: bool = True) -> UnlearnResult:
        """Unlearn the ``forget`` rows from ``model`` in place, keeping the ``retain`` rows (see the module
        docstring). On any error the model is restored to its state at the call and the error re-raised;
        ``restore=False`` skips the copy this takes (a CPU copy of the trainable weights), for a caller that
        discards the model on failure anyway (it reloads the committed version)."""
        self._check(model, forget, retain)
        start = time.perf_counter()
        snapshot = _snapshot(model) if restore else None
        wrapped = None
        was_training = model.training
        try:
            target = model
            if self.lora_rank:
                requires = {name: p.requires_grad for name, p in model.named_parameters()}
                wrapped = target = apply_lora(model, self.lora_rank, seed=self.seed)
            result = self._loop(target, forget, retain, progress)
            if wrapped is not None:
                wrapped.merge_and_unload()  # folds the adapters into the model's own weights, in place
                wrapped = None
                _restore_flags(model, requires)
        except BaseException:
            if wrapped is not None:
                wrapped.unload()  # drops the adapters without merging
                _restore_flags(model, requires)
            if snapshot is not None:
                _restore(model, snapshot)
            raise
        finally:
            model.train(was_training)
        result.seconds = time.perf_counter() - start
        return result

    def _check(self, model, forget: TokenDataset, retain: TokenDataset | None) -> None:
        if len(forget) == 0:
            raise ExpungeError(f"{self.name} needs rows to forget; the forget set is empty")
        if self.uses_retain and (retain is None or len(retain) == 0):
            raise ExpungeError(f"{self.name} needs retain rows (its objective has a retain term); pass the retain set")
        if retain is not None and len(set(forget.ids.tolist()) & set(retain.ids.tolist())):
            raise ExpungeError("the forget and retain sets share ids; a row cannot be both forgotten and kept")
        if self.lora_rank and is_lora(model):
            raise ExpungeError("the model already carries LoRA adapters (only they will be updated); leave lora_rank at 0")
        if not trainable_parameters(model) and not self.lora_rank:
            raise ExpungeError("the model has no trainable parameters")

    def _loop(self, model, forget: TokenDataset, retain: TokenDataset | None, progress: bool) -> UnlearnResult:
        device = next(model.parameters()).device
        retain = retain if self.uses_retain else None
        retain_size = self.retain_batch_size or self.batch_size
        probe_size = self.probe_size() if retain is not None else 0
        # the probe rows come next in the same seeded retain stream: disjoint from the step's retain rows whenever
        # the retain set holds both
        plan = paired_batches(len(forget), len(retain) if retain is not None else 0, self.batch_size,
                              retain_size + probe_size, self.epochs, self.seed, self.max_steps)
        params = trainable_parameters(model)
        optimizer = _optimizer(params, self)
        result = UnlearnResult(self.name)
        with deterministic():
            model.eval()
            with torch.no_grad():
                self.prepare(model, forget)
            model.train()
            for t, (forget_rows, retain_rows) in track(enumerate(plan), len(plan), f"unlearning ({self.name})", progress):
                # probe rows are drawn at every step (the step rows of the stream do not depend on rate_every)
                # but read only at the steps that estimate the rate
                retain_rows, probe_rows = retain_rows[:retain_size], retain_rows[retain_size:]
                forget_batch = forget.batch(forget_rows, device)
                retain_batch = retain.batch(retain_rows, device) if retain is not None else None
                estimate = self.estimates_rate(t)
                extra = {"estimate": estimate}
                if probe_size and estimate:
                    extra["probe"] = retain.batch(probe_rows, device)
                with seeded(step_seed(self.seed, t)):
                    measured, rate = self.step(model, optimizer, params, forget_batch, retain_batch, forget_rows,
                                               **extra)
                result.steps += 1
                result.losses.append(float(measured.loss.detach()))
                result.forget_nlls.append(measured.forget_nll)
                if measured.retain_nll is not None:
                    result.retain_nlls.append(measured.retain_nll)
                result.rates.append(float(rate))
                result.tokens += int(forget_batch["attention_mask"].sum())
                if retain_batch is not None:
                    result.tokens += int(retain_batch["attention_mask"].sum())
        optimizer.zero_grad(set_to_none=True)
        return result


# ------------------------------------------------------------------------------------------------ the methods


@dataclass
class GradAscent(LMUnlearner):
    """Gradient ascent on the forget rows: minimise ``-NLL_F`` (no retain term)."""

    name: ClassVar[str] = "ascent"
    uses_retain: ClassVar[bool] = False

    def objective(self, model, forget, retain, forget_rows):
        return ascent_loss(model, forget)


@dataclass
class GradDiff(LMUnlearner):
    """Gradient difference: minimise ``-gamma NLL_F + alpha NLL_R``."""

    alpha: float = 1.0
    gamma: float = 1.0

    name: ClassVar[str] = "graddiff"

    def objective(self, model, forget, retain, forget_rows):
        return graddiff_loss(model, forget, retain, self.alpha, self.gamma)


@dataclass
class NPO(LMUnlearner):
    """Negative preference optimisation against the model before the request (frozen): its log-probabilities
    of every forget row are computed once, before the first step, and held fixed."""

    beta: float = 0.1
    alpha: float = 1.0
    gamma: float = 1.0

    name: ClassVar[str] = "npo"

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ExpungeError(f"NPO's beta must be positive, got {self.beta}")

    def prepare(self, model, forget: TokenDataset) -> None:
        self._reference = reference_logprobs(model, forget, self.batch_size)

    def objective(self, model, forget, retain, forget_rows):
        return npo_loss(model, forget, self._reference[torch.as_tensor(forget_rows)], retain, self.beta, self.alpha,
                        self.gamma)


@dataclass
class SimNPO(LMUnlearner):
    """Simple NPO: length-normalised, no reference model."""

    beta: float = 4.5
    margin: float = 0.0
    alpha: float = 1.0
    gamma: float = 0.125

    name: ClassVar[str] = "simnpo"

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ExpungeError(f"SimNPO's beta must be positive, got {self.beta}")

    def objective(self, model, forget, retain, forget_rows):
        return simnpo_loss(model, forget, retain, self.beta, self.margin, self.alpha, self.gamma)


@dataclass
class NGDiff(LMUnlearner):
    """Normalised gradient difference: the base optimizer steps along ``g_R/||g_R|| - g_F/||g_F||`` at a rate
    chosen by ``rate`` (a rule of rates.py: ``gen``, GeN's smoothed Newton rate on the retain loss, the default;
    ``quadratic`` the unsmoothed fit; ``fixed`` keeps ``lr``; or any RateRule callable). ``rate_probe``: the
    retain rows the rule measures the loss on, ``fresh`` (the next ``retain_batch_size`` rows of the seeded
    retain stream, which the step's gradient did not see, as GeN probes on a fresh batch) or ``batch`` (the
    step's own retain rows). ``rate_every``: the rate is estimated at the first step and every ``rate_every``
    steps after it (GeN's lazy estimate; 1: at every step), kept in between. See the module docstring."""

    rate: str | RateRule = "gen"
    rate_probe: str = "fresh"
    rate_every: int = 4

    name: ClassVar[str] = "ngdiff"

    def __post_init__(self):
        super().__post_init__()
        if self.rate_probe not in RATE_PROBES:
            raise ExpungeError(f"unknown rate_probe {self.rate_probe!r}; choose one of {', '.join(RATE_PROBES)}")
        if isinstance(self.rate_every, bool) or not isinstance(self.rate_every, int) or self.rate_every < 1:
            raise ExpungeError(f"rate_every must be a whole number of steps >= 1, got {self.rate_every!r}")
        self._rule = rate_rule(self.rate)

    def _rule_reads_loss(self) -> bool:
        return getattr(self._rule, "evaluates_loss", True)

    def probe_size(self) -> int:
        fresh = self.rate_probe == "fresh" and self._rule_reads_loss()
        return (self.retain_batch_size or self.batch_size) if fresh else 0

    def estimates_rate(self, step: int) -> bool:
        return self._rule_reads_loss() and step % self.rate_every == 0

    def step(self, model, optimizer, params, forget, retain, forget_rows, probe=None, estimate=True):
        retain_nll = row_losses(model, retain).mean()
        retain_grads = _grads(retain_nll, params)
        forget_nll = row_losses(model, forget).mean()
        forget_grads = _grads(forget_nll, params)
        direction, _, _ = ngdiff_direction(retain_grads, forget_grads)
        del retain_grads, forget_grads
        for p, d in zip(params, direction):
            p.grad = d
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        measure = retain if probe is None else probe
        rule = self._rule if estimate else fixed_rate  # between estimates: the step at the rate last set
        rate = staged_step(model, optimizer, params, rule, lambda: float(row_losses(model, measure).mean()))
        measured = Objective(retain_nll.detach() - forget_nll.detach(), float(forget_nll.detach()),
                             float(retain_nll.detach()))
        return measured, rate


METHODS: dict[str, type[LMUnlearner]] = {cls.name: cls for cls in (GradAscent, GradDiff, NPO, SimNPO, NGDiff)}


def make_unlearner(name: str, **settings) -> LMUnlearner:
    """The unlearner called ``name`` (ascent, graddiff, npo, simnpo, ngdiff) with ``settings``."""
    if name not in METHODS:
        raise ExpungeError(f"unknown LM unlearning method {name!r}; choose one of {', '.join(METHODS)}")
    known = {f.name for f in fields(METHODS[name])}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ExpungeError(f"{name} has no setting(s) {unknown}; its settings are {sorted(known)}")
    return METHODS[name](**settings)


# ------------------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def reference_logprobs(model, data: TokenDataset, batch_size: int = 8) -> torch.Tensor:
    """log p(y_i|x_i) of every row under ``model`` as it is now (float32, on CPU, in row order)."""
    device = next(model.parameters()).device
    out = [sequence_logprobs(model, data.batch(np.arange(s, min(s + batch_size, len(data))), device))[0].cpu()
           for s in range(0, len(data), batch_size)]
    return torch.cat(out)


def staged_step(model, optimizer, params, rule: RateRule, loss: Callable[[], float]) -> float:
    """The optimizer's step from the gradients in ``params``, at the rate ``rule`` picks along it (see rates.py);
    ``loss()`` evaluates the loss the rule fits on at the model's current weights. Returns the rate used, which
    also becomes the optimizer's rate for the next step."""
    lr = optimizer.param_groups[0]["lr"]
    if not getattr(rule, "evaluates_loss", True):
        optimizer.step()
        new = float(rule(None, None, lr))
        _set_lr(optimizer, new)
        return new
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        optimizer.step()
        update = [(p.detach() - b) / lr for p, b in zip(params, before)]

        def loss_along(eta: float) -> float:
            for p, b, u in zip(params, before, update):
                p.copy_(b + eta * u)
            was_training = model.training
            model.eval()
            try:
                return loss()
            finally:
                model.train(was_training)

        new = float(rule(update, loss_along, lr))
        if not (math.isfinite(new) and new >= 0):
            raise ExpungeError(f"the rate rule returned {new}; a rate must be a finite number >= 0")
        for p, b, u in zip(params, before, update):
            p.copy_(b + new * u)
    _set_lr(optimizer, new)
    return new


def _grads(loss: torch.Tensor, params) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _optimizer(params, settings: LMUnlearner) -> torch.optim.Optimizer:
    if not params:
        raise ExpungeError("the model has no trainable parameters")
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _snapshot(model) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters an update may change: the trainable ones (with lora_rank, the plain model's
    weights are trainable and are what the merge changes)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def _restore(model, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def _restore_flags(model, requires: dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in requires:
            p.requires_grad_(requires[name])


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "__name__", None) or repr(value)


__all__ = ["GradAscent", "GradDiff", "LMUnlearner", "METHODS", "NGDiff", "NPO", "SimNPO", "UnlearnResult",
           "make_unlearner", "paired_batches", "reference_logprobs", "staged_step"]
