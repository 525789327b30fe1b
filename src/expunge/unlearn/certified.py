"""Certified removal for linear models (Guo, Goldstein, Hannun, van der Maaten, ICML 2020).

Training minimises, for each one-vs-rest column k (one column for two classes),

    L_b(w; D) = sum_i l(y_ik w^T x_i) + (lambda n / 2) ||w||^2 + b_k^T w,   l(z) = log(1 + e^-z),

with b ~ N(0, sigma^2 I) drawn from a seed, to high precision (Newton's method). Removing rows R
takes one Newton step on the remaining data D':

    Delta = sum_{i in R} grad l_i(w) + lambda |R| w,    w- = w + H^-1 Delta,

H the Hessian of L on D' at the current w. H^-1 Delta is computed by conjugate gradients with
Hessian-vector products, preconditioned by a cached Cholesky factor of an earlier Hessian: the
step is the exact Newton step up to the solver's residual, which is measured and added to the
bound. Each removal spends the data-dependent bound on the gradient residual (Corollary 1),

    gamma ||X|| ||H^-1 Delta|| ||X' H^-1 Delta|| + ||H v - Delta||,   gamma = 1/4,

accumulated over requests (the training solver's own final gradient norm is the starting spend).
Releasing w- is (epsilon, delta)-certified while the total stays within the budget
sigma * epsilon / c, c = sqrt(2 log(1.5 / delta)) (Theorem 3); past it the model is retrained from
scratch with fresh noise (or the request is refused). Columns are certified jointly: the residual
of the stacked parameter vector is bounded by the root sum of squares of the columns' bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..artifact import write_atomic
from ..data import IndexedDataset
from ..errors import ExpungeError
from ..models import weights_hash
from .base import UpdateReport
from .run import TabularRun

GAMMA = 0.25  # Lipschitz constant of the logistic loss's second derivative used by the paper
WEIGHTS, STATE, PRECONDITIONER = "weights.safetensors", "certified.json", "cache/preconditioner.safetensors"
ROW_NORM_SLACK = 1e-6  # float32 rounding of rows scaled to unit norm


def noise_scale_c(delta: float) -> float:
    return math.sqrt(2 * math.log(1.5 / delta))


def removal_budget(sigma: float, epsilon: float, delta: float) -> float:
    """The gradient-residual budget epsilon' = sigma * epsilon / c of Theorem 3."""
    return sigma * epsilon / noise_scale_c(delta)


def worst_case_bound(lam: float, n_remaining: int, n_removed: int, n_columns: int) -> float:
    """Theorem 1 (batch form) for logistic loss, ||x|| <= 1, C = 1: 4 gamma m^2 / (lambda^2 (n - m)) per column."""
    return math.sqrt(n_columns) * 4 * GAMMA * n_removed**2 / (lam**2 * n_remaining)


def targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """+-1 targets: one column (class 1 vs 0) for two classes, one-vs-rest columns otherwise."""
    if n_classes <= 2:
        return np.where(y == 1, 1.0, -1.0)[:, None]
    Y = -np.ones((len(y), n_classes))
    Y[np.arange(len(y)), y] = 1.0
    return Y


class Objective:
    """L_b on the rows with weight 1 in ``active`` (a 0/1 vector), every column at once."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, active: np.ndarray, lam: float, b: torch.Tensor):
        self.X, self.Y, self.lam, self.b = X, Y, lam, b
        self.a = torch.from_numpy(active.astype(np.float64))
        self.n = int(active.sum())

    def margins(self, W: torch.Tensor) -> torch.Tensor:
        return self.Y * (self.X @ W)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        data = (self.a[:, None] * torch.nn.functional.softplus(-self.margins(W))).sum(0)
        return data + self.lam * self.n / 2 * (W * W).sum(0) + (self.b * W).sum(0)

    def data_grad(self, W: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum of the loss gradients of the rows, weighted (0/1) by ``weights``."""
        coef = (torch.sigmoid(self.margins(W)) - 1) * self.Y * weights[:, None]
        return self.X.T @ coef

    def grad(self, W: torch.Tensor) -> torch.Tensor:
        return self.data_grad(W, self.a) + self.lam * self.n * W + self.b

    def curvature(self, W: torch.Tensor, XW: torch.Tensor | None = None) -> torch.Tensor:
        p = torch.sigmoid(self.X @ W if XW is None else XW)
        return p * (1 - p) * self.a[:, None]

    def hvp(self, W: torch.Tensor | None, V: torch.Tensor, curvature: torch.Tensor | None = None) -> torch.Tensor:
        """H(W) V; pass the ``curvature`` at W to skip recomputing it."""
        s = self.curvature(W) if curvature is None else curvature
        return self.X.T @ (s * (self.X @ V)) + self.lam * self.n * V

    def hessian_factors(self, W: torch.Tensor) -> torch.Tensor:
        """Cholesky factors (columns, d, d) of each column's Hessian at W."""
        s = self.curvature(W)
        eye = self.lam * self.n * torch.eye(W.shape[0], dtype=W.dtype)
        return torch.stack([torch.linalg.cholesky(self.X.T @ (s[:, k : k + 1] * self.X) + eye)
                            for k in range(W.shape[1])])


