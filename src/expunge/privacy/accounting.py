"""Privacy accounting on dp-accounting: the epsilon of a training history, and noise calibration.

Nothing here does privacy arithmetic of its own. A training history is a list of phases; each private
phase is `steps` Poisson-sampled Gaussian mechanisms with one sampling rate and noise multiplier
(`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` self-composed), and phases compose with
`ComposedDpEvent`. A public phase (non-private warm-up on public data) touches no private row and adds
no event. The headline epsilon comes from the PLD accountant (tight); the RDP accountant, over the same
orders as Opacus, is the cross-check and is never smaller.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from ..errors import ExpungeError

# Opacus's default RDP orders, so the RDP cross-check is comparable with `opacus.accountants.RDPAccountant`.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
INTEGER_ORDERS = list(range(2, 65)) + [80, 96, 128, 192, 256]
PLD_DISCRETIZATION = 1e-3  # pessimistic grid: within 0.1% of the 1e-4 grid, ten times faster
ACCOUNTANTS = ("pld", "rdp")
PLD_MIN_SIGMA = 0.3  # below this a PLD grid at 1e-4 spacing runs to gigabytes


@dataclass(frozen=True)
class Phase:
    """`steps` steps, each a Poisson sample with rate `sample_rate` released with Gaussian noise."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    private: bool = True
    name: str = ""

    def event(self) -> dp_accounting.DpEvent | None:
        if not self.private or self.steps == 0:
            return None
        if self.noise_multiplier <= 0:
            return dp_accounting.NonPrivateDpEvent()
        step = dp_accounting.PoissonSampledDpEvent(
            self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        return dp_accounting.SelfComposedDpEvent(step, self.steps)

    def to_dict(self) -> dict:
        return asdict(self)


def history_event(phases: list[Phase]) -> dp_accounting.DpEvent:
    events = [e for e in (p.event() for p in phases) if e is not None]
    return dp_accounting.ComposedDpEvent(events)


def make_accountant(kind: str = "pld", discretization: float = PLD_DISCRETIZATION) -> dp_accounting.PrivacyAccountant:
    if kind == "pld":
        # pessimistic discretization: a coarser grid gives a larger (still valid) epsilon
        return PLDAccountant(value_discretization_interval=discretization)
    if kind == "rdp":
        return RdpAccountant(orders=RDP_ORDERS)
    if kind == "rdp-integer":  # integer orders only: exact and fast, a little looser; brackets calibration
        return RdpAccountant(orders=INTEGER_ORDERS)
    raise ExpungeError(f"unknown accountant {kind!r}; use one of {', '.join(ACCOUNTANTS)}")


def check_delta(delta: float, n_rows: int | None = None) -> None:
    if not 0 < delta < 1:
        raise ExpungeError(f"delta must be in (0, 1), got {delta}; 1e-5 or below 1/n is usual")
    if n_rows is not None and delta >= 1.0 / n_rows:
        raise ExpungeError(
            f"delta {delta:g} is not below 1/n = {1.0 / n_rows:.3g} for {n_rows} rows: such a delta allows "
            f"releasing a whole row; use delta < {1.0 / n_rows:.3g} (for example {10 ** math.floor(math.log10(0.1 / n_rows)):g})")


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning for every fractional RDP order whose series does not converge at large
    sampling rates (it then leaves that order out, which keeps the bound valid); keep the console readable."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon(phases: list[Phase], delta: float, accountant: str = "pld") -> float:
    """Epsilon at `delta` of the whole history (0 when nothing private happened, inf without noise)."""
    check_delta(delta)
    return _epsilon(tuple(phases), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(phases: tuple, delta: float, accountant: str) -> float:
    """epsilon's composition, remembered per process (pure in its arguments; a PLD composition takes up to
    seconds, and calibration and reports ask for the same histories again)."""
    event = history_event(list(phases))
    if not event.events:
        return 0.0
    with _quiet_absl():
        return float(make_accountant(accountant).compose(event).get_epsilon(delta))


def calibrate_noise(sample_rate: float, steps: int, target_epsilon: float, target_delta: float,
                    accountant: str = "pld", prior: list[Phase] | tuple = (), tol: float = 1e-4) -> float:
    """Smallest noise multiplier whose `steps` steps at `sample_rate`, after `prior` phases, spend at
    most `target_epsilon` at `target_delta` (found by dp-accounting's Brent search)."""
    if accountant not in ACCOUNTANTS:
        raise ExpungeError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ExpungeError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    check_delta(target_delta)
    if not 0 < sample_rate <= 1:
        raise ExpungeError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ExpungeError(f"steps must be at least 1, got {steps}")
    return _calibrated(float(sample_rate), int(steps), float(target_epsilon), float(target_delta), accountant,
                       tuple(prior), float(tol))


@functools.lru_cache(maxsize=256)
def _calibrated(sample_rate: float, steps: int, target_epsilon: float, target_delta: float, accountant: str,
                prior: tuple, tol: float) -> float:
    """calibrate_noise's search, remembered per process: it is a pure function of its arguments and takes seconds
    (a tuning grid or a test suite calibrates the same run many times)."""
    prior = list(prior)
    already = epsilon(prior, target_delta, accountant) if prior else 0.0
    if already >= target_epsilon:
        raise ExpungeError(
            f"earlier phases already spent epsilon {already:.3g} >= target {target_epsilon:g}; raise the target")

    def history(sigma: float) -> dp_accounting.DpEvent:
        return history_event(prior + [Phase(sigma, sample_rate, steps)])

    def spent(sigma: float, kind: str = accountant) -> float:
        return epsilon(prior + [Phase(sigma, sample_rate, steps)], target_delta, kind)

    # RDP brackets cheaply from anywhere; PLD at a tiny sigma would build an enormous grid, so it searches
    # between a floor and the RDP answer (PLD is tighter, so its answer is never larger).
    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp-integer"), history, target_epsilon, target_delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=tol)
    if accountant == "rdp":  # refine with the fractional orders too, below the integer-order answer
        hi = sigma + tol
        lo = 0.8 * hi
        if spent(lo) <= target_epsilon:
            sigma = lo
        else:
            with _quiet_absl():
                sigma = dp_accounting.calibrate_dp_mechanism(
                    lambda: make_accountant("rdp"), history, target_epsilon, target_delta,
                    bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol)
    if accountant == "pld":
        # PLD is usually tighter than RDP, but on long runs its pessimistic grid need not be: widen the upper end
        # until it meets the target, then search between a floor and it.
        hi = sigma + tol
        while spent(hi) > target_epsilon:
            hi *= 1.05
        lo = max(PLD_MIN_SIGMA, hi / 2)
        if spent(lo) <= target_epsilon:
            sigma = lo
        else:
            sigma = dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant("pld"), history, target_epsilon, target_delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol)
    # Brent lands within tol of the root on either side; step up until the target holds.
    while spent(sigma) > target_epsilon:
        sigma += tol
    return float(sigma)
