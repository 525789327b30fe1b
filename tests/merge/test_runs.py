"""merge_runs and tradeoff_run on zoo runs: what the merged run holds and records, the trade-off's version and
ledger row, and every bad input refused before anything is written."""

import json
import shutil

import numpy as np
import pytest
import torch

from expunge import ExpungeError
from expunge.data import load_dataset
from expunge.merge import TaskVectors, interpolation, merge_runs, tradeoff_run
from expunge.unlearn import RunModel
from expunge.unlearn.audit import verify_run

from .zoo import accuracy, build


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build(tmp_path_factory.mktemp("zoo"))


def evals(zoo):
    return {"plain": "digits", "inverted": str(zoo["npz"])}


def test_train_init_starts_from_the_base_and_records_it(zoo):
    base, plain = RunModel.load(zoo["base"]), RunModel.load(zoo["plain"])
    assert torch.equal(plain.w0, base.w)
    assert plain.manifest["init"]["run_id"] == base.run_id
    assert plain.manifest["init"]["model_hash"] == base.manifest["model_hash"]


def test_one_hot_c_gives_the_fine_tuned_model_bit_for_bit(zoo, tmp_path):
    for c, name in (([1.0, 0.0], "plain"), ([0.0, 1.0], "inverted")):
        out = tmp_path / name
        merge_runs(zoo["base"], [zoo["plain"], zoo["inverted"]], evals(zoo), "task-arithmetic", c=c, out=out)
        merged, model = RunModel.load(out), RunModel.load(zoo[name])
        assert torch.equal(merged.w, model.w) and merged.manifest["model_hash"] == model.manifest["model_hash"]
    zero = merge_runs(zoo["base"], [zoo["plain"], zoo["inverted"]], evals(zoo), "task-arithmetic", c=[0, 0],
                      out=tmp_path / "zero").run
    assert torch.equal(zero.w, RunModel.load(zoo["base"]).w)


