"""DiSK, DOPPLER, DiceSGD, public/private coupling and continual pre-training on the private engine: each
reduces to its non-private counterpart, filters and combinations match slow references, and the epsilon
each reports is the accounting its docstring claims."""

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn

from expunge.errors import ExpungeError
from expunge.privacy import DOPPLER, DiceSGD, DiSK, PublicCoupling, accounting, make_private
from expunge.privacy.transforms import DOPPLER_A, DOPPLER_B

N, D, K = 48, 5, 3
HUGE = 1e9


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    return X, y


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, K)).double()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_private(transforms, steps=4, lr=0.1, C=HUGE, sigma=0.0, closure=True, optimizer=torch.optim.SGD,
                  batch_size=N, seed=0, **kw):
    X, y = data()
    model = mlp()
    opt = optimizer(model.parameters(), lr=lr)
    engine = make_private(model, opt, (X, y), batch_size=batch_size, noise_multiplier=sigma, max_grad_norm=C,
                          transforms=transforms, seed=seed, **kw)
    while engine.steps < steps:  # logical steps (a logical batch may be several physical ones)
        for xb, yb in engine.loader:
            def step_closure():
                engine.optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            if closure:
                engine.optimizer.step(step_closure)
            else:
                step_closure()
                engine.optimizer.step()
            if engine.steps == steps:
                break
    return model, engine


def train_sgd(steps=4, lr=0.1):
    X, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return model


@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
@pytest.mark.parametrize("transform", [DiSK(kappa=1.0), DOPPLER(a=[1.0], b=[1.0]), DiceSGD(C2=HUGE)],
                         ids=["disk-kappa1", "doppler-identity", "dicesgd-huge-C"])
def test_without_noise_or_clipping_each_method_is_sgd(transform):
    # batch = all rows, so Poisson sampling at q = 1 takes every row: the private step is the full-batch step
    model, _ = train_private([transform])
    assert torch.allclose(flat(model), flat(train_sgd()), rtol=0, atol=1e-12)


def test_coupling_with_alpha_zero_is_dp_sgd_noise_and_all():
    public = data(seed=5)
    coupled, _ = train_private([PublicCoupling(public, alpha=0.0)], sigma=1.0, C=0.5, batch_size=16)
    plain, _ = train_private([], sigma=1.0, C=0.5, batch_size=16)
    assert torch.equal(flat(coupled), flat(plain))


# ----------------------------------------------------------------------------- DOPPLER

def test_doppler_default_filter_is_a_chebyshev_low_pass_with_a_10db_resonance():
    """The default (the authors' optimizer's default) is cheby1(2, 10 dB ripple, 0.02): after the bias
    correction it passes frequency 0 at gain 1 but peaks at +10 dB near 0.0445 rad/step (a 141-step period)
    before it falls off. The resonance, not the averaging, is what limits DOPPLER's learning rate."""
    b, a = scipy.signal.cheby1(2, 10, 0.02)
    assert np.allclose(DOPPLER_A, a, atol=1e-8) and np.allclose(DOPPLER_B, b, atol=1e-8)
    w, h = scipy.signal.freqz(DOPPLER_B, DOPPLER_A, worN=np.linspace(0, math.pi, 20001))
    steady_state = sum(DOPPLER_B) / sum(DOPPLER_A)  # what the bias correction c_t tends to
    gain = np.abs(h) / steady_state
    assert gain[0] == pytest.approx(1.0)
    assert gain.max() == pytest.approx(10 ** 0.5, rel=1e-3) and w[gain.argmax()] == pytest.approx(0.0445, abs=5e-4)
    assert gain[w > 0.2].max() < 0.1 and gain[-1] < 1e-3  # high frequencies (white noise's bulk) are removed


def test_doppler_matches_lfilter_and_passes_a_constant_from_step_one():
    rng = np.random.default_rng(0)
    sequence = rng.normal(size=(30, 4))
    f = DOPPLER()
    out = np.array([f.after_noise(None, [torch.from_numpy(g)])[0].numpy() for g in sequence])
    expected = scipy.signal.lfilter(DOPPLER_B, DOPPLER_A, sequence, axis=0)
    bias = scipy.signal.lfilter(DOPPLER_B, DOPPLER_A, np.ones(30))
    assert np.allclose(out, expected / bias[:, None], rtol=1e-9, atol=1e-12)
    f = DOPPLER()
    const = torch.tensor([0.3, -2.0], dtype=torch.float64)
    for _ in range(10):
        assert torch.allclose(f.after_noise(None, [const])[0], const, rtol=1e-9)


