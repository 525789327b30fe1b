"""SISA on MNIST (MLP) and Location (MLP): accuracy and deletion cost against the number of shards.

For S in {1, 5, 10, 20} and R in {1, 5}: train the ensemble, then serve a stream of 100 single-row
deletion requests (random rows): the rows reprocessed are counted over the whole stream. Seconds are
measured in rounds, each one deletion per slice (a row in slice r retrains stages r..R-1 of its shard; a
random row of the stream lies in each slice with probability 1/R, so a round's mean is the stream's
expected cost per request, without the slice lottery in the spread) and one full retraining of one model on
all the data (the S=1, R=1 recipe), in the same process. Rounds are added until the speedup (retrain
seconds / mean deletion seconds in the same round) is stable (rounds.py: IQR under 5% of the median, 5 to
25 rounds, at most ~1 minute a configuration past the first 5). Shards train single-threaded, in the local
backend (one process per core for the initial training, in-process for a one-shard deletion).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import report
from .rounds import SPREAD_HEADER, RoundRule, Rounds, error_bars, rounds_text, spread_text
from ..data import load_dataset
from ..errors import ExpungeError
from ..recipe import TrainRecipe
from ..unlearn.sisa import SISA, SISAConfig, ShardJob, run_jobs, stage_epochs

SHARDS = (1, 5, 10, 20)
SLICES = (1, 5)
RECIPES = {
    "mnist": TrainRecipe(model="mlp", hidden=(64,), epochs=4, batch_size=128, lr=1e-3, optimizer="Adam",
                         weight_decay=0.0, dtype="float32"),
    "location": TrainRecipe(model="mlp", hidden=(128,), epochs=20, batch_size=64, lr=1e-3, optimizer="Adam",
                            weight_decay=0.0, dtype="float32"),
}
TIME_CAP_S = 60.0  # per configuration, past the floor of rounds


def round_rule(repeats: int | None) -> RoundRule:
    return RoundRule.for_repeats(repeats, time_cap_s=TIME_CAP_S)


def datasets(data_dir: Path, limit: int | None):
    mnist, location = data_dir / "mnist" / "mnist.npz", data_dir / "location" / "bangkok"
    for path in (mnist, location):
        if not path.exists():
            raise ExpungeError(f"{path} not found; pass --data pointing at the shared data folder")
    out = {"mnist": load_dataset(str(mnist)), "location": load_dataset(str(location))}
    if limit:
        out = {k: (tr.take(np.arange(min(limit, len(tr)))), te) for k, (tr, te) in out.items()}
    return out


def full_retrain_seconds(train, recipe: TrainRecipe) -> float:
    """One model on all the rows: SISA with one shard and one slice, trained in this process."""
    job = ShardJob(0, 0, 1, recipe.to_dict(), train.n_features, int(train.y.max()) + 1, train.X, train.y,
                   np.zeros(len(train), np.int64), None)
    start = time.perf_counter()
    run_jobs([job], SISAConfig(shards=1, slices=1, workers=1))
    return time.perf_counter() - start


def run_config(name, train, test, shards, slices, requests=100, repeats: int | None = None, seed=0) -> dict:
    recipe = RECIPES[name]
    with tempfile.TemporaryDirectory(prefix="expunge-sisa-") as tmp:
        start = time.perf_counter()
        fitted = SISA(shards=shards, slices=slices).fit(train, recipe, out=Path(tmp) / "run", test=test)
        train_s = time.perf_counter() - start
        acc = fitted.accuracy()
        stream = np.random.default_rng(seed).choice(train.ids, requests, replace=False)
        # rows reprocessed by each request of the stream: the affected shard from the affected slice on
        epochs = stage_epochs(recipe, slices)
        active = fitted.active.copy()
        reprocessed = []
        for row in fitted.universe.rows_of(stream):
            active[row] = False
            s, r = fitted.shard[row], fitted.slice[row]
            in_shard = active & (fitted.shard == s)
            reprocessed.append(sum(int((in_shard & (fitted.slice <= k)).sum()) * epochs for k in range(r, slices)))
        # seconds: rounds of one deletion per slice (random rows, random shards) and one full retraining
        rng = np.random.default_rng(seed + 1)
        alive = fitted.active.copy()
        delete_s, retrain_s = [], []
        rounds = Rounds(round_rule(repeats))
        while rounds.more():
            seconds = []
            for k in range(slices):
                row = rng.choice(np.flatnonzero(alive & (fitted.slice == k)))
                alive[row] = False
                seconds.append(fitted.forget([fitted.universe.ids[row]]).seconds)
            delete_s.append(statistics.mean(seconds))
            retrain_s.append(full_retrain_seconds(train, recipe))
            rounds.add(speedup=retrain_s[-1] / delete_s[-1])
        full_rows = len(train) * recipe.epochs
    return {"dataset": name, "shards": shards, "slices": slices, "test_acc": acc,
            "delete_s": statistics.median(delete_s), "retrain_s": statistics.median(retrain_s), **rounds.fields(),
            "rows_reprocessed": float(np.mean(reprocessed)), "rows_full_retrain": full_rows,
            "rows_speedup": full_rows / float(np.mean(reprocessed)), "train_s": train_s, "requests": requests,
            "deletions_timed": rounds.count * slices, "rows": len(train)}


def run(data_dir, repeats: int | None = None, limit: int | None = None, progress: bool = True,
        console=None) -> list[dict]:
    rows = []
    for name, (train, test) in datasets(Path(data_dir), limit).items():
        for slices in SLICES:
            for shards in SHARDS:
                row = run_config(name, train, test, shards, slices, repeats=repeats)
                rows.append(row)
                if progress and console is not None:
                    console.print(f"{name} S={shards} R={slices}: acc {row['test_acc']:.4f}, "
                                  f"{row['delete_s']:.3f} s per deletion, {row['speedup']:.1f}x over {row['rounds']} "
                                  f"rounds ({row['rounds_stop']})", highlight=False)
    return rows


def table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="SISA: single-row deletions against full retraining (seconds: median over interleaved rounds; "
                    "speedup: median over rounds, its min-max and IQR; rows: mean over a stream of requests)")
    for col in ("dataset", "S", "R", "test acc", "delete s", "retrain s", "speedup", SPREAD_HEADER, "rounds",
                "rows reprocessed", "rows full", "rows speedup"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["dataset"], str(r["shards"]), str(r["slices"]), f"{100 * r['test_acc']:.2f}", f"{r['delete_s']:.3f}",
                  f"{r['retrain_s']:.3f}", f"{r['speedup']:.1f}", spread_text(r, "speedup", ".1f"), rounds_text(r),
                  f"{r['rows_reprocessed']:.0f}",
                  str(r["rows_full_retrain"]), f"{r['rows_speedup']:.1f}")
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7), squeeze=False)
    for col, name in enumerate(names):
        for slices in SLICES:
            pts = [r for r in rows if r["dataset"] == name and r["slices"] == slices]
            S = [r["shards"] for r in pts]
            axes[0][col].plot(S, [100 * r["test_acc"] for r in pts], "o-", label=f"R={slices}")
            axes[1][col].errorbar(S, [r["speedup"] for r in pts], yerr=error_bars(pts, "speedup"), fmt="o-", capsize=3,
                                  label=f"R={slices}, seconds (min-max over rounds)")
            axes[1][col].plot(S, [r["rows_speedup"] for r in pts], "x--", label=f"R={slices}, rows")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("test accuracy (%)")
        axes[1][col].set_ylabel("speedup over full retraining")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("shards S")
            ax.legend(fontsize=8)
    fig.suptitle("SISA: accuracy and deletion speedup against the number of shards")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(data_dir, json_out, repeats: int | None = None, limit: int | None = None, progress: bool = True,
         console=None) -> list[dict]:
    rows = run(data_dir, repeats=repeats, limit=limit, progress=progress, console=console)
    return report(rows, json_out, table, plot, console, settings={"rounds": round_rule(repeats).describe()})
