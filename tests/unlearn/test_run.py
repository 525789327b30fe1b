"""Batches of requests through RunModel: one version and one ledger row per request, exact against a single update
of the same rows, receipts per request, and a crash between the version and the rows repaired from the manifest."""

import shutil

import numpy as np
import pytest

from expunge import DeltaGrad, ExpungeError, Fitted, IndexedDataset, TrainRecipe
from expunge.unlearn.audit import make_receipt, verify_run
from expunge.unlearn.run import BatchItem, Request, RunModel

RECIPE = TrainRecipe(epochs=2, batch_size=64, lr=0.2, weight_decay=1e-3, dtype="float64")


def dataset(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return IndexedDataset.from_arrays(rng.normal(size=(n, 5)) + y[:, None], y, ids=np.arange(1000, 1000 + n))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return DeltaGrad(T0=2, j0=4).fit(dataset(), RECIPE, out=tmp_path_factory.mktemp("pristine") / "run").path


@pytest.fixture
def run(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


ITEMS = [BatchItem("r1", (1001, 1002), Request("alice", "erasure", "T-1")),
         BatchItem("r2", (1002, 1003), Request("bob")),
         BatchItem("r3", (1010,), Request(reference="T-3"))]


def test_a_batch_is_one_version_with_a_row_per_request_and_equals_one_update_of_the_union(run, tmp_path):
    shutil.copytree(run, tmp_path / "alone", ignore=shutil.ignore_patterns(".lock"))
    model = Fitted.load(run)
    report, entries = model.forget_batch("b1", ITEMS, "retrain")
    assert report.version == 2 and report.ids == [1001, 1002, 1003, 1010]
    assert [e.seq for e in entries] == [2, 3, 4] and {e.version for e in entries} == {2}
    assert [e.body["request_id"] for e in entries] == ["r1", "r2", "r3"]
    assert [e.body["report"]["ids"] for e in entries] == [[1001, 1002], [1002, 1003], [1010]]
    assert [e.body["batch"] for e in entries] == [{"id": "b1", "index": i, "size": 3} for i in range(3)]
    assert [e.body["requested_by"] for e in entries] == ["alice", "bob", None]
    assert entries[0].body["reason"] == "erasure" and entries[2].body["reference"] == "T-3"
    alone = Fitted.load(tmp_path / "alone")
    alone.forget([1001, 1002, 1003, 1010], "retrain")
    assert np.array_equal(model.w.numpy(), alone.w.numpy())  # the batch is exactly the union's update
    assert verify_run(run).ok, verify_run(run).problems
    assert [e.seq for e in RunModel.batch_rows(run, "b1")] == [2, 3, 4] and RunModel.batch_rows(run, "b0") == []
    model.forget([1020])  # a single request after a batch chains on
    assert verify_run(run).ok and [e.seq for e in RunModel.batch_rows(run, "b1")] == [2, 3, 4]


def test_each_request_of_a_batch_has_its_own_receipt(run):
    Fitted.load(run).forget_batch("b1", ITEMS)
    receipt = make_receipt(run, seq=3)
    assert receipt["entry"]["request_id"] == "r2" and receipt["entry"]["report"]["ids"] == [1002, 1003]
    with pytest.raises(ExpungeError, match="batch of 3 requests .* --seq"):
        make_receipt(run, version=2)
    assert make_receipt(run, version=1)["entry"]["seq"] == 1


def test_a_crash_between_the_version_and_its_rows_is_repaired_with_every_row_from_the_manifest(run):
    def crash():
        raise KeyboardInterrupt("killed after the version was committed")

    with pytest.raises(KeyboardInterrupt):
        Fitted.load(run).forget_batch("b1", ITEMS, committed=crash)
    reopened = Fitted.load(run)
    assert reopened.version == 2 and reopened.ledger.length() == 1
    assert [e.seq for e in reopened.pending_rows] == [2, 3, 4]
    assert [e.body["request_id"] for e in RunModel.batch_rows(run, "b1")] == ["r1", "r2", "r3"]  # from the manifest
    assert "lacks rows 2..4" in " ".join(p.what for p in verify_run(run).problems)
    assert [e.seq for e in reopened.repair()] == [2, 3, 4]
    assert reopened.ledger.length() == 4 and verify_run(run).ok and reopened.repair() == []


def test_the_next_write_also_appends_a_crashed_batchs_rows(run):
    with pytest.raises(KeyboardInterrupt):
        Fitted.load(run).forget_batch("b1", ITEMS, committed=lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    report = Fitted.load(run).forget([1050])
    assert "ledger rows 2..4" in report.notes[0] and Fitted.load(run).ledger.length() == 5 and verify_run(run).ok


def test_an_added_batch_assigns_fresh_ids_in_request_order(run):
    rng = np.random.default_rng(1)
    items = [BatchItem("a1", None, rows=(rng.normal(size=(2, 5)), [0, 1])),
             BatchItem("a2", (5000,), rows=(rng.normal(size=(1, 5)), [2])),
             BatchItem("a3", None, rows=(rng.normal(size=(1, 5)), [1]))]
    report, entries = Fitted.load(run).add_batch("b2", items)
    assert [e.body["report"]["ids"] for e in entries] == [[5001, 5002], [5000], [5003]]
    assert sorted(report.ids) == [5000, 5001, 5002, 5003] and verify_run(run).ok


@pytest.mark.parametrize("items, words", [
    ([BatchItem("r1", (1001, 1001))], "more than once"),
    ([BatchItem("r1", (1001,)), BatchItem("r1", (1002,))], "its own non-empty id"),
    ([BatchItem("r1", (99,))], "not in"),
    ([BatchItem("r1", (1001.5,))], "ids must be integers"),
    ([], "holds no requests"),
])
def test_bad_batches_change_nothing(run, items, words):
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(ExpungeError, match=words):
        Fitted.load(run).forget_batch("b1", items)
    assert (run / "manifest.json").read_bytes() == before
