"""The tiny-language-model task of `dp-optimizers-long`: private training of a small Llama on TOFU QA, scored by
perplexity on held-out answers.

Data: the first AUTHORS authors of TOFU (`<data>/tofu/full.json`, 20 QA pairs each); every HOLD_OUT-th pair of each
author is held out (the test text), the rest train. Plain `Question: ... Answer: ...` format, the loss on the answer
tokens only (expunge.lm.data); a byte-level BPE of VOCAB tokens trained on the training rows' texts only.
Model: tiny-llama (expunge.lm.models) narrowed by CONFIG, initialised from the run's seed alone, float32.

Training: the package's private engine (`expunge.privacy.make_private` on the token rows: Poisson batches of expected
size RECIPE.batch_size, per-row clipping of each row's mean answer loss at RECIPE.max_grad_norm, noise calibrated so
that the run spends exactly epsilon at delta 1e-5), through `optimizer.step(closure)` as DiSK needs, each method's
optimizer and transforms as for the CNN. Score: `perplexity` = exp(total answer-token NLL / answer tokens) over the
held-out pairs, lower is better (`heldout_loss` is its log).

Size: chosen so that a run costs minutes on one CPU thread (the private step of this model handles ~35-50 rows a
second there): a model of ~0.23M parameters, 3 epochs of 50 steps. A short run, far from the papers' language
tasks; it says how the methods rank on a token model at this scale, not what they give at scale.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpungeError
from . import dp_mnist

AUTHORS, HOLD_OUT = 100, 5  # 2,000 QA pairs: 1,600 training, 400 held out
MODEL, VOCAB, MAX_LENGTH = "tiny-llama", 1024, 320  # TOFU's longest pair is 259 tokens with this BPE
CONFIG = dict(hidden_size=64, intermediate_size=170, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
RECIPE = dp_mnist.Recipe(batch_size=32, epochs=3, lr=0.25, momentum=0.0, max_grad_norm=1.0)
VALIDATION = 160  # the last training rows, for tuning
# Starting grids, placed by 1-epoch validation runs at epsilon 1, batch 64 (perplexity; 1034 untrained): plain SGD
# lr 0.03 / 0.1 / 0.3: 996 / 838 / 602; Adam lr 0.002 / 0.01: 942 / 661.
GRIDS = {"dp-sgd": (0.03, 0.06, 0.125, 0.25), "dp-sgd-plain": (0.125, 0.25, 0.5, 1.0),
         "dp-adam": (2.5e-3, 5e-3, 1e-2, 2e-2), "disk": (0.125, 0.25, 0.5, 1.0), "doppler": (0.03, 0.06, 0.125, 0.25),
         "dicesgd": (0.125, 0.25, 0.5, 1.0)}
METHODS = ("dp-sgd-plain", "dp-adam", "disk", "doppler", "dicesgd")  # the five (DP-SGD as the papers run it)


@dataclass(frozen=True)
class Rows:
    """Token rows and the tokenizer that made them (the model is sized to it)."""
    tokenizer: object
    data: object  # expunge.lm.TokenDataset

    def __len__(self) -> int:
        return len(self.data)

    def take(self, rows) -> "Rows":
        return Rows(self.tokenizer, self.data.take(rows))


def source(data_dir) -> Path | None:
    path = Path(data_dir) / "tofu" / "full.json"
    return path if path.exists() else None


def load(spec, limit: int | None):
    """(training rows, held-out rows) as Rows; ``limit``: the first N training rows and N/4 held out."""
    from ..lm import LMRecipe, encode, load_corpus, prepare

    corpus = load_corpus(spec)
    if len(corpus) < AUTHORS * 20:
        raise ExpungeError(f"{spec} holds {len(corpus)} QA pairs; the tiny-LM task needs TOFU's first {AUTHORS} "
                           f"authors ({AUTHORS * 20} pairs): point --data at the shared data folder")
    rows = np.arange(AUTHORS * 20)
    held = rows % HOLD_OUT == HOLD_OUT - 1
    train, test = corpus.take(rows[~held]), corpus.take(rows[held])
    if limit:
        train, test = train.take(np.arange(min(limit, len(train)))), test.take(np.arange(max(8, min(limit // 4, len(test)))))
    setup = prepare(LMRecipe(model=MODEL, max_length=MAX_LENGTH, vocab_size=VOCAB, device="cpu", dtype="float32"),
                    train, tiny_config=CONFIG)
    return Rows(setup.tokenizer, setup.data), Rows(setup.tokenizer, encode(test, setup.tokenizer, MAX_LENGTH))


def heldout_loss(model, rows: Rows, batch: int = 32) -> float:
    """Answer-token NLL (nats per token) over all held-out rows, token-weighted; inf when not finite."""
    from ..lm.scoring import token_logprobs

    loss = float(-np.concatenate(token_logprobs(model, rows.data, batch)).mean())
    return loss if math.isfinite(loss) else math.inf


def train(train, test, epsilon: float, recipe: dp_mnist.Recipe, seed: int = 0, transforms=None,
          epochs_run: int | None = None) -> dict:
    """Train the tiny LM privately at `epsilon` (noise calibrated for `recipe.epochs`, stopped after `epochs_run`)
    and return the row: `perplexity` on `test`, and what `dp_mnist.run_epsilon`'s rows hold."""
    from ..lm import row_losses
    from ..lm.data import trim_padding
    from ..privacy import make_private

    model = _model(train, seed)
    optimizer = dp_mnist.make_optimizer(model.parameters(), recipe)
    engine = make_private(model, optimizer, train.data, target_epsilon=epsilon, target_delta=dp_mnist.DELTA,
                          epochs=recipe.epochs, max_grad_norm=recipe.max_grad_norm, batch_size=recipe.batch_size,
                          clip_fn=recipe.clip_fn, seed=seed, transforms=transforms, loss_reduction="mean")
    epochs_run = recipe.epochs if epochs_run is None else min(epochs_run, recipe.epochs)
    initial = heldout_loss(model, test)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs_run):
        for batch in engine.loader:
            batch = trim_padding(batch)

            def closure(batch=batch):  # DiSK evaluates it at its extrapolated point
                engine.optimizer.zero_grad()
                loss = row_losses(model, batch).mean() if len(batch["input_ids"]) else None
                if loss is not None:
                    loss.backward()
                return loss

            engine.optimizer.step(closure)  # an empty draw still steps: the engine releases pure noise
    seconds = time.perf_counter() - start
    engine.detach()
    loss = heldout_loss(model, test)
    return {"epsilon_target": epsilon, "epsilon_pld": engine.epsilon(dp_mnist.DELTA, "pld"), "delta": dp_mnist.DELTA,
            "noise_multiplier": engine.noise_multiplier, "epochs": recipe.epochs, "epochs_run": epochs_run,
            "batch_size": recipe.batch_size, "steps": engine.steps, "perplexity": math.exp(min(loss, 700.0)),
            "heldout_loss": loss if math.isfinite(loss) else None, "initial_heldout_loss": initial,
            "seconds": seconds, "rows": len(train), "test_rows": len(test),
            "parameters": sum(p.numel() for p in model.parameters()), "lr": recipe.lr, "momentum": recipe.momentum,
            "max_grad_norm": recipe.max_grad_norm, "clip_fn": recipe.clip_fn, "optimizer": recipe.optimizer}


def _model(rows: Rows, seed: int):
    """tiny-llama sized to the rows' tokenizer, its weights a function of `seed` alone (no dropout in it)."""
    from ..lm.models import build_tiny

    return build_tiny(MODEL, rows.tokenizer, max_length=MAX_LENGTH, seed=seed, overrides=CONFIG)
