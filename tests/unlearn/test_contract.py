"""Every update method in the package meets the same evaluation contract: after forgetting rows,
its run exposes a plain torch model that the evaluation suite scores. The methods come from the registry,
so a new method joins this test by registering. Language-model methods update language-model runs: their
contract is a transformers causal LM (loadable from the run's model folder) whose per-row losses are scored."""

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
         "dp": {"epsilon": 8, "delta": 1e-4}, "lm-dp": {"noise_multiplier": 1.0, "delta": 1e-3}}


def lm_run(method, tmp_path):
    """A tiny language-model run the method can update: its own run, or an exactly retrainable (lm-retrain) run."""
    from expunge.lm import LMRecipe, load_corpus

    from ..lm.tiny import TINY_LLAMA, write_qa

    corpus = load_corpus(write_qa(tmp_path, 12))
    recipe = LMRecipe(model="tiny-llama", max_length=128, vocab_size=300, batch_size=2, lr=0.05, epochs=1)
    own = registry.get(method).updates == registry.OWN_RUN
    updater = registry.make_updater(method if own else "lm-retrain", **SMALL.get(method, {}))
    return updater.fit(corpus, recipe, out=tmp_path / "run", tiny_config=TINY_LLAMA)


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
    lm_unlearning = {"ngdiff", "graddiff", "npo", "simnpo", "lm-ascent"}
    assert lm_unlearning <= set(registry.names(updates=registry.LM_RUN, serves="forget"))
    assert registry.resolve("ascent", registry.LM) == "lm-ascent" and registry.resolve("ascent", registry.TABULAR) == "ascent"


@pytest.mark.parametrize("method", registry.names(serves="forget"))
def test_every_method_meets_the_evaluation_contract(method, tmp_path):
    if registry.kind_of(registry.get(method)) == registry.LM:
        return lm_contract(method, tmp_path)
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


def lm_contract(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from expunge.lm import encode, row_losses

    run = lm_run(method, tmp_path)
    assert isinstance(run, registry.get(method).run)
    ids = run.universe.ids[:3]
    report = run.forget(ids, method=None if registry.get(method).updates == registry.OWN_RUN else method)
    assert report.kind == "forget" and report.ids == ids.tolist() and report.version == 2
    assert report.method == method
    model = AutoModelForCausalLM.from_pretrained(run.model_path)
    assert isinstance(run.model, torch.nn.Module) and type(run.model) is type(model)
    tokens = encode(run.universe, run.tokenizer, run.recipe.max_length)
    with torch.no_grad():
        forget = row_losses(model, tokens.batch(np.flatnonzero(~run.active)))
        retain = row_losses(model, tokens.batch(np.flatnonzero(run.active)))
    assert len(forget) == 3 and len(retain) == 9 and torch.isfinite(torch.cat([forget, retain])).all()
