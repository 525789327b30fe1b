"""End-to-end on real MNIST: the GeN benchmark trains every kind of run on a subset and reports its rows.

The numbers at the benchmark's scale are in benchmarks/results/gen.json; here a short run checks the pipeline,
the private run's accounting (probes included, within epsilon) and the summary's arithmetic."""

import pytest

from expunge.bench import gen as bench
from expunge.bench import read_results

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_every_kind_of_run_reports_and_the_summary_compares_gen_with_the_best_tuned(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "EPOCHS", 1)
    monkeypatch.setattr(bench, "EPOCHS_DP", 1)
    monkeypatch.setattr(bench, "GRIDS", {"adamw": (1e-3, 1e-2)})
    monkeypatch.setattr(bench, "DP_GRID", (0.5, 2.0))
    from expunge.bench import dp_optimizers

    monkeypatch.setattr(dp_optimizers, "FASHION", tmp_path / "absent")  # MNIST only, to stay short (gen reads its sources)
    out = tmp_path / "gen.json"
    rows = bench.main(DATA, out, limit=1200, progress=False)
    written, provenance = read_results(out)
    assert written == rows and provenance["settings"]["worker_threads"] == 1 and out.with_suffix(".png").exists()
    runs = [r for r in rows if not r.get("summary")]
    assert len(runs) == 2 * 2 + 2 * 2 + 2 + 2  # grid x schedules, GeN x horizons from both ends, DP grid, DP GeN
    for r in runs:
        assert {"task", "optimizer", "schedule", "lr0", "final_test_acc", "seconds", "wall_seconds"} <= set(r)
    private_gen = [r for r in runs if r["optimizer"] == "dp-sgd" and r["schedule"] == "gen"]
    for r in private_gen:
        assert r["epsilon"] <= bench.EPSILON + 1e-9 and r["releases"] == r["estimates"] > 0
    summaries = {(s["optimizer"], s["schedule"], s["lr0"]): s for s in rows if s.get("summary") and "gap_points" in s}
    best = max((r for r in runs if r["optimizer"] == "adamw" and not r["schedule"].startswith("gen")),
               key=lambda r: r["final_test_acc"])
    gen_row = next(r for r in runs if r["optimizer"] == "adamw" and r["schedule"] == "gen" and r["lr0"] == 1e-3)
    s = summaries[("adamw", "gen", 1e-3)]
    assert s["gap_points"] == pytest.approx(100 * (gen_row["final_test_acc"] - best["final_test_acc"]))
    cost = next(s for s in rows if s.get("summary") and "grid_epsilon" in s)
    assert cost["grid_epsilon"] > bench.EPSILON  # two runs at epsilon 3 each compose to more than 3
