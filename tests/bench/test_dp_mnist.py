"""End-to-end on real MNIST (4,000 rows, 3 epochs, epsilon 8): the DP-MNIST benchmark's training learns
and spends no more than its target.

Accuracy at the benchmark's real settings is measured by `expunge bench dp-mnist`, not here."""


from expunge.bench import dp_mnist as bench

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_private_cnn_learns_mnist_within_its_budget(one_thread):
    train, test = bench.datasets(DATA, limit=4000)
    recipe = bench.smoke_recipe(bench.RECIPES[8.0], len(train[1]))
    row = bench.run_epsilon(train, test, 8.0, recipe)
    assert row["rows"] == 4000 and row["epochs"] == 3
    assert row["test_acc"] > 0.5  # chance is 0.1
    assert 0.99 * 8.0 <= row["epsilon_pld"] <= 8.0  # the calibration spends the budget, and no more
    assert row["epsilon_rdp"] >= row["epsilon_pld"]
