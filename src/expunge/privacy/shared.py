"""Parameters shared by several layers (tied input and output embeddings, any weight two modules hold).

A shared parameter's per-sample gradient is the sum of its uses, g_i = sum_j g_ij, so its squared norm is
sum_j ||g_ij||^2 + 2 sum_{j<l} <g_ij, g_il>: every layer's own norm plus the cross terms between layers.
Each handler describes its part of the per-sample gradient in one of three forms, and the cross terms are
taken between the forms without building a per-sample gradient that the handlers did not build anyway:

- Dense(t): per-sample gradients (B, *shape), as instantiated by a handler;
- LowRank(left, right): sum_t left[:, t] right[:, t]^T, a Linear's ghost form: (B, T, rows) and (B, T, cols)
  in the parameter's own layout (output gradients and inputs for nn.Linear; inputs and output gradients for
  transformers' Conv1D, whose weight is stored transposed);
- Rows(ids, grads): sum_t e_{ids[:, t]} grads[:, t]^T, an embedding's: the token ids (B, T) select the rows.

For a tied embedding (ids, G) and output head (inputs A, output gradients D), the cross term per row is
sum_{s,t} D[t, ids_s] <G_s, A_t>: a T x T product and a gather, O(T^2 d), never the V x d gradient.
Every inner product is taken in at least float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32 when it is stored in half or bfloat16 precision (norms and sums are never taken in those)."""
    return t.float() if t.dtype in LOW_PRECISION else t


@dataclass
class Dense:
    grads: torch.Tensor  # (B, *parameter shape)


@dataclass
class LowRank:
    left: torch.Tensor  # (B, T, rows)
    right: torch.Tensor  # (B, T, cols)


@dataclass
class Rows:
    ids: torch.Tensor  # (B, T) row indices into the parameter
    grads: torch.Tensor  # (B, T, cols)


def inner(x, y) -> torch.Tensor:
    """Per-row inner products <x_i, y_i> of two per-sample gradients of one parameter, as a (B,) tensor."""
    order = (Dense, LowRank, Rows)
    if order.index(type(x)) > order.index(type(y)):
        x, y = y, x
    if isinstance(x, Dense):
        d = wide(x.grads)
        B = d.shape[0]
        if isinstance(y, Dense):
            return torch.linalg.vecdot(d.reshape(B, -1), wide(y.grads).reshape(B, -1), dim=1)
        if isinstance(y, LowRank):  # sum_t left_t^T D right_t
            left, right = wide(y.left), wide(y.right)
            d = d.reshape(B, left.shape[2], right.shape[2])
            return (torch.bmm(right, d.transpose(1, 2)) * left).sum((1, 2))
        rows = d.reshape(B, d.shape[1], -1)  # Rows: sum_t <D[ids_t], grads_t>
        grads = wide(y.grads)
        picked = rows.gather(1, y.ids.unsqueeze(2).expand(-1, -1, rows.shape[2]))
        return (picked * grads).sum((1, 2))
    if isinstance(x, LowRank):
        if isinstance(y, LowRank):  # <L1 R1^T, L2 R2^T> = sum_{s,t} (L1_s . L2_t)(R1_s . R2_t)
            lefts = torch.bmm(wide(x.left), wide(y.left).transpose(1, 2))
            return (lefts * torch.bmm(wide(x.right), wide(y.right).transpose(1, 2))).sum((1, 2))
        # Rows: sum_{s,t} left[t, ids_s] <grads_s, right_t>
        T_rows = y.ids.shape[1]
        picked = x.left.gather(2, y.ids.unsqueeze(1).expand(-1, x.left.shape[1], T_rows))
        return (wide(picked) * torch.bmm(wide(x.right), wide(y.grads).transpose(1, 2))).sum((1, 2))
    same = y.ids.unsqueeze(1) == x.ids.unsqueeze(2)  # Rows, Rows: equal ids meet
    return torch.bmm(wide(x.grads), wide(y.grads).transpose(1, 2)).masked_fill_(~same, 0).sum((1, 2))
