"""Certified removal: the Newton step against exact retraining, the bounds, and the budget."""

import hashlib
import math

import numpy as np
import pytest
import torch

from expunge import ExpungeError, IndexedDataset, TrainRecipe
from expunge.unlearn import RunModel
from expunge.unlearn.certified import (CertifiedRemoval, Objective, extract_features, newton_removal, newton_solve,
                                       removal_budget, spectral_norm, targets, worst_case_bound)


def problem(n=400, d=12, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, d)) + 0.8 * np.eye(d)[y % d]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return IndexedDataset.from_arrays(X, y, name="blobs")


def objective(data, active, lam=1e-2, b=None, classes=2):
    X = torch.from_numpy(data.X).double()
    Y = torch.from_numpy(targets(data.y, classes))
    b = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64) if b is None else b
    return Objective(X, Y, active, lam, b)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock" and "cache" not in p.parts}


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_removal_without_noise_is_within_the_bound_of_the_retrained_optimum(classes, seed):
    data = problem(classes=classes, seed=seed)
    active = np.ones(len(data), bool)
    obj = objective(data, active, classes=classes)
    W, grad_norm, _ = newton_solve(obj, tol=1e-12)
    assert grad_norm <= 1e-12
    after = active.copy()
    after[7] = False
    obj_after = objective(data, after, classes=classes)
    step = newton_removal(obj_after, W, [7], spectral_norm(obj.X, active), obj.hessian_factors(W))
    residual = float(obj_after.grad(step.W).norm())
    assert residual <= step.bound  # the data-dependent bound holds
    W_retrain, _, _ = newton_solve(obj_after, tol=1e-12)
    mu = obj_after.lam * obj_after.n  # strong convexity of L on D'
    assert float((step.W - W_retrain).norm()) <= residual / mu + 1e-12
    assert float((step.W - W_retrain).norm()) < 0.05 * float((W - W_retrain).norm())  # far closer than not updating
    assert step.bound <= worst_case_bound(obj.lam, obj_after.n, 1, W.shape[1])


def test_measured_residual_stays_below_the_accumulated_bound():
    data = problem(seed=3)
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data)
    for ids in ([3], [50], [120, 121], [200]):
        report = fitted.forget(ids)
        assert report.metrics["residual_norm"] <= report.guarantee["spent"]
        assert not report.guarantee["retrained"]
    assert fitted.state["removals"] == 4


def test_batch_removal_matches_sequential_removals_and_uses_the_batch_bound(tmp_path):
    data = problem(seed=4)
    batch = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "batch")
    sequential = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "seq")
    ids = [5, 17, 33, 61]
    before = batch.W.clone()
    report = batch.forget(ids, compare=True)
    for i in ids:
        sequential.forget([i])
    moved = float((before - batch.W).norm())
    assert float((batch.W - sequential.W).norm()) < 0.02 * moved
    # one Newton step for the whole batch, charged the batch bound, which covers the measured residual
    assert batch.state["removals"] == 1 and sequential.state["removals"] == 4
    assert report.metrics["removal_bound"] == pytest.approx(report.guarantee["spent"] - batch.state["train_grad_norm"])
    assert report.metrics["residual_norm"] <= report.guarantee["spent"]
    assert float(batch.objective().grad(batch.W).norm()) == pytest.approx(report.metrics["residual_norm"])
    assert report.metrics["dist_to_retrain"] < report.metrics["dist_previous_to_retrain"]


def test_the_budget_formula_is_theorem_3():
    assert removal_budget(2.0, 0.5, 1e-4) == pytest.approx(2.0 * 0.5 / math.sqrt(2 * math.log(1.5 / 1e-4)))


def test_exceeding_the_budget_retrains_with_fresh_noise_never_overspends(tmp_path):
    data = problem(seed=5)
    fitted = CertifiedRemoval(lam=1e-2, sigma=0.05).fit(data, out=tmp_path / "run")
    b0 = fitted.b.clone()
    spent = []
    for i in range(6):
        report = fitted.forget([i])
        spent.append(report.guarantee["spent"])
        assert report.guarantee["spent"] <= report.guarantee["budget"]
    assert fitted.state["retrains"] >= 1
    assert not torch.equal(fitted.b, b0)  # retraining drew fresh noise
    retrained = [e for e in fitted.ledger.entries() if e["report"]["guarantee"].get("retrained")]
    assert retrained and retrained[0]["method"] == "retrain"
    # after a retrain the spend restarts from the solver's own residual
    first = retrained[0]["report"]
    assert first["guarantee"]["spent"] == pytest.approx(first["metrics"]["residual_norm"])


def test_refusing_leaves_the_run_unchanged(tmp_path):
    data = problem(seed=6)
    fitted = CertifiedRemoval(lam=1e-2, sigma=0.01, on_exhausted="refuse").fit(data, out=tmp_path / "run")
    before = snapshot(fitted.path)
    with pytest.raises(ExpungeError, match="budget"):
        fitted.forget([0, 1, 2, 3, 4, 5, 6, 7])
    assert snapshot(fitted.path) == before


