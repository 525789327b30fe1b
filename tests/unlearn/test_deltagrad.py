"""DeltaGrad against exact retraining on the same recipe and batch plan."""

import numpy as np
import pytest
import torch

from expunge.data import IndexedDataset
from expunge.models import FlatModel, build_model
from expunge.recipe import BatchPlan, TrainRecipe
from expunge.train import Workspace, train
from expunge.trajectory import Trajectory
from expunge.unlearn.deltagrad import DeltaGradConfig, LBFGSHessian, deltagrad


def blobs(n=600, d=10, k=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.5, (k, d))
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(0, 1.0, (n, d))
    return IndexedDataset.from_arrays(X, y)


def setup(data, **recipe):
    recipe = TrainRecipe(**{"epochs": 10, "batch_size": 100, "lr": 0.5, "lr_steps": ((5, 0.25),),
                            "weight_decay": 1e-3, "dtype": "float64", **recipe})
    flat = FlatModel(build_model(recipe, data.n_features, data.n_classes))
    plan = BatchPlan.for_recipe(recipe, len(data))
    ws = Workspace(flat, recipe, plan, torch.from_numpy(data.X).double(), torch.from_numpy(data.y), data.ids)
    return ws, flat.get_flat()


def trained(ws, w0, active):
    traj = Trajectory.create(None, ws.plan.n_iterations, ws.flat.n_params, torch.float64)
    return train(ws, active, w0, traj), traj


def removal(n, k, seed=1):
    active = np.ones(n, bool)
    active[np.random.default_rng(seed).choice(n, k, replace=False)] = False
    return active


@pytest.mark.parametrize("batch_size", [100, None])
def test_every_iteration_explicit_reproduces_retraining(batch_size):
    data = blobs()
    ws, w0 = setup(data, batch_size=batch_size)
    full = np.ones(len(data), bool)
    w, traj = trained(ws, w0, full)
    reduced = removal(len(data), 12)
    w_retrain = train(ws, reduced, w0)
    w_dg, figures = deltagrad(ws, full, reduced, traj, DeltaGradConfig(T0=1, j0=0))
    assert figures["explicit_iterations"] == figures["iterations"]
    assert torch.allclose(w_dg, w_retrain, rtol=0, atol=1e-10)
    assert (w - w_retrain).norm() > 1e-3  # the deletion did move the model


