"""End-to-end on real MNIST: every DP optimizer of the benchmark trains, tunes and reports its row.

Accuracy at the benchmark's scale is in benchmarks/results/dp-optimizers.json; here a short run on a
subset checks the pipeline and that each method learns something at a generous epsilon."""

from expunge.bench import dp_optimizers as bench
from expunge.bench import read_rows

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_every_method_runs_and_reports(tmp_path, monkeypatch):
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