def test_doppler_refuses_an_unstable_filter():
    with pytest.raises(ExpungeError, match="unstable"):
        DOPPLER(a=[1.0, -2.5, 1.0], b=[1.0])


# ----------------------------------------------------------------------------- DiSK

class TwoPointDiSK(DiSK):
    """DiSK forced through the general two-gradient path even when c = 1."""

    def points(self, engine):
        shift = None if self.d is None else [self.gamma * d for d in self.d]
        return [(shift, self.c), (None, 1.0 - self.c)]


@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
def test_disk_one_gradient_shortcut_equals_the_two_gradient_form():
    kappa = 0.6
    gamma = (1 - kappa) / kappa
    short, _ = train_private([DiSK(kappa, gamma)], C=0.3, steps=5)
    general, _ = train_private([TwoPointDiSK(kappa, gamma)], C=0.3, steps=5)
    assert DiSK(kappa, gamma).one_gradient
    assert torch.allclose(flat(short), flat(general), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
def test_disk_combines_per_sample_gradients_before_clipping():
    """Slow reference: per row, c grad f_i(x + gamma d) + (1 - c) grad f_i(x), clipped as one vector; then the
    Kalman filter g_t = (1-kappa) g_{t-1} + kappa g~_t and an SGD step."""
    kappa, gamma, C, lr, steps = 0.7, 0.5, 0.2, 0.5, 4
    X, y = data()
    model = mlp()
    params = list(model.parameters())
    c = (1 - kappa) / (kappa * gamma)
    prev, filtered = None, None
    for _ in range(steps):
        x_t = [p.detach().clone() for p in params]
        d = [torch.zeros_like(p) for p in params] if prev is None else [a - b for a, b in zip(x_t, prev)]
        total = [torch.zeros_like(p) for p in params]
        for i in range(N):
            def grad_at(shift):
                with torch.no_grad():
                    for p, s in zip(params, shift):
                        p.add_(s)
                g = torch.autograd.grad(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), params)
                with torch.no_grad():
                    for p, s in zip(params, shift):
                        p.sub_(s)
                return g
            ge = grad_at([gamma * v for v in d])
            gx = grad_at([torch.zeros_like(v) for v in d])
            gi = [c * a + (1 - c) * b for a, b in zip(ge, gx)]
            norm = torch.sqrt(sum(v.pow(2).sum() for v in gi))
            factor = min(1.0, C / norm.item())
            total = [t + factor * v for t, v in zip(total, gi)]
        noisy = [t / N for t in total]
        filtered = noisy if filtered is None else [(1 - kappa) * f + kappa * g for f, g in zip(filtered, noisy)]
        prev = x_t
        with torch.no_grad():
            for p, g in zip(params, filtered):
                p.sub_(lr * g)
    engine_model, _ = train_private([DiSK(kappa, gamma)], C=C, lr=lr, steps=steps)
    assert torch.allclose(flat(engine_model), flat(model), rtol=0, atol=1e-10)


def test_disk_without_a_closure_is_a_clear_error():
    with pytest.raises(ExpungeError, match="closure"):
        train_private([DiSK()], closure=False, sigma=1.0)


