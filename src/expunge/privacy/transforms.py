"""Gradient transformations on top of DP-SGD: clip -> noise -> filter -> base optimizer.

Pass any of them to `make_private(..., transforms=[...])`; they compose in the order given and wrap any
torch.optim optimizer (SGD, Adam, DPAdamBC). All but DiceSGD are post-processing of the privatised
gradient (or change only where the per-sample gradients are evaluated), so the accounting is DP-SGD's.

- DOPPLER (Zhang, Bu, Hong, Razaviyayn, NeurIPS 2024): an IIR low-pass filter on the privatised gradients,
  m_t = -sum_{tau>=1} a_tau m_{t-tau} + sum_{tau>=0} b_tau g_{t-tau}, with the bias correction c_t given by the
  same recursion on the constant 1; the optimizer receives m_t / c_t. The default coefficients are the authors'
  optimizer's default, `scipy.signal.cheby1(2, 10, 0.02)`: after the bias correction, gain 1 at frequency 0, a
  +10 dB resonance at 0.0445 rad/step (a 141-step period), 7% of white noise's power passed. In a training loop
  that resonance bounds the learning rate: on a quadratic the loop is stable only below 1/138 of SGD's rate, and
  on top of momentum beta below a further (1 - beta) of that (`expunge bench dp-filters`). Tune DOPPLER's rate on
  its own grid, far below DP-SGD's; use it on SGD without momentum (momentum is itself a first-order low-pass).
- DiSK (Zhang, Bu, Balle, Hong, Razaviyayn, Mirrokni, ICLR 2025): per sample, before clipping,
  g_i = c grad f_i(x_t + gamma d_t) + (1 - c) grad f_i(x_t) with d_t = x_t - x_{t-1}, c = (1-kappa)/(kappa gamma);
  clip, sum, noise as DP-SGD; then g_t = (1-kappa) g_{t-1} + kappa g~_t. It needs `optimizer.step(closure)`,
  since it evaluates the loss at two points (one when gamma = (1-kappa)/kappa, i.e. c = 1).
- DiceSGD (Zhang, Bu, Wu, Hong, ICLR 2024): v_t = mean_i clip(g_i, C1) + clip(e_t, C2 / B),
  x_{t+1} = x_t - eta (v_t + w_t), e_{t+1} = e_t + mean_i g_i - v_t, e_0 = 0 (C1 is max_grad_norm, B the expected
  batch size). Both thresholds are on the scale of one row's gradient, as in the authors' code, which clips the
  batch-summed error to C2: in the paper's mean form that is clip(e_t, C2/B), and it is what keeps the error's
  share of the sensitivity comparable to one row's (default C2 = C1, the reference code's choice). Privacy: the
  paper's own RDP analysis as its reference code applies it: the Gaussian noise added to the sum has standard
  deviation sigma C1 sqrt(1 + 2 C2/C1) (larger than DP-SGD's sigma C1), and the epsilon reported is that of
  DP-SGD with noise multiplier sigma at the same sampling rate and steps. We take that analysis as given.
- PublicCoupling (Liu, Bu, Wang, Zha, Karypis 2023): g_t = alpha g_pub + (1 - alpha) g~_priv, the public gradient
  computed on a uniformly sampled public batch without noise; only private rows reach the accountant. By default
  the public mean gradient is scaled to norm at most C (`clip_public`), the bound the private mean has: at a
  learning rate suited to clipped gradients, the raw public gradient (often 10x larger early on) made training
  diverge on some seeds of the benchmark. `clip_public=False` gives the formula with the raw gradient.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ExpungeError

DOPPLER_A = (1.0, -1.98342955, 0.98549544)
DOPPLER_B = (1.6332e-4, 3.2665e-4, 1.6332e-4)


class Transform:
    """A stage between the noisy gradient and the base optimizer (override what applies)."""

    needs_closure = False  # evaluates the loss itself (optimizer.step(closure))
    needs_unclipped = False  # needs sum_i g_i as well as sum_i clip(g_i)
    # runs data parallel (expunge.privacy.distributed): its state is a function of the reduced sums and the
    # parameters alone, so every replica computes the same
    data_parallel = False

    def points(self, engine) -> list[tuple[list[torch.Tensor] | None, float]]:
        """Where to evaluate per-sample gradients and with what weight: (shift per param or None, weight)."""
        return [(None, 1.0)]

    def noise_scale(self, engine) -> float:
        return 1.0

    def before_noise(self, engine, summed: list[torch.Tensor], unclipped: list[torch.Tensor] | None):
        return summed

    def after_noise(self, engine, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return grads

    def after_step(self, engine) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DOPPLER(Transform):
    data_parallel = True

    def __init__(self, a=DOPPLER_A, b=DOPPLER_B):
        a, b = [float(x) for x in a], [float(x) for x in b]
        if not a or a[0] == 0 or not b:
            raise ExpungeError("DOPPLER needs a[0] != 0 and at least one b coefficient")
        # normalise so that a[0] = 1, as the recursion assumes
        self.a, self.b = [x / a[0] for x in a], [x / a[0] for x in b]
        roots = np.roots(self.a) if len(self.a) > 1 else np.array([])
        if len(roots) and np.max(np.abs(roots)) >= 1:
            raise ExpungeError(f"DOPPLER filter with a={a} is unstable (a pole on or outside the unit circle)")
        self.reset()

    def reset(self):
        self.g_hist: list[list[torch.Tensor]] = []  # newest first: g_{t-1}, g_{t-2}, ...
        self.m_hist: list[list[torch.Tensor]] = []
        self.c_hist: list[float] = []
        self.t = 0

    def after_noise(self, engine, grads):
        # c_t: the same recursion driven by a constant 1 from step 0
        c = sum(self.b[k] for k in range(len(self.b)) if k <= self.t) - sum(
            self.a[k] * self.c_hist[k - 1] for k in range(1, len(self.a)) if k - 1 < len(self.c_hist))
        m = []
        for j, g in enumerate(grads):
            value = self.b[0] * g
            for k in range(1, len(self.b)):
                if k - 1 < len(self.g_hist):
                    value = value + self.b[k] * self.g_hist[k - 1][j]
            for k in range(1, len(self.a)):
                if k - 1 < len(self.m_hist):
                    value = value - self.a[k] * self.m_hist[k - 1][j]
            m.append(value)
        self.g_hist = ([list(grads)] + self.g_hist)[: len(self.b) - 1]
        self.m_hist = ([m] + self.m_hist)[: len(self.a) - 1]
        self.c_hist = ([c] + self.c_hist)[: max(len(self.a) - 1, 1)]
        self.t += 1
        return [x / c for x in m]

    def state_dict(self):
        return {"g": self.g_hist, "m": self.m_hist, "c": self.c_hist, "t": self.t}

    def load_state_dict(self, state):
        self.g_hist, self.m_hist, self.c_hist, self.t = state["g"], state["m"], state["c"], state["t"]


class DiSK(Transform):
    data_parallel = True

    def __init__(self, kappa: float = 0.7, gamma: float = 0.5):
        if not 0 < kappa <= 1:
            raise ExpungeError(f"DiSK kappa must be in (0, 1], got {kappa}")
        if not gamma > 0:
            raise ExpungeError(f"DiSK gamma must be positive, got {gamma}")
        self.kappa, self.gamma = float(kappa), float(gamma)
        self.c = (1 - kappa) / (kappa * gamma)
        self.needs_closure = self.c != 0
        self.previous: list[torch.Tensor] | None = None  # x_{t-1}
        self.filtered: list[torch.Tensor] | None = None  # g_{t-1}
        self.d: list[torch.Tensor] | None = None

    @property
    def one_gradient(self) -> bool:
        """gamma = (1-kappa)/kappa: c = 1, only the extrapolated gradient is needed."""
        return math.isclose(self.c, 1.0, rel_tol=1e-12)

    def points(self, engine):
        if self.c == 0:
            return [(None, 1.0)]
        shift = None if self.d is None else [self.gamma * d for d in self.d]
        if self.one_gradient:
            return [(shift, 1.0)]
        return [(shift, self.c), (None, 1.0 - self.c)]

    def after_noise(self, engine, grads):
        if self.filtered is None:
            self.filtered = [g.clone() for g in grads]
        else:
            self.filtered = [(1 - self.kappa) * f + self.kappa * g for f, g in zip(self.filtered, grads)]
        self.previous = [p.detach().clone() for p in engine.params]
        return [f.clone() for f in self.filtered]

    def after_step(self, engine):
        self.d = [p.detach() - prev for p, prev in zip(engine.params, self.previous)]

    def state_dict(self):
        return {"previous": self.previous, "filtered": self.filtered, "d": self.d}

    def load_state_dict(self, state):
        self.previous, self.filtered, self.d = state["previous"], state["filtered"], state["d"]


class DiceSGD(Transform):
    data_parallel = True
    needs_unclipped = True

    def __init__(self, C2: float | None = None):
        if C2 is not None and not C2 > 0:
            raise ExpungeError(f"DiceSGD C2 must be positive, got {C2}")
        self.C2 = C2  # default: C1, set when the engine is known
        self.error: list[torch.Tensor] | None = None  # e_t, on the scale of the mean gradient

    def threshold(self, engine) -> float:
        """C2, on the scale of one row's gradient (the batch-summed error is clipped to it)."""
        return self.C2 if self.C2 is not None else engine.max_grad_norm

    def noise_scale(self, engine) -> float:
        return math.sqrt(1.0 + 2.0 * self.threshold(engine) / engine.max_grad_norm)

    def before_noise(self, engine, summed, unclipped):
        batch = engine.expected_batch_size
        if self.error is None:
            self.error = [torch.zeros_like(s) for s in summed]
        norm = torch.sqrt(sum(e.pow(2).sum() for e in self.error))
        factor = min(1.0, self.threshold(engine) / batch / max(float(norm), 1e-12))
        clipped_error = [factor * e for e in self.error]
        v = [s / batch + ce for s, ce in zip(summed, clipped_error)]  # v_t (before noise)
        self.error = [e + u / batch - vt for e, u, vt in zip(self.error, unclipped, v)]
        return [vt * batch for vt in v]  # the engine adds noise to the sum and divides by the batch

    def state_dict(self):
        return {"error": self.error}

    def load_state_dict(self, state):
        self.error = state["error"]


