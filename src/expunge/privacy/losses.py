"""Losses that decompose over rows, as per-sample clipping needs.

The engine clips each row's gradient, so the loss it sees must be a sum (loss_reduction="sum") or a mean
over rows (loss_reduction="mean") of one loss per row. Hugging Face's built-in causal-LM loss is a mean over
all the batch's counted tokens: a row's share then depends on how many tokens the other rows have. Use
causal_lm_loss instead (or call the model with labels and num_items_in_batch=1, which makes the built-in loss
the sum over all tokens: loss_reduction="sum").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ExpungeError

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                   per_row: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of logits (B, T, V) against labels (B, T), which are the input ids with -100
    wherever no loss is taken (padding, a prompt or question); shifted here, as Hugging Face does, so that
    position t predicts label t + 1. Each row's loss is the mean (per_row="mean": every row counts the same)
    or the sum (per_row="sum") over its counted tokens (0 for a row with none); the batch's loss is their
    mean or sum (reduction, the engine's loss_reduction). Computed in float32 at least."""
    if reduction not in ("mean", "sum") or per_row not in ("mean", "sum"):
        raise ExpungeError(f"reduction and per_row must be 'mean' or 'sum', got {reduction!r} and {per_row!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ExpungeError(f"logits must be (batch, positions, vocabulary) and labels (batch, positions); got "
                           f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    # shift the labels, not the logits: the logits (B T V numbers) are not copied
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(target.shape)
    rows = tokens.sum(1)
    if per_row == "mean":
        rows = rows / (target != IGNORE).sum(1).clamp_min(1).to(rows.dtype)
    return rows.mean() if reduction == "mean" else rows.sum()
