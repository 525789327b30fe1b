"""Private loss probes for GeN: losses on private rows, clipped, noised and accounted (HyFreeDP's loss privatisation).

Bu and Liu, "Towards hyperparameter-free optimization with differential privacy" (ICLR 2025) make GeN private
by privatising the losses it fits. One probe here:

1. draws a fresh Poisson sample of the private rows (rate q_l = probe batch size / n; its own random stream);
2. at each of the K probe points x_k computes per-sample losses and clips each value, c_ik = min(l_i(x_k), R_l)
   (losses must be >= 0; one that is not finite is clipped to R_l);
3. releases the K sums with one Gaussian draw each: (sum_i c_ik + N(0, (sigma_l R_l sqrt(K))^2)) / (q_l n).

Adding or removing one row moves each of the K sums by at most R_l, so the vector's L2 sensitivity is R_l sqrt(K)
and the release is one Poisson-sampled Gaussian mechanism with noise multiplier sigma_l: the engine accounts it as
such (`engine.record_release`), composed with the gradient steps by dp-accounting, so `engine.epsilon()` and
`engine.summary()` include it. The K points share one sample and one event (tighter than K separate events).

The threshold R_l: `max_loss` from the start; with `adaptive=True` (the paper's auto-regressive choice) each probe
then clips at the previous probe's released loss at x = 0, kept within [max_loss / 1000, max_loss]. That value
was released with noise already, so following it costs no privacy (post-processing).

Budget: `split_budget` follows the paper's Algorithm: the gradient noise is gamma (1.01) times what the steps alone
would need for target_epsilon, and the probes get the rest; or fix sigma_l and let
`make_private(..., target_epsilon=..., reserve=[probe_phase(...)])` calibrate the gradient noise around them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch

from ..errors import ExpungeError
from .accounting import (
    PLD_MIN_SIGMA,
    Phase,
    _quiet_absl,
    calibrate_noise,
    history_event,
    make_accountant,
)
from .accounting import epsilon as compose_epsilon
from .engine import NoiseSource, PrivacyEngine, check_batch_size, fetch


@dataclass
class Measurement:
    """Losses measured at a probe's offsets, with the noise each carries (what GeN fits)."""

    losses: np.ndarray  # one loss per offset
    noise_std: float = 0.0  # std of the noise in each loss (privatised probes); 0 for exact losses
    eps: float = float(np.finfo(np.float32).eps)  # machine epsilon of the loss values


RELEASE_NAME = "gen-loss-probe"


def probe_phase(noise_multiplier: float, batch_size: int, n: int, probes: int) -> Phase:
    """The accounting of `probes` private loss probes (what make_private's `reserve` takes)."""
    check_batch_size(batch_size, n)
    return Phase(float(noise_multiplier), batch_size / n, int(probes), name=RELEASE_NAME)


def split_budget(target_epsilon: float, target_delta: float, *, n: int, batch_size: int, steps: int, probes: int,
                 probe_batch_size: int | None = None, gamma: float = 1.01, accountant: str = "pld") -> tuple[float, float]:
    """(sigma_g, sigma_l): gradient noise gamma times the steps-alone calibration, and the probe noise that spends
    the rest of target_epsilon on `probes` probes (Bu and Liu's budget split; dp-accounting throughout)."""
    if not gamma > 1:
        raise ExpungeError(f"gamma must be above 1 (the probes need some of the budget), got {gamma}")
    if probes < 1:
        raise ExpungeError(f"probes must be at least 1, got {probes}")
    check_batch_size(batch_size, n)
    probe_batch_size = probe_batch_size or batch_size
    check_batch_size(probe_batch_size, n)
    sigma_g = gamma * calibrate_noise(batch_size / n, steps, target_epsilon, target_delta, accountant)
    gradient = [Phase(sigma_g, batch_size / n, steps)]
    q = probe_batch_size / n

    def spent(sigma: float) -> float:
        return compose_epsilon(gradient + [Phase(sigma, q, probes)], target_delta, accountant)

    # The gradient phase is PLD-tight, so calibrate_noise's RDP bracketing may find no answer: bracket here on the
    # accountant itself (a large sigma leaves little for the probes to spend), then dp-accounting's search.
    hi = 1.0
    while spent(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ExpungeError("the probes cannot fit in what the gradient steps leave of the budget: raise gamma")
    lo = hi / 2
    while spent(lo) <= target_epsilon and lo > PLD_MIN_SIGMA:
        hi, lo = lo, lo / 2
    if spent(lo) <= target_epsilon:
        return float(sigma_g), float(lo)
    with _quiet_absl():
        sigma_l = dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(accountant),
            lambda s: history_event(gradient + [Phase(s, q, probes)]), target_epsilon, target_delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=1e-4)
    while spent(sigma_l) > target_epsilon:  # Brent lands within tol on either side
        sigma_l += 1e-4
    return float(sigma_g), float(sigma_l)


