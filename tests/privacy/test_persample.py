"""Per-sample clipping in one backward pass against a slow per-row reference.

The reference loops over rows with torch.autograd.grad on an untouched copy of the model, clips each
group of parameters with threshold C / sqrt(K) and sums. The engine is run with noise 0 and an SGD base
with lr 0, so after the step at the end of a logical batch p.grad * batch_size is its clipped sum.
"""

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expunge.errors import ExpungeError
from expunge.privacy import make_private
from expunge.privacy import persample
from expunge.privacy.engine import make_groups
from expunge.privacy.persample import (ConvHandler, EmbeddingHandler, FunctionalHandler, LinearHandler,
                                       NormHandler)

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier 0")

TOL = 1e-6
DT = torch.float64


# -- the slow reference -------------------------------------------------------------------------------

def factor(norm: float, threshold: float, clip_fn: str, gamma: float = 0.01) -> float:
    if clip_fn == "abadi":
        return min(1.0, threshold / norm)
    if clip_fn == "automatic":
        return threshold / (norm + gamma)
    if clip_fn == "global":
        return 1.0 if norm <= threshold else 0.0
    raise AssertionError(clip_fn)


def per_row_grads(model, X, y, loss):
    """Per-row gradients {name: (B, *shape)} of loss(model(x_i), y_i) over trainable parameters."""
    named = OrderedDict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    rows = []
    for i in range(len(y)):
        value = loss(model(X[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(value, list(named.values()), allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, named.values())])
    return OrderedDict((n, torch.stack([r[j] for r in rows])) for j, n in enumerate(named))


def reference(per_row, groups, C, clip_fn="abadi"):
    """Clipped sum with groups (lists of parameter names), thresholds C / sqrt(K); also the factors."""
    threshold = C / math.sqrt(len(groups))
    assert sorted(n for g in groups for n in g) == sorted(per_row), "groups must cover every trainable parameter"
    total = {n: torch.zeros_like(g[0]) for n, g in per_row.items()}
    B = next(iter(per_row.values())).shape[0]
    factors = np.zeros((B, len(groups)))
    for i in range(B):
        for k, group in enumerate(groups):
            norm = math.sqrt(sum(per_row[n][i].pow(2).sum().item() for n in group))
            factors[i, k] = c = factor(norm, threshold, clip_fn)
            for n in group:
                total[n] += c * per_row[n][i]
    return total, factors


def total_norms(per_row):
    return torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_row.values()))


def groups_for(model, clipping):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if clipping == "all-layer":
        return [names]
    if clipping == "param-wise":
        return [[n] for n in names]
    if clipping == "layer-wise":
        out = OrderedDict()
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(n)
        return list(out.values())
    raise AssertionError(clipping)


# -- the engine ------------------------------------------------------------------------------------------

