"""SISA: exactness against from-scratch training, only affected shards retrained, backends agree."""

import hashlib

import numpy as np
import pytest
import torch

from expunge import ExpungeError, IndexedDataset, TrainRecipe
from expunge.unlearn import RunModel
from expunge.unlearn import sisa as sisa_module
from expunge.unlearn.sisa import SISA, assign, run_jobs

RECIPE = TrainRecipe(model="mlp", hidden=(16,), epochs=2, batch_size=32, lr=1e-2, optimizer="Adam", dtype="float32")


def dataset(n=240, d=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, d)) + y[:, None]
    return IndexedDataset.from_arrays(X, y, ids=np.arange(500, 500 + n), name="blobs")


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def from_scratch(model):
    """Every shard trained from stage 0 on the current rows, with the same seeds and assignment."""
    jobs = [model._job(s, 0, model.universe, model.active, model.shard, model.slice) for s in range(model.settings.shards)]
    return {(job.shard, stage): w for job, ws in zip(jobs, run_jobs(jobs, model.settings)) for stage, w in enumerate(ws)}


@pytest.fixture
def fitted(tmp_path):
    return SISA(shards=4, slices=3, workers=1).fit(dataset(), RECIPE, out=tmp_path / "run", test=dataset(60, seed=1))


def test_assignment_is_disjoint_and_balanced():
    shard, slice_ = assign(103, sisa_module.SISAConfig(shards=5, slices=4), seed=0)
    counts = np.bincount(shard, minlength=5)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    for s in range(5):
        assert np.bincount(slice_[shard == s], minlength=4).max() - np.bincount(slice_[shard == s], minlength=4).min() <= 1


def test_deletion_is_bit_identical_to_training_from_scratch(fitted):
    rows = [3, 40, 41, 130, 222]
    report = fitted.forget(fitted.universe.ids[rows], compare=True)
    assert report.metrics["identical_to_retrain"] is True
    reference = from_scratch(fitted)
    assert set(reference) == set(fitted.checkpoints)
    for key, w in reference.items():
        assert np.array_equal(fitted.checkpoints[key], w), key
    assert report.guarantee == {"kind": "exact"}


def test_addition_is_bit_identical_and_lands_in_a_last_slice(fitted):
    new = dataset(4, seed=9)
    report = fitted.add(new.X, new.y)
    added = np.arange(len(fitted.universe) - 4, len(fitted.universe))
    assert (fitted.slice[added] == fitted.settings.slices - 1).all()
    assert report.metrics["stages_retrained"] == report.metrics["shards_retrained"]  # one stage per shard
    for key, w in from_scratch(fitted).items():
        assert np.array_equal(fitted.checkpoints[key], w), key


def test_only_the_affected_shards_and_slices_are_retrained(fitted, monkeypatch):
    calls = []
    real = sisa_module.train_shard

    def counting(job):
        calls.append((job.shard, job.start_stage))
        return real(job)

    monkeypatch.setattr(sisa_module, "train_shard", counting)
    row = int(np.flatnonzero((fitted.shard == 2) & (fitted.slice == 1))[0])
    other = int(np.flatnonzero((fitted.shard == 2) & (fitted.slice == 2))[0])  # same shard, later slice: one job
    before = {k: v.copy() for k, v in fitted.checkpoints.items()}
    report = fitted.forget(fitted.universe.ids[[row, other]])
    assert calls == [(2, 1)]
    assert report.metrics["shards_retrained"] == 1 and report.metrics["stages_retrained"] == 2
    for (s, r), w in fitted.checkpoints.items():
        assert np.array_equal(w, before[(s, r)]) == (s != 2 or r < 1)
    assert report.metrics["rows_processed"] < report.metrics["rows_full_retrain"] / 4


def test_save_and_load_round_trip(fitted, tmp_path):
    fitted.forget([510])
    for other in (RunModel.load(fitted.path), fitted.save(tmp_path / "copy")):
        assert type(other).__name__ == "SISAFitted"
        assert set(other.checkpoints) == set(fitted.checkpoints)
        assert all(np.array_equal(other.checkpoints[k], w) for k, w in fitted.checkpoints.items())
        np.testing.assert_array_equal(other.shard, fitted.shard)
        assert other.accuracy() == fitted.accuracy()


def test_a_failure_while_retraining_leaves_the_previous_ensemble(fitted, monkeypatch):
    before = snapshot(fitted.path)

    def broken(job):
        raise RuntimeError("worker died")

    monkeypatch.setattr(sisa_module, "train_shard", broken)
    with pytest.raises(RuntimeError, match="worker died"):
        fitted.forget([505])
    assert snapshot(fitted.path) == before
    monkeypatch.undo()
    reopened = RunModel.load(fitted.path)
    assert reopened.version == 1 and reopened.active.all()
    assert [e["kind"] for e in reopened.ledger.entries()] == ["train"]


def test_local_worker_processes_match_inline_training(tmp_path):
    inline = SISA(shards=2, slices=2, workers=1).fit(dataset(), RECIPE, out=tmp_path / "a")
    pooled = SISA(shards=2, slices=2, workers=2).fit(dataset(), RECIPE, out=tmp_path / "b")
    assert all(np.array_equal(inline.checkpoints[k], w) for k, w in pooled.checkpoints.items())


def test_ray_backend_gives_identical_models(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'expunge[ray]')")
    try:
        local = SISA(shards=2, slices=2, workers=1).fit(dataset(), RECIPE, out=tmp_path / "local")
        on_ray = SISA(shards=2, slices=2, backend="ray").fit(dataset(), RECIPE, out=tmp_path / "ray")
        assert all(np.array_equal(local.checkpoints[k], w) for k, w in on_ray.checkpoints.items())
        local.forget([520]), on_ray.forget([520])
        assert all(np.array_equal(local.checkpoints[k], w) for k, w in on_ray.checkpoints.items())
    finally:
        ray.shutdown()


@pytest.mark.parametrize("model, optimizer", [("logreg", "SGD"), ("cnn", "AdamW")])
def test_any_model_of_the_zoo_and_any_torch_optimizer(tmp_path, model, optimizer):
    rng = np.random.default_rng(0)
    data = IndexedDataset.from_arrays(rng.random((120, 64)), rng.integers(0, 3, 120))
    recipe = TrainRecipe(model=model, epochs=1, batch_size=40, lr=1e-2, optimizer=optimizer, dtype="float32")
    fitted = SISA(shards=3, slices=2, aggregation="mean", workers=1).fit(data, recipe, out=tmp_path / "run")
    assert fitted.forget([7], compare=True).metrics["identical_to_retrain"]
    out = fitted.model(torch.from_numpy(data.X[:5]))
    assert out.shape == (5, 3) and torch.allclose(out.sum(1), torch.ones(5))


@pytest.mark.parametrize("kwargs, message", [({"shards": 0}, "shard"), ({"aggregation": "max"}, "aggregation"),
                                             ({"backend": "spark"}, "backend")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ExpungeError, match=message):
        SISA(**kwargs)


@pytest.mark.parametrize("method", ["deltagrad", "fisher", "finetune"])
def test_methods_that_are_not_exact_are_refused_on_a_sisa_run(fitted, method):
    before = snapshot(fitted.path)
    with pytest.raises(ExpungeError, match=f"this run is exact .* {method} is not; update it with sisa"):
        fitted.forget([501], method=method)
    with pytest.raises(ExpungeError, match="SISA run"):  # exact, but not how a SISA run is updated
        fitted.forget([501], method="retrain")
    assert snapshot(fitted.path) == before
