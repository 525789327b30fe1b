"""Certified removal on MNIST: supported removals against test accuracy over a (lambda, sigma) grid.

Tasks: 3 vs 8 (all 11,982 training rows) and 10 classes one-vs-rest (the first 12,000 training
rows, to keep ten Newton solves per retraining within a 2-core budget). Rows are scaled to unit L2
norm, as the certificate assumes. epsilon = 1, delta = 1e-4. For each setting: train to high
precision, then remove random rows one at a time with the Newton step until the accumulated bound
would exceed the budget (at most ``max_removals`` are performed; past that the count is
extrapolated from the mean bound, and the row says so). Speed, for the settings that support a removal:
rounds in one process, each removing one random row from the trained model with the Newton step (X @ W
cached, as a run keeps it) and retraining without that row (Newton's method from zero to the same
tolerance); rounds are added until the speedup (retrain seconds / removal seconds in the same round) is
stable (rounds.py: IQR under 5% of the median, 5 to 25 rounds, at most ~2 minutes a setting past the first
5). The row reports the median speedup with its IQR, min and max, and the median seconds of each.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import report
from .rounds import SPREAD_HEADER, RoundRule, Rounds, rounds_text, spread_text
from ..data import IndexedDataset
from ..errors import ExpungeError
from ..unlearn.certified import (Objective, newton_removal, newton_solve, removal_budget, spectral_norm,
                                 targets)
from .deltagrad import _mnist

EPSILON, DELTA = 1.0, 1e-4
LAMBDAS = (1e-4, 1e-3, 1e-2)
SIGMAS = (0.1, 1.0, 10.0)
TIME_CAP_S = 120.0  # per setting, past the floor of rounds: ten-class retraining takes ~15 s a round


def round_rule(repeats: int | None) -> RoundRule:
    return RoundRule.for_repeats(repeats, time_cap_s=TIME_CAP_S)


def _unit_rows(ds: IndexedDataset) -> IndexedDataset:
    norms = np.linalg.norm(ds.X, axis=1, keepdims=True)
    return IndexedDataset(ds.X / np.maximum(norms, 1e-12), ds.y, ds.ids, ds.name)


def tasks(data_dir: Path, limit: int | None = None) -> dict:
    train, test = _mnist(data_dir)
    train, test = _unit_rows(train), _unit_rows(test)
    pick = lambda ds: np.flatnonzero((ds.y == 3) | (ds.y == 8))  # noqa: E731
    binary = {}
    for name, ds in (("train", train), ("test", test)):
        rows = pick(ds)
        binary[name] = IndexedDataset(ds.X[rows], (ds.y[rows] == 8).astype(np.int64), ds.ids[rows], "mnist-3v8")
    n10 = limit or 12000
    multi = {"train": train.take(np.arange(min(n10, len(train)))), "test": test}
    if limit:
        binary["train"] = binary["train"].take(np.arange(min(limit, len(binary["train"]))))
    return {"mnist-3v8": (binary["train"], binary["test"], 2), "mnist-10": (multi["train"], multi["test"], 10)}


def _accuracy(W: torch.Tensor, test: IndexedDataset) -> float:
    scores = torch.from_numpy(test.X).double() @ W
    pred = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)
    return float((pred.numpy() == test.y).mean())


def run_setting(train: IndexedDataset, test: IndexedDataset, n_classes: int, lam: float, sigma: float,
                max_removals: int = 100, repeats: int | None = None, seed: int = 0) -> dict:
    X = torch.from_numpy(train.X).double()
    Y = torch.from_numpy(targets(train.y, n_classes))
    b = sigma * torch.randn(X.shape[1], Y.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full = np.ones(len(train), bool)
    obj = Objective(X, Y, full, lam, b)
    W0, grad_norm, _ = newton_solve(obj)
    factors = obj.hessian_factors(W0)
    x_norm = spectral_norm(X, full)
    budget = removal_budget(sigma, EPSILON, DELTA)
    order = np.random.default_rng(seed).permutation(len(train))

    # the budget: remove rows one at a time while the accumulated bound fits
    spent, bounds, W, active, XW = grad_norm, [], W0, full, None
    for row in order[:max_removals]:
        after = active.copy()
        after[row] = False
        step = newton_removal(Objective(X, Y, after, lam, b), W, [row], x_norm, factors, XW)
        if spent + step.bound > budget:
            break
        spent += step.bound
        bounds.append(step.bound)
        W, active, XW = step.W, after, step.XW
    performed = len(bounds)
    exhausted = performed < min(max_removals, len(order))
    if not exhausted and bounds:
        supported = performed + int((budget - spent) // float(np.mean(bounds)))
    else:
        supported = performed
    residual = float(Objective(X, Y, active, lam, b).grad(W).norm())

    # the speed: rounds of (one removal from the trained model, retraining without that row)
    removal_s, retrain_s, first = [], [], None
    rounds = Rounds(round_rule(repeats))
    if performed:
        XW0 = X @ W0
        while rounds.more():
            row = order[rounds.count % len(order)]
            after = full.copy()
            after[row] = False
            obj_after = Objective(X, Y, after, lam, b)
            start = time.perf_counter()
            step = newton_removal(obj_after, W0, [row], x_norm, factors, XW0)
            removal_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            W_retrain, _, _ = newton_solve(obj_after)
            retrain_s.append(time.perf_counter() - start)
            rounds.add(speedup=retrain_s[-1] / removal_s[-1])
            if first is None:
                first = {"dist_newton_retrain": float((step.W - W_retrain).norm()),
                         "dist_before_retrain": float((W0 - W_retrain).norm())}
        timing = rounds.fields()
    else:  # not even one removal fits: every request retrains; time retraining once, for the record
        start = time.perf_counter()
        newton_solve(obj)
        retrain_s.append(time.perf_counter() - start)
        timing = {"speedup": None, "rounds": 0, "rounds_stop": None}
    return {
        "lambda": lam, "sigma": sigma, "epsilon": EPSILON, "delta": DELTA, "budget": budget,
        "test_acc": _accuracy(W, test), "removals_supported": supported, "removals_performed": performed,
        "extrapolated": not exhausted and performed > 0,
        "removal_s": statistics.median(removal_s) if removal_s else None,
        "retrain_s": statistics.median(retrain_s), **timing,
        "residual_norm": residual, "residual_bound": spent, "train_grad_norm": grad_norm,
        **(first or {"dist_newton_retrain": None, "dist_before_retrain": None}),
        "rows": len(train),
    }


def run(data_dir, repeats: int | None = None, limit: int | None = None, max_removals: int = 100, progress: bool = True,
        console=None) -> list[dict]:
    rows = []
    for task, (train, test, n_classes) in tasks(Path(data_dir), limit).items():
        for lam in LAMBDAS:
            for sigma in SIGMAS:
                row = {"task": task, **run_setting(train, test, n_classes, lam, sigma, max_removals, repeats)}
                rows.append(row)
                if progress and console is not None:
                    speed = "" if row["speedup"] is None else \
                        f", speedup {row['speedup']:.1f} over {row['rounds']} rounds ({row['rounds_stop']})"
                    console.print(f"{task} lambda={lam:g} sigma={sigma:g}: acc {row['test_acc']:.4f}, "
                                  f"{row['removals_supported']} removals{speed}", highlight=False)
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title=f"Certified removal on MNIST (epsilon={EPSILON:g}, delta={DELTA:g})")
    for col in ("task", "lambda", "sigma", "test acc", "removals", "removal s", "retrain s", "speedup", SPREAD_HEADER,
                "rounds", "residual", "bound", "|w-w_re| newton", "|w-w_re| before"):
        t.add_column(col, justify="right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        t.add_row(r["task"], f"{r['lambda']:g}", f"{r['sigma']:g}", f"{100 * r['test_acc']:.2f}",
                  f"{r['removals_supported']}{'*' if r['extrapolated'] else ''}", fmt(r["removal_s"], ".4f"),
                  f"{r['retrain_s']:.3f}", fmt(r["speedup"], ".1f"), spread_text(r, "speedup", ".1f"),
                  rounds_text(r) if r["speedup"] is not None else "-", f"{r['residual_norm']:.2e}",
                  f"{r['residual_bound']:.2e}", fmt(r["dist_newton_retrain"], ".2e"), fmt(r["dist_before_retrain"], ".2e"))
    t.caption = ("* extrapolated from the mean bound of the removals performed; speedup: median over rounds of "
                 "(one removal, one retraining), with its min-max and IQR")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks_ = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks_), figsize=(5.5 * len(tasks_), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks_):
        for lam in LAMBDAS:
            pts = sorted((r["removals_supported"], r["test_acc"], r["sigma"]) for r in rows
                         if r["task"] == task and r["lambda"] == lam)
            xs = [max(p[0], 0.8) for p in pts]
            ax.plot(xs, [100 * p[1] for p in pts], "o-", label=f"lambda={lam:g}")
            for x, p in zip(xs, pts):
                ax.annotate(f"σ={p[2]:g}", (x, 100 * p[1]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("supported removals before retraining")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.suptitle(f"Certified removal: accuracy vs supported removals (epsilon={EPSILON:g}, delta={DELTA:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True, console=None) -> list[dict]:
    if not (Path(data_dir) / "mnist" / "mnist.npz").exists():
        raise ExpungeError(f"{Path(data_dir) / 'mnist' / 'mnist.npz'} not found; pass --data pointing at the shared data folder")
    rows = run(data_dir, repeats=repeats, limit=limit, progress=progress, console=console)
    return report(rows, json_out, table, plot, console, settings={"rounds": round_rule(repeats).describe()})