def private_sum(model, X, y, loss, C, clipping="all-layer", clip_fn="abadi", reduction="mean"):
    """Clipped sum computed by the engine on one logical batch of all rows (noise 0, lr 0)."""
    B = len(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = make_private(model, opt, (X, y), batch_size=B, noise_multiplier=0.0, max_grad_norm=C,
                          clipping=clipping, clip_fn=clip_fn, loss_reduction=reduction)
    engine.optimizer.zero_grad()
    loss(model(X), y, reduction=reduction).backward()
    engine.optimizer.step()
    out = OrderedDict((n, p.grad * B) for n, p in model.named_parameters() if p.requires_grad)
    frozen_grads = [p.grad for p in model.parameters() if not p.requires_grad]
    engine.detach()
    return out, engine, frozen_grads


def rel_err(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


def check(model, X, y, loss=None, clipping="all-layer", clip_fn="abadi", reduction="mean", groups=None, C=None,
          mixed=True):
    """Engine against the reference; returns the engine. C defaults to the median per-row gradient norm,
    so some rows are clipped and some are not (asserted for abadi/global when `mixed`)."""
    loss = loss or (lambda out, t, reduction="mean": F.cross_entropy(out, t, reduction=reduction))
    model = model.to(DT)
    per_row = per_row_grads(copy.deepcopy(model), X, y, lambda o, t: loss(o, t, reduction=reduction))
    if C is None:
        C = float(total_norms(per_row).quantile(0.5))  # midpoint: no row sits on C
    groups = groups or groups_for(model, clipping)
    ref, factors = reference(per_row, groups, C, clip_fn)
    if mixed and clip_fn in ("abadi", "global"):
        assert (factors < 1).any() and (factors == 1).any(), "test setting should clip some rows and not others"
    got, engine, frozen = private_sum(model, X, y, loss, C, clipping, clip_fn, reduction)
    assert list(got) == list(ref)
    assert all(g is None for g in frozen), "frozen parameters must get no gradient"
    err = rel_err(got, ref)
    assert err < TOL, f"relative error {err:.3g}"
    return engine


def handler_types(engine):
    return {h.name: type(h) for h in engine.handlers}


@pytest.fixture
def branches(monkeypatch):
    """Records, per Linear handler call of compute_norms, whether per-sample gradients were instantiated."""
    seen = []
    original = LinearHandler.compute_norms

    def spy(self):
        T = sum(x.numel() // max(1, x.shape[0] * x.shape[-1]) for x, _ in self.pairs)  # positions per row
        out = original(self)
        seen.append((self.name, "instantiate" if self._per_sample is not None else "ghost", T))
        return out

    monkeypatch.setattr(LinearHandler, "compute_norms", spy)
    return seen


# -- data and models ------------------------------------------------------------------------------------

B = 8


def gen(seed=0):
    g = torch.Generator().manual_seed(seed)
    return g


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=DT)


def labels(k=3, seed=1):
    return torch.randint(0, k, (B,), generator=gen(seed))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).to(DT)


class MeanT(nn.Module):
    def forward(self, x):
        return x.mean(1)


class Scale(nn.Module):
    """A module with its own parameter and no fast path: the torch.func fallback."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d) * 0.5 + 1.0)

    def forward(self, x):
        return torch.sin(x) * self.w + x


class Gate(nn.Module):
    """Owns a parameter and a child Linear: the fallback must not record the child while it re-runs."""

    def __init__(self, d):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.inner(x) * torch.sigmoid(self.g)


class Conv1D(nn.Module):
    """transformers-style Conv1D: weight (nx, nf), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return x.view(size_out)


# -- all clipping styles and clip functions on a small MLP ----------------------------------------------

@pytest.mark.parametrize("clip_fn", ["abadi", "automatic", "global"])
@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise", "param-wise"])
def test_mlp_every_style_and_clip_fn(clipping, clip_fn):
    model = mlp()
    engine = check(model, randn(B, 6), labels(), clipping=clipping, clip_fn=clip_fn)
    assert len(engine.groups) == {"all-layer": 1, "layer-wise": 3, "param-wise": 6}[clipping]


@pytest.mark.parametrize("clip_fn", ["abadi", "automatic", "global"])
def test_group_head_names(clip_fn):
    model = nn.Sequential(OrderedDict(
        emb=nn.Linear(6, 5), act=nn.Tanh(), body=nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.LayerNorm(5)),
        head=nn.Linear(5, 3))).to(DT)
    # parameters before the first head form a group; each head starts a group that runs to the next head
    groups = [["emb.weight", "emb.bias"],
              ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"],
              ["head.weight", "head.bias"]]
    engine = check(model, randn(B, 6), labels(), clipping=["body", "head"], clip_fn=clip_fn, groups=groups)
    assert [len(g.members) for g in engine.groups] == [2, 4, 2]
    assert engine.groups[0].threshold == pytest.approx(engine.max_grad_norm / math.sqrt(3))


def test_group_heads_can_name_single_parameters():
    model = mlp()
    groups = [["0.weight"], ["0.bias", "2.weight", "2.bias"], ["3.weight", "3.bias"]]
    check(model, randn(B, 6), labels(), clipping=["0.weight", "0.bias", "3"], groups=groups)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
def test_loss_reduction(reduction, clipping):
    mse = lambda out, t, reduction="mean": F.mse_loss(out, t, reduction=reduction)  # noqa: E731
    check(mlp(), randn(B, 6), randn(B, 3, seed=5), loss=mse, clipping=clipping, reduction=reduction)


