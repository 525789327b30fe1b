"""GeN: the learning rate of any torch optimizer from the curvature of the loss along its own step.

Bu and Xu, "Gradient descent with generalized Newton's method" (ICLR 2025). Let u be the direction the base
optimizer moves in per unit of learning rate (its step at rate eta is eta u: preconditioning, momentum and
weight decay included). Along it

    L(w - x u) ~ L(w) - x G'u + x^2/2 u'Hu,    minimised at  eta* = G'u / u'Hu.

Every `every` steps, GeN measures the loss at a few offsets x around 0 (by default x in {-eta, 0, +eta}) on a
fresh batch, with forward passes only, fits L(x) ~ c - B (x/eta) + A/2 (x/eta)^2 by least squares and takes
eta* = eta B / A (with three points: eta* = (eta/2)(L- - L+) / (L+ + L- - 2 L0)). The rate moves smoothly:

    eta <- smoothing eta + (1 - smoothing) s_t clip(eta*, eta/clip, clip eta)

(smoothing 0.9 and clip 2 as in the paper; s_t an optional horizon schedule, e.g. cosine_horizon(T)). That is
`horizon="proposal"`, the paper's form: s_t scales what each accepted estimate proposes, so a rate that starts far
below eta* may not grow once s_t < 1/2. With `horizon="rate"` GeN instead tracks the unscaled rate (the update
above with s_t = 1) and the optimizer steps at s_t times it, so the schedule shapes the run whatever the start.

When an estimate is accepted (write s for the standard deviation of one measured loss: the privatising noise
of private probes, else the floating-point resolution of the loss, 16 eps |L|; se_A, se_B the standard errors
of A and B under that noise; z = 2 by default):
- every loss is finite; when a shifted point overflows but L(w) is finite the step overshoots, and eta*
  is taken as the lower clip end;
- a descent direction: B > z se_B;
- a good fit: with more than three points, R^2 >= r2_min (0.99, the authors' threshold) or residuals within the
  noise (chi-square test at 99%); three points determine the parabola exactly, so there only the next test applies;
- positive curvature: A > z se_A, then eta* = eta B/A. If the curvature is not resolved (|A| within z se_A)
  but even the largest curvature the noise allows puts the optimum past the clip (B / (A + z se_A) >= clip),
  eta* is the upper clip end: a rate far below eta* cannot see the curvature, and must grow.
Otherwise (negative or unresolved curvature, no descent, poor fit) the rate is kept.

What the wrapper assumes of the base optimizer, and why d is computed without stepping twice: its state
(momentum, moments, step count) does not depend on the learning rate, and its step is linear in the rate
(w_new = w - eta u with u independent of eta). torch's SGD (momentum, Nesterov, weight decay), Adam, AdamW,
NAdam, RAdam, Adamax, RMSprop, Adadelta, Adagrad without lr_decay, this package's DPAdamBC and the private
engine's DPOptimizer around any of them are such optimizers. So GeN lets the base optimizer take its one
step at the current rate, reads u from the move, probes, and then places the weights where the step at the
new rate would have put them (w + (eta_new/eta)(w_step - w)): the base state advances exactly once per step,
as in a plain run at the rates GeN applied (`GeN.rates`). Other optimizers (Rprop, ASGD, LBFGS, Adafactor,
Adagrad with lr_decay, subclasses) are refused unless `assume_linear=True` vouches for them.

GeN owns the rate: do not put a torch LR scheduler on the same optimizer (a change made outside GeN is
refused at the next step); use `schedule=` instead. Param groups keep their ratios to group 0's rate.

What to expect (benchmarks/results/gen.json, `expunge bench gen`): the rate moves at most x1.1 up or x0.95 down per
estimate, so a start 100x off is not recovered within a short run; without a horizon the greedy one-step rate
rose late in training (to 5x the best tuned rate for AdamW); with the cosine horizon it decays to ~0 from
wherever it is. Started near or above a good rate, with the horizon, it matched the best tuned schedule.

Against the authors' algorithm (Bu and Xu, ICLR 2025, and their `gen-optim` package, read for this): the same
offsets (-eta, 0, +eta), a fresh training batch per estimate (their `next(tr_iter)`), the same acceptance in
effect (they fit c fixed at L(0) with two free coefficients and ask gHg > 0, Gg > 0, R^2 > 0.99; with three points
both fits are exact, so R^2 tests nothing there; ours adds the noise tests above), the same clip [eta/2, 2 eta],
smoothing 0.9 and horizon scaling of the proposal (theirs per epoch, e.g. linspace(1, 0)), an estimate every Phi
steps, no warm-up. Two deliberate differences: their estimate steps the base optimizer once to read d and again
at the new rate (momentum, Adam's moments and step count advance twice on every estimate step; here once), and
an exception in their fit halves the rate (here a non-finite probe is handled as above). No discrepancy explains
the benchmark's misses. What cheap runs show instead (MNIST small CNN, batch 128, one thread, 300-400 steps):
- the greedy estimate follows the rate the run is using: in plain runs at fixed rates 0.003, 0.014 and 0.065
  (SGD momentum 0.9; the best tuned is 0.065), eta*/eta measured every 25 steps (5 points, not applied) scatters
  around 1 (medians 0.7-1.3, values 0-4) once the first ~150 steps are past: the iterate settles where the
  curvature along its own step matches its rate (the short-horizon bias of one-step-greedy rates), so each of
  these rates, 20x apart, is roughly a fixed point of GeN;
- what makes GeN climb from a low start is the early plateau (curvature along the step below resolution:
  "past the clip", a real signal, in the first ~100 steps) and then the clip's asymmetry (x1.1 up against x0.95
  down on estimates spread from 0.2 to 2.6 eta), a drift: from 0.003 (SGD momentum, every 4) the rate was 0.0099
  at step 100, 0.0124 at step 300, 0.0134 at 400; with an estimate every step (4x the probes) 0.016 / 0.028 /
  0.027; with 512-row probe batches 0.0097 / 0.0089 / 0.0079: less noise, less drift;
- 20-30% of the estimates see no descent along the momentum direction on a fresh batch (kept rate), with
  128 or 512 probe rows alike; 5-15% see concave descent (negative curvature, kept as the paper does;
  treating it as "past the clip" raised the rate at step 300 only from 0.0124 to 0.0162).
So GeN here is a rate tracker that moves a start within a few x, not a tuner that finds the best rate of a 100x
range; start it near a sensible rate (or above, with a horizon) and expect the tuned schedule's accuracy only then.

Probes: `probe=batches` (any re-iterable such as a DataLoader or a list, or an iterator) with
`loss_fn(batch) -> loss` (mean over the batch), or `probe=closure` where closure() draws a fresh batch and
returns a function of no arguments that computes the loss on it at the current weights. The loss must be a
deterministic function of the weights (no dropout; BatchNorm in train mode updates its running statistics at
each probe). Under private training (`engine.optimizer`), the probes touch private rows unless shown otherwise:
use `expunge.privacy.PrivateLossProbe` (clipped per-sample losses, Gaussian noise, accounted by the engine),
or public batches, which the engine checks row by row against the private data; closures are refused there.

    opt = GeN(torch.optim.AdamW(model.parameters(), lr=1e-3), probe=loader,
              loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1]))
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.lr, opt.history        # the current rate; every estimate (losses, fit, decision)
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import ExpungeError
from ..privacy.probes import Measurement

log = logging.getLogger("expunge.optim.gen")

ROUNDING = 16.0  # s of an exact (non-private) loss: this many machine epsilons of its magnitude


# -- horizon schedules ---------------------------------------------------------------------------------------

def cosine_horizon(total_steps: int) -> Callable[[int], float]:
    """s_t = (1 + cos(pi t / T)) / 2: GeN's proposals fade to 0 at step T (the paper's horizon-aware decay)."""
    _positive_int(total_steps, "total_steps")
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))


def linear_horizon(total_steps: int) -> Callable[[int], float]:
    """s_t = 1 - t / T."""
    _positive_int(total_steps, "total_steps")
    return lambda t: max(0.0, 1.0 - t / total_steps)


def estimates_in(steps: int, every: int = 4) -> int:
    """How many estimates (probes) GeN makes in `steps` steps: one at step 0, every, 2 every, ..."""
    return -(-int(steps) // int(every))


# -- the fit ---------------------------------------------------------------------------------------------------

@dataclass
class Fit:
    """The least-squares parabola through the probed losses, in units of the current rate (r = x / eta)."""

    ratio: float | None  # eta* / eta when accepted (before clipping), else None
    accepted: bool
    reason: str
    slope: float  # B = eta G'u
    curvature: float  # A = eta^2 u'Hu
    slope_se: float
    curvature_se: float
    r2: float


def fit_rate(offsets, losses, noise_std: float = 0.0, *, clip: float = 2.0, z: float = 2.0,
             r2_min: float = 0.99) -> Fit:
    """Fit L(r) = c - B r + A/2 r^2 to `losses` at `offsets` (multiples of the current rate) and decide.

    noise_std: standard deviation of each loss value (privatising noise; 0 for exact losses, which are then
    given their floating-point resolution by the caller). See the module docstring for the criterion."""
    r = np.asarray(offsets, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if r.ndim != 1 or r.shape != y.shape or len(np.unique(r)) < 3:
        raise ExpungeError("fit_rate needs losses at three or more distinct offsets")
    nan = float("nan")
    if not np.all(np.isfinite(y)):
        at_zero = np.isclose(r, 0.0)
        if at_zero.any() and np.all(np.isfinite(y[at_zero])):
            return Fit(1.0 / clip, True, "a probe point overflowed: the step overshoots", nan, nan, nan, nan, nan)
        return Fit(None, False, "the loss is not finite", nan, nan, nan, nan, nan)
    design = np.stack([np.ones_like(r), -r, 0.5 * r * r], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    _, slope, curvature = (float(v) for v in coef)
    cov = np.linalg.inv(design.T @ design) * noise_std**2
    slope_se, curvature_se = math.sqrt(cov[1, 1]), math.sqrt(cov[2, 2])
    residual = y - design @ coef
    rss, tss = float(residual @ residual), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - rss / tss if tss > 0 else 1.0

    def verdict(ratio, accepted, reason):
        return Fit(ratio, accepted, reason, slope, curvature, slope_se, curvature_se, r2)

    if not slope > z * slope_se:
        return verdict(None, False, "not a descent direction (slope not above its noise)")
    dof = len(r) - 3
    if dof > 0 and r2 < r2_min:
        from scipy.stats import chi2

        if not (noise_std > 0 and rss <= chi2.ppf(0.99, dof) * noise_std**2):
            return verdict(None, False, f"poor quadratic fit (R^2 {r2:.3f} < {r2_min})")
    if curvature > z * curvature_se:
        return verdict(slope / curvature, True, "positive curvature")
    upper = curvature + z * curvature_se
    if upper > 0 and slope / upper >= clip:
        return verdict(clip, True, "curvature below resolution: the optimum lies past the clip")
    if curvature <= 0:
        return verdict(None, False, "negative curvature")
    return verdict(None, False, "curvature not resolved")


# -- probes ----------------------------------------------------------------------------------------------------



class BatchProbe:
    """Losses on batches drawn one per estimate from `batches` (re-iterated when it runs out, if it can be)."""

    private = False

    def __init__(self, batches: Iterable, loss_fn: Callable, check: Callable | None = None):
        if not callable(loss_fn):
            raise ExpungeError("probe batches need loss_fn(batch) -> the mean loss on the batch")
        if not isinstance(batches, Iterable):
            raise ExpungeError(f"probe must be batches (an iterable such as a DataLoader) or a closure, "
                               f"got {type(batches).__name__}")
        self.batches, self.loss_fn, self.check = batches, loss_fn, check
        self._iter: Iterator | None = None
        self.drawn = 0  # batches drawn so far (a saved state resumes a deterministic batch source where it was)

    def draw(self):
        for fresh in (False, True):
            if self._iter is None or fresh:
                self._iter = iter(self.batches)
            try:
                batch = next(self._iter)
                self.drawn += 1
                return batch
            except StopIteration:
                if self._iter is self.batches:  # a one-shot iterator cannot start over
                    break
        raise ExpungeError("the probe batches ran out: pass a re-iterable (a DataLoader or a list), not an iterator")

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Resume after `drawn` batches: exact for a re-iterable with a fixed order and a length (a list, a
        DataLoader without shuffling); a shuffling loader resumes at the same position in a new order."""
        self.drawn = int(state["drawn"])
        self._iter = iter(self.batches)
        if self._iter is not self.batches and hasattr(self.batches, "__len__") and len(self.batches):
            for _ in range(self.drawn % len(self.batches)):
                next(self._iter)

    def measure(self, offsets, move: Callable[[float], None]) -> Measurement:
        batch = self.draw()
        if self.check is not None:
            self.check(batch)
        values, eps = [], float(np.finfo(np.float32).eps)
        for x in offsets:
            move(x)
            loss = self.loss_fn(batch)
            values.append(_scalar(loss))
            if isinstance(loss, torch.Tensor) and loss.is_floating_point():
                eps = float(torch.finfo(loss.dtype).eps)
        return Measurement(np.asarray(values), 0.0, eps)


