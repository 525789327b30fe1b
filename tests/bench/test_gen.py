"""End-to-end on real MNIST and TOFU: the GeN benchmark trains every kind of run on a subset and reports its rows.

The numbers at the benchmark's scale are in benchmarks/results/gen.json; here a short run checks the pipeline,
the private run's accounting (probes included, within epsilon) and the summary's arithmetic."""

import json

import pytest

from expunge.bench import gen as bench
from expunge.bench import read_results
from expunge.errors import ExpungeError

from .shared_data import DATA, needs


def requires(relative: str):
    """``needs`` for one test (this file's tests need different data)."""
    def mark(test):
        for m in needs(relative):
            test = m(test)
        return test
    return mark


@requires("mnist/mnist.npz")
def test_every_kind_of_run_reports_and_the_summary_compares_gen_with_the_best_tuned(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "EPOCHS", 1)
    monkeypatch.setattr(bench, "EPOCHS_DP", 1)
    monkeypatch.setattr(bench, "GRIDS", {"adamw": (1e-3, 1e-2)})
    monkeypatch.setattr(bench, "DP_GRID", (0.5, 2.0))
    out = tmp_path / "gen.json"
    rows = bench.main(DATA, out, limit=1200, progress=False, tasks="mnist")  # MNIST only, to stay short
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


@requires("tofu/full.json")
def test_the_lm_task_trains_a_tiny_lm_on_tofu_and_merges_its_rows_into_the_earlier_results(tmp_path, monkeypatch):
    # a 2-layer width-64 tiny-llama on 2 authors' QA pairs, 1 epoch, AdamW only: seconds
    monkeypatch.setattr(bench, "LM_AUTHORS", 2)
    monkeypatch.setattr(bench, "LM_EPOCHS", 1)
    monkeypatch.setattr(bench, "LM_VOCAB", 512)
    monkeypatch.setattr(bench, "LM_CONFIG", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=2))
    monkeypatch.setattr(bench, "LM_GRIDS", {"adamw": (1e-3, 1e-2)})
    out = tmp_path / "gen.json"
    earlier = {"task": "mnist", "optimizer": "adamw", "schedule": "constant", "lr0": 1e-3, "final_test_acc": 0.9,
               "seconds": 1.0}
    out.write_text(json.dumps([earlier]))  # an earlier file (without provenance) holding another task's run
    rows = bench.main(DATA, out, progress=False, tasks="tofu-qa", workers=1)
    written, provenance = read_results(out)
    assert written == rows and out.with_suffix(".png").exists()
    assert provenance["settings"]["tasks_run"] == ["tofu-qa"]
    assert provenance["settings"]["kept_rows"]["tasks"] == ["mnist"] and provenance["settings"]["kept_rows"]["runs"] == 1
    runs = [r for r in rows if not r.get("summary")]
    assert earlier in runs
    lm = [r for r in runs if r["task"] == bench.LM_TASK]
    assert len(lm) == 2 * 2 + 2 * 2  # grid x schedules, GeN x horizons from both ends
    for r in lm:
        assert {"optimizer", "schedule", "lr0", "final_test_loss", "initial_test_loss", "seconds", "steps"} <= set(r)
        assert r["rows"] == 32 and r["test_rows"] == 8 and r["steps"] == 8  # 4 of each author's 20 pairs held out
    for r in (r for r in lm if r["schedule"].startswith("gen")):
        # GeN trained: its held-out loss fell from the initial weights' (the same in every run)
        assert r["estimates"] == 2 and len(r["rates"]) == r["steps"]
        assert r["final_test_loss"] < r["initial_test_loss"] == lm[0]["initial_test_loss"]
    best = min((r for r in lm if not r["schedule"].startswith("gen")), key=lambda r: r["final_test_loss"])
    s = next(s for s in rows if s.get("summary") and s["task"] == bench.LM_TASK and s["schedule"] == "gen"
             and s["lr0"] == 1e-3)
    g = next(r for r in lm if r["schedule"] == "gen" and r["lr0"] == 1e-3)
    assert s["gap_loss"] == pytest.approx(g["final_test_loss"] - best["final_test_loss"])
    assert s["gap_met"] == (s["gap_loss"] <= bench.TARGET_LOSS_GAP)


def test_unknown_tasks_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ExpungeError, match="unknown task"):
        bench.main(tmp_path, tmp_path / "gen.json", progress=False, tasks="tofu-qa,cifar")
    assert not (tmp_path / "gen.json").exists()