def test_disk_works_with_virtual_batches():
    whole, _ = train_private([DiSK()], sigma=1.0, C=0.5, batch_size=16, steps=3)
    split, _ = train_private([DiSK()], sigma=1.0, C=0.5, batch_size=16, steps=3, physical_batch_size=5)
    assert torch.allclose(flat(whole), flat(split), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- DiceSGD

@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
def test_dicesgd_error_feedback_matches_the_recursion():
    C1, C2, lr, steps = 0.05, 2.0, 0.5, 4
    X, y = data()
    model = mlp()
    params = list(model.parameters())
    error = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        clipped = [torch.zeros_like(p) for p in params]
        raw = [torch.zeros_like(p) for p in params]
        for i in range(N):
            g = torch.autograd.grad(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), params)
            norm = torch.sqrt(sum(v.pow(2).sum() for v in g)).item()
            clipped = [c + min(1.0, C1 / norm) * v for c, v in zip(clipped, g)]
            raw = [r + v for r, v in zip(raw, g)]
        e_norm = torch.sqrt(sum(e.pow(2).sum() for e in error)).item()
        v = [c / N + min(1.0, C2 / N / max(e_norm, 1e-12)) * e for c, e in zip(clipped, error)]
        error = [e + r / N - vt for e, r, vt in zip(error, raw, v)]
        with torch.no_grad():
            for p, vt in zip(params, v):
                p.sub_(lr * vt)
    engine_model, engine = train_private([DiceSGD(C2=C2)], C=C1, lr=lr, steps=steps)
    assert torch.allclose(flat(engine_model), flat(model), rtol=0, atol=1e-10)
    assert torch.sqrt(sum(e.pow(2).sum() for e in engine.transforms[0].error)) > 0  # the feedback was active


def test_dicesgd_noise_and_its_accounting():
    C1, C2, sigma, batch = 0.5, 1.5, 2.0, 16
    X, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = make_private(model, opt, (X, y), batch_size=batch, noise_multiplier=sigma, max_grad_norm=C1,
                          transforms=[DiceSGD(C2=C2)], seed=3)
    expected_std = sigma * C1 * math.sqrt(1 + 2 * C2 / C1)
    assert engine.noise_std == pytest.approx(expected_std)
    draws = []
    for _ in range(40):  # zero model gradient: an empty logical batch is noise only
        engine.optimizer._logical_end = True
        engine.optimizer.step()
        draws.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) * batch)
        engine.transforms[0].error = None  # keep e_t at zero so the release is the noise alone
    draws = torch.stack(draws)
    assert draws.std().item() == pytest.approx(expected_std, rel=0.05)
    # the epsilon reported is DP-SGD's for noise multiplier sigma at the same rate and steps (the paper's analysis)
    assert engine.epsilon(1e-5) == pytest.approx(
        accounting.epsilon([accounting.Phase(sigma, batch / N, 40)], 1e-5))


@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
def test_dicesgd_removes_the_clipping_bias_that_dp_sgd_keeps():
    """Known answer: minimising mean_i (w - a_i)^2 / 2 with a = (0, 0, 0, 0, 0, 3), C1 = 1, no noise. DP-SGD stops
    where the clipped gradients cancel, 5 w - 1 = 0 (w = 0.2); DiceSGD's error feedback reaches the true minimiser
    mean(a) = 0.5 (its error stays bounded there: the clipped mean gradient, 0.25, is within C2 / B = 1/3)."""
    a = torch.tensor([0.0, 0, 0, 0, 0, 3], dtype=torch.float64)
    X = torch.ones(6, 1, dtype=torch.float64)
    found = {}
    for name, transforms in (("dp-sgd", []), ("dicesgd", [DiceSGD(C2=2.0)])):
        model = nn.Linear(1, 1, bias=False).double()
        nn.init.zeros_(model.weight)
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), (X, a), batch_size=6,
                              noise_multiplier=0.0, max_grad_norm=1.0, transforms=transforms)
        while engine.steps < 100:
            for xb, yb in engine.loader:
                engine.optimizer.zero_grad()
                (0.5 * (model(xb).squeeze(1) - yb) ** 2).mean().backward()
                engine.optimizer.step()
        found[name] = model.weight.item()
    assert found["dp-sgd"] == pytest.approx(0.2, abs=1e-9)
    assert found["dicesgd"] == pytest.approx(0.5, abs=1e-9)


# ----------------------------------------------------------------------------- coupling and continual pre-training

def test_coupling_mixes_in_the_public_gradient_without_touching_the_accountant():
    public = data(seed=7)
    _, engine = train_private([PublicCoupling(public, alpha=1.0, batch_size=N, clip_public=False)], sigma=1.0,
                              C=0.5, batch_size=16, steps=1, lr=0.0)
    model = engine.model
    engine.detach()
    expected = torch.autograd.grad(F.cross_entropy(model(public[0]), public[1]), list(model.parameters()))
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-12)
    assert engine.epsilon(1e-5) == pytest.approx(accounting.epsilon([accounting.Phase(1.0, 16 / N, 1)], 1e-5))


