"""make_private end to end: noise, Poisson sampling, input checks, state, detach, schedulers and Adam."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expunge.errors import ExpungeError
from expunge.privacy import Phase, epsilon, make_private, replace_batchnorm
from expunge.privacy.engine import clip_factors

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier 0")

DT = torch.float64


def data(n=40, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, k, (n,), generator=g)


def mlp(seed=0, d=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).to(DT)


def noise_step(engine):
    """One logical step with no rows: the gradient is pure noise."""
    engine.optimizer.zero_grad()
    engine.optimizer.step()
    return torch.cat([p.grad.flatten() for p in engine.model.parameters() if p.requires_grad])


def draws(engine, k):
    """The first k Poisson draws of the loader (row indices), over as many epochs as needed."""
    out = []
    while len(out) < k:
        for rows in engine.loader.logical_batches():
            out.append(rows)
            if len(out) == k:
                break
    return out


def plain_forward(module):
    return "forward" not in module.__dict__ and not module._forward_hooks


# -- clip functions ----------------------------------------------------------------------------------------

def test_clip_factors_follow_their_definitions():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 8.0], dtype=DT)
    assert torch.allclose(clip_factors(norms, 1.0, "abadi"), torch.tensor([1, 1, 1, 0.5, 0.125], dtype=DT))
    assert torch.allclose(clip_factors(norms, 1.0, "automatic"), 1.0 / (norms + 0.01))
    assert torch.allclose(clip_factors(norms, 1.0, "automatic", gamma=0.1), 1.0 / (norms + 0.1))
    assert torch.equal(clip_factors(norms, 1.0, "global"), torch.tensor([1, 1, 1, 0, 0], dtype=DT))
    for fn in ("abadi", "automatic", "global"):
        assert ((clip_factors(norms, 1.0, fn) * norms) <= 1.0).all()


# -- noise ---------------------------------------------------------------------------------------------------

def test_noise_std_is_sigma_c_over_expected_batch_size():
    torch.manual_seed(0)
    model = nn.Linear(50, 40).to(DT)
    X, y = data(n=100, d=50)
    sigma, C = 1.3, 0.7
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=10,
                          noise_multiplier=sigma, max_grad_norm=C, seed=1)
    z = torch.cat([noise_step(engine) for _ in range(3)])
    expected = sigma * C / 10
    assert z.numel() == 3 * 2040
    assert abs(z.std().item() / expected - 1) < 0.05  # relative sd of the estimate is about 1%
    assert abs(z.mean().item()) < 5 * expected / z.numel() ** 0.5
    kurtosis = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert abs(kurtosis.item() - 3) < 0.4  # Gaussian, not uniform (1.8) or Laplace (6)
    assert engine.steps == 3


def test_noise_is_added_on_top_of_the_clipped_sum():
    X, y = data(n=60)
    grads = []
    for sigma in (0.0, 2.0):
        model = mlp()
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=20,
                              noise_multiplier=sigma, max_grad_norm=0.5, seed=4)
        F.cross_entropy(model(X[:20]), y[:20]).backward()
        engine.optimizer.step()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    diff = grads[1] - grads[0]
    assert grads[0].abs().sum() > 0
    assert abs(diff.std().item() / (2.0 * 0.5 / 20) - 1) < 0.25  # 53 coordinates


def test_noise_free_huge_clip_equals_the_non_private_step():
    X, y = data(n=32)
    model, plain = mlp(), mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    engine = make_private(model, base, (X, y), batch_size=8, noise_multiplier=0.0, max_grad_norm=1e8)
    ref = torch.optim.SGD(plain.parameters(), lr=0.3, momentum=0.9)
    for s in range(3):  # logical batches of exactly batch_size rows
        rows = slice(8 * s, 8 * s + 8)
        engine.optimizer.zero_grad()
        F.cross_entropy(model(X[rows]), y[rows]).backward()
        engine.optimizer.step()
        ref.zero_grad()
        F.cross_entropy(plain(X[rows]), y[rows]).backward()
        ref.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert not torch.equal(model[0].weight, mlp()[0].weight)


def test_seed_makes_noise_and_sampling_deterministic():
    X, y = data(n=50)
    runs = []
    for seed in (7, 7, 8):
        model = mlp()
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=10,
                              noise_multiplier=1.0, seed=seed)
        rows = draws(engine, 5)
        runs.append((noise_step(engine), rows))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert not torch.equal(runs[0][0], runs[2][0])
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[2][1]))


def test_secure_rng_is_not_seed_reproducible_and_has_the_right_scale():
    torch.manual_seed(0)
    X, y = data(n=200, d=30)
    noises, rows = [], []
    for _ in range(2):
        model = nn.Linear(30, 40).to(DT)
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=100,
                              noise_multiplier=2.0, max_grad_norm=1.5, seed=7, secure_rng=True)
        assert engine.noise.secure
        noises.append(noise_step(engine))
        rows.append(draws(engine, 2))
    assert not torch.equal(noises[0], noises[1])
    assert not np.array_equal(rows[0][0], rows[1][0])
    z = torch.cat(noises)
    assert z.dtype == DT
    assert abs(z.std().item() / (2.0 * 1.5 / 100) - 1) < 0.06  # 2480 draws
    assert abs(z.mean().item()) < 5 * (2.0 * 1.5 / 100) / z.numel() ** 0.5


# -- Poisson sampling ----------------------------------------------------------------------------------------

def test_poisson_batch_sizes_average_q_n():
    X, y = data(n=200)
    model = mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=20,
                          noise_multiplier=1.0, seed=0)
    drawn = draws(engine, 300)
    sizes = np.array([len(r) for r in drawn])
    assert abs(sizes.mean() - 20) < 1.0              # sd of the mean: 0.25
    assert 12 < sizes.var(ddof=1) < 25               # binomial variance n q (1 - q) = 18, not a fixed size
    for r in drawn:
        assert r.dtype.kind == "i" and np.all(np.diff(r) > 0) and (r.size == 0 or (r[0] >= 0 and r[-1] < 200))
    # every row is drawn at rate q
    counts = np.bincount(np.concatenate(drawn), minlength=200)
    assert abs(counts.mean() / 300 - 0.1) < 0.01
    assert len(engine.loader) == 10


def test_loader_yields_physical_batches_and_counts_logical_steps():
    X, y = data(n=30)
    model = mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=10,
                          physical_batch_size=4, noise_multiplier=1.0, seed=2)
    sizes, steps_after = [], []
    for xb, yb in engine.loader:
        sizes.append(len(yb))
        assert xb.shape[1:] == (6,) and xb.dtype == DT
        engine.optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        engine.optimizer.step()
        steps_after.append(engine.steps)
    assert engine.steps == len(engine.loader) == 3
    assert max(sizes) <= 4 and len(sizes) > 3
    assert steps_after == sorted(steps_after) and steps_after[-1] == 3  # one step per logical batch
    assert engine.history() == [Phase(1.0, 10 / 30, 3)]


def test_loader_accepts_datasets():
    X, y = data(n=30)
    ds = torch.utils.data.TensorDataset(X, y)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 30

        def __getitem__(self, i):
            return X[i], y[i]

    for source in (ds, Rows()):
        model = mlp()
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), source, batch_size=10,
                              noise_multiplier=1.0, seed=2)
        xb, yb = next(iter(engine.loader))
        assert xb.shape[1:] == (6,) and len(xb) == len(yb)


def test_empty_logical_batch_is_a_pure_noise_step():
    X, y = data(n=50, d=30)
    torch.manual_seed(0)
    model = nn.Linear(30, 40).to(DT)
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), (X, y), batch_size=5,
                          noise_multiplier=1.5, max_grad_norm=2.0, seed=0)
    z = noise_step(engine)
    assert abs(z.std().item() / (1.5 * 2.0 / 5) - 1) < 0.1
    assert engine.steps == 1
    assert engine.epsilon(1e-3) == pytest.approx(epsilon([Phase(1.5, 0.1, 1)], 1e-3))
    assert engine.epsilon(1e-3) > 0


@pytest.mark.parametrize("kind", ["mlp", "conv", "embedding"])
def test_empty_batches_through_the_loader(kind):
    n = 50
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        make_model, X = (lambda: mlp(d=6)), torch.randn(n, 6, generator=g, dtype=DT)
    elif kind == "conv":
        def make_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv1d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(16, 3)).to(DT)
        X = torch.randn(n, 1, 10, generator=g, dtype=DT)
    else:
        def make_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(12, 3)).to(DT)
        X = torch.randint(0, 9, (n, 3), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    for sigma in (1.0, 0.0):
        model = make_model()
        engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=1,
                              noise_multiplier=sigma, seed=0)  # q = 0.02: about a third of the batches are empty
        empties = 0
        for xb, yb in engine.loader:  # the documented loop, unchanged for empty batches
            empty = len(yb) == 0
            empties += empty
            steps = engine.steps
            engine.optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()  # nan loss on no rows: its gradient touches no row
            engine.optimizer.step()
            if engine.steps > steps:  # end of a logical batch: released gradients are finite
                grads = [p.grad for p in model.parameters()]
                assert all(torch.isfinite(gr).all() for gr in grads)
                if empty and sigma == 0:
                    assert all(torch.count_nonzero(gr) == 0 for gr in grads)
                if empty and sigma > 0:
                    assert all(torch.count_nonzero(gr) == gr.numel() for gr in grads)  # pure noise
        assert empties > 0
        assert engine.steps == len(engine.loader) == 50
        assert engine.history() == [Phase(sigma, 0.02, 50)]


# -- bad input -----------------------------------------------------------------------------------------------

def bad_models():
    torch.manual_seed(0)
    frozen_bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    for p in frozen_bn[1].parameters():
        p.requires_grad_(False)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 4)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    return {
        "batchnorm": (nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), r"GroupNorm.*replace_batchnorm"),
        "frozen batchnorm": (frozen_bn, "replace_batchnorm"),
        "batchnorm2d": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "GroupNorm"),
        "rnn": (nn.Sequential(nn.Linear(6, 4), nn.RNN(4, 4)), "recurrent"),
        "lstm": (nn.Sequential(nn.Linear(6, 4), nn.LSTM(4, 4)), "recurrent"),
        "gru": (nn.GRU(6, 4), "recurrent"),
        "attention": (Attention(), "MultiheadAttention"),
    }


@pytest.mark.parametrize("name", list(bad_models()))
def test_unsupported_layers_are_refused_before_any_hook(name):
    model, message = bad_models()[name]
    X, y = data(n=20)
    with pytest.raises(ExpungeError, match=message):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=5, noise_multiplier=1.0)
    assert all(plain_forward(m) for m in model.modules())


def bad_calls():
    X, y = data(n=100)
    other = nn.Linear(2, 2)
    base = dict(batch_size=10, noise_multiplier=1.0)
    target = dict(batch_size=10, target_epsilon=2.0, target_delta=1e-3, epochs=2)
    return {
        "epsilon zero": (dict(target, target_epsilon=0.0), "positive"),
        "epsilon negative": (dict(target, target_epsilon=-1.0), "positive"),
        "delta 1/n": (dict(target, target_delta=0.01), "1/n"),
        "delta above 1/n": (dict(target, target_delta=0.05), "1/n"),
        "delta one": (dict(target, target_delta=1.0), "delta"),
        "epsilon without delta": ({k: v for k, v in target.items() if k != "target_delta"}, "target_delta"),
        "epsilon without length": ({k: v for k, v in target.items() if k != "epochs"}, "epochs"),
        "epsilon and noise": (dict(target, noise_multiplier=1.0), "not both"),
        "no target nor noise": (dict(batch_size=10), "noise_multiplier"),
        "negative noise": (dict(base, noise_multiplier=-0.5), "noise_multiplier"),
        "batch larger than data": (dict(base, batch_size=101), "larger than the data"),
        "batch zero": (dict(base, batch_size=0), "batch_size"),
        "physical zero": (dict(base, physical_batch_size=-1), "physical_batch_size"),
        "clip norm zero": (dict(base, max_grad_norm=0.0), "max_grad_norm"),
        "unknown clip_fn": (dict(base, clip_fn="psac"), "clip_fn"),
        "unknown clipping": (dict(base, clipping="per-layer"), "clipping"),
        "unknown head": (dict(base, clipping=["0", "nosuch"]), "nosuch"),
        "unknown reduction": (dict(base, loss_reduction="none"), "loss_reduction"),
        "unknown accountant": (dict(base, accountant="gdp"), "accountant"),
        "foreign parameters": (dict(base, optimizer=torch.optim.SGD(other.parameters(), lr=0.1)), "not in the model"),
        "mismatched data": (dict(base, data=(X, y[:50])), "lengths"),
    }, (X, y)


@pytest.mark.parametrize("name", list(bad_calls()[0]))
def test_bad_arguments_raise_before_training(name):
    calls, default_data = bad_calls()
    kwargs, message = dict(calls[name][0]), calls[name][1]
    model = mlp()
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    source = kwargs.pop("data", default_data)
    with pytest.raises(ExpungeError, match=message):
        make_private(model, opt, source, **kwargs)
    assert all(plain_forward(m) for m in model.modules())


def test_already_private_optimizer_is_refused():
    X, y = data()
    model = mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=5,
                          noise_multiplier=1.0)
    engine.detach()
    with pytest.raises(ExpungeError, match="already private"):
        make_private(model, engine.optimizer, (X, y), batch_size=5, noise_multiplier=1.0)


def test_start_phase_target_without_delta_is_an_expunge_error():
    X, y = data(n=100)
    model = mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=10,
                          noise_multiplier=1.0)
    with pytest.raises(ExpungeError, match="delta"):
        engine.start_phase(target_epsilon=2.0, steps=10)


def test_replace_batchnorm_makes_a_model_acceptable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Sequential(nn.Linear(6 * 4 * 4, 4), nn.BatchNorm1d(4, affine=False)), nn.Linear(4, 3))
    assert replace_batchnorm(model) is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 6 and model[1].num_channels == 6
    assert isinstance(model[4][1], nn.GroupNorm) and not model[4][1].affine
    model = model.to(DT)
    X = torch.randn(20, 1, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (20,))
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=5,
                          noise_multiplier=1.0, seed=0)
    before = model[0].weight.clone()
    F.cross_entropy(model(X[:5]), y[:5]).backward()
    engine.optimizer.step()
    assert not torch.equal(before, model[0].weight)


# -- state ---------------------------------------------------------------------------------------------------

def train(engine, model, steps):
    target = engine.steps + steps
    while engine.steps < target:
        for xb, yb in engine.loader:
            engine.optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            engine.optimizer.step()
            if engine.steps == target:
                return


def private(model, X, y, seed, **kw):
    return make_private(model, torch.optim.Adam(model.parameters(), lr=0.01), (X, y), batch_size=10,
                        physical_batch_size=4, noise_multiplier=0.8, max_grad_norm=1.0, seed=seed,
                        target_delta=1e-3, **kw)


def test_state_round_trip_continues_exactly():
    X, y = data(n=60)
    straight = mlp()
    engine = private(straight, X, y, seed=3)
    train(engine, straight, 8)  # runs over an epoch boundary (6 steps per epoch)

    first = mlp()
    engine = private(first, X, y, seed=3)
    train(engine, first, 3)
    saved = copy.deepcopy({"engine": engine.state_dict(), "model": first.state_dict(),
                           "optimizer": engine.optimizer.state_dict()})
    engine.detach()

    resumed = mlp(seed=99)  # different init and seed: everything must come from the saved state
    engine = private(resumed, X, y, seed=1234)
    resumed.load_state_dict(saved["model"])
    engine.optimizer.load_state_dict(saved["optimizer"])
    engine.load_state_dict(saved["engine"])
    assert engine.steps == 3
    train(engine, resumed, 5)

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert engine.steps == 8
    assert engine.epsilon() == pytest.approx(epsilon([Phase(0.8, 10 / 60, 8)], 1e-3))


def test_state_refuses_other_settings():
    X, y = data(n=60)
    engine = private(mlp(), X, y, seed=3)
    state = engine.state_dict()
    model = mlp()
    engine2 = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=10,
                           noise_multiplier=0.8, max_grad_norm=2.0)
    with pytest.raises(ExpungeError, match="max_grad_norm"):
        engine2.load_state_dict(state)
    with pytest.raises(ExpungeError, match="format"):
        engine2.load_state_dict({"steps": 3})


def test_detach_restores_plain_autograd():
    X, y = data(n=20)
    model, plain = mlp(), mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=5,
                          noise_multiplier=1.0, seed=0)
    assert not plain_forward(model[0]) and not plain_forward(model[2])
    F.cross_entropy(model(X[:5]), y[:5]).backward()
    assert model[0].weight.grad is None  # the engine computes Linear weight gradients itself
    engine.optimizer.step()
    engine.detach()
    assert all(plain_forward(m) for m in model.modules())
    model.load_state_dict(plain.state_dict())
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    F.cross_entropy(plain(X), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert all(not h.pairs and h.calls == 0 for h in engine.handlers)


# -- optimizers and schedulers ------------------------------------------------------------------------------

def test_step_lr_scheduler_on_the_private_optimizer():
    X, y = data(n=32)
    model = mlp()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.2), (X, y), batch_size=8,
                          noise_multiplier=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        scheduler = torch.optim.lr_scheduler.StepLR(engine.optimizer, step_size=1, gamma=0.5)
        for k in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            engine.optimizer.zero_grad()
            F.cross_entropy(model(X[8 * k:8 * k + 8]), y[8 * k:8 * k + 8]).backward()
            engine.optimizer.step()
            lr = 0.2 * 0.5 ** k
            for b, p in zip(before, model.parameters()):
                torch.testing.assert_close(p, b - lr * p.grad, rtol=0, atol=1e-14)
            scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(0.2 * 0.5 ** 3)]
    assert engine.optimizer.base.param_groups[0]["lr"] == pytest.approx(0.025)


def test_adam_noise_free_equals_plain_adam():
    X, y = data(n=32)
    model, plain = mlp(), mlp()
    engine = make_private(model, torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1), (X, y),
                          batch_size=8, noise_multiplier=0.0, max_grad_norm=1e8)
    ref = torch.optim.Adam(plain.parameters(), lr=0.01, weight_decay=0.1)
    for s in range(4):
        rows = slice(8 * s, 8 * s + 8)
        engine.optimizer.zero_grad()
        F.cross_entropy(model(X[rows]), y[rows]).backward()
        engine.optimizer.step()
        ref.zero_grad()
        F.cross_entropy(plain(X[rows]), y[rows]).backward()
        ref.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert len(engine.optimizer.state_dict()["state"]) == 6


def test_private_adam_trains():
    X, y = data(n=100)
    y = (X[:, 0] > 0).long()
    model = mlp()
    engine = make_private(model, torch.optim.Adam(model.parameters(), lr=0.05), (X, y), batch_size=25,
                          noise_multiplier=0.5, max_grad_norm=1.0, seed=0)
    loss0 = F.cross_entropy(model(X), y).item()
    train(engine, model, 15)
    with torch.no_grad():
        assert F.cross_entropy(model(X), y).item() < loss0 - 0.1


def test_a_model_that_folds_positions_into_the_batch_is_refused():
    """(B, T, d) reshaped to (B*T, d) before a Linear would clip tokens, not rows: a clear error instead."""

    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            b, t, d = x.shape
            return self.lin(x.reshape(b * t, d)).reshape(b, t, 3).mean(1)

    X, y = torch.randn(20, 5, 4), torch.randint(0, 3, (20,))
    model = Folding()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=10,
                          noise_multiplier=1.0)
    with pytest.raises(ExpungeError, match="dimension 0"):
        for xb, yb in engine.loader:
            engine.optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            engine.optimizer.step()


def test_start_phase_names_the_new_phase_and_fails_without_changing_anything():
    X, y = torch.randn(100, 4), torch.randint(0, 2, (100,))
    model = nn.Linear(4, 2)
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=10,
                          noise_multiplier=1.0, target_delta=1e-3)
    engine.steps = 5
    engine.start_phase(noise_multiplier=2.0, name="second")
    engine.steps = 3
    assert [p.name for p in engine.history()] == ["", "second"]
    before = (engine.sample_rate, engine.noise_multiplier, list(engine.phases), engine.steps)
    with pytest.raises(ExpungeError, match="already spent"):
        engine.start_phase(batch_size=50, target_epsilon=1e-3, steps=10)
    assert (engine.sample_rate, engine.noise_multiplier, list(engine.phases), engine.steps) == before