def newton_solve(obj: Objective, W: torch.Tensor | None = None, tol: float = 1e-9, max_iter: int = 100,
                 progress=None) -> tuple[torch.Tensor, float, int]:
    """Minimise L_b by damped Newton steps to ||grad|| <= tol; return (W, final gradient norm, steps)."""
    W = torch.zeros_like(obj.b) if W is None else W.clone()
    for step in range(max_iter):
        g = obj.grad(W)
        norm = float(g.norm())
        if progress:
            progress(step, norm)
        if norm <= tol:
            return W, norm, step
        L = obj.hessian_factors(W)
        direction = torch.cholesky_solve(g.T.unsqueeze(-1), L).squeeze(-1).T
        loss, t = obj.loss(W), torch.ones(W.shape[1], dtype=W.dtype)
        for _ in range(30):  # backtracking per column (the columns are independent problems)
            trial = W - t * direction
            worse = obj.loss(trial) > loss - 1e-4 * t * (g * direction).sum(0) + 1e-12 * loss.abs()
            if not worse.any():
                break
            t = torch.where(worse, t / 2, t)
        W = W - t * direction
    g = obj.grad(W)
    return W, float(g.norm()), max_iter


def preconditioned_cg(obj: Objective, curvature: torch.Tensor, rhs: torch.Tensor, factors: torch.Tensor,
                      tol: float = 1e-6, max_iter: int = 50) -> tuple[torch.Tensor, int]:
    """Solve H V = rhs column by column (H given by its ``curvature``) with conjugate gradients,
    preconditioned by Cholesky ``factors`` of a nearby Hessian (then a few iterations suffice)."""
    precondition = lambda R: torch.cholesky_solve(R.T.unsqueeze(-1), factors).squeeze(-1).T  # noqa: E731
    V, R = torch.zeros_like(rhs), rhs.clone()
    Z = precondition(R)
    P, rz = Z.clone(), (R * Z).sum(0)
    target = tol * rhs.norm(dim=0)
    for it in range(max_iter):
        if bool((R.norm(dim=0) <= target).all()):
            return V, it
        HP = obj.hvp(None, P, curvature)
        alpha = rz / (P * HP).sum(0).clamp_min(1e-300)
        V, R = V + alpha * P, R - alpha * HP
        Z = precondition(R)
        rz_new = (R * Z).sum(0)
        P, rz = Z + (rz_new / rz.clamp_min(1e-300)) * P, rz_new
    return V, max_iter


@dataclass
class NewtonRemoval:
    """One Newton removal step and its certificate figures (per column and joint)."""

    W: torch.Tensor
    XW: torch.Tensor       # X @ W, kept so the next removal need not recompute it
    bound: float           # joint data-dependent bound spent by this step
    taylor: list[float]    # gamma ||X|| ||v|| ||X'v|| per column
    solve_residual: list[float]  # ||H v - Delta|| per column, measured
    cg_iterations: int


