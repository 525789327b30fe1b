"""End-to-end on real MNIST 3 vs 8: certified removal keeps its bound and tracks retraining.

Speed is not asserted here; `expunge bench certified` measures it side by side."""

from expunge.bench import certified as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_certified_removal_on_mnist_3_vs_8():
    train, test, n_classes = bench.tasks(DATA)["mnist-3v8"]
    assert len(train) == 11982
    more_noise = [bench.run_setting(train, test, n_classes, 1e-2, sigma, max_removals=15, repeats=1)
                  for sigma in (1.0, 10.0)]
    for row in more_noise:
        assert row["test_acc"] > 0.9
        assert row["residual_norm"] <= row["residual_bound"] <= row["budget"]
        assert row["dist_newton_retrain"] < 0.01 * row["dist_before_retrain"]
    assert more_noise[1]["removals_supported"] > more_noise[0]["removals_supported"]  # more noise: more removals