class ClosureProbe:
    """closure() draws a fresh batch and returns a function of no arguments: the loss on it at the current weights."""

    private = False

    def __init__(self, closure: Callable):
        self.closure = closure

    def measure(self, offsets, move: Callable[[float], None]) -> Measurement:
        loss_at = self.closure()
        if not callable(loss_at):
            raise ExpungeError("a probe closure must return a function of no arguments that computes the loss on "
                               "the batch it drew (GeN calls it once per probe point)")
        values, eps = [], float(np.finfo(np.float32).eps)
        for x in offsets:
            move(x)
            loss = loss_at()
            values.append(_scalar(loss))
            if isinstance(loss, torch.Tensor) and loss.is_floating_point():
                eps = float(torch.finfo(loss.dtype).eps)
        return Measurement(np.asarray(values), 0.0, eps)


def _scalar(loss) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ExpungeError(f"the probe loss must be one number (the mean over the batch), got shape "
                               f"{tuple(loss.shape)}")
        return float(loss.detach())
    return float(loss)


# -- the wrapper ---------------------------------------------------------------------------------------------

LINEAR_IN_LR = {"SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adadelta", "Adagrad", "DPAdamBC"}


@dataclass
class Estimate:
    """One GeN estimate: where it probed, what it measured, what it decided."""

    step: int
    lr: float  # rate before (applied)
    new_lr: float  # rate after (applied to this step)
    tracked: float  # GeN's unscaled rate after (equals new_lr with horizon="proposal")
    lr_star: float | None  # eta* (before clipping) when accepted
    accepted: bool
    reason: str
    offsets: list[float] = field(default_factory=list)  # probe points x (absolute, not / eta)
    losses: list[float] = field(default_factory=list)
    noise_std: float = 0.0
    slope: float = float("nan")
    curvature: float = float("nan")
    r2: float = float("nan")
    horizon: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