def test_spent_budget_survives_save_and_load(tmp_path):
    data = problem(seed=7)
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "run", test=problem(100, seed=9))
    fitted.forget([1, 2])
    fitted.forget([3])
    for other in (RunModel.load(fitted.path), fitted.save(tmp_path / "copy")):
        assert other.state == fitted.state
        assert torch.equal(other.W, fitted.W) and torch.equal(other.b, fitted.b)
        assert other.guarantee() == fitted.guarantee()
    spends = [e["report"]["guarantee"]["spent"] for e in fitted.ledger.entries()]
    assert spends == sorted(spends) and len(spends) == 3


def test_a_damaged_preconditioner_cache_is_rebuilt(tmp_path):
    data = problem(seed=8)
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "run")
    (fitted.path / "cache" / "preconditioner.safetensors").write_bytes(b"garbage")
    reopened = RunModel.load(fitted.path)
    report = reopened.forget([4], compare=True)
    assert report.metrics["dist_to_retrain"] < 0.05 * report.metrics["dist_previous_to_retrain"]


@pytest.mark.parametrize("damage", ["nan", "not a factor", "checksum"])
def test_a_preconditioner_cache_with_wrong_values_is_rebuilt(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    data = problem(seed=8)
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "run")
    path = fitted.path / "cache" / "preconditioner.safetensors"
    factors = load_file(path)["factors"]
    if damage == "nan":
        save_file({"factors": torch.full_like(factors, float("nan"))}, str(path),
                  metadata={"sha256": hashlib.sha256(torch.full_like(factors, float("nan")).numpy().tobytes()).hexdigest()})
    elif damage == "not a factor":
        bad = -factors.transpose(1, 2).contiguous()
        save_file({"factors": bad}, str(path), metadata={"sha256": hashlib.sha256(bad.numpy().tobytes()).hexdigest()})
    else:
        save_file({"factors": factors * 3}, str(path), metadata={"sha256": "0" * 64})
    report = RunModel.load(fitted.path).forget([4], compare=True)
    assert math.isfinite(report.guarantee["spent"])
    assert report.metrics["dist_to_retrain"] < 0.05 * report.metrics["dist_previous_to_retrain"]


@pytest.mark.parametrize("method", ["fisher", "finetune", "deltagrad"])
def test_methods_without_a_certificate_are_refused(tmp_path, method):
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(problem(seed=8), out=tmp_path / "run")
    before = snapshot(fitted.path)
    with pytest.raises(ExpungeError, match=f"certified, and {method} carries no certificate"):
        fitted.forget([4], method=method)
    assert snapshot(fitted.path) == before
    assert fitted.forget([4], method="retrain").guarantee["kind"] == "certified"  # fresh noise keeps it


def test_adding_rows_retrains_exactly(tmp_path):
    data = problem(seed=10)
    fitted = CertifiedRemoval(lam=1e-2, sigma=1.0).fit(data, out=tmp_path / "run")
    new = problem(5, seed=11)
    report = fitted.add(new.X, new.y)
    assert report.method == "retrain" and report.guarantee["retrained"]
    assert float(fitted.objective().grad(fitted.W).norm()) <= 1e-8
    with pytest.raises(ExpungeError, match="rescale"):
        fitted.add(new.X * 3, new.y)


@pytest.mark.parametrize("kwargs, message", [({"lam": 0.0}, "lambda"), ({"sigma": 0.0}, "sigma"),
                                             ({"delta": 1.5}, "delta"), ({"on_exhausted": "maybe"}, "on_exhausted")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ExpungeError, match=message):
        CertifiedRemoval(**kwargs)


def test_non_linear_models_are_refused(tmp_path):
    with pytest.raises(ExpungeError, match="linear model"):
        CertifiedRemoval().fit(problem(), TrainRecipe(model="mlp"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_features_outside_the_unit_ball_are_refused_with_the_fix(tmp_path):
    data = problem()
    big = IndexedDataset(data.X * 5, data.y, data.ids)
    with pytest.raises(ExpungeError, match="rescale"):
        CertifiedRemoval().fit(big, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_ids_are_refused(tmp_path):
    fitted = CertifiedRemoval().fit(problem(), out=tmp_path / "run")
    before = snapshot(fitted.path)
    with pytest.raises(ExpungeError, match="not in"):
        fitted.forget([10_000])
    assert snapshot(fitted.path) == before


def test_certified_head_on_fixed_features():
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU())
    data = problem(classes=3)
    features = extract_features(extractor, data)
    assert np.allclose(np.linalg.norm(features.X, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(features.ids, data.ids)
    fitted = CertifiedRemoval(lam=1e-2).fit(features)
    report = fitted.forget([2], compare=True)
    assert report.metrics["dist_to_retrain"] < report.metrics["dist_previous_to_retrain"]
