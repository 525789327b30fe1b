"""The dp-lm benchmark at a tiny size: every (model, mode) runs, rows carry their fields, the private steps
train the tied model. Speed is not asserted here; `expunge bench dp-lm` measures it side by side."""
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("opacus")

from expunge.bench import dp_lm as bench

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FIELDS = {"model", "mode", "batch_size", "seq_len", "tokens_per_s", "peak_mem_mb", "throughput_ratio",
          "memory_ratio", "layers", "tied", "note", "device", "params"}


def test_every_model_and_mode_runs_at_a_tiny_size(tmp_path):
    rows = bench.run(repeats=1, tiny=True, isolate=False, round_s=0.0, batch_size=2, seq_len=6, progress=False)
    assert [(r["model"], r["mode"]) for r in rows] == [(m, mode) for m in bench.MODELS for mode in bench.MODES]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 6) and r["peak_mem_mb"] >= 0
        assert math.isfinite(r["throughput_ratio"])
        assert r["tied"] == (r["mode"] != "opacus ghost") and ("untied" in r["note"]) == (not r["tied"])
    out = tmp_path / "dp-lm.json"
    bench.report(rows, out, bench.table, bench.plot)
    assert out.exists() and out.with_suffix(".png").exists()


@pytest.mark.parametrize("mode", ["expunge all-layer", "expunge group-wise"])
@pytest.mark.parametrize("model", bench.MODELS)
def test_the_private_step_trains_the_tied_model(model, mode):
    case = bench.LMCase(model, mode, 2, tiny=True, seq_len=6)
    m = case.model
    before = [p.detach().clone() for p in m.parameters()]
    case.step()
    assert m.get_input_embeddings().weight is m.get_output_embeddings().weight
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))  # noise reaches every parameter
    assert case.engine.steps == 1


def test_the_in_process_path_that_a_gpu_takes():
    """--device cuda runs every case in this process with a CUDA meter; the same path with a CPU meter."""
    rows = bench.run_in_process(("gpt2",), ("non-private", "expunge all-layer"), 2, 6, {"gpt2": 1}, 1, True, "cpu",
                                bench.CpuMeter(), lambda text: None, steps_per_round=1)
    assert [r["mode"] for r in rows] == ["non-private", "expunge all-layer"]
    assert all(r["samples_per_s"] > 0 and r["steps"] == 1 for r in rows)
