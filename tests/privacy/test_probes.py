"""Private loss probes: clipped sums and noise against a per-sample loop, accounting against dp-accounting by hand."""

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from torch import nn

from expunge.errors import ExpungeError
from expunge.optim import GeN, estimates_in
from expunge.privacy import PrivateLossProbe, epsilon, make_private, probe_phase, split_budget
from expunge.privacy.accounting import PLD_DISCRETIZATION, RDP_ORDERS, Phase

DT = torch.float64
DELTA = 1e-5


def data(n=120, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    return X, (X @ torch.randn(d, k, generator=torch.Generator().manual_seed(100), dtype=DT)).argmax(1)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def private_setup(noise=1.1, batch_size=24, seed=2):
    X, y = data()
    model = net()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), (X, y),
                          batch_size=batch_size, noise_multiplier=noise, max_grad_norm=1.0, seed=seed,
                          target_delta=DELTA)
    return model, engine, (X, y)


def per_sample(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none")


def hand_epsilon(phases, accountant):
    """dp-accounting composed by hand: each phase a self-composed Poisson-sampled Gaussian."""
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(sigma)), count) for sigma, q, count in phases]
    acc = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION) if accountant == "pld" \
        else RdpAccountant(orders=RDP_ORDERS)
    return acc.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(DELTA)


def test_clipped_sums_and_release_equal_a_per_sample_loop():
    model, engine, (X, y) = private_setup()
    sigma_l, R, seed, q = 0.7, 0.9, 5, 30 / 120
    probe = PrivateLossProbe(engine, per_sample(model), noise_multiplier=sigma_l, max_loss=R, batch_size=30,
                             seed=seed, adaptive=False)
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    u = [torch.randn_like(p) * 0.3 for p in params]

    def move(x):
        with torch.no_grad():
            for p, a, d in zip(params, w0, u):
                p.copy_(a - x * d)

    offsets = [-0.5, 0.0, 0.5]
    released = probe.measure(offsets, move)
    # the slow reference: the same Poisson draw (the probe's own stream, seed + 1), one row at a time
    rows = np.flatnonzero(np.random.default_rng(seed + 1).random(120) < q)
    assert 10 < len(rows) < 50
    sums = []
    for x in offsets:
        move(x)
        with torch.no_grad():
            sums.append(sum(min(float(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1])), R) for i in rows))
    with torch.no_grad():  # clipping acted on some rows
        assert any(float(F.cross_entropy(model(X[i:i + 1]), y[i:i + 1])) > R for i in rows)
    noise = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=DT) * sigma_l * R * np.sqrt(3)
    expected = (torch.tensor(sums, dtype=DT) + noise) / 30
    np.testing.assert_allclose(released.losses, expected.numpy(), rtol=1e-12, atol=1e-12)
    assert released.noise_std == pytest.approx(sigma_l * R * np.sqrt(3) / 30)
    assert engine.releases == [Phase(sigma_l, q, 1, name="gen-loss-probe")]


def test_noise_std_of_released_losses_is_sigma_r_sqrt_k_over_expected_batch():
    model, engine, _ = private_setup()
    probe = PrivateLossProbe(engine, per_sample(model), noise_multiplier=1.3, max_loss=2.0, batch_size=40,
                             seed=0, adaptive=False)
    still = lambda x: None  # weights fixed: the spread of a probe over the same point is sampling + noise
    big = PrivateLossProbe(engine, lambda b: b[0].abs().mean(1), noise_multiplier=1.3, max_loss=2.0,
                           batch_size=120, seed=0, adaptive=False)  # q = 1: every row each time, only the noise varies
    draws = np.stack([big.measure([-1.0, 0.0, 1.0], still).losses for _ in range(2000)])
    expected = 1.3 * 2.0 * np.sqrt(3) / 120
    assert big.noise_std(3) == pytest.approx(expected)
    assert draws.std(axis=0) == pytest.approx([expected] * 3, rel=0.08)  # 5 standard errors of the estimate
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.1  # independent draws per point
    assert probe.noise_std(5) == pytest.approx(1.3 * 2.0 * np.sqrt(5) / 40)


