"""Accounting on dp-accounting: calibration, Opacus agreement, composition of phases, engine epsilon."""

import functools
import logging
import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from torch import nn

from expunge.errors import ExpungeError
from expunge.privacy import Phase, calibrate_noise, epsilon, make_private
from expunge.privacy.accounting import RDP_ORDERS, make_accountant

DELTA = 1e-4  # below 1/n for the 100-row engines below, so calibrations can be shared


@pytest.fixture(autouse=True)
def quiet_absl():
    # dp-accounting logs a warning for every RDP order whose series does not converge at small sigma
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def step_event(q, sigma):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def direct(event, kind, delta=DELTA):
    """Epsilon computed by dp-accounting alone (its default PLD grid; RDP over Opacus's orders)."""
    accountant = PLDAccountant() if kind == "pld" else RdpAccountant(orders=RDP_ORDERS)
    return accountant.compose(event).get_epsilon(delta)


# -- calibration ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def calibrated(q, steps, target, kind):
    return calibrate_noise(q, steps, target, DELTA, accountant=kind)


@pytest.mark.parametrize("kind,q,steps,target", [("pld", 0.1, 50, 2.0), ("rdp", 0.1, 50, 2.0)])
def test_calibrated_noise_meets_the_target_tightly(kind, q, steps, target):
    sigma = calibrated(q, steps, target, kind)
    spent = direct(dp_accounting.SelfComposedDpEvent(step_event(q, sigma), steps), kind)
    assert spent <= target
    assert spent >= 0.99 * target
    # and it is the smallest such noise: 1% less noise overspends
    less = direct(dp_accounting.SelfComposedDpEvent(step_event(q, 0.99 * sigma), steps), kind)
    assert less > target


def test_pld_needs_less_noise_than_rdp():
    assert calibrated(0.1, 50, 2.0, "pld") < calibrated(0.1, 50, 2.0, "rdp")


def test_calibration_refuses_a_target_the_prior_phases_already_spent():
    # (calibration after prior phases is checked end to end by the start_phase test below)
    prior = [Phase(1.5, 0.1, 30)]
    with pytest.raises(ExpungeError, match="already spent"):
        calibrate_noise(0.05, 40, epsilon(prior, DELTA, "rdp") * 0.9, DELTA, "rdp", prior=prior)


def test_remembered_calibrations_and_epsilons_depend_on_every_argument():
    # calibrate_noise and epsilon remember their answers per process: a prior phase, another delta or accountant
    # must each give their own answer, equal to dp-accounting's
    prior = [Phase(2.0, 0.1, 20)]
    alone, after = calibrate_noise(0.1, 30, 3.0, DELTA, "rdp"), calibrate_noise(0.1, 30, 3.0, DELTA, "rdp", prior=prior)
    assert after > alone and calibrate_noise(0.1, 30, 3.0, DELTA, "rdp", prior=tuple(prior)) == after
    phases = prior + [Phase(alone, 0.1, 30)]
    for kind in ("pld", "rdp"):
        event = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(step_event(p.sample_rate,
                                               p.noise_multiplier), p.steps) for p in phases])
        for delta in (DELTA, 1e-6):
            expected = make_accountant(kind).compose(event).get_epsilon(delta)
            assert epsilon(phases, delta, kind) == pytest.approx(expected, rel=1e-12)
    assert epsilon(phases, DELTA, "pld") != epsilon(phases, 1e-6, "pld") != epsilon(phases, 1e-6, "rdp")


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_epsilon=0.0), "positive"), (dict(target_epsilon=-1.0), "positive"),
    (dict(target_epsilon=math.inf), "finite"), (dict(target_delta=0.0), "delta"), (dict(target_delta=1.0), "delta"),
    (dict(sample_rate=0.0), "sample rate"), (dict(sample_rate=1.5), "sample rate"), (dict(steps=0), "steps"),
])
def test_calibration_rejects_bad_input(kwargs, message):
    args = dict(sample_rate=0.1, steps=10, target_epsilon=1.0, target_delta=DELTA, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ExpungeError, match=message):
        calibrate_noise(**args)