def test_continual_pretraining_composes_epsilon_over_the_private_phase_only():
    X, y = data()
    public = (X[:12], y[:12])
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_private(model, opt, (X[12:], y[12:]), batch_size=12, noise_multiplier=1.0, max_grad_norm=1.0)
    before = flat(model)
    steps = engine.pretrain_public(public, epochs=2, batch_size=4)
    assert steps == 6 and not torch.equal(before, flat(model))  # public training moved the model
    assert engine.epsilon(1e-5) == 0.0
    for xb, yb in engine.loader:
        engine.optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        engine.optimizer.step()
    private_only = accounting.epsilon([accounting.Phase(1.0, 12 / 36, len(engine.loader))], 1e-5)
    assert engine.epsilon(1e-5) == pytest.approx(private_only)
    assert [p.private for p in engine.history()] == [False, True]


def test_public_phase_refuses_a_model_output_that_is_not_a_tensor():
    class Outputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return {"logits": self.net(x)}

    X, y = data()
    model = Outputs()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X[12:], y[12:]), batch_size=12,
                          noise_multiplier=1.0, max_grad_norm=1.0)
    before = flat(model)
    with pytest.raises(ExpungeError, match="batch_loss"):
        engine.pretrain_public((X[:12], y[:12]), batch_size=4)
    assert torch.equal(before, flat(model)) and not engine.phases


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, K)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids)).mean(1))


def conv_model():
    return nn.Sequential(nn.Unflatten(1, (1, 6, 6)), nn.Conv2d(1, 3, 3, stride=2), nn.Tanh(),
                         nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(12, K))


@pytest.mark.filterwarnings("ignore:noise_multiplier 0")
@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_dicesgd_sees_the_unclipped_sum_for_every_layer_kind(kind):
    """After one step from e_0 = 0: e_1 = (sum_i g_i - sum_i clip(g_i)) / B, for every handler type."""
    torch.manual_seed(1)
    if kind == "conv":
        model, X = conv_model().double(), torch.randn(N, 36, dtype=torch.float64)
    else:
        model, X = TokenModel().double(), torch.randint(0, 11, (N, 5))
    y = torch.randint(0, K, (N,))
    C = 0.05
    params = list(model.parameters())
    clipped = [torch.zeros_like(p) for p in params]
    raw = [torch.zeros_like(p) for p in params]
    for i in range(N):
        g = torch.autograd.grad(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), params)
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g)).item()
        clipped = [c + min(1.0, C / norm) * v for c, v in zip(clipped, g)]
        raw = [r + v for r, v in zip(raw, g)]
    engine = make_private(model, torch.optim.SGD(params, lr=0.0), (X, y), batch_size=N, noise_multiplier=0.0,
                          max_grad_norm=C, transforms=[DiceSGD()])
    for xb, yb in engine.loader:
        engine.optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        engine.optimizer.step()
        break
    for e, r, c in zip(engine.transforms[0].error, raw, clipped):
        assert torch.allclose(e, (r - c) / N, rtol=1e-6, atol=1e-12)


def test_two_point_disk_keeps_no_autograd_graph_between_steps():
    """Clipping deferred to step() used to run in grad mode, chaining each step's graph (and activations)
    into DiSK's filter state: memory grew with every step."""
    _, engine = train_private([DiSK(0.7, 0.5)], sigma=1.0, C=0.5, batch_size=16, steps=3)
    disk = engine.transforms[0]
    assert all(not t.requires_grad for t in disk.filtered + disk.previous + disk.d)
    assert all(not p.grad.requires_grad for p in engine.params)


def test_coupling_scales_the_public_gradient_to_the_private_bound():
    public = data(seed=7)
    _, engine = train_private([PublicCoupling(public, alpha=1.0, batch_size=N)], sigma=1.0, C=1e-3, batch_size=16,
                              steps=1, lr=0.0)
    model = engine.model
    engine.detach()
    raw = torch.autograd.grad(F.cross_entropy(model(public[0]), public[1]), list(model.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in raw))
    assert norm > 1e-3
    for p, g in zip(model.parameters(), raw):
        assert torch.allclose(p.grad, g * 1e-3 / norm, atol=1e-15)
