"""End-to-end on real MNIST: every DP optimizer of the benchmark trains, tunes and reports its row.

Accuracy at the benchmark's scale is in benchmarks/results/dp-optimizers.json; here a short run on a
subset checks the pipeline and that each method learns something at a generous epsilon."""

import math

import pytest

from expunge.bench import dp_optimizers as bench
from expunge.bench import read_rows

from .shared_data import DATA, needs


def on_mnist(test):
    for mark in needs("mnist/mnist.npz"):
        test = mark(test)
    return test


def test_tuning_extends_a_grid_whose_edge_wins():
    """The 2-epoch run tuned DOPPLER on DP-SGD's grid and kept its lowest rate (0.25: 72%, chance from 0.5 on),
    an edge, not an optimum. A winning edge now extends the grid by its ratio until the best is inside it (or the
    extensions run out)."""
    peaks = {"below": 0.05, "inside": 0.5, "far-above": 40.0}

    def evaluate(pairs):
        return [{"method": m, "lr": lr, "test_acc": 1 - abs(math.log(lr / peaks[m]))} for m, lr in pairs]

    best, tried = bench.tune(evaluate, {m: (0.25, 0.5, 1.0, 2.0) for m in peaks}, extensions=3)
    assert best["inside"] == 0.5 and len([r for r in tried if r["method"] == "inside"]) == 4
    assert best["below"] == pytest.approx(0.0625)  # 0.125, 0.0625, then 0.03125 is past the peak
    assert sorted(r["lr"] for r in tried if r["method"] == "below") == [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
    assert best["far-above"] == 16.0  # three extensions (4, 8, 16), then it stops
    ties, _ = bench.tune(lambda pairs: [{"method": m, "lr": lr, "test_acc": 0.1} for m, lr in pairs],
                         {"diverged": (1.0, 2.0)}, extensions=1)
    assert ties["diverged"] == 0.5  # all at chance: the smaller rates are tried


@on_mnist
def test_every_method_runs_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TUNE_EXTENSIONS", 0)
    monkeypatch.setattr(bench, "EPOCHS", 1)
    monkeypatch.setattr(bench, "SGD_GRID", (0.5, 2.0))
    monkeypatch.setattr(bench, "LR_GRID", {"dp-adam": (2e-3,)})
    monkeypatch.setattr(bench, "VALIDATION", 300)
    monkeypatch.setattr(bench, "FASHION", tmp_path / "absent")  # MNIST only, to stay short
    out = tmp_path / "dp-optimizers.json"
    rows = bench.main(DATA, out, repeats=1, limit=1500, progress=False, epsilons=(8.0,))
    assert read_rows(out) == rows and out.with_suffix(".png").exists()
    final = [r for r in rows if not r.get("tuning")]
    assert sorted(r["method"] for r in final) == sorted(bench.METHODS)
    for r in final:
        assert {"dataset", "method", "epsilon", "seed", "test_acc", "seconds"} <= set(r)
        assert r["epsilon_pld"] <= 8.0 + 1e-9
        assert r["test_acc"] > 0.2, r  # ten classes: clearly above chance after one short epoch at epsilon 8
    continual = next(r for r in final if r["method"] == "continual")
    assert continual["public_rows"] == 150 and continual["private_rows"] == 1350