class PrivateLossProbe:
    """GeN's probe on the private rows of `engine`: per_sample_loss(batch) -> (B,) losses >= 0 (for example
    lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"))."""

    private = True

    def __init__(self, engine: PrivacyEngine, per_sample_loss, *, noise_multiplier: float, max_loss: float,
                 batch_size: int | None = None, adaptive: bool = True, seed: int | None = None):
        if not isinstance(engine, PrivacyEngine):
            raise ExpungeError("PrivateLossProbe needs the PrivacyEngine that make_private returned")
        if not callable(per_sample_loss):
            raise ExpungeError("per_sample_loss must be a function batch -> per-row losses (reduction='none')")
        if not noise_multiplier > 0 or math.isinf(noise_multiplier):
            raise ExpungeError(f"noise_multiplier must be positive and finite for a private probe, got {noise_multiplier}")
        if not max_loss > 0 or math.isinf(max_loss):
            raise ExpungeError(f"max_loss (the clipping threshold R_l of per-sample losses) must be positive and finite, "
                               f"got {max_loss}")
        batch_size = batch_size if batch_size is not None else max(1, int(round(engine.expected_batch_size)))
        check_batch_size(batch_size, engine.n)
        self.engine, self.per_sample_loss = engine, per_sample_loss
        self.noise_multiplier, self.max_loss, self.adaptive = float(noise_multiplier), float(max_loss), adaptive
        self.sample_rate = batch_size / engine.n
        self.threshold = self.max_loss  # R_l of the next probe
        self.noise = NoiseSource(seed, engine.secure_rng)
        self._rows_rng = np.random.default_rng(None if engine.secure_rng or seed is None else seed + 1)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.engine.n

    def noise_std(self, points: int) -> float:
        """Standard deviation of the noise on each released mean loss."""
        return self.noise_multiplier * self.threshold * math.sqrt(points) / self.expected_batch_size

    def draw(self) -> np.ndarray:
        if self.engine.secure_rng:
            self._rows_rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        return np.flatnonzero(self._rows_rng.random(self.engine.n) < self.sample_rate)

    def clipped_sums(self, batch, offsets, move) -> torch.Tensor:
        """sum_i min(l_i(x_k), R_l) for each offset (no noise)."""
        sums = []
        with torch.no_grad():  # no capture by the engine's hooks, no graph
            for x in offsets:
                move(x)
                losses = self.per_sample_loss(batch) if _rows(batch) else torch.zeros(0)
                if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or len(losses) != _rows(batch):
                    raise ExpungeError("per_sample_loss must return one loss per row (a 1-d tensor; use "
                                       "reduction='none')")
                losses = losses.detach().to(torch.float64)
                if (losses < 0).any():
                    raise ExpungeError("per-sample losses must be >= 0 to be clipped at R_l (cross-entropy and "
                                       "squared error are)")
                losses = torch.nan_to_num(losses, nan=self.threshold, posinf=self.threshold).clamp(max=self.threshold)
                sums.append(losses.sum())
        return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)

    def measure(self, offsets, move):

        rows = self.draw()
        batch = fetch(self.engine.loader.data, rows)
        k = len(offsets)
        std = self.noise_std(k)
        sums = self.clipped_sums(batch, offsets, move)
        noisy = sums + self.noise.normal((k,), torch.float64) * (self.noise_multiplier * self.threshold * math.sqrt(k))
        released = (noisy / self.expected_batch_size).numpy()
        self.engine.record_release(self.noise_multiplier, self.sample_rate, RELEASE_NAME)
        if self.adaptive:
            at_zero = [i for i, x in enumerate(offsets) if x == 0]
            level = abs(float(released[at_zero[0]])) if at_zero else abs(float(np.mean(released)))
            self.threshold = min(max(level, self.max_loss / 1000), self.max_loss)
        return Measurement(released, std, float(np.finfo(np.float64).eps))

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "noise_rng": self.noise.generator.get_state(),
                "rows_rng": self._rows_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.noise.generator.set_state(state["noise_rng"])
        self._rows_rng.bit_generator.state = state["rows_rng"]


def _rows(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)
