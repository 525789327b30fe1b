"""Rate rules: the fixed rate, the three-point quadratic fit, and staging a step at the chosen rate."""

import pytest
import torch

from expunge.errors import ExpungeError
from expunge.lm.rates import GeNRate, QuadraticFitRate, fixed_rate, rate_rule
from expunge.lm.unlearning import staged_step


def test_the_quadratic_fit_finds_the_minimum_of_a_parabola_within_its_bound():
    parabola = lambda eta: 3.0 * (eta - 0.3) ** 2 + 1.0  # noqa: E731
    assert QuadraticFitRate(max_factor=4)(None, parabola, 0.1) == pytest.approx(0.3)
    assert QuadraticFitRate(max_factor=2)(None, parabola, 0.1) == pytest.approx(0.2)  # bounded growth
    assert QuadraticFitRate(max_factor=2)(None, lambda eta: (eta + 1) ** 2, 0.1) == pytest.approx(0.05)  # uphill: shrink
    assert QuadraticFitRate()(None, lambda eta: -(eta ** 2) - eta, 0.1) == 0.1  # concave: no minimum, keep the rate
    assert QuadraticFitRate()(None, lambda eta: float("nan"), 0.1) == 0.1
    assert fixed_rate(None, None, 0.7) == 0.7
    assert rate_rule("fixed") is fixed_rate and isinstance(rate_rule("quadratic"), QuadraticFitRate)
    with pytest.raises(ExpungeError, match="unknown rate rule"):
        rate_rule("gen?")
    with pytest.raises(ExpungeError, match="max_factor"):
        QuadraticFitRate(0.5)


def test_the_gen_rule_moves_a_tenth_of_the_way_to_the_clipped_newton_rate():
    parabola = lambda eta: 3.0 * (eta - 0.3) ** 2 + 1.0  # noqa: E731
    # eta* = 0.3 from 0.1: clipped to 0.2, then 0.9 * 0.1 + 0.1 * 0.2
    assert GeNRate()(None, parabola, 0.1) == pytest.approx(0.11)
    assert GeNRate(smoothing=0.5, clip=4)(None, parabola, 0.1) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    assert GeNRate()(None, lambda eta: (eta + 1) ** 2, 0.1) == 0.1  # uphill: not a descent direction, kept
    assert GeNRate()(None, lambda eta: -(eta ** 2) - eta, 0.1) == 0.1  # concave: kept
    assert GeNRate()(None, lambda eta: 1.0, 0.1) == 0.1  # flat within rounding: kept
    assert isinstance(rate_rule("gen"), GeNRate)
    with pytest.raises(ExpungeError, match="smoothing"):
        GeNRate(smoothing=1.0)


def model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3)
    loss = lambda: float(model(x).pow(2).mean())  # noqa: E731
    model(x).pow(2).mean().backward()
    return model, list(model.parameters()), loss


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_staged_step_moves_along_the_optimizers_update_by_the_chosen_rate(kind):
    make = {"sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5),
            "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1)}[kind]
    # the reference: the optimizer's own step at three times the rate (both optimizers are linear in it)
    _ref, ref_params, _ = model_and_grads()
    make(ref_params, 0.03).step()
    model, params, loss = model_and_grads()
    opt = make(params, 0.01)
    seen = []

    def triple(update, loss_along, lr):
        seen.append((loss_along(0.0), loss_along(lr)))
        return 3 * lr

    used = staged_step(model, opt, params, triple, loss)
    assert used == pytest.approx(0.03) and opt.param_groups[0]["lr"] == pytest.approx(0.03)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, atol=1e-7, rtol=1e-6)
    assert seen[0][0] != seen[0][1]  # the closure really moved the weights


def test_a_fixed_rate_is_the_optimizers_own_step():
    _ref, ref_params, _ = model_and_grads()
    torch.optim.SGD(ref_params, lr=0.05).step()
    model, params, loss = model_and_grads()
    assert staged_step(model, torch.optim.SGD(params, lr=0.05), params, fixed_rate, loss) == 0.05
    for p, r in zip(params, ref_params):
        assert torch.equal(p, r)
    with pytest.raises(ExpungeError, match="finite number >= 0"):
        staged_step(model, torch.optim.SGD(params, lr=0.05), params, lambda u, f, lr: -1.0, loss)