def test_every_iteration_explicit_reproduces_retraining_for_additions():
    data = blobs()
    ws, w0 = setup(data)
    without = removal(len(data), 12)
    _, traj = trained(ws, w0, without)
    w_dg, _ = deltagrad(ws, without, np.ones(len(data), bool), traj, DeltaGradConfig(T0=1, j0=0))
    assert torch.allclose(w_dg, train(ws, np.ones(len(data), bool), w0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch_size, epochs", [(250, 20), (None, 80)])
def test_default_settings_land_within_five_percent_of_the_deletion_move(batch_size, epochs):
    # the reference setting's shape: a few large batches per epoch (MNIST: 4 of 16384), or full batch
    data = blobs(n=1000)
    ws, w0 = setup(data, batch_size=batch_size, epochs=epochs, lr=0.1, lr_steps=((epochs // 2, 0.05),))
    full = np.ones(len(data), bool)
    w, traj = trained(ws, w0, full)
    reduced = removal(len(data), 10)
    w_retrain = train(ws, reduced, w0)
    w_dg, figures = deltagrad(ws, full, reduced, traj, DeltaGradConfig())
    assert figures["explicit_iterations"] < figures["iterations"]
    assert (w_dg - w_retrain).norm() <= 0.05 * (w - w_retrain).norm()


def test_approximation_degrades_gracefully_with_longer_periods():
    data = blobs(n=1000)
    ws, w0 = setup(data, epochs=20)
    full = np.ones(len(data), bool)
    _, traj = trained(ws, w0, full)
    reduced = removal(len(data), 10)
    w_retrain = train(ws, reduced, w0)
    errors = [float((deltagrad(ws, full, reduced, traj, DeltaGradConfig(T0=T0))[0] - w_retrain).norm())
              for T0 in (1, 5, 50)]
    assert errors[0] < 1e-10 < errors[1] <= errors[2]


def test_delete_then_add_back_returns_to_the_original_model():
    data = blobs()
    ws, w0 = setup(data)
    full = np.ones(len(data), bool)
    w, traj = trained(ws, w0, full)
    reduced = removal(len(data), 12)
    new = Trajectory.create(None, len(traj), ws.flat.n_params, torch.float64)
    w_deleted, _ = deltagrad(ws, full, reduced, traj, DeltaGradConfig(), new=new)
    w_back, _ = deltagrad(ws, reduced, full, new, DeltaGradConfig())
    moved = (w_deleted - w).norm()
    assert (w_back - w).norm() <= 0.05 * moved


def test_online_requests_end_close_to_one_request_with_their_union():
    data = blobs(n=1000)
    ws, w0 = setup(data, epochs=20)
    active = np.ones(len(data), bool)
    w, traj = trained(ws, w0, active)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(data))
    for request in np.array_split(order[:15], 3):  # three requests of five rows
        after = active.copy()
        after[request] = False
        new = Trajectory.create(None, len(traj), ws.flat.n_params, torch.float64)
        w_online, _ = deltagrad(ws, active, after, traj, DeltaGradConfig(), new=new)
        active, traj = after, new
    _, traj0 = trained(ws, w0, np.ones(len(data), bool))
    w_union, _ = deltagrad(ws, np.ones(len(data), bool), active, traj0, DeltaGradConfig())
    w_retrain = train(ws, active, w0)
    moved = (w - w_retrain).norm()
    assert (w_online - w_union).norm() <= 0.05 * moved
    assert (w_online - w_retrain).norm() <= 0.05 * moved


def test_online_trajectory_matches_retraining_trajectory_when_exact():
    data = blobs()
    ws, w0 = setup(data)
    full = np.ones(len(data), bool)
    _, traj = trained(ws, w0, full)
    reduced = removal(len(data), 7)
    new = Trajectory.create(None, len(traj), ws.flat.n_params, torch.float64)
    deltagrad(ws, full, reduced, traj, DeltaGradConfig(T0=1, j0=0), new=new)
    _, reference = trained(ws, w0, reduced)
    np.testing.assert_allclose(new.params, reference.params, atol=1e-10, rtol=0)
    np.testing.assert_allclose(new.grads, reference.grads, atol=1e-10, rtol=0)


def test_mlp_runs_through_the_same_path_less_accurately():
    data = blobs(n=500)
    ws, w0 = setup(data, model="mlp", hidden=(16,), lr=0.2, lr_steps=())
    full = np.ones(len(data), bool)
    w, traj = trained(ws, w0, full)
    reduced = removal(len(data), 5)
    w_retrain = train(ws, reduced, w0)
    exact, _ = deltagrad(ws, full, reduced, traj, DeltaGradConfig(T0=1, j0=0))
    approx, _ = deltagrad(ws, full, reduced, traj, DeltaGradConfig())
    assert torch.allclose(exact, w_retrain, atol=1e-10, rtol=0)
    assert (approx - w_retrain).norm() < (w - w_retrain).norm()  # closer than not updating at all


def test_compact_lbfgs_equals_recursive_bfgs_updates():
    rng = np.random.default_rng(0)
    p, m = 8, 3
    A = rng.normal(size=(p, p))
    A = torch.from_numpy(A @ A.T + p * np.eye(p))
    pairs = [(s, A @ s) for s in torch.from_numpy(rng.normal(size=(m, p)))]
    hessian = LBFGSHessian(m)
    for s, y in pairs:
        assert hessian.push(s, y)
    s_last, y_last = pairs[-1]
    B = torch.eye(p, dtype=torch.float64) * float(s_last @ y_last) / float(s_last @ s_last)
    for s, y in pairs:
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    v = torch.from_numpy(rng.normal(size=p))
    assert torch.allclose(hessian.matvec(v), B @ v, atol=1e-9)


def test_lbfgs_keeps_the_last_m_pairs_and_rejects_negative_curvature():
    hessian = LBFGSHessian(2)
    e = torch.eye(3, dtype=torch.float64)
    assert not hessian.push(e[0], -e[0])
    assert not hessian.push(torch.zeros(3, dtype=torch.float64), e[0])
    for i in range(3):
        hessian.push(e[i], 2 * e[i])
    assert len(hessian) == 2


def test_trajectory_from_another_recipe_is_refused():
    data = blobs()
    ws, w0 = setup(data)
    _, traj = trained(ws, w0, np.ones(len(data), bool))
    short = Trajectory(traj.params[:-1], traj.grads[:-1])
    with pytest.raises(Exception, match="iterations"):
        deltagrad(ws, np.ones(len(data), bool), removal(len(data), 3), short)


def test_bad_settings_are_refused():
    with pytest.raises(Exception, match="T0"):
        DeltaGradConfig(T0=0)
