"""End-to-end on real MNIST (a 12,000-row slice to stay lean): DeltaGrad's accuracy targets.

Speed is not asserted here; `expunge bench deltagrad` measures it side by side."""

from expunge.bench import deltagrad as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_deltagrad_meets_the_reference_accuracy_targets_on_mnist():
    cases = [case for case in bench.CASES if case[0] == "logreg"]  # the MLP row is the benchmark's, not a target
    rows = bench.run(DATA, repeats=1, limit=12000, progress=False, cases=cases)
    for row in rows:
        if row["model"] == "logreg" and row["T0"] == 5:  # the reference setting, deletion and addition
            assert row["dist_deltagrad_retrain"] <= 0.03 * row["dist_full_retrain"], row
            assert abs(row["acc_deltagrad"] - row["acc_retrain"]) <= 0.001, row
    by_T0 = {r["T0"]: r["dist_deltagrad_retrain"] for r in rows if r["model"] == "logreg" and r["task"] == "delete" and r["ratio"] == 0.001}
    assert by_T0[5] <= by_T0[10] <= by_T0[20]  # the sweep shows the trade-off
