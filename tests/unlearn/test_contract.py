"""Every update method in the package meets the same evaluation contract: after forgetting rows,
its run exposes a plain torch model that the evaluation suite scores. The methods come from the registry,
so a new method joins this test by registering."""

import numpy as np
import pytest
import torch

from expunge import IndexedDataset, TrainRecipe
from expunge import evaluate as ev
from expunge.unlearn import Fitted, registry

RECIPE = TrainRecipe(model="mlp", hidden=(16,), epochs=3, batch_size=64, lr=0.2, weight_decay=1e-3)
LINEAR = TrainRecipe(model="logreg", epochs=3, batch_size=64, lr=0.2, weight_decay=1e-3)


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 6)) + y[:, None]
    return IndexedDataset.from_arrays(X / np.linalg.norm(X, axis=1, keepdims=True), y, ids=np.arange(n) + 1000 * seed)


# settings that keep a method's own run small here (methods not listed train with their defaults)
SMALL = {"certified": {"lam": 1e-2}, "sisa": {"shards": 3, "slices": 2, "workers": 1},
         "dp": {"epsilon": 8, "delta": 1e-4}}


def fitted_run(method, tmp_path):
    """A run the method can update: its own run, or a gradient-trained (DeltaGrad) run."""
    train, test = blobs(240, 0), blobs(90, 1)
    if registry.get(method).updates == registry.OWN_RUN:
        recipe = LINEAR if method == "certified" else RECIPE  # certified removal covers linear models
        return registry.make_updater(method, **SMALL.get(method, {})).fit(train, recipe, out=tmp_path / "run",
                                                                           test=test)
    return Fitted.train(train, RECIPE, "deltagrad", out=tmp_path / "run", test=test)


def test_the_registry_holds_every_method():
    assert set(registry.names()) >= {"deltagrad", "retrain", "fisher", "finetune", "ascent", "certified", "sisa", "dp"}


@pytest.mark.parametrize("method", registry.names(serves="forget"))
def test_every_method_meets_the_evaluation_contract(method, tmp_path):
    run = fitted_run(method, tmp_path)
    assert isinstance(run, registry.get(method).run) or registry.get(method).updates == registry.GRADIENT_RUN
    ids = run.universe.ids[:6]
    report = run.forget(ids, method=None if registry.get(method).updates == registry.OWN_RUN else method)
    assert report.kind == "forget" and report.ids == ids.tolist() and report.version == 2
    assert isinstance(run.model, torch.nn.Module)
    forget = run.universe.take(np.flatnonzero(~run.active))
    figures = ev.evaluate(run.model, forget, run.data, run.test)
    assert len(forget) == 6
    for key in ("forget_acc", "retain_acc", "test_acc", "mia_auc"):
        assert 0 <= figures[key] <= 1, (key, figures)
    assert ev.logits(run.model, run.test).shape == (len(run.test), 3)
