"""GeN: the estimate against exact answers, the acceptance test, the base optimizer's state, the rate's bookkeeping."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

from expunge.errors import ExpungeError
from expunge.optim import GeN, cosine_horizon, estimates_in, fit_rate, linear_horizon
from expunge.privacy import DiSK, PrivateLossProbe, make_private

DT = torch.float64


def quadratic(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=DT)
    Q = M @ M.T / d + 0.1 * torch.eye(d, dtype=DT)
    target = torch.randn(d, generator=g, dtype=DT)
    return Q, target


def logistic(n=400, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (X @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    return X, y


def direction(before, gen):
    """u with w_new = w - eta_new u, read off the step GeN applied."""
    return (before - gen.optimizer.param_groups[0]["params"][0].detach()) / gen.rates[-1]


# -- the estimate ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda w: torch.optim.SGD([w], lr=0.05, momentum=0.9, weight_decay=0.01),
                                  lambda w: torch.optim.Adam([w], lr=0.02),
                                  lambda w: torch.optim.AdamW([w], lr=0.02, weight_decay=0.1)])
def test_on_a_quadratic_eta_star_is_the_exact_minimiser_along_the_step(make):
    Q, target = quadratic()
    loss = lambda v: 0.5 * (v - target) @ Q @ (v - target)
    w = torch.zeros(6, dtype=DT, requires_grad=True)
    gen = GeN(make(w), probe=lambda: (lambda: loss(w)), every=1)
    for _ in range(4):
        before = w.detach().clone()
        rate = gen.lr
        gen.zero_grad()
        loss(w).backward()
        gradient = w.grad.detach().clone()
        gen.step()
        u = direction(before, gen)
        exact = float(gradient @ u) / float(u @ Q @ u)  # argmin_x L(w - x u) of a quadratic
        e = gen.history[-1]
        assert e.accepted and e.lr == rate
        assert e.lr_star == pytest.approx(exact, rel=1e-9)
        clipped = min(max(exact, rate / 2), 2 * rate)
        assert gen.lr == pytest.approx(0.9 * rate + 0.1 * clipped, rel=1e-12)
        torch.testing.assert_close(w.detach(), before - gen.lr * u, rtol=1e-12, atol=1e-14)
    assert len({round(r, 12) for r in gen.rates}) == 4  # the rate moved at every estimate


@pytest.mark.parametrize("name,lr", [("sgd", 1.0), ("adam", 0.01)])
def test_on_logistic_regression_eta_star_is_newtons_step_along_u_and_near_the_optimum_a_line_search(name, lr):
    """GeN estimates phi'(0)/phi''(0) for phi(x) = L(w - x u) from three losses. That is the exact line search
    where phi is quadratic on the scale of the step (near the optimum); far from it, it is Newton's step on phi,
    checked against autograd's Hessian-vector product."""
    X, y = logistic()
    loss = lambda v: F.binary_cross_entropy_with_logits(X @ v, y) + 0.5e-2 * (v * v).sum()
    w = torch.zeros(8, dtype=DT, requires_grad=True)
    lbfgs = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        value = loss(w)
        value.backward()
        return value

    lbfgs.step(closure)
    optimum = w.detach().clone()
    noise = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=DT)
    for distance, versus in ((1.0, "newton"), (0.005, "line search")):
        w = (optimum + distance * noise).requires_grad_(True)
        base = torch.optim.SGD([w], lr=lr) if name == "sgd" else torch.optim.Adam([w], lr=lr)
        gen = GeN(base, probe=lambda: (lambda: loss(w)), every=1)
        before = w.detach().clone()
        gen.zero_grad()
        loss(w).backward()
        gen.step()
        star = gen.history[0].lr_star
        u = direction(before, gen)
        if versus == "newton":
            v = before.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(v), v, create_graph=True)
            (hu,) = torch.autograd.grad(g @ u, v)
            reference = float(g.detach() @ u) / float(hu @ u)
        else:
            reference = minimize_scalar(lambda x: float(loss(before - x * u)), bracket=(0.0, star), tol=1e-14).x
        assert star == pytest.approx(reference, rel=1e-3), versus