def test_accounting_of_steps_and_probes_equals_dp_accounting_by_hand_and_exceeds_steps_alone():
    model, engine, (X, y) = private_setup(noise=1.1, batch_size=24)
    probe = PrivateLossProbe(engine, per_sample(model), noise_multiplier=2.0, max_loss=3.0, batch_size=40, seed=1)
    gen = GeN(engine.optimizer, probe=probe, every=3)
    plain_model, plain, _ = private_setup(noise=1.1, batch_size=24)
    for run_model, opt in ((model, gen), (plain_model, plain.optimizer)):
        for _ in range(2):
            for xb, yb in (plain if opt is plain.optimizer else engine).loader:
                opt.zero_grad()
                F.cross_entropy(run_model(xb), yb).backward()
                opt.step()
    steps = engine.steps
    assert steps == plain.steps == 10 and gen.steps == 10
    assert sum(p.steps for p in engine.releases) == estimates_in(10, 3) == 4
    for accountant in ("pld", "rdp"):
        with_probes = engine.epsilon(accountant=accountant)
        by_hand = hand_epsilon([(1.1, 24 / 120, steps), (2.0, 40 / 120, 4)], accountant)
        assert with_probes == pytest.approx(by_hand, rel=1e-9)
        assert with_probes > plain.epsilon(accountant=accountant) == pytest.approx(
            hand_epsilon([(1.1, 24 / 120, steps)], accountant), rel=1e-9)
    summary = engine.summary()
    assert summary["releases"] == 4 and summary["steps"] == 10
    assert summary["epsilon_pld"] == pytest.approx(engine.epsilon())
    # the engine's state carries the releases
    _, fresh, _ = private_setup(noise=1.1, batch_size=24)
    fresh.load_state_dict(engine.state_dict())
    assert fresh.releases == engine.releases and fresh.epsilon() == pytest.approx(engine.epsilon(), rel=1e-12)


def test_budget_split_and_reserved_probes_meet_the_target():
    n, batch, steps, every = 1000, 50, 200, 4
    probes = estimates_in(steps, every)
    sigma_g, sigma_l = split_budget(3.0, DELTA, n=n, batch_size=batch, steps=steps, probes=probes)
    first = net()
    alone = make_private(first, torch.optim.SGD(first.parameters(), lr=0.1), data(n), batch_size=batch,
                         target_epsilon=3.0, target_delta=DELTA, steps=steps).noise_multiplier
    assert sigma_g == pytest.approx(1.01 * alone, rel=1e-3)
    total = epsilon([Phase(sigma_g, batch / n, steps), probe_phase(sigma_l, batch, n, probes)], DELTA)
    assert 3.0 * 0.99 < total <= 3.0
    # or fix the probe noise and let make_private calibrate the gradient noise around the reserved probes
    model = net()
    engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data(n), batch_size=batch,
                          target_epsilon=3.0, target_delta=DELTA, steps=steps,
                          reserve=[probe_phase(5.0, batch, n, probes)])
    assert engine.noise_multiplier > alone
    assert engine.releases == []  # reserved, not yet spent
    planned = [Phase(engine.noise_multiplier, batch / n, steps), probe_phase(5.0, batch, n, probes)]
    assert 3.0 * 0.99 < epsilon(planned, DELTA) <= 3.0


def test_probe_input_checks():
    model, engine, _ = private_setup()
    with pytest.raises(ExpungeError, match="noise_multiplier must be positive"):
        PrivateLossProbe(engine, per_sample(model), noise_multiplier=0.0, max_loss=1.0)
    with pytest.raises(ExpungeError, match="max_loss"):
        PrivateLossProbe(engine, per_sample(model), noise_multiplier=1.0, max_loss=float("inf"))
    with pytest.raises(ExpungeError, match="batch_size 500 is larger"):
        PrivateLossProbe(engine, per_sample(model), noise_multiplier=1.0, max_loss=1.0, batch_size=500)
    mean_loss = PrivateLossProbe(engine, lambda b: F.cross_entropy(model(b[0]), b[1]), noise_multiplier=1.0,
                                 max_loss=1.0, seed=0)
    with pytest.raises(ExpungeError, match="one loss per row"):
        mean_loss.measure([-1.0, 0.0, 1.0], lambda x: None)
    negative = PrivateLossProbe(engine, lambda b: -F.cross_entropy(model(b[0]), b[1], reduction="none"),
                                noise_multiplier=1.0, max_loss=1.0, seed=0)
    with pytest.raises(ExpungeError, match=">= 0"):
        negative.measure([-1.0, 0.0, 1.0], lambda x: None)
    assert engine.releases == []  # nothing released by the refused probes
    with pytest.raises(ExpungeError, match="gamma must be above 1"):
        split_budget(3.0, DELTA, n=100, batch_size=10, steps=10, probes=3, gamma=1.0)


def test_adaptive_threshold_follows_the_released_loss():
    model, engine, _ = private_setup()
    probe = PrivateLossProbe(engine, per_sample(model), noise_multiplier=0.5, max_loss=5.0, batch_size=60, seed=3)
    assert probe.threshold == 5.0
    released = probe.measure([-1.0, 0.0, 1.0], lambda x: None)
    assert probe.threshold == pytest.approx(min(max(abs(released.losses[1]), 5.0 / 1000), 5.0))
    state = probe.state_dict()
    again = probe.measure([-1.0, 0.0, 1.0], lambda x: None)
    probe.load_state_dict(state)
    np.testing.assert_array_equal(probe.measure([-1.0, 0.0, 1.0], lambda x: None).losses, again.losses)
