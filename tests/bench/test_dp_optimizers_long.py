"""End-to-end on real MNIST: the long DP-optimizers benchmark tunes every method on validation rows and
reports a row per (dataset, method, epsilon, seed). Its accuracy at the real 40-epoch recipe is measured by
`expunge bench dp-optimizers-long`, not here: this is a 600-row smoke run."""

import pytest

from expunge.bench import dp_optimizers_long as bench
from expunge.bench import read_results
from expunge.errors import ExpungeError

from .shared_data import DATA, needs


def test_tasks_and_methods_are_checked_by_name():
    with pytest.raises(ExpungeError, match=r"--tasks: unknown task\(s\) \['cifar'\].*mnist, fashion-mnist, tofu-lm"):
        bench.main(DATA, "unused.json", tasks="mnist,cifar")
    with pytest.raises(ExpungeError, match="--methods: unknown method"):
        bench.main(DATA, "unused.json", methods="sgd")


def test_smoke_run_tunes_and_reports_every_method(tmp_path):
    out = tmp_path / "dp-optimizers-long.json"
    rows = bench.main(DATA, out, limit=600, progress=False, epsilons=(8.0,), datasets=("mnist",), workers=1)
    written, provenance = read_results(out)
    assert written == rows and provenance["settings"]["worker_threads"] == 1 and out.with_suffix(".png").exists()
    final = [r for r in rows if not r.get("tuning")]
    assert sorted(r["method"] for r in final) == sorted(bench.METHODS)
    tuning = [r for r in rows if r.get("tuning")]
    for method, spec in bench.METHODS.items():
        tried = sorted(r["lr"] for r in tuning if r["method"] == method)
        assert set(spec.grid[1:3]) <= set(tried)  # the smoke grid, perhaps extended past a winning edge
        chosen = next(r for r in final if r["method"] == method)["lr"]
        assert chosen == max((r for r in tuning if r["method"] == method), key=lambda r: r["test_acc"])["lr"]
    for r in final:
        assert {"dataset", "method", "epsilon", "seed", "test_acc", "lr", "seconds"} <= set(r)
        assert r["epsilon_pld"] <= 8.0 + 1e-9 and r["rows"] == 600
    for r in tuning:
        assert r["rows"] == 600 - r["validation_rows"] and r["epochs_run"] == 1


for _mark in needs("mnist/mnist.npz"):  # the smoke run reads real MNIST; the name checks above need no data
    test_smoke_run_tunes_and_reports_every_method = _mark(test_smoke_run_tunes_and_reports_every_method)
