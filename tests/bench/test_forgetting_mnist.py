"""End-to-end on real MNIST (5,000 rows, MLP): Fisher scrubbing forgets a class like retraining.

Speed is not asserted here; `expunge bench forgetting` measures it side by side."""

import numpy as np

from expunge.bench import forgetting as bench
from expunge.data import load_dataset

from .shared_data import DATA, needs

pytestmark = needs("mnist/mnist.npz")


def test_fisher_forgets_a_class_like_retraining():
    train, test = load_dataset(str(DATA / "mnist" / "mnist.npz"))
    rows = {r["method"]: r for r in bench.run_case("mnist", "mlp", "class", train.take(np.arange(5000)), test)}
    fisher, retrain, original = rows["fisher"], rows["retrain"], rows["original"]
    assert original["forget_acc"] > 0.9 and retrain["forget_acc"] < 0.05
    assert fisher["forget_acc"] <= retrain["forget_acc"] + 0.05
    assert abs(fisher["test_acc"] - original["test_acc"]) <= 0.03
    assert abs(fisher["mia_auc"] - retrain["mia_auc"]) <= 0.05
