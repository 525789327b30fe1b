"""The DP optimizers' gradient filters on a noisy quadratic, where the answer is known in closed form.

Setting: f(x) = lambda/2 |x|^2, each step sees the gradient lambda x_t + w_t with white noise w_t of variance
sigma^2 per coordinate (DP noise), the optimizer filters it and steps x_{t+1} = x_t - eta * filtered. Every
method here is linear in (x, w), so the closed loop is a linear system: its spectral radius says whether a rate
is stable and how fast it forgets the start, and its discrete Lyapunov equation gives the stationary error
E[(lambda x)^2] / sigma^2 exactly (scipy.linalg.solve_discrete_lyapunov). Rates are effective rates
r = eta * lambda * (the filter's gain at frequency 0): DOPPLER's bias correction and DiSK's Kalman gain have
unit gain at frequency 0, momentum beta has 1 / (1 - beta), so equal r means equal progress on slow directions.
The same loop is then simulated with the library's own `DOPPLER` and `DiSK` transforms and torch's SGD
(many independent coordinates), which must land on the analytic value: the transforms do what the algebra says.

What it shows (`benchmarks/results/dp-filters.json`, `.png`):

- DOPPLER's default coefficients (the authors' public optimizer's default: exactly
  `scipy.signal.cheby1(2, 10, 0.02)`, a Chebyshev type I low-pass with 10 dB pass-band ripple) cut white noise
  to 7% of its power, but after the bias correction the gain has a +10 dB (x3.16) resonance at 0.0445
  rad/step (a period of 141 steps), where the group delay is 138 steps (7 at frequency 0). In the loop this
  resonance is what matters: the quadratic is stable only for r < 0.0145, against 2 for SGD and 3.8 for
  momentum 0.9 (in effective rate, 38); DOPPLER on top of momentum 0.9 is stable only for eta * lambda < 0.0015.
- At every stable rate DOPPLER's stationary error is at least SGD's at the same effective rate (equal for
  small rates, 3.2x at r = 0.01), and it forgets the start more slowly: a filter with unit gain at frequency 0
  passes exactly the low frequencies that the loop integrates into the error, and it removes only the high
  frequencies that SGD's loop already averages out. The filter helps only when the rate is large, which its
  delay forbids. So the usable learning rate for DOPPLER is about two orders of magnitude below DP-SGD's, and a
  learning-rate grid shared with DP-SGD (as in `dp-optimizers`, 0.25-4: DOPPLER was 72% at 0.25 and chance at
  0.5 and above) does not contain DOPPLER's optimum. This is the benchmark's error, not the filter's.
- DiSK's extrapolated gradient grad f(x_t + gamma d_t) compensates its Kalman filter's delay exactly on a
  quadratic (c gamma = (1-kappa)/kappa whatever gamma): it is stable up to r = 2 like SGD, has the same error
  at small rates and a lower one at large rates (0.54 against 1.0 at r = 1). The same EMA without the
  extrapolation behaves like heavy-ball momentum.
- DiceSGD's error feedback acts on clipping bias, which a quadratic without clipping does not have; see the
  tests (tests/privacy/test_transforms.py) for its fixed point.

The recursion of `DOPPLER` itself (m_t = -sum a m + sum b g, c_t the same recursion on 1, update m_t / c_t)
matches the paper's algorithm and scipy.signal.lfilter; no defect was found in the transform.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from . import report

MOMENTUM = 0.9
KAPPA = 0.7  # DiSK's Kalman gain (the benchmarks' default)
RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 1.5, 1.9)
SIMULATED_RATES = (3e-3, 1e-2, 0.1, 1.0)
METHODS = ("sgd", "momentum", "doppler", "doppler+momentum", "disk", "disk-no-extrapolation")
COLORS = {"sgd": "C0", "momentum": "C1", "doppler": "C2", "doppler+momentum": "C3", "disk": "C4",
          "disk-no-extrapolation": "C5", "disk-ema": "C5"}


def filters() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The linear filters (b, a) the gradient goes through, each scaled to unit gain at frequency 0."""
    from ..privacy.transforms import DOPPLER_A, DOPPLER_B

    def unit(b, a):
        b, a = np.asarray(b, float), np.asarray(a, float)
        return b * a.sum() / b.sum(), a

    momentum = unit([1.0], [1.0, -MOMENTUM])
    doppler = unit(DOPPLER_B, DOPPLER_A)
    return {"sgd": unit([1.0], [1.0]), "momentum": momentum, "doppler": doppler,
            "doppler+momentum": (np.convolve(doppler[0], momentum[0]), np.convolve(doppler[1], momentum[1])),
            "disk-ema": unit([KAPPA], [1.0, -(1 - KAPPA)])}


def response(b, a, w) -> tuple[np.ndarray, np.ndarray]:
    """Gain (relative to frequency 0) and group delay in steps at frequencies w (radians per step)."""
    import scipy.signal

    _, h = scipy.signal.freqz(b, a, worN=w)
    _, delay = scipy.signal.group_delay((b, a), w=w)
    return np.abs(h) / abs(np.sum(b) / np.sum(a)), delay