def newton_removal(obj_after: Objective, W: torch.Tensor, removed_rows: np.ndarray, x_norm: float,
                   factors: torch.Tensor, XW: torch.Tensor | None = None) -> NewtonRemoval:
    """The Newton step that removes ``removed_rows`` (universe row indices).

    ``obj_after`` is the objective on the remaining rows; ``x_norm`` an upper bound on the spectral
    norm of the remaining rows' matrix; ``factors`` the preconditioner; ``XW`` = X @ W if known.
    The CG tolerance (1e-6 relative) is cheap to loosen because its residual is measured and spent."""
    rows = torch.from_numpy(np.asarray(removed_rows, dtype=np.int64))
    X_r, Y_r = obj_after.X[rows], obj_after.Y[rows]
    delta = X_r.T @ ((torch.sigmoid(Y_r * (X_r @ W)) - 1) * Y_r) + obj_after.lam * len(rows) * W
    XW = obj_after.X @ W if XW is None else XW
    curvature = obj_after.curvature(W, XW)
    V, iterations = preconditioned_cg(obj_after, curvature, delta, factors)
    XV = obj_after.X @ V
    HV = obj_after.X.T @ (curvature * XV) + obj_after.lam * obj_after.n * V
    residual = (HV - delta).norm(dim=0)  # measured, not taken from the CG recursion
    taylor = GAMMA * x_norm * V.norm(dim=0) * (XV * obj_after.a[:, None]).norm(dim=0)
    bound = float(((taylor + residual) ** 2).sum().sqrt())
    return NewtonRemoval(W + V, XW + XV, bound, taylor.tolist(), residual.tolist(), iterations)


def spectral_norm(X: torch.Tensor, active: np.ndarray) -> float:
    """||X_active||_2, exactly (largest eigenvalue of the d x d Gram matrix)."""
    Xa = X[torch.from_numpy(np.flatnonzero(active))]
    return float(torch.linalg.eigvalsh(Xa.T @ Xa)[-1].clamp_min(0).sqrt()) * (1 + 1e-12)


