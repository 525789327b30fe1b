"""Private runs: DP-SGD training in a run directory, privacy recorded in the manifest, forget requests
answered by private retraining that equals a fresh private training on the remaining rows."""

import json

import numpy as np
import pytest
import torch

from expunge import IndexedDataset, TrainRecipe
from expunge.errors import ExpungeError
from expunge.privacy import accounting
from expunge.unlearn import RunModel
from expunge.unlearn.private import PrivateFitted, PrivateTraining

RECIPE = TrainRecipe(model="mlp", hidden=(16,), epochs=2, batch_size=40, lr=0.5, weight_decay=0.0, dtype="float32")


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 6)) + 2 * y[:, None]
    return IndexedDataset.from_arrays(X, y, ids=np.arange(n) + 1000 * seed)


@pytest.fixture
def run(tmp_path):
    return PrivateTraining(epsilon=4.0, delta=1e-4).fit(blobs(400, 0), RECIPE, out=tmp_path / "run", test=blobs(200, 1))


def test_private_training_records_what_it_spent(run):
    privacy = json.loads((run.path / "manifest.json").read_text())["privacy"]
    assert privacy["epsilon_pld"] <= 4.0 and privacy["epsilon_pld"] > 3.5  # calibrated to the target, not far below
    assert privacy["epsilon_rdp"] >= privacy["epsilon_pld"]
    assert privacy["sample_rate"] == pytest.approx(40 / 400) and privacy["steps"] == 2 * 10
    phases = [accounting.Phase(**p) for p in privacy["phases"]]
    assert accounting.epsilon(phases, 1e-4) == pytest.approx(privacy["epsilon_pld"])
    assert run.accuracy() > 0.6  # well-separated blobs: private training still learns them
    assert isinstance(RunModel.load(run.path), PrivateFitted)


def test_forget_retrains_privately_and_matches_a_fresh_private_training(run):
    ids = run.universe.ids[:7]
    report = run.forget(ids)
    assert report.method == "dp" and report.guarantee["kind"] == "exact"
    assert report.guarantee["privacy"]["epsilon_pld"] <= 4.0
    fresh = run.updater.train(run.ws, run.active, run.w0)[0]
    assert torch.equal(run.w, fresh)
    reopened = RunModel.load(run.path)
    assert torch.equal(reopened.w, run.w) and reopened.privacy["steps"] == 20
    # "retrain" on a private run is private retraining too, never a non-private model
    assert run.forget(run.universe.ids[7:9], method="retrain").method == "dp"


def test_bad_private_settings_are_refused_before_a_run_exists(tmp_path):
    data = blobs(400, 0)
    with pytest.raises(ExpungeError, match="below 1/n"):
        PrivateTraining(epsilon=1, delta=0.01).fit(data, RECIPE, out=tmp_path / "a")
    with pytest.raises(ExpungeError, match="--batch-size"):
        PrivateTraining(epsilon=1, delta=1e-4).fit(data, TrainRecipe(model="mlp"), out=tmp_path / "b")
    with pytest.raises(ExpungeError, match="epsilon"):
        PrivateTraining()
    with pytest.raises(ExpungeError, match="clip"):
        PrivateTraining(epsilon=1, clip_fn="nope")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("transform", ["disk", "doppler", "dicesgd"])
def test_private_runs_train_with_a_transform_and_keep_it_on_retraining(tmp_path, transform):
    run = PrivateTraining(noise_multiplier=1.0, delta=1e-4, transform=transform).fit(blobs(200, 0), RECIPE, out=tmp_path / "r")
    assert run.manifest["method"]["config"]["transform"] == transform
    plain = PrivateTraining(noise_multiplier=1.0, delta=1e-4).fit(blobs(200, 0), RECIPE, out=tmp_path / "p")
    assert not torch.equal(run.w, plain.w)  # the transform changed training
    run.forget(run.universe.ids[:3])
    assert torch.equal(run.w, run.updater.train(run.ws, run.active, run.w0)[0])
    with pytest.raises(ExpungeError, match="dp-transform"):
        PrivateTraining(epsilon=1, transform="kalman")


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("method", ["finetune", "fisher", "ascent", "deltagrad"])
def test_a_private_run_refuses_non_private_updates_without_drop_privacy(run, method):
    before = snapshot(run.path)
    with pytest.raises(ExpungeError, match=f"differentially private .* {method} is not a private update.*--drop-privacy"):
        run.forget(run.universe.ids[:3], method=method)
    assert snapshot(run.path) == before
    with pytest.raises(ExpungeError, match="keeps the privacy guarantee"):  # nothing to drop with the run's own update
        run.forget(run.universe.ids[:3], drop_privacy=True)


def test_drop_privacy_records_that_the_guarantee_ended_and_private_retraining_restores_it(run):
    epsilon = run.privacy["epsilon_pld"]
    report = run.forget(run.universe.ids[:3], method="finetune", drop_privacy=True, requested_by="ops",
                        reason="urgent takedown before the private retraining")
    ended = report.guarantee["privacy_ended"]
    assert ended["version"] == 2 and ended["method"] == "finetune" and ended["privacy"]["epsilon_pld"] == epsilon
    reopened = RunModel.load(run.path)
    assert "privacy" not in reopened.manifest and reopened.manifest["privacy_ended"] == ended
    assert reopened.privacy == {} and reopened.guarantees() == set()
    row = reopened.ledger.entries()[-1]
    assert row["guarantee"]["privacy_ended"] == ended and row["requested_by"] == "ops"
    # the guarantee is gone: further non-private updates need no flag, and the flag now has nothing to drop
    reopened.forget(reopened.universe.ids[3:4], method="finetune")
    with pytest.raises(ExpungeError, match="not private"):
        reopened.forget(reopened.universe.ids[4:5], method="finetune", drop_privacy=True)
    report = reopened.forget(reopened.universe.ids[4:5])  # private retraining: a private model again
    assert report.method == "dp" and reopened.guarantees() == {"private"}
    assert "privacy_ended" not in reopened.manifest and reopened.privacy["epsilon_pld"] <= 4.0


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["none", "disk"])
def test_two_processes_train_the_one_process_model(tmp_path, transform):
    """--nproc 2: DDP over gloo with the shared row and noise streams gives one process's model (to rounding)
    and its epsilon, with or without a gradient transform; a forget request retrains in two processes as well."""
    data = blobs(200, 0)
    settings = dict(noise_multiplier=1.0, delta=1e-4, transform=transform)
    one = PrivateTraining(**settings).fit(data, RECIPE, out=tmp_path / "one")
    two = PrivateTraining(**settings, nproc=2).fit(data, RECIPE, out=tmp_path / "two")
    assert torch.allclose(one.w, two.w, rtol=0, atol=1e-5)
    assert (one.w - one.w0).abs().max() > 1e-2  # it trained
    assert two.privacy["epsilon_pld"] == pytest.approx(one.privacy["epsilon_pld"], rel=1e-12)
    reopened = RunModel.load(two.path)
    assert reopened.updater.nproc == 2 and reopened.updater.transform == transform


def test_nproc_is_checked_before_a_run_exists():
    with pytest.raises(ExpungeError, match="--nproc"):
        PrivateTraining(noise_multiplier=1.0, nproc=0)
