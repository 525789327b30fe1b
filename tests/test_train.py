"""The reference trainer against a plain torch loop (nn.Linear / MLP + torch.optim.SGD)."""

import numpy as np
import pytest
import torch
from torch import nn

from expunge.data import IndexedDataset
from expunge.models import FlatModel, build_model
from expunge.recipe import BatchPlan, TrainRecipe
from expunge.train import Workspace, train
from expunge.trajectory import Trajectory


def make(model="logreg", batch_size=32):
    rng = np.random.default_rng(0)
    data = IndexedDataset.from_arrays(rng.normal(size=(150, 6)), rng.integers(0, 3, 150))
    recipe = TrainRecipe(model=model, hidden=(8,), epochs=4, batch_size=batch_size, lr=0.3, lr_steps=((2, 0.1),),
                         weight_decay=1e-2, dtype="float64", seed=5)
    flat = FlatModel(build_model(recipe, 6, 3))
    plan = BatchPlan.for_recipe(recipe, len(data))
    ws = Workspace(flat, recipe, plan, torch.from_numpy(data.X).double(), torch.from_numpy(data.y), data.ids)
    return data, recipe, flat, plan, ws


@pytest.mark.parametrize("model, batch_size", [("logreg", 32), ("logreg", None), ("mlp", 32)])
def test_trainer_matches_torch_sgd_with_weight_decay(model, batch_size):
    data, recipe, flat, plan, ws = make(model, batch_size)
    active = np.ones(len(data), bool)
    active[[3, 50, 77]] = False
    w0 = flat.get_flat()
    traj = Trajectory.create(None, plan.n_iterations, flat.n_params, torch.float64)
    w = train(ws, active, w0, traj)

    reference = build_model(recipe, 6, 3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    for t, rows in enumerate(plan.iterations(active, data.ids)):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(plan.epoch_of(t))
        optimizer.zero_grad()
        X, y = ws.batch(rows)
        nn.functional.cross_entropy(reference(X), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        np.testing.assert_allclose(traj.grads[t], g.numpy(), rtol=1e-10, atol=1e-12)
        optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.allclose(w, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(traj.params[0], w0.numpy())


def test_training_is_deterministic_and_seeded():
    data, recipe, flat, plan, ws = make("mlp")
    active = np.ones(len(data), bool)
    assert torch.equal(train(ws, active, flat.get_flat()), train(ws, active, flat.get_flat()))
    other = build_model(TrainRecipe(model="mlp", hidden=(8,), seed=6), 6, 3)
    assert not torch.equal(FlatModel(other).get_flat(), flat.get_flat())


def test_float32_recipe_trains_in_float32():
    recipe = TrainRecipe(dtype="float32")
    assert FlatModel(build_model(recipe, 4, 2)).get_flat().dtype == torch.float32


# -- --lr auto: GeN sets the rate --------------------------------------------------------------------------------

def make_auto(data=None, every=2):
    rng = np.random.default_rng(0)
    if data is None:
        data = IndexedDataset.from_arrays(rng.normal(size=(160, 6)) + np.repeat(np.eye(3, 6), [54, 53, 53], 0) * 2,
                                          np.repeat(np.arange(3), [54, 53, 53]))
    recipe = TrainRecipe(model="mlp", hidden=(8,), epochs=3, batch_size=32, lr=1.0, weight_decay=1e-2,
                         dtype="float64", seed=5, lr_auto=True, lr_every=every)
    flat = FlatModel(build_model(recipe, 6, 3))
    plan = BatchPlan.for_recipe(recipe, len(data))
    ws = Workspace(flat, recipe, plan, torch.from_numpy(data.X).double(), torch.from_numpy(data.y), data.ids)
    return data, recipe, flat, plan, ws


def test_auto_rate_is_gen_around_torch_sgd_probing_the_objective_on_the_probe_plan():
    from expunge.optim import GeN

    data, recipe, flat, plan, ws = make_auto()
    active = np.ones(len(data), bool)
    traj = Trajectory.create(None, plan.n_iterations, flat.n_params, torch.float64)
    w = train(ws, active, flat.get_flat(), traj)

    reference = build_model(recipe, 6, 3)
    params = list(reference.parameters())
    optimizer = torch.optim.SGD(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    probes, step = plan.probes().iterations(active, data.ids), [0]

    def probe():
        X, y = ws.batch(probes[step[0]])
        return lambda: (nn.functional.cross_entropy(reference(X), y)
                        + 0.5 * recipe.weight_decay * sum((p * p).sum() for p in params))

    gen = GeN(optimizer, probe=probe, every=recipe.lr_every)
    for t, rows in enumerate(plan.iterations(active, data.ids)):
        step[0] = t
        gen.zero_grad()
        X, y = ws.batch(rows)
        nn.functional.cross_entropy(reference(X), y).backward()
        gen.step()
    np.testing.assert_allclose(traj.rates, gen.rates, rtol=1e-9)
    # the first estimate (iteration 0) moves the start rate by at most x1.1 or x0.95; then GeN keeps moving it
    assert 0.95 * recipe.lr - 1e-15 <= traj.rates[0] <= 1.1 * recipe.lr + 1e-15 and len(set(np.round(traj.rates, 12))) > 3
    assert any(e.accepted for e in gen.history)
    expected = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.allclose(w, expected, rtol=1e-8, atol=1e-10)


def test_auto_rate_retraining_without_rows_does_not_depend_on_them():
    """The rates after a deletion are those of training without the rows: whatever the removed rows held, the
    retrained weights and GeN's rates are the same (bitwise), and they differ from the rates with the rows."""
    data, _, flat, plan, ws = make_auto()
    removed = [2, 40, 41, 99, 150]
    kept = np.ones(len(data), bool)
    kept[removed] = False
    X = data.X.copy()
    X[removed] = np.random.default_rng(9).normal(size=(len(removed), 6)) * 5  # other values in the removed rows
    other = IndexedDataset.from_arrays(X, data.y, ids=data.ids)
    _, _, _, _, ws_other = make_auto(other)
    w0 = flat.get_flat()
    runs = []
    for workspace, active in ((ws, np.ones(len(data), bool)), (ws, kept), (ws_other, kept)):
        traj = Trajectory.create(None, plan.n_iterations, flat.n_params, torch.float64)
        runs.append((train(workspace, active, w0, traj), traj.rates))
    (_, rates_all), (w_kept, rates_kept), (w_other, rates_other) = runs
    assert torch.equal(w_kept, w_other)
    np.testing.assert_array_equal(rates_kept, rates_other)
    assert not np.array_equal(rates_all, rates_kept)
    probes = plan.probes().iterations(kept, data.ids)
    assert not set(removed) & set(np.concatenate(probes).tolist())


def test_the_probe_plan_is_an_independent_stream_and_the_training_plan_is_unchanged():
    plan = BatchPlan(100, 10, 2, seed=3)
    active = np.ones(100, bool)
    batches, probes = plan.iterations(active, np.arange(100)), plan.probes().iterations(active, np.arange(100))
    assert len(batches) == len(probes) and not all(np.array_equal(a, b) for a, b in zip(batches, probes))
    np.testing.assert_array_equal(batches[0], np.random.default_rng([3, 0]).permutation(100)[:10])