class PublicCoupling(Transform):
    def __init__(self, public_data, alpha: float = 0.5, batch_size: int = 256, loss_fn=F.cross_entropy,
                 seed: int | None = 0, clip_public: bool = True):
        if not 0 <= alpha <= 1:
            raise ExpungeError(f"coupling alpha must be in [0, 1], got {alpha}")
        if not isinstance(public_data, (tuple, list)) or not public_data:
            raise ExpungeError("public_data must be a tuple of tensors (X, y)")
        self.public_data, self.alpha, self.loss_fn = tuple(public_data), float(alpha), loss_fn
        self.n_public = len(public_data[0])
        if self.n_public == 0:
            raise ExpungeError("public_data is empty")
        self.batch_size = min(int(batch_size), self.n_public)
        self.rng = np.random.default_rng(seed)
        self.clip_public = clip_public

    def public_gradient(self, engine) -> list[torch.Tensor]:
        from .persample import _NoCapture

        rows = torch.as_tensor(self.rng.choice(self.n_public, self.batch_size, replace=False))
        *inputs, target = (t[rows] for t in self.public_data)
        with _NoCapture(), torch.enable_grad():
            loss = self.loss_fn(engine.model(*inputs), target)
            grads = torch.autograd.grad(loss, engine.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(engine.params, grads)]
        if self.clip_public:  # same scale as the private mean, whose norm is at most C
            norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
            grads = [g * min(1.0, engine.max_grad_norm / max(norm, 1e-12)) for g in grads]
        return grads

    def after_noise(self, engine, grads):
        if self.alpha == 0:
            return grads
        public = self.public_gradient(engine)
        return [self.alpha * gp + (1 - self.alpha) * g for gp, g in zip(public, grads)]

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
