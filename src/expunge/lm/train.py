"""The LM trainer: a Hugging Face causal LM on a TokenDataset, following a deterministic batch plan.

Loss. Each row's loss is its mean negative log-likelihood over its own target tokens (answer tokens of a QA
pair, every token of a document); a step's loss is the plain mean of its rows' losses:

    loss(B) = (1/|B|) sum_{i in B} (1/|T_i|) sum_{t in T_i} -log p(x_t | x_<t)

So every row weighs the same whatever its length, a row's gradient does not depend on which rows share its
batch (as per-sample clipping needs), and splitting a step into micro-batches (gradient accumulation) gives
the same gradient as one pass: each micro-batch backpropagates sum_{i in micro} loss_i / |B|.

Plan. As for the other models (recipe.BatchPlan): every epoch is a seeded permutation of the original rows
cut into steps of ``batch_size * grad_accum`` rows; a removed row leaves a hole in its step and nothing
shifts; a step whose rows were all removed is skipped (no optimizer step) but the learning-rate schedule
still advances, so every other step keeps its learning rate. Dropout (if the model has any) draws from a
seed of (recipe seed, step), and training runs under deterministic algorithms. Exact retraining is this
function from the same initial weights, recipe and plan, with the removed rows inactive: bit for bit what
training on the remaining rows gives (same device and thread count).

Automatic rate (``recipe.lr_auto``, ``expunge train --task lm --lr auto``). ``expunge.optim.GeN`` wraps the
optimizer and sets its rate from the curvature of the loss along each step: every ``recipe.lr_every`` optimizer
steps it measures the mean row loss, with dropout off (GeN needs a deterministic loss), at a few points along the
step on that plan step's rows of the probe stream (``plan.probes()``, a second recorded plan of the same rows:
a removed row leaves a hole there too). The transformers schedule is dropped (GeN owns the rate); a linear or
cosine ``schedule`` becomes GeN's horizon over the plan's steps. GeN steps only on steps that have rows, so its
rates are a function of the active rows alone and exact retraining after a deletion reproduces them (and the
weights) bit for bit. The applied rates are in ``TrainResult.rates``, GeN's estimates in ``.estimates``.
Private training refuses it: the probes would read private rows without being accounted.

Private training. ``private(model, optimizer, data, recipe)`` returns a make_private-style engine (``.optimizer``
wrapping ours, ``.loader`` yielding Poisson-sampled physical batches); the trainer then follows the engine's
sampling instead of the plan, on the active rows, and the loss passed back is the mean of the rows' losses
(``loss_reduction="mean"``); ``TrainResult.losses`` holds each logical batch's mean row loss. ``dp_hook(...)``
builds one from ``expunge.privacy.make_private``. In data-parallel private training (``model`` in
DistributedDataParallel, every rank calling train_lm: ``expunge.unlearn.lm_run``'s ``--nproc``) each rank trains on
its share of every logical batch and the counts and losses of the result are summed over the ranks.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExpungeError
from ..progress import track
from ..recipe import BatchPlan
from .data import IGNORE, TokenDataset, trim_padding
from .determinism import deterministic, seeded, step_seed
from .recipe import LMRecipe

SCHEDULE_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}

PrivateHook = Callable[[torch.nn.Module, torch.optim.Optimizer, TokenDataset, LMRecipe], object]


@dataclass
class TrainResult:
    """What a training did: optimizer ``steps`` taken, plan steps ``skipped`` (all rows removed), row passes,
    input tokens (padding excluded) and target tokens processed, ``losses`` (the mean row loss of each
    optimizer step; in private training, of each logical batch that drew rows), wall time, and the privacy
    engine when training was private."""

    steps: int = 0
    skipped: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    engine: object | None = None
    rates: list[float] = field(default_factory=list)  # the learning rate of each optimizer step (planned training)
    estimates: list = field(default_factory=list)  # GeN's estimates (expunge.optim.gen.Estimate) when lr_auto

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def lm_plan(recipe: LMRecipe, n_rows: int) -> BatchPlan:
    """The batch plan of a training on ``n_rows`` original rows: ``recipe.step_rows`` rows per optimizer step."""
    return BatchPlan(n_rows, recipe.step_rows, recipe.epochs, recipe.seed)


def target_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed NLL over its target tokens (labels != -100, shifted: logits at t predict token t+1), in
    float32 whatever the model's dtype, and its number of target tokens. Shapes (rows,), (rows,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(targets.shape)
    counts = (targets != IGNORE).sum(1)
    if (counts == 0).any():
        raise ExpungeError("a row of the batch has no target tokens (every label is masked): it has nothing to score")
    return nll.sum(1), counts


def row_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's mean NLL over its target tokens, in float32. Shape (rows,)."""
    nll, counts = target_nll(model, batch)
    return nll / counts


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, recipe: LMRecipe) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over the trainable parameters (all, or the LoRA adapters)."""
    params = trainable_parameters(model)
    if not params:
        raise ExpungeError("the model has no trainable parameters")
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, recipe: LMRecipe, n_steps: int):
    """Linear warm-up over ``recipe.warmup_steps`` steps, then constant, linear decay to 0 or cosine decay to 0
    at ``n_steps`` (transformers' schedules); step it once per plan step."""
    from transformers import get_scheduler

    if recipe.warmup_steps > n_steps:
        raise ExpungeError(f"warmup_steps {recipe.warmup_steps} is longer than the training ({n_steps} steps)")
    return get_scheduler(SCHEDULE_NAMES[recipe.schedule], optimizer, num_warmup_steps=recipe.warmup_steps,
                         num_training_steps=n_steps)


def train_lm(model, data: TokenDataset, recipe: LMRecipe, active: np.ndarray | None = None, *,
             plan: BatchPlan | None = None, private: PrivateHook | None = None, optimizer=None,
             progress: bool = False) -> TrainResult:
    """Train ``model`` in place on the ``active`` rows of ``data`` (default all) as the recipe says; see the
    module docstring. ``plan`` defaults to ``lm_plan(recipe, len(data))``; ``optimizer`` to ``make_optimizer``."""
    active = np.ones(len(data), bool) if active is None else np.asarray(active, bool)
    if active.shape != (len(data),):
        raise ExpungeError(f"active must mark each of the {len(data)} rows, got shape {active.shape}")
    if not active.any():
        raise ExpungeError("no active rows: nothing to train on")
    if private is not None and recipe.lr_auto:
        raise ExpungeError("an automatic learning rate (GeN) is not available for private training: its loss probes "
                           "would read private rows without being accounted; give a fixed --lr with --dp")
    if private is not None and recipe.max_grad_norm is not None:
        raise ExpungeError("max_grad_norm clips the whole step's gradient and does not apply to private training, "
                           "which clips each row's gradient (give the engine its max_grad_norm instead)")
    optimizer = optimizer or make_optimizer(model, recipe)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    try:
        with deterministic():
            if private is None:
                result = _train_planned(model, data, recipe, active, plan or lm_plan(recipe, len(data)), optimizer,
                                        progress)
            else:
                result = _train_private(model, data, recipe, active, private, optimizer, progress)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def auto_rate(model, data: TokenDataset, recipe: LMRecipe, active: np.ndarray, plan: BatchPlan, optimizer,
              n_steps: int):
    """GeN around ``optimizer`` probing on the probe stream of ``plan`` (module docstring). Returns the GeN and a
    function ``at(t)`` that points its probe at plan step t's probe rows."""
    from ..optim import GeN, cosine_horizon, linear_horizon

    probes = plan.probes().iterations(active, data.ids)
    device = next(model.parameters()).device
    current = [0]

    def probe():  # the mean row loss on step t's probe rows at the weights GeN moves, dropout off
        rows = probes[current[0]]

        def loss() -> torch.Tensor:
            if not len(rows):  # every probe row of this step was removed: no estimate (GeN keeps the rate)
                return torch.tensor(float("nan"))
            model.eval()
            try:
                total = sum(row_losses(model, data.batch(rows[start:start + recipe.batch_size], device)).sum()
                            for start in range(0, len(rows), recipe.batch_size))
            finally:
                model.train()
            return total / len(rows)

        return loss

    horizon = {"constant": None, "linear": linear_horizon, "cosine": cosine_horizon}[recipe.schedule]
    gen = GeN(optimizer, probe=probe, every=recipe.lr_every, schedule=horizon and horizon(n_steps))

    def at(t: int) -> None:
        current[0] = t

    return gen, at


def _train_planned(model, data, recipe, active, plan, optimizer, progress) -> TrainResult:
    device = next(model.parameters()).device
    steps = plan.iterations(active, data.ids)
    if recipe.lr_auto:  # GeN owns the rate: no transformers schedule
        schedule, (gen, probe_at) = None, auto_rate(model, data, recipe, active, plan, optimizer, len(steps))
    else:
        schedule = make_schedule(optimizer, recipe, len(steps))
    params = trainable_parameters(model)
    result = TrainResult()
    for t, rows in track(enumerate(steps), len(steps), "training", progress):
        if len(rows):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            with seeded(step_seed(recipe.seed, t)):
                for start in range(0, len(rows), recipe.batch_size):
                    batch = data.batch(rows[start:start + recipe.batch_size], device)
                    losses = row_losses(model, batch)
                    (losses.sum() / len(rows)).backward()
                    total += float(losses.detach().sum())
                    _count(result, batch)
            if recipe.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            if schedule is None:  # GeN steps only on steps that have rows
                probe_at(t)
                gen.step()
                result.rates.append(gen.rates[-1])
            else:
                result.rates.append(float(optimizer.param_groups[0]["lr"]))
                optimizer.step()
            result.steps += 1
            result.losses.append(total / len(rows))
        else:
            result.skipped += 1
        if schedule is not None:
            with warnings.catch_warnings():  # a skipped first step warns that the schedule stepped first: intended
                warnings.simplefilter("ignore", UserWarning)
                schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if schedule is None:
        result.estimates = list(gen.history)
    return result


def _train_private(model, data, recipe, active, private, optimizer, progress) -> TrainResult:
    device = next(model.parameters()).device
    engine = private(model, optimizer, data.take(np.flatnonzero(active)), recipe)
    n_steps = recipe.epochs * len(engine.loader)
    schedule = make_schedule(optimizer, recipe, n_steps)
    step_losses, current = [], [0.0, 0]  # per logical batch: its rows' summed loss and their number

    def logical_step(*args) -> None:  # the engine steps our optimizer once per logical batch
        schedule.step()
        step_losses.append(tuple(current))
        current[:] = [0.0, 0]

    hook = optimizer.register_step_post_hook(logical_step)
    result = TrainResult(engine=engine)
    physical = 0
    try:
        for _ in track(range(recipe.epochs), recipe.epochs, "private training", progress):
            for batch in engine.loader:
                engine.optimizer.zero_grad(set_to_none=True)
                batch = trim_padding(batch)
                if len(batch["input_ids"]):
                    with seeded(step_seed(recipe.seed, physical)):
                        losses = row_losses(model, {k: v.to(device) for k, v in batch.items()})
                        losses.mean().backward()
                    current[0] += float(losses.detach().double().sum())
                    current[1] += len(losses)
                    _count(result, batch)
                engine.optimizer.step()  # an empty draw still steps: the engine releases pure noise
                physical += 1
    finally:
        hook.remove()
    result.steps = schedule.last_epoch
    _combine_ranks(result, step_losses, engine)
    engine.optimizer.zero_grad(set_to_none=True)
    return result


def _combine_ranks(result: TrainResult, step_losses: list[tuple[float, int]], engine) -> None:
    """Set ``result.losses`` to each logical batch's mean row loss (batches that drew rows) and, when the engine
    trains data parallel, sum the losses and counts over the ranks: every rank's result is then the whole
    training's, the same figures one process gives (to the rounding of the sums)."""
    sums = torch.tensor(step_losses, dtype=torch.float64).reshape(-1, 2)
    counts = torch.tensor([result.rows, result.tokens, result.target_tokens], dtype=torch.int64)
    parallel = getattr(engine, "dist", None)
    if parallel is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, group=parallel.group)
        dist.all_reduce(counts, group=parallel.group)
        result.rows, result.tokens, result.target_tokens = (int(c) for c in counts)
    result.losses = [float(total / rows) for total, rows in sums.tolist() if rows > 0]


