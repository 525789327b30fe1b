"""Unlearning objectives for causal LMs: what each method minimises on a forget batch F and a retain batch R.

Notation. A row i has a prompt x_i and a target y_i (the answer tokens of a QA pair, every token of a
document; see data.py). ``log p(y_i|x_i)`` is the sum of the target tokens' log-probabilities
(``sequence_logprobs``) and ``NLL_i = -log p(y_i|x_i) / |y_i|`` its mean per token: the loss training
minimises (train.row_losses). A batch's ``NLL`` is the plain mean of its rows' NLL_i, as in train.py, so
every row weighs the same whatever its length (open-unlearning's Hugging Face loss averages over all the
batch's tokens instead: the two differ only when rows differ in length).

- GradAscent: ``L = -NLL_F``.
- GradDiff:   ``L = -gamma NLL_F + alpha NLL_R`` (open-unlearning: gamma = alpha = 1, NLL retain loss).
- NPO (Zhang, Lin, Bai, Mei 2024):
  ``L = -(2/beta) mean_{i in F} log sigmoid(-beta (log p(y_i|x_i) - log p_ref(y_i|x_i))) * gamma + alpha NLL_R``
  with sequence log-probabilities summed over the target tokens and p_ref the frozen model before the
  request; beta = 0.1, gamma = alpha = 1 (open-unlearning's defaults). With the model equal to its
  reference the forget part is (2/beta) log 2.
- SimNPO (Fan et al. 2024): no reference, length-normalised:
  ``L = -(2/beta) mean_{i in F} log sigmoid(beta NLL_i - margin) * gamma + alpha NLL_R``. The paper writes
  ``-(2/beta) log sigmoid(-(beta/|y|) log p(y|x) - gamma)``: its margin gamma is ``margin`` here.
  Defaults as open-unlearning's TOFU config: beta = 4.5, margin 0 (its ``delta``, subtracted before the
  multiplication by beta: delta = margin / beta), forget weight gamma = 0.125 (its ``gamma``), alpha = 1.
- NGDiff (Jin, Bu, Vinzamuri et al., NAACL 2025) is not a scalar loss but a direction:
  ``d = g_R/||g_R|| - g_F/||g_F||`` with g_R, g_F the gradients of NLL_R and NLL_F over the trainable
  parameters and global norms over all of them (``ngdiff_direction``); descending along d lowers the
  retain loss and raises the forget loss, each at unit speed whatever their scales.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ExpungeError
from .train import row_losses, target_nll


class Objective(NamedTuple):
    """A method's loss on one step (a scalar with its graph) and the batches' mean NLLs (floats, for the record)."""

    loss: torch.Tensor
    forget_nll: float
    retain_nll: float | None


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its target tokens (float32) and its number of target tokens."""
    nll, counts = target_nll(model, batch)
    return -nll, counts


def _retain_term(model, retain, alpha: float) -> tuple[torch.Tensor | float, float | None]:
    if retain is None or alpha == 0:
        return 0.0, None
    nll = row_losses(model, retain).mean()
    return alpha * nll, float(nll.detach())


def ascent_loss(model, forget: dict[str, torch.Tensor]) -> Objective:
    """GradAscent: ``-NLL_F``."""
    nll = row_losses(model, forget).mean()
    return Objective(-nll, float(nll.detach()), None)


def graddiff_loss(model, forget, retain, alpha: float = 1.0, gamma: float = 1.0) -> Objective:
    """GradDiff: ``-gamma NLL_F + alpha NLL_R``."""
    nll = row_losses(model, forget).mean()
    retain_part, retain_nll = _retain_term(model, retain, alpha)
    return Objective(-gamma * nll + retain_part, float(nll.detach()), retain_nll)


def npo_loss(model, forget, reference_logprobs: torch.Tensor, retain=None, beta: float = 0.1, alpha: float = 1.0,
             gamma: float = 1.0) -> Objective:
    """NPO: ``-(2/beta) mean log sigmoid(-beta (log p - log p_ref)) * gamma + alpha NLL_R``; ``reference_logprobs``
    holds log p_ref(y_i|x_i) (summed over target tokens) of the forget batch's rows, from the frozen model."""
    logp, counts = sequence_logprobs(model, forget)
    reference_logprobs = reference_logprobs.to(logp.device, logp.dtype)
    if reference_logprobs.shape != logp.shape:
        raise ExpungeError(f"NPO needs one reference log-probability per forget row: got {tuple(reference_logprobs.shape)} "
                           f"for {len(logp)} rows")
    forget_part = -(2.0 / beta) * F.logsigmoid(-beta * (logp - reference_logprobs)).mean()
    retain_part, retain_nll = _retain_term(model, retain, alpha)
    return Objective(gamma * forget_part + retain_part, float((-logp / counts).mean().detach()), retain_nll)


def simnpo_loss(model, forget, retain=None, beta: float = 4.5, margin: float = 0.0, alpha: float = 1.0,
                gamma: float = 0.125) -> Objective:
    """SimNPO: ``-(2/beta) mean log sigmoid(beta NLL_i - margin) * gamma + alpha NLL_R`` (NLL_i per token)."""
    logp, counts = sequence_logprobs(model, forget)
    nll = -logp / counts
    forget_part = -(2.0 / beta) * F.logsigmoid(beta * nll - margin).mean()
    retain_part, retain_nll = _retain_term(model, retain, alpha)
    return Objective(gamma * forget_part + retain_part, float(nll.mean().detach()), retain_nll)


def global_norm(tensors) -> float:
    """The l2 norm of a list of tensors taken together (float64 accumulation)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def ngdiff_direction(retain_grads, forget_grads) -> tuple[list[torch.Tensor], float, float]:
    """``g_R/||g_R|| - g_F/||g_F||`` (one tensor per parameter), with the two global norms.

    A zero gradient (a task already at a stationary point on this batch) contributes nothing rather than 0/0;
    a non-finite one is refused, since it would turn every weight into NaN."""
    retain_grads, forget_grads = list(retain_grads), list(forget_grads)
    if len(retain_grads) != len(forget_grads):
        raise ExpungeError("the retain and forget gradients must cover the same parameters")
    norms = []
    for name, grads in (("retain", retain_grads), ("forget", forget_grads)):
        norm = global_norm(grads)
        if not math.isfinite(norm):
            raise ExpungeError(f"the {name} gradient is not finite (norm {norm}); lower the learning rate")
        norms.append(norm)
    scale_r = 1.0 / norms[0] if norms[0] > 0 else 0.0
    scale_f = 1.0 / norms[1] if norms[1] > 0 else 0.0
    direction = [scale_r * gr - scale_f * gf for gr, gf in zip(retain_grads, forget_grads)]
    return direction, norms[0], norms[1]
