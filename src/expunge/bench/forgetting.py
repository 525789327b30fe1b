"""Fisher forgetting and its baselines against retraining, scored by the evaluation suite.

MNIST and Fashion-MNIST (all 60,000 training rows, full test sets), an MLP and the
small CNN of the zoo, class removal (class 0) and 1% random removal; Location (MLP trained long
enough to overfit, which is what makes membership inference work there) with 1% random removal.
Methods: original, retrain (same recipe and batch plan), fine-tune (1 epoch on the remaining rows),
gradient ascent (1 epoch on the forgotten rows at 1/100 of the training rate: faster diverges), Fisher
scrubbing (lam = 1e-9). Membership inference: the
loss-threshold attack separates the forget rows from held-out test rows (of the removed class for
class removal); on Location also offline LiRA with 8 shadow models.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from . import report
from .. import evaluate as ev
from ..data import IndexedDataset, load_dataset
from ..errors import ExpungeError
from ..models import FlatModel, build_model
from ..recipe import BatchPlan, TrainRecipe
from ..train import Workspace, train
from ..unlearn.baselines import FineTune, GradientAscent
from ..unlearn.fisher import Fisher, diag_fisher

FASHION = Path("/usr/share/datasets/fashion-mnist")
RECIPES = {
    "mlp": TrainRecipe(model="mlp", hidden=(128,), epochs=5, batch_size=128, lr=0.1, weight_decay=5e-4, dtype="float32"),
    "cnn": TrainRecipe(model="cnn", epochs=3, batch_size=128, lr=0.05, weight_decay=5e-4, dtype="float32"),
    "location-mlp": TrainRecipe(model="mlp", hidden=(128,), epochs=60, batch_size=64, lr=0.1, weight_decay=1e-5,
                                dtype="float32"),
}
FISHER_LAM = {"mlp": 1e-9, "cnn": 1e-9, "location-mlp": 1e-9}


def _module(flat: FlatModel, w: torch.Tensor) -> torch.nn.Module:
    return copy.deepcopy(flat.set_flat(w)).eval()


def _workspace(data: IndexedDataset, recipe: TrainRecipe, n_classes: int) -> Workspace:
    flat = FlatModel(build_model(recipe, data.n_features, n_classes))
    return Workspace(flat, recipe, BatchPlan.for_recipe(recipe, len(data)), torch.from_numpy(data.X),
                     torch.from_numpy(data.y), data.ids)


def run_case(dataset: str, model: str, removal: str, train_set: IndexedDataset, test: IndexedDataset,
             shadows: int = 0, seed: int = 0) -> list[dict]:
    recipe = RECIPES[model]
    n_classes = int(max(train_set.y.max(), test.y.max())) + 1
    ws = _workspace(train_set, recipe, n_classes)
    w0 = ws.flat.get_flat()
    full = np.ones(len(train_set), bool)
    if removal == "class":
        forget_rows = np.flatnonzero(train_set.y == 0)
        heldout, scored_test = test.take(np.flatnonzero(test.y == 0)), test.take(np.flatnonzero(test.y != 0))
    else:
        forget_rows = np.sort(np.random.default_rng(seed).choice(len(train_set), len(train_set) // 100, replace=False))
        heldout, scored_test = test, test
    remaining = full.copy()
    remaining[forget_rows] = False
    forget, retain = train_set.take(forget_rows), train_set.take(np.flatnonzero(remaining))

    start = time.perf_counter()
    w_original = train(ws, full, w0)
    timings = {"original": time.perf_counter() - start}
    start = time.perf_counter()
    w_retrain = train(ws, remaining, w0)
    timings["retrain"] = time.perf_counter() - start
    weights = {"original": w_original, "retrain": w_retrain}
    diag_fisher(ws, w_original, forget_rows[:2])  # trace the per-sample gradient code once, outside the timings
    for name, method in (("finetune", FineTune(epochs=1)), ("ascent", GradientAscent(epochs=1, lr=recipe.lr / 100)),
                         ("fisher", Fisher(lam=FISHER_LAM[model], seed=seed))):
        start = time.perf_counter()
        weights[name], _ = method.update(ws, full, remaining, w0, None, None, w=w_original)
        timings[name] = time.perf_counter() - start
    modules = {name: _module(ws.flat, w) for name, w in weights.items()}
    shadow_models = []
    if shadows:  # offline LiRA: shadow models on random halves of the retained rows (never the targets)
        rng = np.random.default_rng(seed + 1)
        retained = np.flatnonzero(remaining)
        for _ in range(shadows):
            half = np.zeros(len(train_set), bool)
            half[rng.choice(retained, len(retained) // 2, replace=False)] = True
            shadow_models.append(_module(ws.flat, train(ws, half, w0)))
    rows = []
    for name, module in modules.items():
        figures = ev.evaluate(module, forget, retain, scored_test, reference=modules["retrain"],
                              original=modules["original"], shadows=shadow_models or None, heldout=heldout)
        figures = {k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in figures.items()}
        rows.append({"dataset": dataset, "model": model, "removal": removal, "method": name,
                     "forget_acc": figures["forget_acc"], "retain_acc": figures["retain_acc"],
                     "test_acc": figures["test_acc"], "kl_to_retrain": figures["kl_to_retrain"],
                     "mia_auc": figures["mia_auc"], "lira_auc": figures.get("lira_auc"),
                     "relearn_steps": figures["relearn_steps"], "seconds": timings[name],
                     "param_dist_to_retrain": figures["param_dist_to_retrain"], "rows": len(train_set)})
    return rows


def run(data_dir, limit: int | None = None, progress: bool = True, console=None) -> list[dict]:
    data_dir = Path(data_dir)
    mnist = data_dir / "mnist" / "mnist.npz"
    if not mnist.exists():
        raise ExpungeError(f"{mnist} not found; pass --data pointing at the shared data folder")
    sources = {"mnist": str(mnist)}
    if FASHION.exists():
        sources["fashion-mnist"] = str(FASHION)
    elif console is not None:
        console.print(f"Fashion-MNIST not found at {FASHION} (apt-get install dataset-fashion-mnist); skipped")
    n = limit or 60000
    rows = []
    for dataset, spec in sources.items():
        train_set, test = load_dataset(spec)
        train_set = train_set.take(np.arange(min(n, len(train_set))))
        for model in ("mlp", "cnn"):
            for removal in ("class", "random"):
                rows += run_case(dataset, model, removal, train_set, test)
                if progress and console is not None:
                    console.print(f"{dataset} {model} {removal}: done", highlight=False)
    location = data_dir / "location" / "bangkok"
    if location.exists():
        train_set, test = load_dataset(str(location))
        if limit:
            train_set = train_set.take(np.arange(min(limit, len(train_set))))
        rows += run_case("location", "location-mlp", "random", train_set, test, shadows=8)
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="Forgetting: every method scored against retraining")
    for col in ("dataset", "model", "removal", "method", "forget acc", "retain acc", "test acc", "KL to retrain",
                "MIA AUC", "LiRA AUC", "relearn", "seconds"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["dataset"], r["model"], r["removal"], r["method"], f"{100 * r['forget_acc']:.1f}",
                  f"{100 * r['retain_acc']:.1f}", f"{100 * r['test_acc']:.1f}", "-" if r["kl_to_retrain"] is None else f"{r['kl_to_retrain']:.3f}",
                  f"{r['mia_auc']:.3f}", "-" if r["lira_auc"] is None else f"{r['lira_auc']:.3f}",
                  str(r["relearn_steps"]), f"{r['seconds']:.2f}")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["dataset"], r["model"], r["removal"]) for r in rows})
    methods = ["original", "retrain", "finetune", "ascent", "fisher"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(cases))
    for i, method in enumerate(methods):
        pick = {(r["dataset"], r["model"], r["removal"]): r for r in rows if r["method"] == method}
        axes[0].bar(x + i * 0.16, [100 * pick[c]["forget_acc"] for c in cases], 0.16, label=method)
        axes[1].bar(x + i * 0.16, [100 * pick[c]["test_acc"] for c in cases], 0.16, label=method)
    for ax, title in zip(axes, ("forget-set accuracy (%)", "test accuracy (%)")):
        ax.set_xticks(x + 0.32, ["\n".join(c) for c in cases], fontsize=7)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(data_dir, json_out, repeats: int = 3, limit: int | None = None, progress: bool = True, console=None) -> list[dict]:
    rows = run(data_dir, limit=limit, progress=progress, console=console)
    return report(rows, json_out, table, plot, console)