def test_the_fit_rejects_negative_curvature_and_keeps_the_rate():
    w = torch.ones(4, dtype=DT, requires_grad=True)
    concave = lambda: -0.5 * (w * w).sum() + 3.0 * w.sum()  # gradient descends, curvature -|u|^2
    gen = GeN(torch.optim.SGD([w], lr=0.1), probe=lambda: concave, every=1)
    for _ in range(3):
        gen.zero_grad()
        concave().backward()
        gen.step()
    assert [e.accepted for e in gen.history] == [False] * 3
    assert all(e.reason == "negative curvature" and e.curvature < 0 and e.slope > 0 for e in gen.history)
    assert gen.lr == 0.1 and gen.rates == [0.1] * 3
    fit = fit_rate([-1, 0, 1], [1.0, 1.2, 1.0])  # a bump: slope 0, curvature < 0
    assert not fit.accepted


def test_three_point_formula_and_the_acceptance_rules():
    L = {-1: 1.30, 0: 1.00, 1: 0.90}
    fit = fit_rate([-1, 0, 1], [L[-1], L[0], L[1]])
    assert fit.accepted and fit.ratio == pytest.approx(0.5 * (L[-1] - L[1]) / (L[1] + L[-1] - 2 * L[0]))
    assert not fit_rate([-1, 0, 1], [0.9, 1.0, 1.3]).accepted  # loss rises along -u: not a descent direction
    # noise: a curvature within two standard errors is not trusted ...
    assert fit_rate([-1, 0, 1], [1.01, 1.0, 0.99 + 0.001], noise_std=0.01).reason == "not a descent direction (slope not above its noise)"
    unresolved = fit_rate([-1, 0, 1], [1.10, 1.0, 0.90 + 0.001], noise_std=0.005)
    assert unresolved.accepted and unresolved.ratio == 2.0  # ... unless even its upper bound puts eta* past the clip
    assert fit_rate([-1, 0, 1], [1.02, 1.0, 0.98 + 0.01], noise_std=0.01).reason == "curvature not resolved"
    # more points: a good parabola passes, a kinked curve does not
    r = np.linspace(-1, 1, 5)
    assert fit_rate(r, 1 - 0.3 * r + 0.2 * r**2).accepted
    poor = fit_rate(r, 1 - 0.3 * r + 0.4 * np.abs(r) ** 0.5)
    assert not poor.accepted and poor.reason.startswith("poor quadratic fit")
    # an overflow away from w: the step overshoots, eta* goes to the lower clip end
    assert fit_rate([-1, 0, 1], [2.0, 1.0, float("inf")]).ratio == 0.5
    assert not fit_rate([-1, 0, 1], [2.0, float("nan"), 1.0]).accepted


def test_a_rate_far_too_small_grows_and_one_far_too_large_shrinks():
    Q, target = quadratic()
    loss = lambda v: 0.5 * (v - target) @ Q @ (v - target)
    for start, moves in ((1e-6, "up"), (50.0, "down")):
        w = torch.zeros(6, dtype=DT, requires_grad=True)
        gen = GeN(torch.optim.SGD([w], lr=start), probe=lambda: (lambda: loss(w)), every=1)
        for _ in range(10):
            gen.zero_grad()
            loss(w).backward()
            gen.step()
        assert all(e.accepted for e in gen.history)
        factor = (0.9 + 0.1 * 2) if moves == "up" else (0.9 + 0.1 / 2)
        assert gen.lr == pytest.approx(start * factor**10, rel=1e-9)


# -- the base optimizer's state -------------------------------------------------------------------------------

