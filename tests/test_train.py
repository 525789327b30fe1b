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