def test_wrong_reduction_is_detected_by_the_reference():
    """Guard on the harness itself: declaring 'sum' for a mean loss must not match the reference."""
    model = mlp()
    X, y = randn(B, 6), labels()
    per_row = per_row_grads(copy.deepcopy(model), X, y, lambda o, t: F.cross_entropy(o, t))
    C = float(total_norms(per_row).quantile(0.5))  # midpoint: no row sits on C
    ref, _ = reference(per_row, groups_for(model, "all-layer"), C)
    got, _, _ = private_sum(model, X, y, lambda o, t, reduction: F.cross_entropy(o, t), C, reduction="sum")
    assert rel_err(got, ref) > 1e-2


# -- Linear ------------------------------------------------------------------------------------------------

def test_linear_2d_rows(branches):
    check(mlp(), randn(B, 6), labels())
    assert {(name, T) for name, _, T in branches} == {("0", 1), ("3", 1)}


def test_linear_3d_ghost_branch(branches):
    # T = 3, d = 10, p = 8: 2 T^2 = 18 <= p d = 80 (and p d = 80 > T (p + d) = 54), so the norm comes from
    # T x T Gram matrices
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), MeanT(), nn.Linear(8, 3))
    check(model, randn(B, 3, 10), labels(), clipping="layer-wise")
    assert ("0", "ghost", 3) in branches


def test_linear_3d_instantiation_branch(branches):
    # T = 6, d = 3, p = 2: 2 T^2 = 72 > p d = 6, so per-sample gradients are instantiated
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    check(model, randn(B, 6, 3), labels())
    assert ("0", "instantiate", 6) in branches


def test_linear_without_bias_on_4d_input():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    engine = check(model, randn(B, 2, 3, 4), labels())
    assert handler_types(engine)["0"] is LinearHandler


def test_transformers_style_conv1d(branches):
    torch.manual_seed(4)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), MeanT(), Conv1D(3, 5))
    engine = check(model, randn(B, 3, 4), labels(), clipping="layer-wise")
    h = engine.handlers[0]
    assert type(h) is LinearHandler and h.transposed, "Conv1D must take the fast transposed-Linear path"
    assert {name for name, _, _ in branches} == {"0", "3"}


# -- convolutions --------------------------------------------------------------------------------------------

def test_conv1d_stride_padding_dilation():
    torch.manual_seed(5)
    # L = 11: L_out = floor((11 + 2 - 2 * 2 - 1) / 2) + 1 = 5
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(15, 3))
    engine = check(model, randn(B, 2, 11), labels(), clipping="layer-wise")
    assert handler_types(engine)["0"] is ConvHandler


def test_conv2d_stride_padding_dilation():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    X = randn(B, 2, 7, 6)
    flat = conv(X.float()).flatten(1).shape[1]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))
    engine = check(model, X, labels())
    assert handler_types(engine)["0"] is ConvHandler


def test_conv2d_without_bias_and_groupnorm():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=2, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 3))
    engine = check(model, randn(B, 1, 8, 8), labels(), clipping="param-wise")
    assert handler_types(engine) == {"0": ConvHandler, "1": NormHandler, "4": LinearHandler}


def test_conv_outside_the_fast_path_falls_back():
    torch.manual_seed(8)
    # grouped and "same"-padded convolutions take the torch.func path and must still be exact
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Conv2d(4, 2, 3, padding="same"),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    engine = check(model, randn(B, 2, 6, 6), labels())
    types = handler_types(engine)
    assert types["0"] is FunctionalHandler and types["2"] is FunctionalHandler


# -- embeddings and norms ------------------------------------------------------------------------------------

class Tokens(nn.Module):
    def __init__(self, padding_idx=2):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


def token_ids(pad=2):
    ids = torch.randint(0, 7, (B, 6), generator=gen(3))
    ids[:, 0] = pad  # every row holds the padding index...
    ids[:3, 1] = pad
    ids[:, 2] = ids[:, 3]  # ...and repeated tokens (the ghost norm's equal-id terms)
    return ids


@pytest.mark.parametrize("clipping", ["all-layer", "param-wise"])
def test_embedding_with_padding_idx_and_layernorm_3d(clipping):
    torch.manual_seed(9)
    ids = token_ids()
    assert (ids == 2).any()
    engine = check(Tokens(), ids, labels(), clipping=clipping)
    assert handler_types(engine) == {"emb": EmbeddingHandler, "norm": NormHandler, "head": LinearHandler}


def test_embedding_padding_row_gets_nothing():
    torch.manual_seed(9)
    model = Tokens().to(DT)
    got, _, _ = private_sum(model, token_ids(), labels(), lambda o, t, reduction: F.cross_entropy(o, t), C=1.0)
    assert torch.count_nonzero(got["emb.weight"][2]) == 0
    assert torch.count_nonzero(got["emb.weight"]) > 0


