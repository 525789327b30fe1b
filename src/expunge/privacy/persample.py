"""Per-sample gradient norms and clipped gradient sums in one backward pass (book-keeping).

Each layer with trainable parameters gets a handler. During the ordinary backward pass the handler
keeps what it needs (the layer's input and the gradient of its output), computes each row's squared
gradient norm for each of its parameters, and, once the clipping factors c_i are known, the clipped
sum  sum_i c_i g_i  directly as one weighted product (Bu et al. 2023, "book-keeping"): no second
backward pass, and per-sample gradient tensors only where they are cheaper than the ghost norm.

- Linear (any number of leading dims; also transformers' Conv1D): with one position per row the norm is
  |a_i| |d_i|; otherwise either the ghost norm ||g_i||^2 = <a_i a_i^T, d_i d_i^T> from T x T Gram
  matrices (T = positions per row; computed in three half-size blocks from T = 64, and once for an input
  that several layers read, as q, k and v do), or the per-sample gradients d_i^T a_i by one batched
  product; `instantiate` chooses by cost and memory. Its weight gradient is not computed by autograd.
- Conv1d / Conv2d (groups 1, zero padding): per-sample gradients by the backend's weight-gradient kernel
  with the batch as groups, or the ghost norm on unfolded patches (treated as a Linear's rows) with the
  clipped sum as one weight gradient of row-weighted output gradients.
- Embedding: ghost norm over equal token ids; padding positions contribute nothing, as in torch.
- LayerNorm / GroupNorm / RMSNorm: per-sample gradients instantiated (they are small).
- Any other module that owns parameters: per-sample gradients by torch.func (vmap of grad).

Output gradients are kept as autograd gives them: the loss's scale (the batch size for a mean) goes on
the squared norms and on the clipping factors, never on the tensors. Captured tensors are dropped as soon
as the norms are computed, and what a parameter's clipped sum needs as soon as it is summed.

A layer called several times in one forward (weight sharing within the module) is handled exactly:
its calls are concatenated along the position axis before the norm is taken. A parameter that several
modules hold (tied embeddings) gets the norm of its summed per-sample gradient from each module's part and
the cross terms between them (shared.py).

A layer called on an input of one row in a forward of B > 1 rows (GPT-2 looks up its position embedding
for position ids of shape (1, T) and lets the addition broadcast it) has that input expanded to the B rows,
so that each row's gradient reaches the layer from that row's output gradient alone.

Half and bfloat16 models keep their activations as they are; norms, per-sample gradients and clipped
sums are computed in float32 (the widened copies a block of rows at a time where they would be large).
"""
from __future__ import annotations

import threading
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ExpungeError
from .shared import LOW_PRECISION, Dense, LowRank, Rows, wide

_local = threading.local()


def capturing() -> bool:
    """False while a torch.func fallback re-runs a module per sample: nested layers must not record."""
    return getattr(_local, "capturing", True)


class _NoCapture:
    def __enter__(self):
        self.previous = capturing()
        _local.capturing = False

    def __exit__(self, *exc):
        _local.capturing = self.previous