def loop_matrices(method: str, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """The closed loop on f = |x|^2 / 2 (lambda = 1) at effective rate `rate`: state' = F state + G w."""
    if method in ("disk", "disk-no-extrapolation"):
        # state (x_t, x_{t-1}, g_{t-1}); the point where the gradient is taken, x + c gamma d, is
        # x + (1-kappa)/kappa (x_t - x_{t-1}) on a quadratic whatever gamma is
        ahead = (1 - KAPPA) / KAPPA if method == "disk" else 0.0
        g_row = np.array([KAPPA * (1 + ahead), -KAPPA * ahead, 1 - KAPPA])
        F = np.array([[1.0, 0, 0], [1.0, 0, 0], g_row])
        F[0] -= rate * g_row
        return F, np.array([[-rate * KAPPA], [0.0], [KAPPA]])
    import scipy.signal

    b, a = filters()[method]
    n = max(len(a), len(b))  # tf2ss reads (b, a) as polynomials in z: pad both to one length for z^-1 form
    b, a = np.pad(b, (0, n - len(b))), np.pad(a, (0, n - len(a)))
    A, B, C, D = scipy.signal.tf2ss(b, a)
    k = A.shape[0]
    F = np.zeros((k + 1, k + 1))
    F[0, 0], F[0, 1:] = 1 - rate * D[0, 0], -rate * C[0]  # x' = x - rate * (C s + D u), u = x + w
    F[1:, 0], F[1:, 1:] = B[:, 0], A  # s' = A s + B u
    G = np.concatenate([[-rate * D[0, 0]], B[:, 0]])[:, None]
    return F, G


def spectral_radius(method: str, rate: float) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(loop_matrices(method, rate)[0]))))


def stationary_error(method: str, rate: float) -> float:
    """E[(lambda x)^2] / sigma^2 once the loop has forgotten its start (inf where the rate is unstable)."""
    import scipy.linalg

    F, G = loop_matrices(method, rate)
    if np.max(np.abs(np.linalg.eigvals(F))) >= 1:
        return math.inf
    return float(scipy.linalg.solve_discrete_lyapunov(F, G @ G.T)[0, 0])


def stable_rate(method: str) -> float:
    """The largest effective rate at which the loop is stable."""
    import scipy.optimize

    grid = np.geomspace(1e-5, 100.0, 281)
    unstable = next(i for i, r in enumerate(grid) if spectral_radius(method, r) >= 1)
    return float(scipy.optimize.brentq(lambda r: spectral_radius(method, r) - 1, grid[unstable - 1], grid[unstable],
                                       xtol=1e-10))


def simulate(method: str, rate: float, steps: int, dims: int = 2000, seed: int = 0) -> float:
    """Run the loop with the library's transforms (or torch's SGD) on `dims` independent coordinates and
    return the mean of x^2 over the last half of `steps` (sigma = lambda = 1)."""
    import torch

    from ..privacy.transforms import DOPPLER, DiSK

    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(dims, dtype=torch.float64)
    engine = SimpleNamespace(params=[x])
    doppler = DOPPLER() if method.startswith("doppler") else None
    disk = DiSK(KAPPA, (1 - KAPPA) / KAPPA) if method == "disk" else None
    beta = MOMENTUM if method in ("momentum", "doppler+momentum") else 0.0
    param = torch.nn.Parameter(x)  # shares x's storage
    sgd = torch.optim.SGD([param], lr=rate * (1 - beta), momentum=beta)
    total, counted = 0.0, 0
    for t in range(steps):
        noise = torch.randn(dims, generator=g, dtype=torch.float64)
        if disk is not None:
            (shift, weight), = disk.points(engine)  # one point when gamma = (1-kappa)/kappa
            grad = weight * (x + (0 if shift is None else shift[0])) + noise
            step = disk.after_noise(engine, [grad])[0]
        else:
            step = x + noise
            if doppler is not None:
                step = doppler.after_noise(None, [step])[0]
        param.grad = step.clone()
        sgd.step()
        if disk is not None:
            disk.after_step(engine)
        if t >= steps // 2:
            total += float(x.pow(2).mean())
            counted += 1
    return total / counted