def test_embedding_without_padding():
    torch.manual_seed(10)
    check(Tokens(padding_idx=None), token_ids(), labels())


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.gn = nn.GroupNorm(4, 8)  # on (B, C): no spatial axes
        self.rms = nn.RMSNorm(8)
        self.ln = nn.LayerNorm(8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(self.ln(torch.tanh(self.rms(self.gn(h)))))


@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
def test_layernorm_groupnorm_rmsnorm(clipping):
    torch.manual_seed(11)
    engine = check(Norms(), randn(B, 6), labels(), clipping=clipping)
    assert all(handler_types(engine)[n] is NormHandler for n in ("gn", "rms", "ln"))


def test_groupnorm_on_1d_feature_maps():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3))
    check(model, randn(B, 2, 7), labels(), clipping="layer-wise")


# -- fallback, sharing, frozen --------------------------------------------------------------------------------

def test_custom_parameter_torch_func_fallback():
    torch.manual_seed(13)
    model = nn.Sequential(Scale(6), nn.Linear(6, 4), Gate(4), nn.Linear(4, 3))
    engine = check(model, randn(B, 6), labels(), clipping="layer-wise")
    types = handler_types(engine)
    assert types["0"] is FunctionalHandler and types["2"] is FunctionalHandler
    assert types["2.inner"] is LinearHandler


