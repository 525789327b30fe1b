"""Run directories: train, forget, add, save/load, and what bad input and crashes leave behind."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from expunge import DeltaGrad, ExpungeError, Fitted, IndexedDataset, Retrain, TrainRecipe
from expunge import ledger as ledger_module
from expunge.unlearn import fitted as fitted_module

RECIPE = TrainRecipe(epochs=6, batch_size=64, lr=0.2, lr_steps=((3, 0.1),), weight_decay=1e-3, dtype="float64")


def dataset(n=300, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, d)) + y[:, None]
    return IndexedDataset.from_arrays(X, y, ids=np.arange(1000, 1000 + n), name="blobs")


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def run(tmp_path):
    data = dataset()
    test = dataset(100, seed=1)
    return DeltaGrad(T0=2, j0=4).fit(data, RECIPE, out=tmp_path / "run", test=test)


def test_fit_writes_a_run_directory_and_a_ledger(run):
    files = snapshot(run.path)
    assert {"manifest.json", "ledger.sqlite", "base.npz", "versions/000001/weights.safetensors",
            "versions/000001/trajectory/params.npy", "versions/000001/trajectory/grads.npy"} <= set(files)
    assert [e["kind"] for e in run.ledger.entries()] == ["train"]
    assert isinstance(run.model, torch.nn.Module)
    assert run.accuracy() > 0.5  # chance is 1/3


def test_save_and_load_round_trip_exactly(run, tmp_path):
    run.forget([1003, 1010])
    copy = run.save(tmp_path / "copy")
    loaded = Fitted.load(run.path)
    for other in (copy, loaded):
        assert torch.equal(other.w, run.w) and torch.equal(other.w0, run.w0)
        np.testing.assert_array_equal(other.trajectory.params, run.trajectory.params)
        np.testing.assert_array_equal(other.trajectory.grads, run.trajectory.grads)
        np.testing.assert_array_equal(other.active, run.active)
        assert other.version == run.version == 2
        assert other.recipe == run.recipe
    assert [e["version"] for e in copy.ledger.entries()] == [1, 2]


def test_forget_then_add_back_through_the_run(run):
    before = run.w.clone()
    report = run.forget([1001, 1002, 1050], compare=True)
    assert report.guarantee["kind"] == "approximate" and report.version == 2
    m = report.metrics
    assert m["dist_to_retrain"] < 0.1 * m["dist_previous_to_retrain"]
    assert m["rows"] == 297
    rows = run.universe.rows_of([1001, 1002, 1050])
    run.add(run.universe.X[rows], run.universe.y[rows], ids=[1001, 1002, 1050], method="retrain")
    assert torch.allclose(run.w, before, atol=1e-12)  # exact retraining returns to the original model
    assert [e["kind"] for e in run.ledger.entries()] == ["train", "forget", "add"]


def test_added_rows_get_fresh_ids_and_persist(run):
    new = dataset(5, seed=7)
    report = run.add(new.X, new.y)
    assert report.ids == list(range(1300, 1305))
    loaded = Fitted.load(run.path)
    np.testing.assert_array_equal(loaded.universe.ids[-5:], np.arange(1300, 1305))
    assert loaded.active.sum() == 305


def test_retrain_method_is_exact(run):
    report = run.forget([1000], method=Retrain())
    assert report.guarantee == {"kind": "exact", "iterations": run.plan.n_iterations}


def test_loading_with_another_dataset_is_refused(run):
    with pytest.raises(ExpungeError, match="not the one"):
        Fitted.load(run.path, data=dataset(seed=3))


@pytest.mark.parametrize("request_ids, message", [
    ([5], "not in"),                              # unknown id
    ([1001, 1001], "more than once"),             # duplicate
    ([], "no ids"),                               # empty request
    (list(range(1000, 1300)), "every row"),       # deleting everything
])
def test_bad_forget_requests_change_nothing(run, request_ids, message):
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match=message):
        run.forget(request_ids)
    assert snapshot(run.path) == before


def test_deleting_twice_is_refused(run):
    run.forget([1001])
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match="already deleted"):
        run.forget([1001])
    assert snapshot(run.path) == before


@pytest.mark.parametrize("X, y, ids, message", [
    (np.zeros((2, 4)), [0, 1], None, "features"),                  # wrong feature count
    (np.zeros((2, 5)), [0, 7], None, "labels"),                    # label outside the classes
    (np.zeros((2, 5)), [0, 1], [1000, 5000], "already in"),        # id already present
    (np.zeros((2, 5)), [0, 1], [4000, 4000], "unique"),            # duplicate ids
    (np.full((1, 5), np.nan), [0], None, "NaN"),                   # not finite
    (np.zeros((2, 5)), [0, 1.5], None, "non-integer"),             # a float label, never truncated
    (np.zeros((2, 5)), [0, 1], [4000.5, 4001], "non-integer"),     # a float id, never truncated
])
def test_bad_additions_change_nothing(run, X, y, ids, message):
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match=message):
        run.add(X, y, ids)
    assert snapshot(run.path) == before


def test_ratio_outside_zero_one_is_refused(run):
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(ExpungeError, match="ratio"):
            run.sample_ids(ratio)


def corrupt(path, truncate=False):
    raw = path.read_bytes()
    path.write_bytes(raw[:-100] if truncate else raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:])


@pytest.mark.parametrize("truncate", [False, True])
def test_a_damaged_trajectory_is_rebuilt_by_the_retraining_its_message_names(run, truncate):
    corrupt(run.path / "versions/000001/trajectory/params.npy", truncate)
    before = snapshot(run.path)
    reopened = Fitted.load(run.path)  # the model itself is intact: the run opens, the cache is noted
    assert torch.equal(reopened.w, run.w) and reopened.trajectory is None
    assert [p.where for p in reopened.cache_problems] == ["versions/000001/trajectory/params.npy"]
    with pytest.raises(ExpungeError, match="trajectory is damaged .*params.npy.* --method retrain, which rebuilds it"):
        reopened.forget([1001])
    assert snapshot(run.path) == before  # refused before anything changed
    report = reopened.forget([1001], method="retrain")  # the path the message names
    assert report.version == 2 and reopened.trajectory is not None and not reopened.trajectory_problem
    again = Fitted.load(run.path)
    assert again.cache_problems == [] and again.forget([1002], compare=True).guarantee["kind"] == "approximate"


def test_a_crash_mid_update_leaves_the_previous_run_intact(run, monkeypatch):
    before = snapshot(run.path)
    w = run.w.clone()

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(fitted_module, "save_file", crash)  # fails after the update was computed
    with pytest.raises(RuntimeError, match="power cut"):
        run.forget([1001, 1002])
    assert snapshot(run.path) == before
    assert torch.equal(run.w, w) and run.active.all()
    reloaded = Fitted.load(run.path)
    assert reloaded.version == 1 and torch.equal(reloaded.w, w)
    monkeypatch.undo()
    assert reloaded.forget([1001, 1002]).version == 2


def test_a_crash_between_manifest_and_ledger_is_repaired_by_the_next_write_from_the_manifest(run, monkeypatch):
    monkeypatch.setattr(ledger_module.Ledger, "append_all", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        run.forget([1001], requested_by="alice")
    monkeypatch.undo()
    reloaded = Fitted.load(run.path)
    assert reloaded.version == 2 and reloaded.pending.version == 2
    assert [e["kind"] for e in reloaded.ledger.entries()] == ["train"]  # opening never writes
    # the handle took the whole committed state, not half of it
    assert run.version == 2 and torch.equal(run.w, reloaded.w)
    np.testing.assert_array_equal(run.active, reloaded.active)
    np.testing.assert_array_equal(run.trajectory.params, reloaded.trajectory.params)
    report = reloaded.forget([1002])
    rows = reloaded.ledger.entries()
    assert [(e["version"], e["kind"], e["requested_by"]) for e in rows] == [(1, "train", None), (2, "forget", "alice"),
                                                                          (3, "forget", None)]
    assert rows[2]["prev_hash"] == rows[1]["entry_hash"]
    assert "appended from the manifest" in report.notes[0]


def test_methods_that_need_their_own_runs_are_refused(run):
    for method in ("sisa", "certified"):
        with pytest.raises(ExpungeError, match=f"--method {method}"):
            run.forget([1001], method=method)


def test_a_stale_handle_cannot_overwrite_a_newer_version(run):
    other = Fitted.load(run.path)
    other.forget([1001])
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match="changed since.*RunModel.locked"):
        run.forget([1002])
    assert snapshot(run.path) == before
    with Fitted.locked(run.path) as fresh:  # loading under the lock sees the newest version
        assert fresh.forget([1002]).version == 3


def test_training_into_an_existing_run_is_refused(run):
    with pytest.raises(ExpungeError, match="already holds a run"):
        DeltaGrad().fit(dataset(), RECIPE, out=run.path)


def test_auto_rate_run_records_gens_rates_and_retraining_recomputes_them_without_the_rows(tmp_path):
    from expunge.train import train
    from expunge.trajectory import Trajectory

    recipe = TrainRecipe(epochs=4, batch_size=64, lr=0.5, weight_decay=1e-3, dtype="float64", lr_auto=True, lr_every=2)
    with pytest.raises(ExpungeError, match="--method retrain"):
        DeltaGrad().fit(dataset(), recipe, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run = Retrain().fit(dataset(), recipe, out=tmp_path / "run")
    first = run.rates.copy()
    assert len(first) == run.plan.n_iterations and len(np.unique(first)) > 2  # GeN moved the rate
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match="only exact retraining"):
        run.forget([1003], method="deltagrad")
    assert snapshot(run.path) == before
    run.forget([1003, 1010, 1200])
    # exact retraining = GeN run from scratch on the remaining rows: the same weights and the same rates
    traj = Trajectory.create(None, run.plan.n_iterations, run.flat.n_params, torch.float64)
    w = train(run.ws, run.active, run.w0, traj)
    assert torch.equal(run.w, w)
    np.testing.assert_array_equal(run.rates, traj.rates)
    assert not np.array_equal(run.rates, first)
    np.testing.assert_array_equal(Fitted.load(run.path).rates, traj.rates)


def test_runs_that_do_not_take_an_automatic_rate_refuse_it(tmp_path):
    from expunge.unlearn.certified import CertifiedRemoval
    from expunge.unlearn.private import PrivateTraining
    from expunge.unlearn.sisa import SISA

    recipe = TrainRecipe(epochs=2, batch_size=64, lr=0.5, lr_auto=True)
    for name, updater, match in (("sisa", SISA(shards=2), "SISA"), ("dp", PrivateTraining(epsilon=3.0), "private"),
                                 ("certified", CertifiedRemoval(), "no learning rate")):
        with pytest.raises(ExpungeError, match=match):
            updater.fit(dataset(), recipe, out=tmp_path / name)
        assert not (tmp_path / name).exists()
