"""End-to-end on real data (smoke sizes): the merge benchmark's tasks conflict, every method yields a scored
front, and the forgetting trade-off runs from the model before the deletion to the one after.

Front quality at the benchmark's real settings is measured by `expunge bench merge`, not here."""

import numpy as np
import pytest

from expunge.bench import merge as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz") + [
    pytest.mark.skipif(not bench.FASHION.exists(), reason=f"{bench.FASHION} not found (apt-get install dataset-fashion-mnist)")]


def test_merge_benchmark_smoke(one_thread):
    setup = bench.smoke(bench.Setup(), 1500)
    rows = bench.run_merging(bench.load_tasks(DATA, setup), setup)
    setup_row, merges = rows[0], {r["method"]: r for r in rows[1:]}
    own = {t: setup_row["finetuned_acc"][t][t] for t in bench.TASKS}
    # each fine-tuned model is best at its own task: the merge has something to trade off
    assert all(own[t] > max(setup_row["finetuned_acc"][s][t] for s in bench.TASKS if s != t) for t in bench.TASKS)
    assert merges["grid (ground truth)"]["evaluations"] == 5**3
    for name in ("map", "bayesian-map", "nested-map", "map on ties", "map on dare", "task-arithmetic (one c)"):
        row = merges[name]
        assert row["front"] and np.isfinite(row["igd"]) and 0 <= row["hv_ratio"] <= 1 + 1e-9
    assert merges["map"]["evaluations"] == 25 and merges["task-arithmetic (one c)"]["evaluations"] == 11


def test_tradeoff_smoke(one_thread):
    setup = bench.smoke(bench.Setup(), 1500)
    rows = bench.run_tradeoff(DATA, setup)
    fisher = next(r for r in rows if r["deletion"] == "fisher")
    assert fisher["curve_c"][0] == 0.0 and fisher["curve_c"][-1] == 1.5
    assert fisher["after"]["forget"] == 0.0  # Fisher zeroes the removed class's output row
    assert fisher["curve_forget"][0] == pytest.approx(fisher["before"]["forget"])
    assert fisher["evaluations"] == 8 and np.isfinite(fisher["igd"])
