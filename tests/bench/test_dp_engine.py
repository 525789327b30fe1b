"""The dp-engine benchmark at a tiny size: every (model, mode) runs and the rows carry their fields.

Speed is not asserted here; `expunge bench dp-engine` measures it side by side."""
import math

import pytest
import torch

from expunge.bench import dp_engine as bench

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning",
                                        "ignore:noise_multiplier 0:UserWarning")

FIELDS = {"model", "mode", "batch_size", "samples_per_s", "peak_mem_mb", "throughput_ratio", "memory_ratio",
          "step_ms", "cpu_ms", "cpu_throughput_ratio", "params", "threads", "rounds", "rounds_stop"}


def _check(rows, models, modes):
    assert [(r["model"], r["mode"]) for r in rows] == [(m, mode) for m in models for mode in modes]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] >= 0
        assert math.isfinite(r["throughput_ratio"]) or "non-private" not in modes
    for r in rows:
        if r["mode"] == "non-private":
            assert r["throughput_ratio"] == 1.0
        elif "non-private" in modes:  # a ratio per round, the median reported with its spread
            assert len(r["throughput_ratio_rounds"]) == r["rounds"] == len(r["samples_per_s_rounds"])
            assert r["throughput_ratio_min"] <= r["throughput_ratio"] <= r["throughput_ratio_max"]


def test_every_model_and_mode_runs_at_a_tiny_size(tmp_path):
    rows = bench.run(repeats=1, tiny=True, isolate=False, round_s=0.0, batch_sizes={"mlp": 8, "cnn": 8, "gpt": 4},
                     progress=False)
    _check(rows, bench.MODELS, bench.MODES)
    out = tmp_path / "dp-engine.json"
    bench.report(rows, out, bench.table, bench.plot)
    assert out.exists() and out.with_suffix(".png").exists()


def test_workers_in_their_own_processes():
    modes = ("expunge all-layer",)  # one mode: a memory process and a timing process
    rows = bench.run(repeats=1, models=("mlp",), modes=modes, tiny=True, round_s=0.0, batch_sizes={"mlp": 8}, replicas=1,
                     progress=False)
    _check(rows, ("mlp",), modes)
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    assert all("VmHWM" in r["mem_method"] or "ru_maxrss" in r["mem_method"] for r in rows)


def test_the_expunge_step_clips_and_moves_the_weights():
    for model in bench.MODELS:
        case = bench.Case(model, "expunge all-layer", 4, tiny=True)
        before = [p.detach().clone() for p in case.model.parameters()]
        case.step()
        after = list(case.model.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        assert case.engine.steps == 1
