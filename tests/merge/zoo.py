"""Tiny zoo runs for the merge tests: a base trained briefly on digits, two runs fine-tuned from it (on digits,
and on inverted digits), and a few that must not merge with them. Seconds in all."""

import numpy as np

from expunge import Fitted, TrainRecipe
from expunge.data import IndexedDataset, load_dataset

RECIPE = TrainRecipe(epochs=2, batch_size=256, lr=0.2)
FINE_TUNE = TrainRecipe(epochs=2, batch_size=256, lr=0.2, seed=1)


def inverted_npz(path):
    """Digits with inverted pixels, as an .npz with a test split (a second task for the same model)."""
    train, test = load_dataset("digits")
    np.savez(path, x_train=1 - train.X, y_train=train.y, x_test=1 - test.X, y_test=test.y)
    return path


def build(root) -> dict:
    """{name: run path}: base, plain and inverted (fine-tuned from base), mlp (another architecture), other_base and
    stranger (fine-tuned from another base), unrelated (not
    fine-tuned from anything: no init record), and the inverted task's .npz."""
    train, test = load_dataset("digits")
    npz = inverted_npz(root / "inverted.npz")
    inv_train, inv_test = load_dataset(str(npz))
    runs = {"npz": npz}
    base = Fitted.train(train, RECIPE, "deltagrad", out=root / "base", test=test, source="digits")
    runs["base"] = base.path
    runs["plain"] = Fitted.train(train, FINE_TUNE, "deltagrad", out=root / "plain", test=test, source="digits",
                                 init=base).path
    runs["inverted"] = Fitted.train(inv_train, FINE_TUNE, "deltagrad", out=root / "inverted", test=inv_test,
                                    source=str(npz), init=base).path
    runs["unrelated"] = Fitted.train(inv_train, RECIPE, "deltagrad", out=root / "unrelated", test=inv_test,
                                     source=str(npz)).path
    runs["mlp"] = Fitted.train(train, TrainRecipe(model="mlp", hidden=(8,), epochs=1, batch_size=256), "deltagrad",
                               out=root / "mlp", test=test, source="digits").path
    other = Fitted.train(train, TrainRecipe(epochs=1, batch_size=256, lr=0.2, seed=7), "deltagrad",
                         out=root / "other_base", test=test, source="digits")
    runs["other_base"] = other.path
    runs["stranger"] = Fitted.train(train, FINE_TUNE, "deltagrad", out=root / "stranger", test=test, source="digits",
                                    init=other).path
    return runs


def accuracy(run, data: IndexedDataset) -> float:
    return run.state_score(data)(run.model_state())