# -- epsilon of a history -------------------------------------------------------------------------------------

def test_rdp_epsilon_matches_opacus():
    from opacus.accountants import RDPAccountant
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.01, 1000)]
    ours = epsilon([Phase(1.1, 0.01, 1000)], DELTA, "rdp")
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-3)
    # two phases, as Opacus keeps them in its history
    opacus.history = [(1.1, 0.01, 1000), (2.0, 0.05, 200)]
    ours = epsilon([Phase(1.1, 0.01, 1000), Phase(2.0, 0.05, 200)], DELTA, "rdp")
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), rel=1e-3)


@pytest.mark.parametrize("phase", [Phase(1.1, 0.01, 1000), Phase(3.0, 0.5, 20)])
def test_pld_is_never_above_rdp(phase):
    pld, rdp = epsilon([phase], DELTA, "pld"), epsilon([phase], DELTA, "rdp")
    assert 0 < pld <= rdp
    # the engine's coarse (pessimistic) PLD grid is close to dp-accounting's default grid, and not below it
    fine = direct(phase.event(), "pld")
    assert fine <= pld * (1 + 1e-9) and pld <= fine * 1.01


def test_two_phases_compose():
    p1, p2 = Phase(1.2, 0.05, 40, name="warm"), Phase(2.0, 0.2, 10, name="tune")
    both = dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(step_event(0.05, 1.2), 40),
                                          dp_accounting.SelfComposedDpEvent(step_event(0.2, 2.0), 10)])
    for kind in ("pld", "rdp"):
        eps = epsilon([p1, p2], DELTA, kind)
        assert eps > max(epsilon([p1], DELTA, kind), epsilon([p2], DELTA, kind))
        assert eps == pytest.approx(direct(both, kind), rel=0.01)
        assert eps >= direct(both, kind) * (1 - 1e-9)  # never optimistic
    # the same grid gives the same number
    assert epsilon([p1, p2], DELTA, "pld") == pytest.approx(
        PLDAccountant(value_discretization_interval=1e-3).compose(both).get_epsilon(DELTA), rel=1e-9)


def test_public_phase_adds_nothing():
    p1, p2 = Phase(1.2, 0.05, 100), Phase(2.0, 0.2, 30)
    public = Phase(0.0, 0.0, 500, private=False, name="public")
    assert epsilon([public], DELTA) == 0.0
    assert epsilon([], DELTA) == 0.0
    assert epsilon([p1, public, p2], DELTA, "rdp") == epsilon([p1, p2], DELTA, "rdp")
    assert epsilon([public, p1], DELTA, "pld") == epsilon([p1], DELTA, "pld")


def test_unknown_accountant():
    with pytest.raises(ExpungeError, match="accountant"):
        epsilon([Phase(1.0, 0.1, 10)], DELTA, "moments")


def test_no_noise_is_infinite_epsilon():
    assert epsilon([Phase(0.0, 0.1, 10)], DELTA, "rdp") == math.inf
    assert epsilon([Phase(0.0, 0.1, 10)], DELTA, "pld") == math.inf


# -- the engine's epsilon ------------------------------------------------------------------------------------

def engine_for(n=100, batch_size=10, accountant="rdp", **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    X, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 2, (n,))
    kwargs.setdefault("target_delta", DELTA)
    return make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), (X, y), batch_size=batch_size,
                        accountant=accountant, seed=0, **kwargs)


def noise_steps(engine, k):
    for _ in range(k):
        engine.optimizer.zero_grad()
        engine.optimizer.step()


