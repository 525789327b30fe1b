"""TIES and DARE: processing task vectors before they are merged, so that MAP can search over them.

TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, NeurIPS 2023):
  1. trim: keep the ``density`` fraction of each task vector's entries with the largest magnitude
     (over the whole vector), zero the rest;
  2. elect: per entry, the sign of the summed trimmed values ("mass"); entries where that sum is 0
     take the sign of the sum of all elected signs (the paper's code calls it the majority sign);
  3. disjoint mean: per entry, the mean over the tasks whose trimmed value is non-zero and carries the
     elected sign.
  TIES then merges theta_0 + lambda * (disjoint mean). Here each task keeps its share of that mean,
  tau'_n = trimmed_n * [sign agrees] / (number agreeing), so theta_0 + sum_n c_n tau'_n is TIES with
  lambda = c for c = (c, ..., c), and per-task coefficients c_n are what MAP searches.

DARE (Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario", ICML 2024): drop each entry of each
task vector independently with probability p and rescale the kept ones by 1 / (1 - p), which keeps
every entry's expectation. Seeded: the same seed drops the same entries.
"""

from __future__ import annotations

import math

import torch

from ..errors import ExpungeError
from .vectors import TaskVectors


def trim_thresholds(vectors: TaskVectors, density: float) -> torch.Tensor:
    """Per task, the magnitude of its ceil(density * size)-th largest entry (ties at it are kept)."""
    if not (0 < density <= 1):
        raise ExpungeError(f"TIES density is the fraction of entries kept, in (0, 1]; got {density}")
    magnitudes = torch.cat([v.abs().reshape(len(vectors), -1) for v in vectors.stack.values()], dim=1)
    size = magnitudes.shape[1]
    keep = math.ceil(density * size)
    return magnitudes.kthvalue(size - keep + 1, dim=1).values


def ties(vectors: TaskVectors, density: float = 0.2) -> TaskVectors:
    """TIES-processed task vectors (trim, elect sign, disjoint mean), one share per task."""
    thresholds = trim_thresholds(vectors, density)
    trimmed = {}
    for key, stack in vectors.stack.items():
        view = thresholds.to(stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
        trimmed[key] = torch.where(stack.abs() >= view, stack, torch.zeros_like(stack))
    elected = {key: torch.sign(t.sum(0)) for key, t in trimmed.items()}
    majority = torch.sign(sum(e.sum() for e in elected.values()))
    majority = majority if majority != 0 else torch.ones_like(majority)
    stack = {}
    for key, t in trimmed.items():
        sign = torch.where(elected[key] == 0, majority.to(t.dtype), elected[key])
        agrees = (torch.sign(t) == sign) & (t != 0)
        count = agrees.sum(0).clamp_min(1).to(t.dtype)
        stack[key] = torch.where(agrees, t, torch.zeros_like(t)) / count
    return vectors.with_stack(stack, {"ties": {"density": density}})


def dare(vectors: TaskVectors, p: float = 0.5, seed: int = 0) -> TaskVectors:
    """DARE-processed task vectors: each entry dropped with probability ``p``, the rest times 1/(1-p).

    Draws: one generator seeded with ``seed``, one uniform number per entry, task by task and entry by
    entry in state-dict order; an entry is kept when its number is >= p."""
    if not (0 <= p < 1):
        raise ExpungeError(f"DARE drop probability p must be in [0, 1); got {p}")
    generator = torch.Generator().manual_seed(seed)
    stack = {key: torch.empty_like(v) for key, v in vectors.stack.items()}
    for n in range(len(vectors)):
        for key, v in vectors.stack.items():
            keep = torch.rand(v[n].shape, generator=generator, dtype=torch.float64) >= p
            stack[key][n] = torch.where(keep, v[n] / (1 - p), torch.zeros_like(v[n]))
    return vectors.with_stack(stack, {"dare": {"p": p, "seed": seed}})