def _count(result: TrainResult, batch: dict[str, torch.Tensor]) -> None:
    result.rows += len(batch["input_ids"])
    result.tokens += int(batch["attention_mask"].sum())
    result.target_tokens += int((batch["labels"][:, 1:] != IGNORE).sum())


def dp_hook(*, target_epsilon: float | None = None, target_delta: float | None = None,
            noise_multiplier: float | None = None, max_grad_norm: float = 1.0, physical_batch_size: int | None = None,
            **make_private_options) -> PrivateHook:
    """A private-training hook from ``expunge.privacy.make_private``: the expected logical batch is the recipe's
    ``batch_size * grad_accum`` rows, physical batches ``physical_batch_size`` rows (default the recipe's
    ``batch_size``), ``epochs`` and ``seed`` from the recipe, loss reduction "mean". Other options (clipping,
    clip_fn, accountant, prior_phases, transforms...) pass through."""

    def hook(model, optimizer, data: TokenDataset, recipe: LMRecipe):
        from ..privacy import make_private

        if recipe.step_rows > len(data):
            raise ExpungeError(f"the expected batch ({recipe.step_rows} rows) is larger than the data ({len(data)} rows)")
        return make_private(model, optimizer, data, batch_size=recipe.step_rows,
                            physical_batch_size=physical_batch_size or recipe.batch_size,
                            epochs=recipe.epochs, target_epsilon=target_epsilon, target_delta=target_delta,
                            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, seed=recipe.seed,
                            loss_reduction="mean", **make_private_options)

    return hook