class GeN:
    """Wrap `optimizer` (any torch.optim optimizer whose step is linear in its rate, or the private engine's
    DPOptimizer): `step()` steps it, and every `every` steps sets its rate from probed losses (module docstring).

    points: 3 (offsets -eta, 0, +eta), an odd number of evenly spaced offsets in [-eta, eta], or a sequence of
    offsets in units of eta. smoothing, clip, schedule, horizon: the update of the rate (module docstring).
    z, r2_min: the acceptance test."""

    def __init__(self, optimizer: torch.optim.Optimizer, probe, *, loss_fn: Callable | None = None, every: int = 4,
                 points=3, smoothing: float = 0.9, schedule: Callable[[int], float] | None = None,
                 horizon: str = "proposal", clip: float = 2.0, z: float = 2.0, r2_min: float = 0.99,
                 assume_linear: bool = False):
        _positive_int(every, "every")
        if not 0 <= smoothing < 1:
            raise ExpungeError(f"smoothing must be in [0, 1), got {smoothing}")
        if not clip > 1:
            raise ExpungeError(f"clip must be above 1 (eta* is clipped to [eta/clip, clip eta]), got {clip}")
        if schedule is not None and not callable(schedule):
            raise ExpungeError("schedule must be a function of the step, s(t) in [0, 1] (e.g. cosine_horizon(T))")
        if horizon not in ("proposal", "rate"):
            raise ExpungeError(f"horizon must be 'proposal' (s_t scales each estimate, the paper's form) or 'rate' "
                               f"(s_t scales the applied rate), got {horizon!r}")
        if not z >= 0 or not 0 <= r2_min <= 1:
            raise ExpungeError(f"z must be >= 0 and r2_min in [0, 1], got z={z}, r2_min={r2_min}")
        self.optimizer, self.every, self.smoothing, self.schedule = optimizer, int(every), float(smoothing), schedule
        self.horizon = horizon
        self.clip, self.z, self.r2_min = float(clip), float(z), float(r2_min)
        self.offsets = _offsets(points)
        self.engine = _engine_of(optimizer)
        _check_linear(optimizer, self.engine, assume_linear)
        groups = optimizer.param_groups
        rate = float(groups[0]["lr"])
        if not rate > 0 or not math.isfinite(rate):
            raise ExpungeError(f"the optimizer's learning rate must be positive and finite to start GeN from, got {rate}")
        self._lr = self._tracked = rate  # the applied rate; GeN's unscaled rate (they differ with horizon="rate")
        self.ratios = [float(g["lr"]) / rate for g in groups]
        self.probe = self._make_probe(probe, loss_fn)
        self.steps = 0  # base-optimizer steps taken through GeN
        self.rates: list[float] = []  # the rate applied at each step
        self.history: list[Estimate] = []

    # -- public surface -----------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The current rate (of param group 0; the others keep their ratios to it)."""
        return self._lr

    @property
    def tracked(self) -> float:
        """GeN's own rate before the horizon (the same as lr unless horizon="rate")."""
        return self._tracked

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        """Step the base optimizer; on an estimate step, probe and set the new rate (applied to this step)."""
        self._check_rates()
        if self.engine is not None and not getattr(self.optimizer, "_logical_end", True):
            return self.optimizer.step(closure)  # a physical batch inside a logical one: no base step yet
        if self.horizon == "rate":
            self._set_rate(self._horizon() * self._tracked)
        if self.steps % self.every or self._lr == 0:  # (a zero rate moves nothing to read a direction from)
            loss = self.optimizer.step(closure)
            self.rates.append(self._lr)
            self.steps += 1
            return loss
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        before = [p.detach().clone() for p in params]
        engine_steps = self.engine.steps if self.engine is not None else None
        loss = self.optimizer.step(closure)
        if self.engine is not None and self.engine.steps == engine_steps:
            return loss  # the engine did not release a gradient: no base step happened
        after = [p.detach().clone() for p in params]
        eta = self._lr  # the rate of the step just taken
        scale = self._tracked  # the probe offsets and the fit are in units of GeN's own rate

        def move(x: float) -> None:
            with torch.no_grad():
                for p, a, b in zip(params, before, after):
                    p.copy_(torch.lerp(a, b, x / eta))

        try:
            with torch.no_grad():
                measured = self.probe.measure([r * scale for r in self.offsets], move)
        except BaseException:
            move(eta)  # leave the weights where the base step put them
            raise
        estimate = self._decide(measured)
        move(estimate.new_lr)  # the step at the new rate: w + (eta_new / eta)(w_step - w)
        self._tracked = estimate.tracked
        self._set_rate(estimate.new_lr)
        if self.engine is not None:  # transforms that read the step just taken (DiSK's d) see the rescaled one
            from ..privacy.transforms import DiSK

            for t in self.engine.transforms:
                if isinstance(t, DiSK):
                    t.after_step(self.engine)
        self.history.append(estimate)
        self.rates.append(self._lr)
        self.steps += 1
        log.debug("GeN step %d: lr %.4g -> %.4g (%s)", estimate.step, estimate.lr, estimate.new_lr, estimate.reason)
        return loss

    def state_dict(self) -> dict:
        probe_state = self.probe.state_dict() if hasattr(self.probe, "state_dict") else None
        return {"format": 1, "optimizer": self.optimizer.state_dict(), "lr": self._lr, "tracked": self._tracked,
                "ratios": list(self.ratios),
                "steps": self.steps, "rates": list(self.rates), "history": [e.to_dict() for e in self.history],
                "probe": probe_state}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ExpungeError("not a GeN state (format 1 expected): pass what GeN.state_dict() returned")
        if len(state["ratios"]) != len(self.optimizer.param_groups):
            raise ExpungeError(f"the saved GeN state has {len(state['ratios'])} param groups, this optimizer "
                               f"{len(self.optimizer.param_groups)}: build the optimizer as before loading")
        if (state.get("probe") is not None) != hasattr(self.probe, "load_state_dict"):
            raise ExpungeError("the saved GeN state was made with another kind of probe: use the same probe")
        self.optimizer.load_state_dict(state["optimizer"])
        self.ratios = [float(r) for r in state["ratios"]]
        self._set_rate(float(state["lr"]))
        self._tracked = float(state["tracked"])
        self.steps, self.rates = int(state["steps"]), [float(r) for r in state["rates"]]
        self.history = [Estimate(**e) for e in state["history"]]
        if state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])

    def __repr__(self) -> str:
        return f"GeN({self.optimizer!r}, lr={self._lr:.4g}, every={self.every}, points={len(self.offsets)})"

    # -- internals -----------------------------------------------------------------------------------------
    def _make_probe(self, probe, loss_fn):
        from ..privacy.probes import PrivateLossProbe

        if isinstance(probe, PrivateLossProbe):
            if probe.engine is not self.engine:
                raise ExpungeError("this PrivateLossProbe belongs to another privacy engine (or the optimizer is not "
                                   "private): wrap that engine's engine.optimizer")
            return probe
        if self.engine is not None:
            if isinstance(probe, (BatchProbe, ClosureProbe)) or (callable(probe) and not isinstance(probe, Iterable)):
                raise ExpungeError(
                    "the optimizer trains privately, so GeN's loss probes would read private rows without being "
                    "accounted: use expunge.privacy.PrivateLossProbe(engine, per_sample_loss, ...), or give public "
                    "batches as probe=batches with loss_fn=... (the engine checks they hold no private row)")
            return BatchProbe(probe, loss_fn, check=self.engine.check_public)
        if isinstance(probe, (BatchProbe, ClosureProbe)):
            return probe
        if loss_fn is not None:
            return BatchProbe(probe, loss_fn)
        if callable(probe):
            return ClosureProbe(probe)
        raise ExpungeError("give probe=batches with loss_fn=..., or probe=closure (a function that draws a fresh batch "
                           "and returns a function of no arguments computing the loss on it)")

    def _horizon(self) -> float:
        horizon = float(self.schedule(self.steps)) if self.schedule is not None else 1.0
        if not 0 <= horizon <= 1 or not math.isfinite(horizon):
            raise ExpungeError(f"the horizon schedule gave {horizon} at step {self.steps}; it must be in [0, 1]")
        return horizon

    def _decide(self, measured: Measurement) -> Estimate:
        eta = self._tracked
        losses = np.asarray(measured.losses, dtype=np.float64)
        noise = measured.noise_std
        if noise <= 0:  # exact losses: their floating-point resolution
            finite = losses[np.isfinite(losses)]
            noise = ROUNDING * measured.eps * (float(np.abs(finite).max()) if finite.size else 1.0)
        fit = fit_rate(self.offsets, losses, noise, clip=self.clip, z=self.z, r2_min=self.r2_min)
        horizon = self._horizon()
        tracked, star = eta, None
        if fit.accepted:
            star = eta * fit.ratio
            proposal = min(max(star, eta / self.clip), eta * self.clip)
            scale = horizon if self.horizon == "proposal" else 1.0
            tracked = self.smoothing * eta + (1 - self.smoothing) * scale * proposal
        new = tracked if self.horizon == "proposal" else horizon * tracked
        return Estimate(step=self.steps, lr=self._lr, new_lr=new, tracked=tracked, lr_star=star,
                        accepted=fit.accepted, reason=fit.reason,
                        offsets=[r * eta for r in self.offsets], losses=[float(v) for v in losses],
                        noise_std=float(measured.noise_std), slope=fit.slope, curvature=fit.curvature, r2=fit.r2,
                        horizon=horizon)

    def _set_rate(self, rate: float) -> None:
        self._lr = float(rate)
        for g, ratio in zip(self.optimizer.param_groups, self.ratios):
            g["lr"] = self._lr * ratio

    def _check_rates(self) -> None:
        for k, (g, ratio) in enumerate(zip(self.optimizer.param_groups, self.ratios)):
            if float(g["lr"]) != self._lr * ratio:
                raise ExpungeError(
                    f"the learning rate of param group {k} was changed outside GeN (to {float(g['lr']):.4g}; GeN set "
                    f"{self._lr * ratio:.4g}), by an LR scheduler perhaps: GeN sets the rate, give a horizon "
                    "schedule as GeN(..., schedule=cosine_horizon(steps)) instead")
        if len(self.optimizer.param_groups) != len(self.ratios):
            raise ExpungeError("param groups were added to the optimizer after GeN wrapped it: wrap it once it is complete")