class Shared(nn.Module):
    """Every kind of layer called twice in one forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.scale = Scale(4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids) + self.emb((ids + 1) % 7)            # embedding twice
        h = self.lin(torch.tanh(self.lin(h)))                   # linear twice, on (B, T, d)
        h = self.ln(self.scale(self.ln(h)))                     # norm twice, fallback once
        h = self.scale(h)                                       # fallback again
        c = self.conv(torch.tanh(self.conv(h.transpose(1, 2))))  # conv twice
        pooled = c.mean(2)
        return self.head(pooled) + self.head(torch.tanh(self.lin(pooled)))  # linear on 2-D too


@pytest.mark.parametrize("clipping,reduction", [("all-layer", "mean"), ("layer-wise", "sum"),
                                                ("param-wise", "mean")])
def test_module_called_twice_weight_sharing(clipping, reduction):
    torch.manual_seed(14)
    ids = token_ids(pad=0)
    check(Shared(), ids, labels(), clipping=clipping, reduction=reduction)


def test_frozen_parameters_are_skipped():
    torch.manual_seed(15)
    model = Norms().to(DT)
    model.lin.weight.requires_grad_(False)   # a Linear with only its bias trainable
    for p in model.rms.parameters():         # a whole norm frozen
        p.requires_grad_(False)
    engine = check(model, randn(B, 6), labels(), clipping="layer-wise")
    names = [f"{h.name}.{p}" for h in engine.handlers for p in h.params]
    assert "lin.weight" not in names and "rms" not in handler_types(engine)
    assert "lin.bias" in names
    assert len(engine.groups) == 4


def test_fully_frozen_layer_in_the_middle():
    torch.manual_seed(16)
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    engine = check(model, randn(B, 6), labels())
    assert [h.name for h in engine.handlers] == ["2", "3"]


# -- physical batches adding up to one logical batch -----------------------------------------------------------

def run_logical_batch(model, data, physical, loss, clipping, seed, reduction="mean"):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = make_private(model, opt, data, batch_size=20, noise_multiplier=0.0, max_grad_norm=0.5,
                          clipping=clipping, physical_batch_size=physical, seed=seed, loss_reduction=reduction)
    rows, sizes = [], []
    for X, y in engine.loader:
        sizes.append(len(y))
        rows.append(X)
        engine.optimizer.zero_grad()
        loss(model(X), y, reduction=reduction).backward()
        engine.optimizer.step()
        if engine.steps == 1:
            break
    grads = OrderedDict((n, p.grad.clone()) for n, p in model.named_parameters())
    engine.detach()
    return grads, torch.cat(rows), sizes


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_physical_batches_add_up_to_the_logical_batch(reduction):
    torch.manual_seed(17)
    n = 40
    X, y = randn(n, 6, seed=7), torch.randint(0, 3, (n,), generator=gen(8))
    model = Norms().to(DT)
    ce = lambda o, t, reduction="mean": F.cross_entropy(o, t, reduction=reduction)  # noqa: E731
    whole, rows_a, sizes_a = run_logical_batch(copy.deepcopy(model), (X, y), None, ce, "layer-wise", 3, reduction)
    split, rows_b, sizes_b = run_logical_batch(copy.deepcopy(model), (X, y), 3, ce, "layer-wise", 3, reduction)
    assert torch.equal(rows_a, rows_b), "same seed, same Poisson draw"
    assert len(sizes_a) == 1 and len(sizes_b) > 2 and max(sizes_b) <= 3 and sum(sizes_b) == sizes_a[0]
    assert rel_err(split, whole) < TOL
    # and both are the reference on the drawn rows, averaged by the expected batch size 20
    idx = torch.cat([torch.nonzero((X == r).all(1)).flatten() for r in rows_a])
    per_row = per_row_grads(copy.deepcopy(model), X[idx], y[idx], lambda o, t: ce(o, t, reduction=reduction))
    ref, _ = reference(per_row, groups_for(model, "layer-wise"), 0.5)
    assert rel_err({k: v * 20 for k, v in split.items()}, ref) < TOL


def test_physical_batches_by_hand_with_logical_end():
    """Backward on chunks, step() with _logical_end False in between: only the last step releases."""
    torch.manual_seed(18)
    model = Tokens().to(DT)
    ids, y = token_ids(), labels()
    per_row = per_row_grads(copy.deepcopy(model), ids, y, lambda o, t: F.cross_entropy(o, t))
    ref, _ = reference(per_row, groups_for(model, "all-layer"), 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = make_private(model, opt, (ids, y), batch_size=B, noise_multiplier=0.0, max_grad_norm=0.3)
    chunks = [slice(0, 3), slice(3, 4), slice(4, 8)]
    for k, s in enumerate(chunks):
        engine.optimizer._logical_end = k == len(chunks) - 1
        engine.optimizer.zero_grad()
        F.cross_entropy(model(ids[s]), y[s]).backward()
        engine.optimizer.step()
        assert engine.steps == (1 if k == len(chunks) - 1 else 0)
    got = OrderedDict((n, p.grad * B) for n, p in model.named_parameters())
    assert rel_err(got, ref) < TOL


# -- registration ------------------------------------------------------------------------------------------------

def test_handlers_cover_every_trainable_parameter_once():
    model = Shared()
    handlers = persample.build_handlers(model)
    owned = [id(p) for h in handlers for p in h.params.values()]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


def test_module_registered_twice_is_weight_sharing():
    """The same module under two names (nn.Sequential(lin, act, lin)) is weight sharing, not tied weights."""
    torch.manual_seed(19)
    lin = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), lin, nn.Tanh(), lin, nn.Linear(5, 3))
    engine = check(model, randn(B, 6), labels(), clipping="layer-wise")
    assert [h.name for h in engine.handlers] == ["0", "2", "5"]


# -- parameters held by several layers (tied weights) -------------------------------------------------------

@pytest.fixture
def forms(monkeypatch):
    """Records the pairs of per-sample forms (Dense, LowRank, Rows) whose cross terms the engine takes."""
    from expunge.privacy import engine as engine_module

    seen, original = [], engine_module.inner

    def spy(x, y):
        seen.append(tuple(sorted((type(x).__name__, type(y).__name__))))
        return original(x, y)

    monkeypatch.setattr(engine_module, "inner", spy)
    return seen


def token_loss(out, t, reduction="mean"):
    """Next-token style loss over (B, T, V) logits: with T tokens in every row, the mean over B T tokens is
    the mean over rows of each row's mean."""
    return F.cross_entropy(out.transpose(1, 2), t, reduction=reduction) if reduction == "mean" else \
        F.cross_entropy(out.transpose(1, 2), t, reduction="none").mean(1).sum()