# ------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class CertifiedConfig:
    lam: float = 1e-3
    sigma: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-4
    on_exhausted: str = "retrain"  # or "refuse"
    tol: float = 1e-9
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ExpungeError(f"certified removal needs an L2-regularised objective: lambda must be > 0, got {self.lam}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ExpungeError(f"sigma (the loss-perturbation noise) must be > 0 for a certificate, got {self.sigma}")
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise ExpungeError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={self.epsilon}, delta={self.delta}")
        if self.on_exhausted not in ("retrain", "refuse"):
            raise ExpungeError(f"on_exhausted must be 'retrain' or 'refuse', got {self.on_exhausted!r}")
        if self.seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {self.seed}")

    @property
    def budget(self) -> float:
        return removal_budget(self.sigma, self.epsilon, self.delta)


class CertifiedRemoval:
    """The certified-removal updater: ``fit`` trains the perturbed linear model into a run."""

    name = "certified"

    def __init__(self, lam: float = 1e-3, sigma: float = 1.0, epsilon: float = 1.0, delta: float = 1e-4,
                 on_exhausted: str = "retrain", tol: float = 1e-9, seed: int = 0):
        self.settings = CertifiedConfig(lam, sigma, epsilon, delta, on_exhausted, tol, seed)

    def config(self) -> dict:
        return asdict(self.settings)

    def fit(self, data: IndexedDataset, recipe=None, out=None, test=None, source=None, progress: bool = False,
            preprocess: dict | None = None, signing_key=None) -> "CertifiedFitted":
        if recipe is not None and getattr(recipe, "model", "logreg") != "logreg":
            raise ExpungeError(f"certified removal needs a linear model, not {recipe.model!r}; for a deep net, train a "
                               "certified linear head on features from a fixed extractor (expunge.unlearn.certified.extract_features)")
        if getattr(recipe, "lr_auto", False):
            raise ExpungeError("certified removal solves its objective exactly and has no learning rate: drop lr_auto")
        return CertifiedFitted.train(data, self.settings, out=out, test=test, source=source, preprocess=preprocess,
                                     signing_key=signing_key)


def check_row_norms(X: np.ndarray, what: str = "training rows") -> None:
    norms = np.linalg.norm(X, axis=1)
    if len(norms) and norms.max() > 1 + ROW_NORM_SLACK:
        raise ExpungeError(
            f"{what} have L2 norms up to {norms.max():.3g}, but the certificate assumes ||x|| <= 1; rescale the features "
            "(e.g. `--l2-normalize`, which divides each row by its norm as Guo et al. do, or divide by the largest norm)"
        )


def extract_features(extractor: torch.nn.Module, data: IndexedDataset, batch_size: int = 1024) -> IndexedDataset:
    """Features of a fixed (frozen) extractor, rows scaled to unit norm: the input of a certified
    linear head on top of a deep net (the paper's DNN option). Ids are kept."""
    extractor.eval()
    outputs = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = torch.from_numpy(data.X[i : i + batch_size]).to(next(extractor.parameters()).dtype)
            outputs.append(extractor(x).reshape(len(x), -1).double())
    F = torch.nn.functional.normalize(torch.cat(outputs), dim=1).numpy()
    return IndexedDataset(F, data.y, data.ids, f"{data.name}-features")


class LinearScores(torch.nn.Module):
    """x -> x W, with a zero score prepended for the negative class of a single binary column."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.W = torch.nn.Parameter(W, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x.to(self.W.dtype) @ self.W
        return torch.cat([torch.zeros_like(scores), scores], 1) if scores.shape[1] == 1 else scores


class CertifiedFitted(TabularRun):
    """A certified linear model bound to its run directory; removals spend the epsilon budget."""

    own_retraining = True  # "retrain" retrains with fresh noise: the certificate starts over, it is kept

    def __init__(self, run, manifest, universe, active, test, W, b, state: dict):
        super().__init__(run, manifest, universe, active, test)
        self.settings = CertifiedConfig(**manifest["method"]["config"])
        self.W, self.b, self.state = W, b, state
        self.X = torch.from_numpy(universe.X).double()
        self.Y = torch.from_numpy(targets(universe.y, self.n_classes))
        self._factors = None
        self._XW = None  # X @ W of the current model, carried from one removal to the next

    # ------------------------------------------------------------------ views

    @property
    def budget_left(self) -> float:
        return self.state["budget"] - self.state["spent"]

    def guarantee(self, state: dict | None = None) -> dict:
        """The certificate's figures: epsilon, delta, the budget, what is spent and what is left."""
        state = self.state if state is None else state
        left = state["budget"] - state["spent"]
        typical = state["typical_bound"]
        return {
            "kind": "certified", "epsilon": self.settings.epsilon, "delta": self.settings.delta,
            "sigma": self.settings.sigma, "lambda": self.settings.lam, "budget": state["budget"],
            "spent": state["spent"], "budget_left": left, "typical_removal_bound": typical,
            "removals_left_estimate": int(max(left, 0) // typical) if typical > 0 else None,
            "removals": state["removals"], "retrains": state["retrains"],
        }

    @property
    def model(self) -> torch.nn.Module:
        """The certified linear model as a ``torch.nn.Module`` giving one score per class."""
        return LinearScores(self.W.clone())

    def current_model_hash(self) -> str:
        return weights_hash(self.W)

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        return weights_hash(load_file(folder / WEIGHTS)["W"])

    def objective(self, active: np.ndarray | None = None, b: torch.Tensor | None = None) -> Objective:
        return Objective(self.X, self.Y, self.active if active is None else active, self.settings.lam,
                         self.b if b is None else b)

    def predict(self, X: np.ndarray, W: torch.Tensor | None = None) -> np.ndarray:
        scores = torch.from_numpy(np.asarray(X, np.float64)) @ (self.W if W is None else W)
        return (scores[:, 0] > 0).long().numpy() if scores.shape[1] == 1 else scores.argmax(1).numpy()

    def accuracy(self, data: IndexedDataset | None = None, W: torch.Tensor | None = None) -> float | None:
        data = self.test if data is None else data
        if data is None or len(data) == 0:
            return None
        return float((self.predict(data.X, W) == data.y).mean())

    # ------------------------------------------------------------------ training

    def _noise(self, draw: int) -> torch.Tensor:
        """The loss-perturbation vector b of the ``draw``-th training (fresh after every retrain)."""
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + draw)
        return self.settings.sigma * torch.randn(self.X.shape[1], self.Y.shape[1], generator=generator,
                                                 dtype=torch.float64)

    @classmethod
    def train(cls, data: IndexedDataset, settings: CertifiedConfig, out=None, test=None, source=None,
              preprocess: dict | None = None, signing_key=None) -> "CertifiedFitted":
        check_row_norms(data.X)
        run, manifest, created, signer = cls._new_run(data, out, test, source,
                                                      {"name": "certified", "config": asdict(settings)}, preprocess,
                                                      signing_key)
        with cls._creating(run, manifest, created, data, test, source):
            active = np.ones(len(data), bool)
            model = cls(run, manifest, data, active, test, None, None, {})
            model._signer = signer
            start = time.perf_counter()
            model.b = model._noise(0)
            W, grad_norm, steps = newton_solve(model.objective(active), tol=settings.tol)
            seconds = time.perf_counter() - start
            model.W = W
            model.state = {"budget": settings.budget, "spent": grad_norm, "removals": 0, "retrains": 0,
                           "noise_draw": 0, "train_grad_norm": grad_norm, "x_norm": spectral_norm(model.X, active),
                           "typical_bound": 0.0}
            model.state["typical_bound"] = model._typical_bound()
            report = UpdateReport("certified", "train", [], seconds, None, weights_hash(W), model.guarantee(),
                                  {"rows": len(data), "test_acc": model.accuracy(), "newton_steps": steps,
                                   "train_grad_norm": grad_norm})
            model._commit_state(report, W, model.b, model.state, data, active)
        return model

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> "CertifiedFitted":
        tensors = load_file(folder / WEIGHTS)
        state = json.loads((folder / STATE).read_text())
        return cls(run, manifest, universe, active, test, tensors["W"], tensors["b"], state)

    # ------------------------------------------------------------------ removal

    def factors(self) -> torch.Tensor:
        """Preconditioner: Cholesky factors of a recent Hessian, cached in the run directory. A cache only:
        one that is missing, fails its checksum or is not a valid factor (lower triangular, finite, positive
        diagonal) is rebuilt here, and any valid factor gives a correct step (the residual is measured)."""
        if self._factors is None:
            try:
                self._factors = self._cached_factors()
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
                self._refresh_factors(self.W, self.active)
        return self._factors

    def _cached_factors(self) -> torch.Tensor:
        with safe_open(self.path / PRECONDITIONER, "pt") as f:
            recorded = (f.metadata() or {}).get("sha256")
            factors = f.get_tensor("factors")
        if recorded != hashlib.sha256(factors.contiguous().numpy().tobytes()).hexdigest():
            raise ValueError("checksum")
        if factors.shape != (self.Y.shape[1], self.X.shape[1], self.X.shape[1]) or factors.dtype != torch.float64:
            raise ValueError("shape")
        diagonal = torch.diagonal(factors, dim1=1, dim2=2)
        if not (torch.isfinite(factors).all() and (diagonal > 0).all() and not torch.triu(factors, 1).any()):
            raise ValueError("not a Cholesky factor")
        return factors

    def _refresh_factors(self, W: torch.Tensor, active: np.ndarray) -> None:
        self._factors = self.objective(active).hessian_factors(W)
        (self.path / "cache").mkdir(exist_ok=True)
        tmp = self.path / "cache" / ".preconditioner.tmp"
        factors = self._factors.contiguous()
        save_file({"factors": factors}, str(tmp), metadata={"sha256": hashlib.sha256(factors.numpy().tobytes()).hexdigest()})
        write_atomic(self.path / PRECONDITIONER, tmp.read_bytes())
        tmp.unlink()

    def _typical_bound(self, sample: int = 8) -> float:
        """The bound one removal of a typical row spends, from a few random rows (not applied)."""
        rows = np.random.default_rng(self.settings.seed).choice(np.flatnonzero(self.active), min(sample, int(self.active.sum()) - 1),
                                                                replace=False)
        bounds = []
        for row in rows:
            after = self.active.copy()
            after[row] = False
            bounds.append(newton_removal(self.objective(after), self.W, [row], self.state["x_norm"], self.factors()).bound)
        return float(np.mean(bounds)) if bounds else 0.0

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        name = getattr(method, "name", method) or "certified"
        if name not in ("certified", "retrain"):
            raise ExpungeError(f"a certified run is updated by the certified Newton step or by retraining, not {name!r}")
        if kind == "add" or universe is not self.universe:
            name = "retrain"  # the certificate covers removals; added rows mean retraining with fresh noise
        start = time.perf_counter()
        metrics: dict = {}
        state = dict(self.state)
        b, retrained = self.b, name == "retrain"
        if not retrained:
            removed = np.flatnonzero(self.active & ~new_active)
            step = newton_removal(self.objective(new_active), self.W, removed, state["x_norm"], self.factors(),
                                  self._XW)
            if state["spent"] + step.bound > state["budget"]:
                if self.settings.on_exhausted == "refuse":
                    raise ExpungeError(
                        f"this removal would spend {step.bound:.3g} of the {self.budget_left:.3g} budget left "
                        f"(epsilon={self.settings.epsilon}, delta={self.settings.delta}); retrain (--method retrain) to "
                        "reset it, or let the run retrain automatically (on_exhausted='retrain')")
                retrained = True
            else:
                W, state["spent"] = step.W, state["spent"] + step.bound
                state["removals"] += 1
                metrics.update(removal_bound=step.bound, taylor=step.taylor, solve_residual=step.solve_residual,
                               cg_iterations=step.cg_iterations)
                if step.cg_iterations > 8:  # the preconditioner went stale: rebuild it at the new point
                    self._refresh_factors(W, new_active)
        X, Y = self.X, self.Y
        if universe is not self.universe:
            check_row_norms(universe.X[len(self.universe):], "added rows")
            X, Y = torch.from_numpy(universe.X).double(), torch.from_numpy(targets(universe.y, self.n_classes))
        if retrained:
            state["noise_draw"] += 1
            b = self._noise(state["noise_draw"])
            W, grad_norm, _ = newton_solve(Objective(X, Y, new_active, self.settings.lam, b), tol=self.settings.tol)
            state.update(spent=grad_norm, retrains=state["retrains"] + 1, train_grad_norm=grad_norm,
                         x_norm=spectral_norm(X, new_active))
        after = Objective(X, Y, new_active, self.settings.lam, b)
        seconds = time.perf_counter() - start
        metrics.update(rows=int(new_active.sum()), test_acc=self.accuracy(W=W),
                       residual_norm=float(after.grad(W).norm()),
                       worst_case_bound=worst_case_bound(self.settings.lam, int(new_active.sum()), len(ids), self.Y.shape[1]),
                       dist_to_previous=float((W - self.W).norm()))
        if compare and not retrained:
            t0 = time.perf_counter()
            W_ref, _, _ = newton_solve(after, tol=self.settings.tol)
            metrics.update(retrain_s=time.perf_counter() - t0, dist_to_retrain=float((W - W_ref).norm()),
                           dist_previous_to_retrain=float((self.W - W_ref).norm()), acc_retrain=self.accuracy(W=W_ref))
            metrics["speedup"] = metrics["retrain_s"] / seconds
        report = UpdateReport("retrain" if retrained else "certified", kind, ids.tolist(), seconds,
                              weights_hash(self.W), weights_hash(W), {}, metrics)
        self._commit_state(report, W, b, state, universe, new_active, retrained,
                           None if retrained else step.XW)
        if retrained:
            self._refresh_factors(W, new_active)
        return report

    def _commit_state(self, report: UpdateReport, W, b, state, universe, active, retrained: bool = False,
                      step_XW: torch.Tensor | None = None) -> None:
        """Stage weights, noise and budget state, commit them, and only then take them in memory."""
        report.guarantee = self.guarantee(state) | {"retrained": retrained}
        grew = universe is not self.universe

        def adopt(folder: Path) -> None:
            if grew:
                self.X = torch.from_numpy(universe.X).double()
                self.Y = torch.from_numpy(targets(universe.y, self.n_classes))
            self.W, self.b, self.state, self._XW = W, b, state, step_XW

        with self.run.staging() as stage:
            save_file({"W": W.contiguous(), "b": b.contiguous()}, str(stage / WEIGHTS))
            (stage / STATE).write_text(json.dumps(state, indent=2))
            self._commit(stage, report, universe, active, adopt)
