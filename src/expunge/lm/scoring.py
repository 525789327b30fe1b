"""What a causal LM says about texts, batched and deterministic: per-row NLLs, per-token log-probabilities, and
greedy answers. The evaluation (tofu.py, muse.py) is built from these.

Rows are scored in batches of similar length (sorted by length, longest first, so padding stays small) and
returned in the caller's order; the model runs in eval mode without gradients, under deterministic
algorithms, and its mode is restored afterwards. Generation is greedy (no sampling) with a cap on new tokens,
on left-padded prompts, and stops at the tokenizer's EOS or at any of the ``stop`` strings.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExpungeError
from .data import IGNORE, TokenDataset
from .determinism import deterministic


@contextlib.contextmanager
def inference(model):
    """Eval mode, no gradients, deterministic kernels; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), deterministic():
            yield
    finally:
        model.train(was_training)


def _batches_by_length(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def token_logprobs(model, data: TokenDataset, batch_size: int = 16) -> list[np.ndarray]:
    """For every row, the log-probabilities of its target tokens (float64 arrays, in order)."""
    if batch_size < 1:
        raise ExpungeError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    out: list[np.ndarray | None] = [None] * len(data)
    with inference(model):
        for rows in _batches_by_length(data.lengths, batch_size):
            batch = data.batch(rows, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            targets = batch["labels"][:, 1:]
            logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                    reduction="none").view(targets.shape)
            mask = targets != IGNORE
            for k, row in enumerate(rows):
                out[row] = logp[k][mask[k]].double().cpu().numpy()
    return out


def row_nlls(model, data: TokenDataset, batch_size: int = 16) -> np.ndarray:
    """Each row's mean NLL per target token (as train.row_losses), float64, in row order."""
    return np.array([-lp.mean() for lp in token_logprobs(model, data, batch_size)], dtype=np.float64)


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             stop: tuple[str, ...] = ()) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (at most ``max_new_tokens`` each), decoded without special
    tokens, cut at the first ``stop`` string and stripped; in the prompts' order."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ExpungeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ExpungeError("an empty prompt has nothing to continue; every prompt needs at least one token")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    out: list[str | None] = [None] * len(prompts)
    with inference(model):
        for rows in _batches_by_length(np.array([len(p) for p in prompts]), batch_size):
            width = max(len(prompts[r]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[k, width - len(prompts[r]):] = torch.tensor(prompts[r])
                mask[k, width - len(prompts[r]):] = 1
            new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config)[:, width:]
            for k, r in enumerate(rows):
                out[r] = _cut(tokenizer.decode(new[k], skip_special_tokens=True), stop)
    return out


def _cut(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        if s and s in text:
            text = text.split(s, 1)[0]
    return text.strip()