def run(limit: int | None = None, progress: bool = True) -> list[dict]:
    import scipy.signal

    from ..progress import track

    rows = []
    w = np.geomspace(1e-4, math.pi, 4000)
    for name, (b, a) in filters().items():
        gain, delay = response(b, a, w)
        # white noise in, power out: the sum of the squared impulse response (unit gain at frequency 0)
        impulse = scipy.signal.lfilter(b, a, np.r_[1.0, np.zeros(20000)])
        rows.append({"kind": "filter", "method": name, "b": [float(v) for v in b], "a": [float(v) for v in a],
                     "dc_group_delay": float(response(b, a, [0.0])[1][0]), "peak_gain": float(gain.max()),
                     "peak_frequency": float(w[gain.argmax()]), "peak_group_delay": float(delay[gain.argmax()]),
                     "noise_power_gain": float(np.sum(impulse ** 2)),
                     "stable_rate": stable_rate(name) if name != "disk-ema" else stable_rate("disk-no-extrapolation")})
    for method in ("disk",):
        rows.append({"kind": "filter", "method": method, "stable_rate": stable_rate(method)})
    for method in METHODS:
        for rate in RATES:
            rows.append({"kind": "quadratic", "method": method, "rate": rate,
                         "stationary_error": stationary_error(method, rate),
                         "spectral_radius": spectral_radius(method, rate)})
    sims = [(m, r) for m in ("sgd", "momentum", "doppler", "disk") for r in SIMULATED_RATES
            if stationary_error(m, r) < math.inf]
    for method, rate in track(sims, len(sims), "simulating the loops", progress):
        # long enough to forget the start many times over: 1 - spectral radius is the per-step forgetting
        mixing = 1.0 / max(1.0 - spectral_radius(method, rate), 1e-6)
        steps = int(min(40 * mixing + 400, 60000 if not limit else 4000))
        rows.append({"kind": "simulation", "method": method, "rate": rate, "steps": steps,
                     "simulated": simulate(method, rate, steps, dims=400 if limit else 2000),
                     "stationary_error": stationary_error(method, rate)})
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="Gradient filters on a noisy quadratic: stationary error E[(lambda x)^2]/sigma^2 at effective "
                    "rate r (SGD: r/(2-r)); inf = unstable")
    shown = (1e-3, 1e-2, 0.1, 1.0)
    for col in ("method", "stable up to r", "delay at 0 (steps)", "peak gain", "white-noise power",
                *[f"r = {r:g}" for r in shown]):
        t.add_column(col, justify="right")
    info = {r["method"]: r for r in rows if r["kind"] == "filter"}
    info["disk-no-extrapolation"] = info.get("disk-ema", {})
    for method in METHODS:
        f = info.get(method, {})
        cells = []
        for rate in shown:
            q = next(r for r in rows if r["kind"] == "quadratic" and r["method"] == method and r["rate"] == rate)
            cells.append(f"{q['stationary_error']:.4g}")
        def fmt(key, spec, f=f):
            return format(f[key], spec) if key in f else "-"

        peak = f"{f['peak_gain']:.2f} at {f['peak_frequency']:.3f}" if "peak_gain" in f else "-"
        t.add_row(method, fmt("stable_rate", ".4g"), fmt("dc_group_delay", ".1f"), peak,
                  fmt("noise_power_gain", ".3f"), *cells)
    sims = [r for r in rows if r["kind"] == "simulation"]
    if sims:
        worst = max(abs(r["simulated"] / r["stationary_error"] - 1) for r in sims)
        t.caption = (f"{len(sims)} simulations with the library's transforms agree with the analytic error to "
                     f"{100 * worst:.1f}%")
    return t


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    w = np.geomspace(1e-3, math.pi, 3000)
    labels = {"sgd": "SGD", "momentum": f"momentum {MOMENTUM}", "doppler": "DOPPLER default (cheby1(2, 10 dB, 0.02))",
              "doppler+momentum": f"DOPPLER + momentum {MOMENTUM}", "disk-ema": f"DiSK's EMA (kappa {KAPPA})",
              "disk": f"DiSK (kappa {KAPPA}, extrapolated)", "disk-no-extrapolation": "DiSK's EMA alone"}
    for name, (b, a) in filters().items():
        if name == "sgd":
            continue
        gain, delay = response(b, a, w)
        axes[0].loglog(w, gain, color=COLORS[name], label=labels[name])
        axes[1].semilogx(w, delay, color=COLORS[name], label=labels[name])
    axes[0].axhline(1, color="grey", lw=0.8)
    axes[0].set_ylim(1e-5, 10)
    axes[0].set_title("gain (1 at frequency 0, after bias correction)")
    axes[1].set_yscale("symlog", linthresh=1)
    axes[1].set_title("group delay (steps)")
    for ax in axes[:2]:
        ax.set_xlabel("frequency (radians per step)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = axes[2]
    for method in METHODS:
        pts = [r for r in rows if r["kind"] == "quadratic" and r["method"] == method and r["stationary_error"] < math.inf]
        ax.loglog([r["rate"] for r in pts], [r["stationary_error"] for r in pts], "-", color=COLORS[method],
                  label=labels[method])
        sims = [r for r in rows if r["kind"] == "simulation" and r["method"] == method]
        ax.loglog([r["rate"] for r in sims], [r["simulated"] for r in sims], "o", color=COLORS[method], mfc="none")
        limit = next((r["stable_rate"] for r in rows if r["kind"] == "filter" and r["method"] == method), None)
        if limit is not None and limit < 1.9:
            ax.axvline(limit, color=COLORS[method], ls=":", lw=1)
    ax.set_xlabel("effective rate r = lr x lambda x gain at frequency 0")
    ax.set_ylabel("stationary E[(lambda x)^2] / sigma^2")
    ax.set_title("noisy quadratic: lines exact (Lyapunov), circles simulated;\ndotted: stability limit")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(data_dir, json_out, repeats: int = 3, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    """No data is read (`data_dir` is accepted for the common bench interface); `limit` shortens the
    simulations for a smoke run."""
    return report(run(limit=limit, progress=progress), json_out, table, plot, console)
