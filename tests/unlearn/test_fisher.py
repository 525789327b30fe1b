"""Fisher forgetting and the baselines."""

import numpy as np
import pytest
import torch

from expunge import ExpungeError, IndexedDataset
from expunge.models import FlatModel, build_model
from expunge.recipe import BatchPlan, TrainRecipe
from expunge.train import Workspace, train
from expunge.unlearn.baselines import FineTune, GradientAscent
from expunge.unlearn.fisher import Fisher, diag_fisher


def setup(n=300, d=8, k=3, hidden=(16,), trained=True):
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    data = IndexedDataset.from_arrays(rng.normal(size=(n, d)) + y[:, None], y)
    recipe = TrainRecipe(model="mlp", hidden=hidden, epochs=5, batch_size=50, lr=0.2, weight_decay=1e-3)
    flat = FlatModel(build_model(recipe, d, k))
    ws = Workspace(flat, recipe, BatchPlan.for_recipe(recipe, n), torch.from_numpy(data.X).double(),
                   torch.from_numpy(data.y), data.ids)
    w = train(ws, np.ones(n, bool), flat.get_flat()) if trained else flat.get_flat()
    return data, ws, w


def removal(n, rows):
    active = np.ones(n, bool)
    active[rows] = False
    return np.ones(n, bool), active


def test_lambda_zero_leaves_the_weights_unchanged():
    data, ws, w = setup()
    old, new = removal(len(data), [1, 2, 3])
    scrubbed, figures = Fisher(lam=0.0).update(ws, old, new, None, None, None, w=w)
    assert torch.equal(scrubbed, w) and figures["noise_norm"] == 0


def test_noise_follows_the_documented_scale():
    data, ws, w = setup()
    old, new = removal(len(data), [1, 2, 3])
    method = Fisher(lam=1e-6, fisher_rows=len(data))
    scrubbed, _ = method.update(ws, old, new, None, None, None, w=w)
    F = diag_fisher(ws, w, np.flatnonzero(new), seed=0)
    std = method.noise_std(F, ws.recipe.weight_decay)
    assert torch.allclose(std, 1e-6**0.25 * (F + 1e-3) ** -0.25)
    z = (scrubbed - w) / std  # should be standard normal per coordinate
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1
    bigger, _ = Fisher(lam=16e-6, fisher_rows=len(data)).update(ws, old, new, None, None, None, w=w)
    assert float((bigger - w).norm()) == pytest.approx(2 * float((scrubbed - w).norm()), rel=1e-9)  # lam^(1/4)


def test_diag_fisher_matches_a_per_row_loop():
    data, ws, w = setup(n=40)
    rows = np.arange(40)
    fast = diag_fisher(ws, w, rows, chunk=40, seed=3)
    X, _ = ws.batch(rows)
    with torch.no_grad():
        probs = torch.softmax(ws.flat.logits(w, X), 1)
    y = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0]  # the same draws
    slow = torch.zeros_like(w)
    for i in range(40):
        wi = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(ws.flat.logits(wi, X[i : i + 1]), 1)[0, y[i]], wi)
        slow += g * g
    assert torch.allclose(fast, slow / 40, rtol=1e-6, atol=1e-12)


def test_removing_a_class_zeroes_its_output_row():
    data, ws, w = setup()
    old, new = removal(len(data), np.flatnonzero(data.y == 2))
    scrubbed, figures = Fisher(lam=0.0).update(ws, old, new, None, None, None, w=w)
    assert figures["classes_dropped"] == [2]
    weight, bias = torch.split(scrubbed, ws.flat.sizes)[-2:]
    assert torch.all(weight.view(ws.flat.shapes[-2])[2] == 0) and bias[2] == 0
    X, _ = ws.batch(np.flatnonzero(data.y == 2))
    assert (ws.flat.predict(scrubbed, X) != 2).float().mean() > 0.9


def test_newton_variant_moves_towards_the_remaining_optimum_and_refuses_large_models():
    data, ws, w = setup(hidden=(4,))
    old, new = removal(len(data), np.arange(10))
    stepped, _ = Fisher(lam=0.0, newton=True).update(ws, old, new, None, None, None, w=w)
    X, y = ws.batch(np.flatnonzero(new))
    objective = lambda v: float(torch.nn.functional.cross_entropy(ws.flat.logits(v, X), y)  # noqa: E731
                                + ws.recipe.weight_decay / 2 * (v * v).sum())
    assert objective(stepped) < objective(w)
    _, big, w_big = setup(hidden=(512,), trained=False)
    with pytest.raises(ExpungeError, match="Newton variant"):
        Fisher(newton=True).update(big, old, new, None, None, None, w=w_big)


def test_fine_tune_and_gradient_ascent_move_the_loss_the_right_way():
    data, ws, w = setup()
    forgotten = np.arange(30)
    old, new = removal(len(data), forgotten)
    loss = lambda v, rows: float(torch.nn.functional.cross_entropy(ws.flat.logits(v, ws.batch(rows)[0]),  # noqa: E731
                                                                   ws.batch(rows)[1]))
    ascended, _ = GradientAscent(epochs=2, lr=0.5).update(ws, old, new, None, None, None, w=w)
    assert loss(ascended, forgotten) > loss(w, forgotten)
    tuned, _ = FineTune(epochs=1).update(ws, old, new, None, None, None, w=w)
    assert not torch.equal(tuned, w)
