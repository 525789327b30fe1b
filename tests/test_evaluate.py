"""The evaluation suite on hand-built cases."""

import copy
import json

import numpy as np
import pytest
import torch

from expunge import IndexedDataset
from expunge import evaluate as ev


def mlp(d=20, k=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, k))


def random_rows(n, d=20, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return IndexedDataset.from_arrays(rng.normal(size=(n, d)), rng.integers(0, k, n))


def memorise(model, data, steps=400):
    """Fit random labels: the model then knows exactly these rows."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = torch.from_numpy(data.X), torch.from_numpy(data.y)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model.eval()


def test_identical_models_are_at_distance_zero_and_kl_zero():
    a = mlp()
    b = copy.deepcopy(a)
    data = random_rows(50)
    assert ev.parameter_distance(a, b) == 0.0
    assert ev.mean_kl(a, b, data) == pytest.approx(0.0, abs=1e-12)
    assert ev.mean_kl(a, mlp(seed=1), data) > 0


def test_a_model_that_memorised_the_forget_set_is_caught_by_both_attacks():
    forget, heldout = random_rows(60, seed=1), random_rows(60, seed=2)
    model = memorise(mlp(), forget)
    attack = ev.loss_threshold_attack(model, forget, heldout)
    assert attack["auc"] > 0.9
    shadows = [memorise(mlp(seed=s), random_rows(60, seed=10 + s)) for s in range(4)]  # never saw the targets
    assert ev.lira_offline(model, shadows, forget, heldout)["auc"] > 0.9
    fresh = mlp(seed=7).eval()  # never trained: cannot tell members apart
    assert abs(ev.loss_threshold_attack(fresh, forget, heldout)["auc"] - 0.5) < 0.2


def test_relearn_steps_count_fine_tuning_until_the_original_loss():
    forget = random_rows(40, seed=3)
    original = memorise(mlp(), forget)
    target = float(ev.losses(original, forget).mean())
    assert ev.relearn_steps(original, forget, target) == 0
    fresh = mlp(seed=5)
    steps = ev.relearn_steps(fresh, forget, target, lr=0.05, max_steps=50)
    assert 0 < steps <= 50


def test_evaluate_and_the_report(tmp_path):
    forget, retain, test = random_rows(30, seed=1), random_rows(100, seed=2), random_rows(50, seed=3)
    model, reference = mlp(), mlp(seed=1)
    figures = ev.evaluate(model, forget, retain, test, reference=reference, original=model)
    for key in ("forget_acc", "retain_acc", "test_acc", "mia_auc"):
        assert 0 <= figures[key] <= 1
    assert figures["param_dist_to_retrain"] > 0 and figures["relearn_steps"] == 0
    paths = ev.write_report({"model": figures, "retrain": ev.evaluate(reference, forget, retain, test)}, tmp_path)
    assert json.loads(paths["json"].read_text())["model"]["mia_auc"] == figures["mia_auc"]
    assert "| model |" in paths["md"].read_text() and paths["png"].stat().st_size > 0


def test_a_diverged_model_is_scored_not_crashed():
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    data = random_rows(20)
    assert 0 <= ev.loss_threshold_attack(model, data, random_rows(20, seed=4))["auc"] <= 1


def test_relearn_steps_of_models_that_cannot_be_fine_tuned():
    from expunge.unlearn.certified import LinearScores
    from expunge.unlearn.sisa import SISAEnsemble

    forget = random_rows(30, seed=3)
    vote = SISAEnsemble([mlp(seed=1), mlp(seed=2)], "vote")
    assert ev.relearn_steps(vote, forget, 0.0, max_steps=10) is None
    linear = LinearScores(torch.zeros(20, 4, dtype=torch.float64))
    assert ev.relearn_steps(linear, forget, target_loss=10.0) == 0  # trainable copy, target already met