def test_the_merged_run_records_what_made_it(zoo, tmp_path):
    out = tmp_path / "merged"
    outcome = merge_runs(zoo["base"], [zoo["plain"], zoo["inverted"]], evals(zoo), "map",
                         preferences={"plain": 1, "inverted": 1}, out=out)
    merged = RunModel.load(out)  # opens like any run, its integrity checked
    assert verify_run(out).ok
    record = merged.manifest["merge"]
    base, plain, inverted = (RunModel.load(zoo[k]) for k in ("base", "plain", "inverted"))
    assert record["base"]["run_id"] == base.run_id and record["base"]["model_hash"] == base.manifest["model_hash"]
    assert [m["model_hash"] for m in record["models"]] == [plain.manifest["model_hash"], inverted.manifest["model_hash"]]
    assert [m["base_check"] for m in record["models"]] == ["init", "init"]
    vectors = TaskVectors.from_models(base.model_state(), [plain.model_state(), inverted.model_state()], min_cosine=None)
    assert record["task_vectors"]["hashes"] == vectors.hashes()
    assert len(record["c"]) == 2 and all(0 <= v <= 1 for v in record["c"])
    assert torch.equal(merged.w, vectors.merge(record["c"])["w"])  # the model is the merge at the recorded c
    assert set(record["predicted"]) == set(record["measured"]) == {"plain", "inverted"}
    test, inv_test = load_dataset("digits")[1], load_dataset(str(zoo["npz"]))[1]
    assert record["measured"]["plain"] == pytest.approx(accuracy(merged, test), abs=1e-12)
    assert record["measured"]["inverted"] == pytest.approx(accuracy(merged, inv_test), abs=1e-12)
    assert record["evaluations"] == outcome.result.n_evaluations == 15  # 12 design points + 3 held out
    assert set(record["r2_heldout"]) == {"plain", "inverted"}
    folder = merged.run.current(merged.manifest)
    front = json.loads((folder / "front.json").read_text())
    assert front["chosen"]["c"] == record["c"] and front["front"]["front"]
    assert (folder / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert {"front.json", "front.png"} <= set(merged.manifest["files"])  # sealed with the version
    assert merged.manifest["method"]["name"] == "merge" and merged.guarantees() == set()
    row = merged.ledger.entries()[-1]
    assert row["kind"] == "merge" and row["guarantee"]["kind"] == "evaluated"
    assert row["guarantee"]["by_construction"] == "none"


def test_a_merged_run_refuses_updates(zoo, tmp_path):
    out = tmp_path / "merged"
    merge_runs(zoo["base"], [zoo["plain"], zoo["inverted"]], evals(zoo), "task-arithmetic", c=[0.5, 0.5], out=out)
    merged = RunModel.load(out)
    with pytest.raises(ExpungeError, match="merge does not serve forget requests"):
        merged.forget(merged.universe.ids[:3])
    with pytest.raises(ExpungeError, match="is a merged model"):  # retraining would fit the base's rows alone
        merged.forget(merged.universe.ids[:3], method="retrain")
    assert RunModel.load(out).version == merged.version


@pytest.mark.parametrize("case, words", [
    ("architecture", "another architecture"),
    ("other base", "fine-tuned from another run"),
    ("c outside", "outside the bounds"),
    ("c count", "1 coefficient(s) given for 2"),
    ("c with map", "--c merges at the coefficients given"),
    ("prefer unknown", "unknown metric(s) ['fashion']"),
    ("prefer negative", "non-negative"),
    ("out exists", "exists; --out must name a new directory"),
    ("method", "unknown merge method"),
    ("twice", "given twice"),
    ("no eval", "at least one evaluation set"),
    ("eval features", "has 4 features; the models take 64"),
])
def test_bad_input_is_refused_before_anything_is_written(zoo, tmp_path, case, words):
    out = tmp_path / "merged"
    models = [zoo["plain"], zoo["inverted"]]
    kwargs = {"method": "map", "out": out}
    ev = evals(zoo)
    if case == "architecture":
        models = [zoo["plain"], zoo["mlp"]]
    elif case == "other base":
        models = [zoo["plain"], zoo["stranger"]]
    elif case == "c outside":
        kwargs.update(method="task-arithmetic", c=[1.5, 0.0])
    elif case == "c count":
        kwargs.update(method="task-arithmetic", c=[1.0])
    elif case == "c with map":
        kwargs.update(c=[1.0, 0.0])
    elif case == "prefer unknown":
        kwargs.update(preferences={"plain": 1, "fashion": 2})
    elif case == "prefer negative":
        kwargs.update(preferences={"plain": -1})
    elif case == "out exists":
        out.mkdir()
    elif case == "method":
        kwargs.update(method="average")
    elif case == "twice":
        models = [zoo["plain"], zoo["plain"]]
    elif case == "no eval":
        ev = {}
    elif case == "eval features":
        np.savez(tmp_path / "small.npz", X=np.zeros((5, 4)), y=np.zeros(5, int))
        ev = {"small": str(tmp_path / "small.npz")}
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ExpungeError) as error:
        merge_runs(zoo["base"], models, ev, **kwargs)
    assert words in str(error.value), str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_models_that_do_not_record_their_base_are_checked_by_cosine(zoo, tmp_path):
    # unrelated was trained from a fresh initialisation on another task: it fails the cosine check
    with pytest.raises(ExpungeError, match="does not look fine-tuned from this base"):
        merge_runs(zoo["base"], [zoo["plain"], zoo["unrelated"]], evals(zoo), "task-arithmetic", c=[1, 0],
                   out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------ tradeoff


@pytest.fixture
def deleted(zoo, tmp_path):
    """A copy of the plain run saved at version 1, and the run after fine-tuning away class 3 (version 2)."""
    run = tmp_path / "run"
    shutil.copytree(zoo["plain"], run, ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(run, tmp_path / "run.v1")
    fitted = RunModel.load(run)
    fitted.forget(fitted.universe.ids[fitted.universe.y == 3], method="finetune")
    return run, tmp_path / "run.v1"


def test_tradeoff_writes_a_version_and_a_ledger_row_that_verify(deleted):
    run, copy = deleted
    with RunModel.locked(run) as fitted:
        before, after, rows = RunModel.load(copy).w, fitted.w.clone(), fitted.active.copy()
        outcome = tradeoff_run(fitted, str(copy), preferences={"forget": 1, "retain": 1})
    assert verify_run(run).ok
    reopened = RunModel.load(run)
    assert reopened.version == 3 and np.array_equal(reopened.active, rows)  # the rows stay
    row = reopened.ledger.entries()[-1]
    assert row["kind"] == "tradeoff" and row["method"] == "tradeoff" and row["n_rows"] == 0
    assert row["guarantee"]["kind"] == "evaluated" and row["guarantee"]["by_construction"] == "none"
    assert row["guarantee"]["before"]["version"] == 1 and row["guarantee"]["after"]["version"] == 2
    c = outcome.chosen["c"]
    assert 0 <= c[0] <= 1 and row["guarantee"]["c"] == c
    assert torch.equal(reopened.w, interpolation({"w": before}, {"w": after}).merge(c)["w"])
    # its measured metrics are what the row says: accuracy on the deleted rows (forget) and the test split (retain)
    forget_rows = reopened.universe.take(np.flatnonzero(~reopened.active))
    assert row["guarantee"]["measured"]["forget"] == pytest.approx(accuracy(reopened, forget_rows), abs=1e-12)
    assert row["guarantee"]["measured"]["retain"] == pytest.approx(accuracy(reopened, reopened.test), abs=1e-12)
    folder = reopened.run.current(reopened.manifest)
    assert {"front.json", "front.png"} <= set(reopened.manifest["files"]) and (folder / "front.json").exists()


def test_tradeoff_refuses_a_version_whose_weights_are_gone_and_foreign_copies(deleted, zoo, tmp_path):
    run, copy = deleted
    fitted = RunModel.load(run)
    with pytest.raises(ExpungeError, match="keeps the weights of its current version only"):
        tradeoff_run(fitted, 1)
    with pytest.raises(ExpungeError, match="earlier version than the current one"):
        tradeoff_run(fitted, 2)
    with pytest.raises(ExpungeError, match="has no version 9"):
        tradeoff_run(fitted, 9)
    with pytest.raises(ExpungeError, match="is not a copy of"):
        tradeoff_run(fitted, str(zoo["inverted"]))
    with pytest.raises(ExpungeError, match="unknown metric"):
        tradeoff_run(fitted, str(copy), preferences={"utility": 1})
    with pytest.raises(ExpungeError, match="--eval forget=DATA and --eval retain=DATA"):
        tradeoff_run(fitted, str(copy), evals={"forget": "deleted"})
    with pytest.raises(ExpungeError, match="must contain"):
        tradeoff_run(fitted, str(copy), bounds=(0.2, 1.0))
    assert RunModel.load(run).version == 2 and verify_run(run).ok


def test_tradeoff_is_not_a_forget_method(deleted):
    run, _ = deleted
    fitted = RunModel.load(run)
    with pytest.raises(ExpungeError, match="tradeoff does not serve forget requests"):
        fitted.forget(fitted.universe.ids[:2], method="tradeoff")