class LayerHandler:
    """Collects (input, output-gradient) pairs of one module and turns them into per-parameter
    squared per-sample norms and clipped sums."""

    sums_into_others = False  # True when the clipped sum is best added into one another layer made (sparse rows)

    def __init__(self, name: str, module: nn.Module, params: dict[str, nn.Parameter]):
        self.name, self.module, self.params = name, module, params  # params: attribute name -> trainable parameter
        self.calls = 0  # forward calls whose output gradient is awaited
        self.pairs: list[tuple] = []
        self.norms_sq: dict[str, torch.Tensor] | None = None
        self.scale = 1.0  # multiplies output gradients (loss reduction "mean": the batch size)
        self.free_after_sum = True  # False when the engine sums twice (DiceSGD also needs sum_i g_i)
        self.shared: set[str] = set()  # parameters that other handlers use too (tied weights)
        self.guarded: set[str] = set()  # parameters whose every gradient must come through handlers like this one
        self.batch_rows = 0  # rows of the model's current forward (set by the engine; 0 when unknown)

    # -- capture ---------------------------------------------------------------------------------
    def attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def forward_called(self) -> None:
        self.calls += 1

    def captured(self, *pair) -> None:
        # detached: a pair kept past its backward (DiSK's first point) must not hold the autograd graph
        self.pairs.append(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in pair))

    @property
    def complete(self) -> bool:
        return self.calls > 0 and len(self.pairs) >= self.calls

    @property
    def empty(self) -> bool:
        return not self.pairs

    # -- maths -----------------------------------------------------------------------------------
    def compute_norms(self) -> dict[str, torch.Tensor]:
        """Per-parameter (B,) squared per-sample norms; keeps what clipped_sum needs."""
        raise NotImplementedError

    def clipped_sum(self, factors: dict[str, torch.Tensor], into: dict | None = None) -> dict[str, torch.Tensor]:
        """sum_i factors[name][i] * g_i for each trainable parameter. ``into`` may hold, by name, a running sum
        that the handler may add its own to in place (and return): no new parameter-sized tensor then."""
        raise NotImplementedError

    def per_sample(self, name: str):
        """This layer's per-sample gradients of one parameter (unscaled) as a shared.Dense, LowRank or Rows, for
        the cross terms of a parameter that several layers use; valid between compute_norms and clipped_sum."""
        raise NotImplementedError

    def broadcast(self, x):
        """An input of one row in a forward of several (GPT-2's position ids, shape (1, T)) is broadcast over
        the batch by the layers that read the output; expanded here, so that each row's gradient reaches this
        layer apart instead of summed over the rows by autograd."""
        if self.batch_rows > 1 and isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            return x.expand(self.batch_rows, *x.shape[1:])
        return x

    def reset(self) -> None:
        self.calls, self.pairs, self.norms_sq = 0, [], None
        self._batch = None
        self._clear_state()

    def _clear_state(self) -> None:
        pass

    def _release_pairs(self) -> None:
        """Drop the captured tensors once compute_norms has what it needs (the count of calls stays)."""
        self._batch = self.batch_size()
        self.pairs = [None] * len(self.pairs)

    def batch_size(self) -> int:
        if getattr(self, "_batch", None) is not None:
            return self._batch
        return self.pairs[0][-1].shape[0] if self.pairs else 0


# ------------------------------------------------------------------------------------------------
# Linear-like layers: a custom autograd function computes the input gradient only and hands
# (input, output gradient) to the handler, so autograd never builds the non-private weight gradient.