def classification(n=64, d=5, k=3, seed=0):
    """Rows whose labels follow a fixed linear rule (learnable: probes see a descent)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    rule = torch.randn(d, k, generator=torch.Generator().manual_seed(100), dtype=DT)
    return X, (X @ rule).argmax(1)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.05),
}


def assert_same_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            torch.testing.assert_close(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]), rtol=1e-9,
                                       atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_base_state_after_k_gen_steps_equals_k_plain_steps_at_the_same_rates(name):
    X, y = classification()
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model, plain = net(), net()
    gen = GeN(OPTIMIZERS[name](model.parameters()), probe=batches[::-1],
              loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]), every=2)
    for t in range(9):
        xb, yb = batches[t % 4]
        gen.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        gen.step()
    assert gen.steps == 9 and len(gen.rates) == 9 and len(gen.history) == estimates_in(9, 2) == 5
    assert len(set(gen.rates)) > 2  # the rates did change
    reference = OPTIMIZERS[name](plain.parameters())
    for t, rate in enumerate(gen.rates):
        for group in reference.param_groups:
            group["lr"] = rate
        xb, yb = batches[t % 4]
        reference.zero_grad()
        F.cross_entropy(plain(xb), yb).backward()
        reference.step()
    assert_same_state(gen.optimizer, reference)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("probe_kind", ["private", "public"])
@pytest.mark.parametrize("transforms", [[], [DiSK(0.7, 0.5)]], ids=["dp-sgd", "disk"])
def test_dp_optimizer_state_after_k_gen_steps_equals_k_plain_private_steps(probe_kind, transforms):
    X, y = classification(n=80)
    public = classification(n=32, seed=5)
    runs = []
    for use_gen in (True, False):
        model = net()
        base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        engine = make_private(model, base, (X, y), batch_size=16, noise_multiplier=0.8, max_grad_norm=1.0, seed=3,
                              physical_batch_size=80, transforms=copy.deepcopy(transforms))
        gen = None
        if use_gen:
            if probe_kind == "private":
                probe = PrivateLossProbe(engine, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"),
                                         noise_multiplier=0.01, max_loss=3.0, seed=11)  # quiet: GeN must act
                gen = GeN(engine.optimizer, probe=probe, every=2)
            else:
                gen = GeN(engine.optimizer, probe=[public], loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]),
                          every=2)
        steps = 0
        while steps < 7:
            for xb, yb in engine.loader:
                if not use_gen:
                    for group in base.param_groups:
                        group["lr"] = runs[0]["rates"][steps]

                def closure(xb=xb, yb=yb):
                    engine.optimizer.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                (gen or engine.optimizer).step(closure)
                steps += 1
                if steps == 7:
                    break
        runs.append({"model": model, "base": base, "engine": engine, "rates": gen.rates if gen else None, "gen": gen})
    a, b = runs
    assert a["engine"].steps == b["engine"].steps == 7
    assert len(set(a["rates"])) > 1
    assert_same_state(a["base"], b["base"])
    for p, q in zip(a["model"].parameters(), b["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    if transforms:  # DiSK's d_t is the step GeN applied, not the one at the old rate
        for d_a, d_b in zip(a["engine"].transforms[0].d, b["engine"].transforms[0].d):
            torch.testing.assert_close(d_a, d_b, rtol=1e-9, atol=1e-12)


def test_physical_batches_count_once_per_logical_step():
    X, y = classification(n=80)
    model = net()
    engine = make_private(model, torch.optim.Adam(model.parameters(), lr=0.01), (X, y), batch_size=40,
                          physical_batch_size=8, noise_multiplier=1.0, seed=0)
    probe = PrivateLossProbe(engine, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"),
                             noise_multiplier=1.0, max_loss=3.0, seed=1)
    gen = GeN(engine.optimizer, probe=probe, every=2)
    for xb, yb in engine.loader:
        gen.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        gen.step()
    assert gen.steps == engine.steps == 2 and len(gen.history) == 1


# -- bookkeeping ----------------------------------------------------------------------------------------------

def train(gen, model, batches, steps):
    for t in range(steps):
        xb, yb = batches[t % len(batches)]
        gen.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        gen.step()


def test_state_dict_round_trip_continues_exactly():
    X, y = classification()
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    probes = [classification(n=16, seed=s) for s in range(3)]
    model = net()
    make = lambda m: GeN(torch.optim.AdamW(m.parameters(), lr=0.01), probe=probes,
                         loss_fn=lambda b: F.cross_entropy(m(b[0]), b[1]), every=2, schedule=cosine_horizon(20))
    gen = make(model)
    train(gen, model, batches, 5)
    saved, weights = copy.deepcopy(gen.state_dict()), copy.deepcopy(model.state_dict())
    train(gen, model, batches, 5)
    resumed = net(seed=9)
    resumed.load_state_dict(weights)
    again = make(resumed)
    again.load_state_dict(saved)
    assert again.lr == saved["lr"] and again.steps == 5 and len(again.history) == 3
    train(again, resumed, batches, 5)
    assert again.rates == gen.rates
    assert [e.to_dict() for e in again.history] == [e.to_dict() for e in gen.history]
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ExpungeError, match="not a GeN state"):
        again.load_state_dict(saved["optimizer"])


def test_param_groups_keep_their_ratios_and_horizon_schedules():
    model = net()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                                 {"params": model[2].parameters(), "lr": 0.05}], momentum=0.5)
    X, y = classification()
    gen = GeN(optimizer, probe=[(X, y)], loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]), every=1)
    train(gen, model, [(X[:32], y[:32])], 3)
    assert gen.lr != 0.1
    assert optimizer.param_groups[1]["lr"] == pytest.approx(gen.lr / 2, rel=1e-15)
    cos, lin = cosine_horizon(10), linear_horizon(10)
    assert (cos(0), cos(5), cos(10), cos(20)) == pytest.approx((1.0, 0.5, 0.0, 0.0))
    assert (lin(0), lin(5), lin(10)) == pytest.approx((1.0, 0.5, 0.0))
    # a zero horizon: accepted estimates only shrink the rate, by the smoothing factor
    w = torch.zeros(6, dtype=DT, requires_grad=True)
    Q, target = quadratic()
    loss = lambda: 0.5 * (w - target) @ Q @ (w - target)
    gen = GeN(torch.optim.SGD([w], lr=0.01), probe=lambda: loss, every=1, schedule=lambda t: 0.0)
    train_closure(gen, loss, 2)
    assert gen.lr == pytest.approx(0.01 * 0.81)


def train_closure(gen, loss, steps):
    for _ in range(steps):
        gen.zero_grad()
        loss().backward()
        gen.step()


def test_more_points_and_the_history_records_what_was_probed():
    Q, target = quadratic()
    w = torch.zeros(6, dtype=DT, requires_grad=True)
    loss = lambda: 0.5 * (w - target) @ Q @ (w - target)
    gen = GeN(torch.optim.SGD([w], lr=0.05), probe=lambda: loss, every=1, points=5)
    train_closure(gen, loss, 2)
    e = gen.history[0]
    assert e.offsets == pytest.approx([-0.05, -0.025, 0.0, 0.025, 0.05]) and len(e.losses) == 5
    assert e.accepted and e.r2 == pytest.approx(1.0)


# -- refusals -------------------------------------------------------------------------------------------------

def test_refusals_name_the_problem():
    model = net()
    X, y = classification()
    batches = [(X, y)]
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])
    with pytest.raises(ExpungeError, match="Rprop is not known"):
        GeN(torch.optim.Rprop(model.parameters(), lr=0.01), probe=batches, loss_fn=loss_fn)
    GeN(torch.optim.Rprop(model.parameters(), lr=0.01), probe=batches, loss_fn=loss_fn, assume_linear=True)
    with pytest.raises(ExpungeError, match="Adagrad"):
        GeN(torch.optim.Adagrad(model.parameters(), lr=0.01, lr_decay=0.1), probe=batches, loss_fn=loss_fn)
    with pytest.raises(ExpungeError, match="points must be an odd number"):
        GeN(torch.optim.SGD(model.parameters(), lr=0.1), probe=batches, loss_fn=loss_fn, points=4)
    with pytest.raises(ExpungeError, match="every must be a positive integer"):
        GeN(torch.optim.SGD(model.parameters(), lr=0.1), probe=batches, loss_fn=loss_fn, every=0)
    with pytest.raises(ExpungeError, match="give probe=batches with loss_fn"):
        GeN(torch.optim.SGD(model.parameters(), lr=0.1), probe=batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = GeN(optimizer, probe=batches, loss_fn=loss_fn)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(gen, model, batches, 1)
    scheduler.step()
    with pytest.raises(ExpungeError, match="changed outside GeN"):
        train(gen, model, batches, 1)
    one_shot = GeN(torch.optim.SGD(model.parameters(), lr=0.1), probe=iter(batches), loss_fn=loss_fn, every=1)
    train(one_shot, model, batches, 1)
    with pytest.raises(ExpungeError, match="ran out"):
        train(one_shot, model, batches, 1)


def test_private_training_refuses_unaccounted_probes():
    X, y = classification(n=80)
    model = net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_private(model, base, (X, y), batch_size=16, noise_multiplier=1.0, seed=0)
    loss_fn = lambda b: F.cross_entropy(model(b[0]), b[1])
    with pytest.raises(ExpungeError, match="base of a private engine"):
        GeN(base, probe=[(X[:16], y[:16])], loss_fn=loss_fn)
    with pytest.raises(ExpungeError, match="without being accounted"):
        GeN(engine.optimizer, probe=lambda: (lambda: loss_fn((X, y))))
    # batches offered as public are checked row by row against the private data
    mixed = (torch.cat([classification(n=8, seed=7)[0], X[5:6]]), torch.zeros(9, dtype=torch.long))
    gen = GeN(engine.optimizer, probe=[mixed], loss_fn=loss_fn, every=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ExpungeError, match="1 row\\(s\\) of a batch offered as public are private"):
        train(gen, model, [(X[:16], y[:16])], 1)
    # the refused probe left the weights where the base step put them, and released nothing
    assert engine.releases == [] and engine.steps == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    second = net()
    other = make_private(second, torch.optim.SGD(second.parameters(), lr=0.1), (X, y), batch_size=16,
                         noise_multiplier=1.0)
    foreign = PrivateLossProbe(other, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"),
                               noise_multiplier=1.0, max_loss=2.0)
    with pytest.raises(ExpungeError, match="another privacy engine"):
        GeN(engine.optimizer, probe=foreign)
    engine.detach()
    GeN(base, probe=[(X[:16], y[:16])], loss_fn=loss_fn)  # no longer private: an ordinary optimizer again


def test_estimates_in_counts_probes():
    assert [estimates_in(s, 4) for s in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert math.isclose(cosine_horizon(4)(2), 0.5)


def test_rate_horizon_scales_the_applied_rate_and_tracks_the_unscaled_one():
    Q, target = quadratic()
    w = torch.zeros(6, dtype=DT, requires_grad=True)
    loss = lambda: 0.5 * (w - target) @ Q @ (w - target)
    horizon = linear_horizon(8)
    gen = GeN(torch.optim.SGD([w], lr=1e-4), probe=lambda: loss, every=2, schedule=horizon, horizon="rate")
    tracked = []
    for t in range(10):
        tracked.append(gen.tracked)
        train_closure(gen, loss, 1)
        if t % 2 == 0 and horizon(t) > 0:
            e = gen.history[-1]
            assert e.new_lr == pytest.approx(horizon(t) * e.tracked, rel=1e-12)
            assert e.accepted and e.tracked == pytest.approx(1e-4 * 1.1 ** (t // 2 + 1), rel=1e-9)  # grows at full speed
        else:
            assert gen.rates[-1] == pytest.approx(horizon(t) * tracked[-1], rel=1e-12)
    assert gen.rates[8] == gen.rates[9] == 0.0 and len(gen.history) == 4  # no direction to read at rate 0
    with pytest.raises(ExpungeError, match="horizon must be"):
        GeN(torch.optim.SGD([w], lr=0.1), probe=lambda: loss, horizon="steps")
