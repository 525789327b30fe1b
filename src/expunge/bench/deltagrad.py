"""DeltaGrad on MNIST against exact retraining, the setting of the reference code's README.

Regularised multinomial logistic regression, batch 16384, 20 epochs, weight decay 1e-4, lr 0.1 for
10 epochs then 0.05, float64; DeltaGrad T0=5, j0=20, m=2. Rows: deletion of 0.1% and 1%, addition
of 0.1%, and a T0 sweep at 0.1% deletion. Retraining and DeltaGrad run alternately in the same
process, both computing only the weights (neither writes a trajectory); each round times one of each, and
rounds are added until the speedup (retrain seconds / DeltaGrad seconds in the same round) is stable
(rounds.py: its IQR across rounds under 5% of its median, 5 to 25 rounds, at most ~5 minutes a case past
the first 5). The row reports the median speedup with its IQR, min and max, and the median seconds of each.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import report
from .rounds import SPREAD_HEADER, RoundRule, Rounds, error_bars, rounds_text, spread_text
from ..data import load_dataset
from ..errors import ExpungeError
from ..models import FlatModel, build_model
from ..recipe import BatchPlan, TrainRecipe
from ..train import Workspace, train
from ..trajectory import Trajectory
from ..unlearn.deltagrad import DeltaGradConfig, deltagrad

RECIPE = TrainRecipe(model="logreg", epochs=20, batch_size=16384, lr=0.1, lr_steps=((10, 0.05),),
                     weight_decay=1e-4, dtype="float64", seed=0)
# (model, task, ratio, T0): the reference setting, the T0 sweep, and the MLP through the same path
CASES = [("logreg", "delete", 0.001, 5), ("logreg", "delete", 0.01, 5), ("logreg", "add", 0.001, 5),
         ("logreg", "delete", 0.001, 10), ("logreg", "delete", 0.001, 20), ("mlp", "delete", 0.001, 5)]


def _mnist(data_dir: Path):
    path = data_dir / "mnist" / "mnist.npz"
    if not path.exists():
        raise ExpungeError(f"{path} not found; pass --data pointing at the shared data folder (it holds mnist/mnist.npz)")
    return load_dataset(str(path))


def _accuracy(flat: FlatModel, w: torch.Tensor, X: torch.Tensor, y: np.ndarray) -> float:
    return float((flat.predict(w, X).numpy() == y).mean())


def run(data_dir, repeats: int | None = None, limit: int | None = None, j0: int = 20, m: int = 2,
        progress: bool = True, cases=CASES, console=None) -> list[dict]:
    """Measure every case; ``repeats`` fixes the rounds per case (None: until the speedup is stable);
    ``limit`` trains on the first rows only (for smoke tests)."""
    rule = RoundRule.for_repeats(repeats)
    train_set, test_set = _mnist(Path(data_dir))
    if limit:
        train_set = train_set.take(np.arange(min(limit, len(train_set))))
    n = len(train_set)
    X, y = torch.from_numpy(train_set.X).double(), torch.from_numpy(train_set.y)
    X_test = torch.from_numpy(test_set.X).double()
    rng = np.random.default_rng(0)
    rows, cached = [], {}
    with tempfile.TemporaryDirectory(prefix="expunge-bench-") as tmp:
        for model, task, ratio, T0 in cases:
            recipe = TrainRecipe.from_dict({**RECIPE.to_dict(), "model": model, "hidden": [64],
                                            "batch_size": RECIPE.batch_size if not limit else max(64, n // 4)})
            flat = FlatModel(build_model(recipe, train_set.n_features, 10))
            plan = BatchPlan.for_recipe(recipe, n)
            ws = Workspace(flat, recipe, plan, X, y, train_set.ids)
            w0 = flat.get_flat()
            key = (model, task, ratio)
            if key not in cached:
                changed = rng.choice(n, max(1, int(round(ratio * n))), replace=False)
                partial = np.ones(n, bool)
                partial[changed] = False
                old_active, new_active = (np.ones(n, bool), partial) if task == "delete" else (partial, np.ones(n, bool))
                # the model before the request, its trajectory on disk (memory-mapped, as a run keeps it)
                traj = Trajectory.create(Path(tmp) / "-".join(map(str, key)), plan.n_iterations, flat.n_params, flat.dtype)
                w_before = train(ws, old_active, w0, traj, progress=progress)
                traj.flush()
                cached[key] = (old_active, new_active, w_before, Trajectory.open(traj.folder))
            old_active, new_active, w_before, trajectory = cached[key]
            config = DeltaGradConfig(T0=T0, j0=j0, m=m)
            retrain_s, deltagrad_s = [], []
            rounds = Rounds(rule)
            while rounds.more():
                start = time.perf_counter()
                w_retrain = train(ws, new_active, w0)
                retrain_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                w_dg, figures = deltagrad(ws, old_active, new_active, trajectory, config)
                deltagrad_s.append(time.perf_counter() - start)
                rounds.add(speedup=retrain_s[-1] / deltagrad_s[-1])
            if progress and console is not None:
                console.print(f"{model} {task} {ratio:g} T0={T0}: speedup {rounds.median('speedup'):.2f} over "
                              f"{rounds.count} rounds ({rounds.stop})", highlight=False)
            rows.append({
                "model": model, "task": task, "ratio": ratio, "T0": T0, "j0": j0, "m": m,
                "retrain_s": statistics.median(retrain_s), "deltagrad_s": statistics.median(deltagrad_s),
                **rounds.fields(), "speedup_bound": figures["speedup_bound"],
                "dist_full_retrain": float((w_before - w_retrain).norm()),
                "dist_deltagrad_retrain": float((w_dg - w_retrain).norm()),
                "acc_retrain": _accuracy(flat, w_retrain, X_test, test_set.y),
                "acc_deltagrad": _accuracy(flat, w_dg, X_test, test_set.y),
                "iterations": figures["iterations"], "explicit_iterations": figures["explicit_iterations"],
                "rows": n,
            })
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="DeltaGrad vs retraining on MNIST (interleaved rounds in one process; median speedup over "
                    "rounds, its min-max and IQR)")
    for col in ("model", "task", "ratio", "T0", "retrain s", "DeltaGrad s", "speedup", SPREAD_HEADER, "rounds", "bound",
                "speedup/bound", "|w-w_re|", "|w_dg-w_re|", "dist ratio", "acc re", "acc dg"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["model"], r["task"], f"{r['ratio']:g}", str(r["T0"]), f"{r['retrain_s']:.3f}", f"{r['deltagrad_s']:.3f}",
                  f"{r['speedup']:.2f}", spread_text(r, "speedup"), rounds_text(r), f"{r['speedup_bound']:.2f}",
                  f"{r['speedup'] / r['speedup_bound']:.2f}",
                  f"{r['dist_full_retrain']:.2e}", f"{r['dist_deltagrad_retrain']:.2e}",
                  f"{r['dist_deltagrad_retrain'] / r['dist_full_retrain']:.4f}",
                  f"{100 * r['acc_retrain']:.2f}", f"{100 * r['acc_deltagrad']:.2f}")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['task']} {r['ratio']:g}\nT0={r['T0']}" for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(x - 0.2, [r["speedup"] for r in rows], 0.4, yerr=error_bars(rows, "speedup"), capsize=3,
             label="measured speedup (median, min-max over rounds)")
    left.bar(x + 0.2, [r["speedup_bound"] for r in rows], 0.4, label="bound (iterations / explicit)")
    left.set_xticks(x, labels, fontsize=8)
    left.set_ylabel("retrain seconds / DeltaGrad seconds")
    left.legend()
    right.bar(x - 0.2, [r["dist_full_retrain"] for r in rows], 0.4, label="||w_full - w_retrain||")
    right.bar(x + 0.2, [r["dist_deltagrad_retrain"] for r in rows], 0.4, label="||w_deltagrad - w_retrain||")
    right.set_yscale("log")
    right.set_xticks(x, labels, fontsize=8)
    right.legend()
    fig.suptitle("DeltaGrad vs retraining on MNIST (batch 16384, 20 epochs, float64)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    rows = run(data_dir, repeats=repeats, limit=limit, progress=progress, console=console)
    return report(rows, json_out, table, plot, console, settings={"rounds": RoundRule.for_repeats(repeats).describe()})