def _offsets(points) -> list[float]:
    if isinstance(points, (int, np.integer)) and not isinstance(points, bool):
        if points < 3 or points % 2 == 0:
            raise ExpungeError(f"points must be an odd number >= 3 (offsets evenly spaced in [-eta, eta]), got {points}")
        m = (points - 1) // 2
        return [k / m for k in range(-m, m + 1)]
    try:
        offsets = [float(x) for x in points]
    except TypeError:
        raise ExpungeError(f"points must be an odd number >= 3 or a sequence of offsets in units of eta, got {points!r}")
    if len(set(offsets)) < 3 or not all(math.isfinite(x) for x in offsets):
        raise ExpungeError(f"give at least three distinct finite offsets (in units of eta), got {offsets}")
    return offsets


def _engine_of(optimizer):
    from ..privacy.engine import DPOptimizer

    if isinstance(optimizer, DPOptimizer):
        return optimizer.engine
    if getattr(optimizer, "_expunge_private_wrapper", None) is not None and optimizer._expunge_private_wrapper() is not None:
        raise ExpungeError("this optimizer is the base of a private engine: wrap engine.optimizer (the DPOptimizer), "
                           "which adds the noise, not the optimizer given to make_private")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ExpungeError(f"GeN wraps a torch.optim optimizer, got {type(optimizer).__name__}")
    return None


def _check_linear(optimizer, engine, assume_linear: bool) -> None:
    base = optimizer.base if engine is not None else optimizer
    name = type(base).__name__
    known = name in LINEAR_IN_LR and type(base).__module__.startswith(("torch.optim", "expunge.privacy"))
    if name == "Adagrad" and known and any(g.get("lr_decay", 0) for g in base.param_groups):
        known = False
    if not known and not assume_linear:
        raise ExpungeError(
            f"GeN needs an optimizer whose state does not depend on the learning rate and whose step is linear in it "
            f"(SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adadelta, Adagrad without lr_decay, DPAdamBC); "
            f"{name} is not known to be one. Pass assume_linear=True if it is")
    if engine is not None:
        from ..privacy.transforms import DiSK, Transform

        odd = [type(t).__name__ for t in engine.transforms
               if type(t).after_step is not Transform.after_step and not isinstance(t, DiSK)]
        if odd:
            raise ExpungeError(f"the private engine's transforms {odd} act after each step in ways GeN cannot "
                               "reproduce at a rescaled step; use GeN without them")


def _positive_int(value, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ExpungeError(f"{name} must be a positive integer, got {value!r}")