class _CaptureLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, handler):
        ctx.handler = handler
        ctx.save_for_backward(x, weight)
        ctx.input_shape = x.shape
        return handler.op(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        handler = ctx.handler
        handler.captured(x, grad_out)
        handler.after_capture()
        grad_in = handler.input_grad(grad_out, weight, ctx.input_shape) if ctx.needs_input_grad[0] else None
        return grad_in, None, None, None


class _PatchedForward(LayerHandler):
    """Handlers that replace the module's forward with a capturing one (undone by detach)."""

    def attach(self) -> None:
        handler, module = self, self.module

        def forward(mod, x, *args, **kwargs):
            if args or kwargs or not capturing() or not torch.is_grad_enabled():
                return handler.plain_forward(x, *args, **kwargs)
            weight, bias = handler.weight_and_bias()
            if not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
                return handler.plain_forward(x)
            x = handler.broadcast(x)
            handler.forward_called()
            return _CaptureLinear.apply(x, weight, bias, handler)

        self._original_forward = module.forward
        module.forward = types.MethodType(forward, module)
        self._guard_parameters()

    def _guard_parameters(self) -> None:
        """The capturing forward gives autograd no gradient for these parameters: a gradient that reaches one
        comes from a use that no handler sees (a functional x @ weight.T outside the module, a call with extra
        arguments), whose per-sample part would escape clipping. Refused while capturing."""
        def guard(name):
            def hook(grad):
                if grad is not None and capturing():  # (the capturing forward's own None passes)
                    raise ExpungeError(
                        f"parameter {self.name}.{name} received a gradient from a use outside its module's plain "
                        f"forward (a functional use such as x @ {self.name}.{name}.T, or a call with extra "
                        "arguments): per-sample clipping cannot see that use; use the parameter through its "
                        "module (tie another module's parameter to it instead)")
                return grad
            return hook

        self._guards = [p.register_hook(guard(name)) for name, p in self.params.items() if name in self.guarded]

    def detach(self) -> None:
        if hasattr(self, "_original_forward"):
            del self.module.forward  # the instance attribute goes; the class method shows through again
            del self._original_forward
            for guard in self._guards:
                guard.remove()

    def plain_forward(self, x, *args, **kwargs):
        return self._original_forward(x, *args, **kwargs)

    def weight_and_bias(self):
        return self.module.weight, self.module.bias

    def after_capture(self) -> None:
        self.on_capture(self)

    on_capture = staticmethod(lambda handler: None)  # the engine replaces it to clip groups early


class LinearHandler(_PatchedForward):
    """nn.Linear (weight p x d) or transformers' Conv1D (weight d x p, `transposed`)."""

    def __init__(self, name, module, params, transposed: bool = False):
        super().__init__(name, module, params)
        self.transposed = transposed

    def op(self, x, weight, bias):
        if self.transposed:
            out = x @ weight
            return out + bias if bias is not None else out
        return F.linear(x, weight, bias)

    def input_grad(self, grad_out, weight, input_shape):
        return grad_out @ (weight.t() if self.transposed else weight)

    def _activations(self):
        """All calls as (B, T, d) inputs and (B, T, p) output gradients, concatenated over T (unscaled)."""
        a = [x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in self.pairs]
        g = [gr.reshape(gr.shape[0], -1, gr.shape[-1]) for _, gr in self.pairs]
        return (a[0], g[0]) if len(a) == 1 else (torch.cat(a, 1), torch.cat(g, 1))

    def _shared_input(self):
        """The input tensor when one call is captured and the rows are the tensor's own (a cache key)."""
        return self.pairs[0][0] if len(self.pairs) == 1 else None

    def compute_norms(self):
        shared = self._shared_input()
        a, g = self._activations()
        self._release_pairs()
        self._a = self._g = self._per_sample = self._bias_per_sample = None
        B, T, d, p = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        s2 = self.scale * self.scale
        norms = {}
        if "weight" in self.params:
            # per-sample gradients are kept in float32 at least: in units of what the ghost norm keeps, they
            # cost twice as much when the activations are half or bfloat16
            kept = T * (p + d) // 2 if a.dtype in LOW_PRECISION else T * (p + d)
            if T == 1:  # the gradient is the outer product g a^T: its norm is |a| |g|
                norms["weight"] = _sq_rows(a[:, 0]) * _sq_rows(g[:, 0])
                self._a, self._g = a, g
            elif instantiate(T, p, d, kept):  # (B, p, d): the same product autograd would do, batched by row
                self._per_sample = torch.bmm(wide(g).transpose(1, 2), wide(a))
                norms["weight"] = _sq_rows(self._per_sample.view(B, -1))
            else:  # ghost norm <a a^T, g g^T> from two T x T Gram matrices per row
                norms["weight"] = _ghost_norm(_gram(a, shared), _gram(g, None))
                self._a, self._g = a, g
        if "bias" in self.params:
            self._bias_per_sample = g.sum(1, dtype=torch.float32 if g.dtype in LOW_PRECISION else None)
            norms["bias"] = _sq_rows(self._bias_per_sample)
        if s2 != 1.0:  # the output gradients were of a mean loss: scale the norms, not the tensors
            norms = {k: v * s2 for k, v in norms.items()}
        self.norms_sq = norms
        return norms

    def clipped_sum(self, factors, into=None):
        out = {}
        if "weight" in factors:
            c = factors["weight"] * self.scale if self.scale != 1.0 else factors["weight"]
            if self._per_sample is not None:
                ps = self._per_sample
                w = (c.to(ps.dtype).unsqueeze(0) @ ps.view(ps.shape[0], -1)).view(ps.shape[1], ps.shape[2])
                out["weight"] = (w.t() if self.transposed else w).reshape(self.params["weight"].shape)
            else:
                out["weight"] = self._ghost_weight_sum(c, (into or {}).get("weight"))
            if self.free_after_sum:  # each parameter is summed once: free what it kept
                self._clear_weight()
        if "bias" in factors:
            c = factors["bias"] * self.scale if self.scale != 1.0 else factors["bias"]
            out["bias"] = c.to(self._bias_per_sample.dtype) @ self._bias_per_sample
            if self.free_after_sum:
                self._bias_per_sample = None
        return out

    def _ghost_weight_sum(self, c: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i c_i g_i^T a_i (a_i^T g_i for Conv1D) as one product, in the parameter's layout, added to
        ``total`` when given: the factors go on the narrower of a and g (in float32 at least, a block of rows
        at a time when a and g are stored in lower precision)."""
        for a, g, cc in _row_blocks(self._a, self._g, c):
            a, g = wide(a), wide(g)
            cc = cc.to(a.dtype)[:, None, None]
            if a.shape[2] <= g.shape[2]:
                a = a * cc
            else:
                g = g * cc
            a, g = a.reshape(-1, a.shape[2]), g.reshape(-1, g.shape[2])
            left, right = (a, g) if self.transposed else (g, a)
            total = left.t() @ right if total is None else total.addmm_(left.t(), right)
        return total

    def per_sample(self, name):
        if name == "bias":
            return Dense(self._bias_per_sample)
        if self._per_sample is not None:  # (B, p, d) in nn.Linear's layout
            return Dense(self._per_sample.transpose(1, 2) if self.transposed else self._per_sample)
        return LowRank(self._a, self._g) if self.transposed else LowRank(self._g, self._a)

    def _clear_weight(self) -> None:
        self._a = self._g = self._per_sample = None

    def _clear_state(self):
        self._a = self._g = self._per_sample = self._bias_per_sample = None


INSTANTIATE_UP_TO = 1.75  # per-sample gradients may take this many times the memory the ghost norm keeps ...
GRAM_WORK_FROM = 32  # ... when the Gram matrices would cost this many multiply-adds per gradient entry


def instantiate(T: int, p: int, d: int, kept: int | None = None) -> bool:
    """Per-sample gradients (B, p, d) rather than the ghost norm, for a layer with T > 1 positions per row.

    Instantiating costs the batched product g_i^T a_i, which is the weight gradient autograd would compute
    anyway (B T p d multiply-adds), then a few memory passes over B p d numbers (norms, clipped sum). The
    ghost norm adds two T x T Gram matrices, B T^2 (p + d) multiply-adds, to the clipped product (B T p d),
    and keeps the input and the output gradient (``kept`` numbers per row; T (p + d) for a Linear) until
    the clipping factors are known. So:

    - per-sample gradients no larger than what the ghost norm keeps: instantiate (less memory, less work);
    - Gram matrices larger than the gradients (2 T^2 > p d): instantiate;
    - otherwise instantiate only when the Grams are expensive, at least GRAM_WORK_FROM multiply-adds per
      gradient entry (a memory pass costs about that on a CPU core), and the per-sample gradients take at
      most INSTANTIATE_UP_TO times what the ghost norm keeps. In a small GPT at T = 128 this instantiates
      the MLP (1.6x the memory, 80 multiply-adds per entry; about 5% faster steps) but not the 4096-token
      head (1.9x: no measurable gain, 23% more peak memory); at T = 3 the Grams are nearly free."""
    kept = T * (p + d) if kept is None else kept
    if p * d <= kept or 2 * T * T > p * d:
        return True
    return T * T * (p + d) >= GRAM_WORK_FROM * p * d and p * d <= INSTANTIATE_UP_TO * kept


def _sq_rows(v: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of a (B, ...) tensor, in float32 at least (vector_norm makes no (B, n)
    temporary; vecdot does)."""
    dtype = torch.float32 if v.dtype in LOW_PRECISION else None
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1, dtype=dtype).square()


WIDE_BLOCK = 1 << 24  # numbers per block when low-precision tensors are widened to float32 for a product


def _row_blocks(*tensors: torch.Tensor):
    """The tensors (all with the batch's rows first) whole, or in blocks of rows when one is half or bfloat16
    and would be widened to float32 (so that the widened copies stay near WIDE_BLOCK numbers)."""
    if not any(t.dtype in LOW_PRECISION for t in tensors):
        yield tensors
        return
    step = max(1, WIDE_BLOCK // max(1, sum(t[0].numel() for t in tensors)))
    for start in range(0, tensors[0].shape[0], step):
        yield tuple(t[start:start + step] for t in tensors)


_GRAMS: dict[int, tuple] = {}  # id(input tensor) -> (weak reference, its Gram blocks, version)
_BLOCKED_FROM = 64  # positions from which a Gram matrix is computed as three blocks rather than four


def _gram(a: torch.Tensor, source: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """a a^T per row, as (a a^T,) or, for T >= _BLOCKED_FROM, the blocks (A1 A1^T, A2 A2^T, A1 A2^T) of the
    halves A1, A2 of the positions (the fourth block is the transpose of the third: a quarter less work).
    Computed once for an input tensor that several layers read (q, k, v), while that tensor lives."""
    if source is not None:
        key = id(source)
        hit = _GRAMS.get(key)
        if hit is not None and hit[0]() is source and hit[2] == source._version and hit[3] == a.shape:
            return hit[1]
    T = a.shape[1]
    parts = []
    for (block,) in _row_blocks(a):  # widened to float32 a block of rows at a time
        block = wide(block)
        if T < _BLOCKED_FROM:
            parts.append((torch.bmm(block, block.transpose(1, 2)),))
        else:
            a1, a2 = block[:, :T // 2], block[:, T // 2:]
            parts.append((torch.bmm(a1, a1.transpose(1, 2)), torch.bmm(a2, a2.transpose(1, 2)),
                          torch.bmm(a1, a2.transpose(1, 2))))
    gram = parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts))
    if source is not None:
        _GRAMS[key] = (weakref.ref(source, lambda _, k=key: _GRAMS.pop(k, None)), gram, source._version, a.shape)
    return gram


def _ghost_norm(ga: tuple[torch.Tensor, ...], gg: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """<a a^T, g g^T> per row from Gram matrices (or blocks) made by _gram."""
    if len(ga) == 1:
        return torch.linalg.vecdot(ga[0].flatten(1), gg[0].flatten(1), dim=1)
    diagonal, off = (torch.linalg.vecdot(x.flatten(1), y.flatten(1), dim=1) for x, y in ((ga[0], gg[0]), (ga[2], gg[2])))
    return diagonal + torch.linalg.vecdot(ga[1].flatten(1), gg[1].flatten(1), dim=1) + 2 * off


class ConvHandler(LinearHandler):
    """nn.Conv1d / nn.Conv2d with groups=1 and zero padding.

    Per-sample weight gradients, when instantiated, are the weight gradient of one convolution that treats
    the batch as groups (the backend's own weight-gradient kernel, no unfolded patches); otherwise the
    ghost norm works on the unfolded patches (rows of a Linear) and the clipped sum is the convolution's
    weight gradient with the output gradient weighted row by row."""

    def __init__(self, name, module, params):
        super().__init__(name, module, params)
        self.two_d = isinstance(module, nn.Conv2d)

    def op(self, x, weight, bias):
        return self.module._conv_forward(x, weight, bias)

    def input_grad(self, grad_out, weight, input_shape):
        m = self.module
        fn = torch.nn.grad.conv2d_input if self.two_d else torch.nn.grad.conv1d_input
        return fn(input_shape, weight, grad_out, m.stride, m.padding, m.dilation, m.groups)

    def _patches(self, x):
        m = self.module
        if self.two_d:
            cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
        else:
            cols = F.unfold(x.unsqueeze(2), (1, m.kernel_size[0]), (1, m.dilation[0]), (0, m.padding[0]),
                            (1, m.stride[0]))
        return cols.transpose(1, 2)  # (B, L, C_in * prod(kernel))

    def _weight_grad(self, x, gr, groups: int = 1):
        """The convolution's weight gradient for input x and output gradient gr (batch as groups: per row)."""
        m, w = self.module, self.module.weight
        if groups > 1:
            B = x.shape[0]
            x = x.reshape(1, B * x.shape[1], *x.shape[2:])
            gr = gr.reshape(1, B * gr.shape[1], *gr.shape[2:])
        shape = (groups * w.shape[0], *w.shape[1:])
        return torch.ops.aten.convolution_backward(
            gr, x, gr.new_empty(1).expand(shape), None, list(m.stride), list(m.padding), list(m.dilation), False,
            [0] * (x.dim() - 2), groups, (False, True, False))[1]

    def compute_norms(self):
        xs, grs = [wide(x) for x, _ in self.pairs], [wide(gr) for _, gr in self.pairs]
        self._release_pairs()
        self._xs = self._grs = self._per_sample = self._bias_per_sample = None
        B, p = grs[0].shape[0], grs[0].shape[1]
        d = self.module.weight[0].numel()
        L = sum(gr[0, 0].numel() for gr in grs)
        kept = sum(x[0].numel() for x in xs) + L * p  # per row: what the ghost norm keeps (inputs, gradients)
        norms = {}
        if "weight" in self.params:
            if "weight" in self.shared or instantiate(L, p, d, kept):  # a shared weight's cross terms: dense
                ps = None
                for x, gr in zip(xs, grs):
                    g_i = self._weight_grad(x, gr, groups=B).view(B, p, d)
                    ps = g_i if ps is None else ps + g_i
                self._per_sample = ps
                norms["weight"] = _sq_rows(ps)
            else:
                a = [self._patches(x) for x in xs]
                g = [gr.reshape(B, p, -1).transpose(1, 2) for gr in grs]
                a, g = (a[0], g[0]) if len(a) == 1 else (torch.cat(a, 1), torch.cat(g, 1))
                norms["weight"] = _ghost_norm(_gram(a, None), _gram(g, None))
                self._xs, self._grs = xs, grs
        if "bias" in self.params:
            bias = [gr.reshape(B, p, -1).sum(2) for gr in grs]
            self._bias_per_sample = bias[0] if len(bias) == 1 else torch.stack(bias).sum(0)
            norms["bias"] = _sq_rows(self._bias_per_sample)
        s2 = self.scale * self.scale
        if s2 != 1.0:
            norms = {k: v * s2 for k, v in norms.items()}
        self.norms_sq = norms
        return norms

    def per_sample(self, name):
        return Dense(self._bias_per_sample if name == "bias" else self._per_sample)

    def _ghost_weight_sum(self, c: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i c_i g_i: the weight gradient with each row's input or output gradient weighted (added to
        ``total`` when given)."""
        w = None
        for x, gr in zip(self._xs, self._grs):
            cw = c.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
            term = self._weight_grad(x * cw, gr) if x.numel() <= gr.numel() else self._weight_grad(x, gr * cw)
            w = term if w is None else w + term
        return w if total is None else total.add_(w.reshape(total.shape))

    def _clear_weight(self) -> None:
        self._xs = self._grs = self._per_sample = None

    def _clear_state(self):
        self._xs = self._grs = self._per_sample = self._bias_per_sample = None


class _CaptureEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, handler):
        ctx.handler = handler
        ctx.save_for_backward(ids)
        m = handler.module
        return F.embedding(ids, weight, m.padding_idx, None, 2.0, False, False)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.handler.captured(ids, grad_out)
        ctx.handler.after_capture()
        return None, None, None


class EmbeddingHandler(_PatchedForward):
    sums_into_others = True  # its clipped sum touches a few rows: added into a tied head's sum, not into zeros

    def attach(self) -> None:
        handler, module = self, self.module

        def forward(mod, ids):
            if not capturing() or not torch.is_grad_enabled():
                return handler._original_forward(ids)
            ids = handler.broadcast(ids)
            handler.forward_called()
            return _CaptureEmbedding.apply(ids, mod.weight, handler)

        self._original_forward = module.forward
        module.forward = types.MethodType(forward, module)
        self._guard_parameters()

    def _tokens(self):
        ids = [i.reshape(i.shape[0], -1) for i, _ in self.pairs]
        g = [gr.reshape(gr.shape[0], -1, gr.shape[-1]) for _, gr in self.pairs]
        ids, g = (ids[0], g[0]) if len(ids) == 1 else (torch.cat(ids, 1), torch.cat(g, 1))
        pad = self.module.padding_idx
        if pad is not None:  # torch gives the padding row no gradient
            g = g * (ids != pad).unsqueeze(-1).to(g.dtype)
        return ids, g

    def compute_norms(self):
        ids, g = self._tokens()
        self._release_pairs()
        self._ids, self._g = ids, g
        same = ids.unsqueeze(2) == ids.unsqueeze(1)
        wg = wide(g)
        norms = (torch.bmm(wg, wg.transpose(1, 2)).masked_fill_(~same, 0)).sum((1, 2))
        self.norms_sq = {"weight": norms * (self.scale * self.scale) if self.scale != 1.0 else norms}
        return self.norms_sq

    def clipped_sum(self, factors, into=None):
        c = factors["weight"] * self.scale if self.scale != 1.0 else factors["weight"]
        g = wide(self._g)
        g = (g * c.to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        out = (into or {}).get("weight")
        if out is None:
            # (shape, not zeros_like: under FSDP2 the parameter is a sharded DTensor; the sum is whole)
            out = torch.zeros(self.params["weight"].shape, dtype=g.dtype, device=g.device)
        out.index_add_(0, self._ids.reshape(-1), g)
        return {"weight": out}

    def per_sample(self, name):
        return Rows(self._ids, self._g)

    def _clear_state(self):
        self._ids = self._g = None


# ------------------------------------------------------------------------------------------------
# Layers whose per-sample gradients are instantiated: hooks keep the inputs and the output gradient
# (autograd's own summed gradient for these few parameters is computed and then replaced).

class _HookedLayer(LayerHandler):
    def attach(self) -> None:
        self._hook = self.module.register_forward_hook(self._forward_hook, with_kwargs=True)
        self._pre_hook = self.module.register_forward_pre_hook(self._expand_broadcast)

    def detach(self) -> None:
        if hasattr(self, "_hook"):
            self._hook.remove()
            self._pre_hook.remove()
            del self._hook, self._pre_hook

    def _expand_broadcast(self, module, args):
        if args and capturing() and torch.is_grad_enabled():
            first = self.broadcast(args[0])
            if first is not args[0]:
                return (first, *args[1:])
        return None

    def _forward_hook(self, module, args, kwargs, output):
        if not capturing() or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor):
            raise ExpungeError(
                f"module {self.name} ({type(module).__name__}) returns {type(output).__name__}, not one tensor; "
                "per-sample gradients need modules with one tensor output: wrap its parameters in a module that "
                "returns a tensor")
        if not output.requires_grad:
            return
        self.forward_called()
        inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

        def on_grad(g):
            self.captured(inputs, kwargs, g)
            self.on_capture(self)

        output.register_hook(on_grad)

    on_capture = staticmethod(lambda handler: None)

    def per_sample_call(self, inputs, kwargs, g) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_norms(self):
        total: dict[str, torch.Tensor] = {}
        for inputs, kwargs, g in self.pairs:
            for name, value in self.per_sample_call(inputs, kwargs, g).items():
                total[name] = total[name] + value if name in total else value
        self._release_pairs()
        self._per_sample = {name: wide(v) for name, v in total.items()}  # unscaled: the scale goes on norms, factors
        s2 = self.scale * self.scale
        self.norms_sq = {name: _sq_rows(v) * s2 if s2 != 1.0 else _sq_rows(v) for name, v in total.items()}
        return self.norms_sq

    def per_sample(self, name):
        return Dense(self._per_sample[name])

    def clipped_sum(self, factors, into=None):
        out = {}
        for name, c in factors.items():
            c = c * self.scale if self.scale != 1.0 else c
            out[name] = torch.tensordot(c.to(self._per_sample[name].dtype), self._per_sample[name], dims=1)
        return out

    def _clear_state(self):
        self._per_sample = None


class NormHandler(_HookedLayer):
    """LayerNorm, GroupNorm, RMSNorm: weight gradient is (dL/dy * x_hat) summed over non-parameter axes."""

    def per_sample_call(self, inputs, kwargs, g):
        m, x, g = self.module, wide(inputs[0]), wide(g)
        if isinstance(m, nn.LayerNorm):
            x_hat = F.layer_norm(x, m.normalized_shape, eps=m.eps)
            axes = tuple(range(1, x.dim() - len(m.normalized_shape)))
        elif isinstance(m, nn.GroupNorm):
            x_hat = F.group_norm(x, m.num_groups, eps=m.eps)
            axes = tuple(range(2, x.dim()))
        else:  # RMSNorm
            x_hat = F.rms_norm(x, m.normalized_shape, eps=m.eps)
            axes = tuple(range(1, x.dim() - len(m.normalized_shape)))
        out = {}
        if "weight" in self.params:
            out["weight"] = (g * x_hat).sum(axes) if axes else g * x_hat
        if "bias" in self.params:
            out["bias"] = g.sum(axes) if axes else g
        return out


class FunctionalHandler(_HookedLayer):
    """Any other module that owns parameters: vmap over rows of grad(<module(x_i), dL/dy_i>)."""

    def per_sample_call(self, inputs, kwargs, g):
        """Tensor arguments (positional or keyword) whose first dimension is the batch are split by row;
        anything else (a shared causal mask, a flag) is passed whole to every row."""
        # in float32 at least: a module stored in bfloat16 gets its per-sample gradients from a float32 copy
        # the module's own parameters as they are now (FSDP2 swaps in unsharded ones for the forward)
        params = {name: wide(getattr(self.module, name).detach()) for name in self.params}
        g = wide(g)
        inputs = tuple(wide(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs)
        kwargs = {k: wide(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        batch = g.shape[0]
        per_row = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch for a in inputs]
        kw_rows = {k: v.detach() for k, v in kwargs.items()
                   if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch}
        kw_shared = {k: v for k, v in kwargs.items() if k not in kw_rows}

        def inner(p, g_i, kw_row, *row):
            args = tuple(r.unsqueeze(0) if split else r for r, split in zip(row, per_row))
            kw = dict(kw_shared, **{k: v.unsqueeze(0) for k, v in kw_row.items()})
            out = functional_call(self.module, p, args, kw)
            return (out * g_i.unsqueeze(0)).sum()

        in_dims = (None, 0, 0) + tuple(0 if split else None for split in per_row)
        with _NoCapture():
            return vmap(grad(inner), in_dims=in_dims)(params, g, kw_rows, *inputs)


# ------------------------------------------------------------------------------------------------

REFUSED = {
    "BatchNorm": "BatchNorm mixes rows of a batch, so no per-sample gradient exists: replace it with "
                 "GroupNorm (expunge.privacy.replace_batchnorm(model) does it) or LayerNorm",
    "RNN": "recurrent layers are not supported: write the recurrence with nn.Linear cells",
    "MultiheadAttention": "nn.MultiheadAttention owns a packed projection and returns a tuple: write attention "
                          "with nn.Linear projections and F.scaled_dot_product_attention",
}


def _refusal(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return REFUSED["BatchNorm"]
    if isinstance(module, nn.RNNBase):
        return REFUSED["RNN"]
    if isinstance(module, nn.MultiheadAttention):
        return REFUSED["MultiheadAttention"]
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return "InstanceNorm with running statistics mixes rows across batches: use track_running_stats=False"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        return "Embedding with max_norm, scale_grad_by_freq or sparse gradients is not supported: turn them off"
    return None


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def handler_for(name: str, module: nn.Module, params: dict[str, nn.Parameter]) -> LayerHandler:
    reason = _refusal(module)
    if reason:
        raise ExpungeError(f"module {name or '<model>'} ({type(module).__name__}): {reason}")
    if type(module) is nn.Linear or (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward):
        return LinearHandler(name, module, params)
    if _is_hf_conv1d(module):
        return LinearHandler(name, module, params, transposed=True)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward) \
            and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return ConvHandler(name, module, params)
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return EmbeddingHandler(name, module, params)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and type(module).forward in (
            nn.LayerNorm.forward, nn.GroupNorm.forward, nn.RMSNorm.forward):
        return NormHandler(name, module, params)
    return FunctionalHandler(name, module, params)


def build_handlers(model: nn.Module) -> list[LayerHandler]:
    """One handler per module that owns trainable parameters, in registration order. Frozen parameters are
    skipped. A parameter that several modules hold (tied input and output embeddings) is marked as shared
    in each of their handlers: the engine adds the cross terms of its uses (see shared.py)."""
    handlers, users = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # even frozen, it mixes the rows of a batch
            raise ExpungeError(f"module {name} ({type(module).__name__}): {REFUSED['BatchNorm']}")
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not params:
            continue
        if any(h.module is module for h in handlers):
            continue  # the same module registered twice: one handler sees all its calls
        handler = handler_for(name, module, params)
        handlers.append(handler)
        for pname, p in params.items():
            users.setdefault(id(p), []).append((handler, pname))
    for uses in users.values():
        if len(uses) > 1:
            for handler, pname in uses:
                handler.shared.add(pname)
        if all(isinstance(h, _PatchedForward) for h, _ in uses):  # autograd computes none of its gradient
            handler, pname = uses[0]
            handler.guarded.add(pname)
    return handlers


def replace_batchnorm(model: nn.Module, groups: int = 32) -> nn.Module:
    """Swap every BatchNorm for a GroupNorm with min(groups, channels) groups (in place; returns the model)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            channels = child.num_features
            g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
            setattr(model, name, nn.GroupNorm(g, channels, affine=child.affine))
        else:
            replace_batchnorm(child, groups)
    return model