class TiedHead(nn.Module):
    """Input embedding and output head (with a bias) share one weight, as in GPT-2 or Llama."""

    def __init__(self, vocab, d, pooled=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight
        self.pooled = pooled

    def forward(self, ids):
        h = self.norm(torch.tanh(self.emb(ids)))
        return self.head(h.mean(1) if self.pooled else h)


@pytest.mark.parametrize("vocab,d,T,form", [(40, 8, 3, "LowRank"), (12, 6, 5, "Dense")])
@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
def test_tied_embedding_and_head(vocab, d, T, form, clipping, forms):
    torch.manual_seed(16)
    ids = torch.randint(0, vocab, (B, T), generator=gen(4))
    ids[:, 1] = ids[:, 0]  # a repeated token in every row
    engine = check(TiedHead(vocab, d), ids, torch.randint(0, vocab, (B, T), generator=gen(5)), loss=token_loss,
                   clipping=clipping)
    assert forms == [tuple(sorted((form, "Rows")))]
    assert [h.shared for h in engine.handlers] == [{"weight"}, set(), {"weight"}]
    assert len(engine.params) == len(list(engine.model.parameters()))  # the tied weight once


def test_tied_embedding_and_head_on_pooled_rows(forms):
    torch.manual_seed(17)
    check(TiedHead(9, 5, pooled=True), torch.randint(0, 9, (B, 4), generator=gen(6)), labels(k=9))
    assert forms == [("LowRank", "Rows")]  # one position per row: the outer product g a^T


class TiedLinears(nn.Module):
    """Two projections share a 6 x 8 weight (not square, so that a transposed layout cannot pass): nn.Linear
    with nn.Linear, or with transformers' Conv1D (which stores its weight as (inputs, outputs)), or with a
    module of the torch.func fallback."""

    def __init__(self, other):
        super().__init__()
        self.other = other
        self.first = nn.Linear(8, 6)
        self.second = {"linear": lambda: nn.Linear(8, 6), "conv1d": lambda: Conv1D(8, 6),
                       "fallback": lambda: Project()}[other]()
        self.second.weight = self.first.weight
        self.head = nn.Linear(6 if other == "linear" else 8, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        out = h * self.second(torch.cos(x)) if self.other == "linear" else self.second(h)
        return self.head(out.mean(1))


class Project(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        return torch.sin(x @ self.weight)


@pytest.mark.parametrize("other,T,pair", [("linear", 3, ("LowRank", "LowRank")), ("linear", 12, ("Dense", "Dense")),
                                          ("conv1d", 3, ("LowRank", "LowRank")), ("conv1d", 12, ("Dense", "Dense")),
                                          ("fallback", 3, ("Dense", "LowRank"))])
def test_tied_linear_layers(other, T, pair, forms):
    torch.manual_seed(18)
    check(TiedLinears(other), randn(B, T, 8), labels())
    assert forms == [pair]


class TiedEmbeddings(nn.Module):
    """Two embeddings share one table (and two LayerNorms one gain; two convolutions one kernel)."""

    def __init__(self):
        super().__init__()
        self.words, self.tags = nn.Embedding(9, 4), nn.Embedding(9, 4)
        self.tags.weight = self.words.weight
        self.ln1, self.ln2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.ln2.weight = self.ln1.weight
        self.conv1, self.conv2 = nn.Conv1d(4, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.conv2.weight = self.conv1.weight
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.ln2(torch.tanh(self.ln1(self.words(ids) + self.tags((ids * 2) % 9))))
        c = self.conv2(torch.tanh(self.conv1(h.transpose(1, 2))))
        return self.head(c.mean(2))


@pytest.mark.parametrize("clipping", ["all-layer", "param-wise"])
def test_tied_embeddings_norms_and_convolutions(clipping, forms):
    torch.manual_seed(19)
    check(TiedEmbeddings(), token_ids(pad=0), labels(), clipping=clipping)
    assert sorted(forms) == [("Dense", "Dense"), ("Dense", "Dense"), ("Rows", "Rows")]


def test_tied_weight_has_one_group_under_any_of_its_names():
    torch.manual_seed(20)
    model = TiedHead(12, 6)
    for heads in (["emb"], ["head"], ["norm", "head"]):
        groups = make_groups(persample.build_handlers(model), heads, 1.0)
        owners = [g for g in groups if any(h.params[p] is model.emb.weight for h, p in g.members)]
        assert len(owners) == 1 and len(owners[0].tied) == 1


# -- an input of one row broadcast over the batch ----------------------------------------------------------

class Broadcast(nn.Module):
    """GPT-2's pattern: position ids of shape (1, T) looked up once and added to every row; also a Linear and
    a LayerNorm called on one-row tensors that broadcast."""

    def __init__(self, T=5, d=4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(7, d), nn.Embedding(T, d)
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.register_buffer("base", torch.randn(1, T, d))
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.tok(ids) + self.pos(positions) + self.lin(self.base) * self.ln(self.base)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
def test_one_row_input_broadcast_over_the_batch(clipping):
    torch.manual_seed(21)
    check(Broadcast(), token_ids(pad=0)[:, :5], labels(), clipping=clipping)


class Masked(nn.Module):
    """A fallback module taking a per-row tensor keyword argument (an attention-style mask)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x, mask=None):
        return x * self.w * mask


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.masked = Masked(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.masked(x, mask=(x > 0).to(x.dtype)))


def test_fallback_slices_tensor_keyword_arguments_per_row():
    torch.manual_seed(20)
    check(MaskedNet(), randn(B, 6), labels(), clipping="layer-wise")


class Attention(nn.Module):
    """Attention written as the refusal of nn.MultiheadAttention suggests: Linear projections reading one
    input (their Gram matrices may be shared) and F.scaled_dot_product_attention."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.v, self.o = (nn.Linear(d, d) for _ in range(3))
        self.k = nn.Linear(d, d, bias=False)  # a key bias shifts every score of a query equally: its gradient is 0
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm(x)
        att = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), is_causal=True)
        return self.head((x + self.o(att)).mean(1))


@pytest.mark.parametrize("clipping", ["all-layer", "layer-wise"])
def test_attention_from_linear_projections(clipping, branches):
    # T = 3, d = p = 8: the ghost norm (2 T^2 = 18 <= p d = 64) for q, k, v and o
    torch.manual_seed(21)
    check(Attention(), randn(B, 3, 8), labels(), clipping=clipping)
    assert {n for n, kind, _ in branches if kind == "ghost" and n in "qkvo"} == set("qkvo")


def test_forward_without_backward_between_steps_changes_nothing():
    """An evaluation forward with autograd on (and no backward) must not leak into the next step."""
    torch.manual_seed(22)
    model = Norms().to(DT)
    X, y = randn(B, 6), labels()
    per_row = per_row_grads(copy.deepcopy(model), X, y, lambda o, t: F.cross_entropy(o, t))
    ref, _ = reference(per_row, groups_for(model, "all-layer"), 0.4)
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=B,
                          noise_multiplier=0.0, max_grad_norm=0.4)
    F.cross_entropy(model(randn(5, 6, seed=9)), y[:5])  # evaluation with grad enabled, never backpropagated
    engine.optimizer.zero_grad()
    F.cross_entropy(model(X), y).backward()
    engine.optimizer.step()
    got = OrderedDict((n, p.grad * B) for n, p in model.named_parameters())
    assert rel_err(got, ref) < TOL


def test_a_layer_called_on_its_own_is_not_expanded():
    """Only forwards of the model given to make_private expand one-row inputs; a part called on its own
    keeps its shape, and a backward through it names the fix."""
    torch.manual_seed(22)
    model = Broadcast().to(DT)
    ids, y = token_ids(pad=0)[:, :5], labels()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (ids, y), batch_size=B,
                          noise_multiplier=0.0, max_grad_norm=1.0)
    F.cross_entropy(model(ids), y).backward()
    engine.optimizer.step()
    out = model.pos(torch.arange(5).unsqueeze(0))
    assert out.shape == (1, 5, 4)
    engine.optimizer.zero_grad()
    positions = model.pos(torch.arange(5).unsqueeze(0))
    loss = F.cross_entropy(model.head(torch.tanh(model.tok(ids) + positions).mean(1)), y)
    loss.backward()
    with pytest.raises(ExpungeError, match="call that model"):
        engine.optimizer.step()


class FunctionalHead(nn.Module):
    """Logits from the embedding table used as a plain tensor: no module sees that use."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 4)

    def forward(self, ids):
        return torch.tanh(self.emb(ids)).mean(1) @ self.emb.weight[:3].t()


def test_a_parameter_used_outside_its_module_is_refused():
    torch.manual_seed(23)
    model = FunctionalHead().to(DT)
    ids, y = token_ids(pad=0), labels()
    make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (ids, y), batch_size=B, noise_multiplier=0.0)
    with pytest.raises(ExpungeError, match="outside its module"):
        F.cross_entropy(model(ids), y).backward()