def test_engine_epsilon_grows_with_steps():
    engine = engine_for(noise_multiplier=1.0)
    assert engine.epsilon() == 0.0
    seen = []
    for k in (1, 5, 10):
        noise_steps(engine, k)
        seen.append(engine.epsilon())
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert engine.steps == 16
    assert seen[-1] == epsilon([Phase(1.0, 0.1, 16)], DELTA, "rdp")
    assert engine.epsilon(accountant="pld") == epsilon([Phase(1.0, 0.1, 16)], DELTA, "pld") < seen[-1]
    assert engine.epsilon(1e-6) > seen[-1]


def test_make_private_calibrates_to_the_target():
    engine = engine_for(target_epsilon=2.0, target_delta=DELTA, epochs=5, accountant="rdp")
    assert engine.planned_steps == 50  # 5 epochs of round(1/q) = 10 steps
    assert engine.noise_multiplier == calibrated(0.1, 50, 2.0, "rdp")
    noise_steps(engine, 50)
    assert 0.99 * 2.0 <= engine.epsilon() <= 2.0
    noise_steps(engine, 1)
    assert engine.epsilon() > 2.0  # the plan was tight: one step over spends more


def test_start_phase_with_target_epsilon_covers_the_whole_history():
    engine = engine_for(noise_multiplier=1.5)
    noise_steps(engine, 20)
    spent = engine.epsilon()
    sigma = engine.start_phase(batch_size=20, target_epsilon=spent + 1.0, steps=15, name="second")
    assert sigma == engine.noise_multiplier and engine.sample_rate == 0.2 and engine.steps == 0
    assert engine.epsilon() == pytest.approx(spent)  # closing a phase spends nothing
    noise_steps(engine, 15)
    assert [(p.noise_multiplier, p.sample_rate, p.steps) for p in engine.history()] == [(1.5, 0.1, 20),
                                                                                        (sigma, 0.2, 15)]
    total = engine.epsilon()
    assert 0.99 * (spent + 1.0) <= total <= spent + 1.0
    with pytest.raises(ExpungeError, match="already spent"):
        engine.start_phase(target_epsilon=total * 0.5, steps=10)


def test_start_phase_with_a_fixed_noise_and_a_public_phase():
    engine = engine_for(noise_multiplier=1.0)
    noise_steps(engine, 10)
    engine.add_public_phase(1000)
    after_public = engine.epsilon()
    assert after_public == epsilon([Phase(1.0, 0.1, 10)], DELTA, "rdp")
    engine.start_phase(noise_multiplier=2.0)
    noise_steps(engine, 10)
    assert engine.epsilon() == pytest.approx(epsilon([Phase(1.0, 0.1, 10), Phase(2.0, 0.1, 10)], DELTA, "rdp"))
    assert engine.epsilon() > after_public
    kinds = [p.private for p in engine.history()]
    assert kinds == [True, False, True]


def test_prior_phases_are_part_of_the_history():
    prior = [Phase(1.0, 0.1, 10)]
    engine = engine_for(noise_multiplier=1.0, prior_phases=prior)
    assert engine.epsilon() == epsilon(prior, DELTA, "rdp")
    noise_steps(engine, 10)
    assert engine.epsilon() == pytest.approx(epsilon([Phase(1.0, 0.1, 20)], DELTA, "rdp"), rel=1e-9)


def test_history_survives_the_state_round_trip():
    engine = engine_for(noise_multiplier=1.0)
    noise_steps(engine, 5)
    engine.start_phase(noise_multiplier=2.0, batch_size=25)
    noise_steps(engine, 3)
    state = engine.state_dict()
    other = engine_for(noise_multiplier=1.0)
    other.load_state_dict(state)
    assert other.history() == engine.history()
    assert other.epsilon() == engine.epsilon()
    assert other.sample_rate == 0.25 and len(other.loader) == 4


def test_engine_epsilon_needs_a_delta():
    engine = engine_for(noise_multiplier=1.0, target_delta=None)
    noise_steps(engine, 2)
    with pytest.raises(ExpungeError, match="delta"):
        engine.epsilon()
    assert engine.epsilon(DELTA) > 0
    with pytest.raises(ExpungeError, match="accountant"):
        engine.epsilon(DELTA, accountant="gdp")
