"""Audit of whole runs: tampering is found by `verify_run` and refused by the next write; a manifest ahead of
or behind its ledger is reported, never written over; receipts check alone and against the run; runs of the
earlier format migrate once."""

import hashlib
import json
import shutil
import sqlite3

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from expunge import DeltaGrad, ExpungeError, Fitted, IndexedDataset, TrainRecipe
from expunge.artifact import file_sha256
from expunge.integrity import manifest_digest
from expunge.signing import generate
from expunge.unlearn.audit import V1_LEDGER, check_receipt, make_receipt, migrate_run, verify_run

RECIPE = TrainRecipe(epochs=2, batch_size=64, lr=0.2, weight_decay=1e-3, dtype="float64")


def dataset(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return IndexedDataset.from_arrays(rng.normal(size=(n, 5)) + y[:, None], y, ids=np.arange(1000, 1000 + n))


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def make_run(path, signing_key=None):
    run = DeltaGrad(T0=2, j0=4).fit(dataset(), RECIPE, out=path, signing_key=signing_key)
    run.forget([1001, 1002], requested_by="alice", reason="erasure request", reference="T-1", signing_key=signing_key)
    run.forget([1003], requested_by="bob", signing_key=signing_key)
    return run


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pristine") / "run").path


@pytest.fixture
def run(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "run"


def text(result):
    return " | ".join(str(p) for p in result.problems)


def tamper(run, sql):
    db = sqlite3.connect(run / "ledger.sqlite")
    db.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;" + sql)
    db.close()


def assert_next_write_refused(run, *words):
    """Opening for a write (and a write through an open handle) refuse, and nothing on disk changes."""
    before = snapshot(run)
    with pytest.raises(ExpungeError, match="failed its integrity check") as caught:
        Fitted.load(run).forget([1010])
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert snapshot(run) == before


def test_a_pristine_run_verifies(run):
    result = verify_run(run)
    assert result.ok, text(result)
    assert any("3 row(s)" in line for line in result.checked) and any("hashes to" in line for line in result.checked)


def test_a_row_edited_with_the_triggers_dropped_is_found_by_verify_and_the_next_write(run):
    tamper(run, "UPDATE entries SET body = replace(body, '\"requested_by\":\"alice\"', '\"requested_by\":\"carol\"') "
                "WHERE seq = 2;")
    assert "ledger row 2 (version 2): its content does not hash" in text(verify_run(run))
    Fitted.load(run)  # reading checks the head only: row 2 is not the head
    assert_next_write_refused(run, "ledger row 2")


def test_a_deleted_middle_row_is_found_by_verify_and_the_next_write(run):
    tamper(run, "DELETE FROM entries WHERE seq = 2;")
    assert "it is row 2 of the file but says seq 3" in text(verify_run(run))
    assert_next_write_refused(run)


def test_a_deleted_last_row_is_found_and_restored_from_the_manifest_by_the_next_write(run):
    head = json.loads((run / "manifest.json").read_text())["last_entry"]
    tamper(run, "DELETE FROM entries WHERE seq = 3;")
    assert "ledger.sqlite: it lacks row 3 (version 3)" in text(verify_run(run))
    report = Fitted.load(run).forget([1010])
    assert "ledger row 3 (version 3)" in report.notes[0]
    rows = Fitted.load(run).ledger.entries()
    assert [r["version"] for r in rows] == [1, 2, 3, 4] and rows[2]["entry_hash"] == head["entry_hash"]
    assert verify_run(run).ok


def test_a_deleted_ledger_is_found_by_verify_reading_and_writing_never_recreated(run):
    (run / "ledger.sqlite").unlink()
    assert "ledger.sqlite: is missing, but the manifest records 3 request(s)" in text(verify_run(run))
    assert_next_write_refused(run, "restore ledger.sqlite from the backup")
    assert not (run / "ledger.sqlite").exists()


def test_swapped_weights_with_a_matching_manifest_hash_are_found(run, tmp_path):
    other = Fitted.train(dataset(seed=5), RECIPE, "deltagrad", out=tmp_path / "other")
    weights = run / "versions/000003/weights.safetensors"
    shutil.copy(other.path / "versions/000001/weights.safetensors", weights)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = file_sha256(weights)
    manifest["model_hash"] = other.manifest["model_hash"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    found = text(verify_run(run))
    assert "manifest.json: its content (file hashes" in found and "its model hash is not the one" in found
    assert_next_write_refused(run, "manifest.json")


def test_swapped_weights_alone_are_found(run):
    weights = run / "versions/000003/weights.safetensors"
    tensors = load_file(weights)
    save_file({"w": tensors["w"] + 1e-3, "w0": tensors["w0"]}, str(weights))
    assert "versions/000003/weights.safetensors: it is corrupted" in text(verify_run(run))
    assert_next_write_refused(run, "weights.safetensors")


def test_a_chain_rewritten_without_the_operators_key_is_found(tmp_path):
    key, forger = generate(tmp_path / "key"), generate(tmp_path / "forger")
    signed = make_run(tmp_path / "signed", signing_key=key).path
    assert verify_run(signed, key.verifier(), pinned=True).ok
    # someone with file access rebuilds the history (dropping a request) and signs it with a key of their own
    forged = DeltaGrad(T0=2, j0=4).fit(dataset(), RECIPE, out=tmp_path / "forged", signing_key=forger)
    forged.forget([1003], requested_by="bob", signing_key=forger)
    result = verify_run(forged.path, key.verifier(), pinned=True)
    assert not result.ok and f"signed by key {forger.key_id} (ed25519), not by the key given ({key.key_id})" in text(result)
    # the run's own writes need its key
    with pytest.raises(ExpungeError, match="ledger is signed"):
        Fitted.load(signed).forget([1010])
    with pytest.raises(ExpungeError, match="is not .*'s"):
        Fitted.load(signed).forget([1010], signing_key=forger)
    assert Fitted.load(signed).forget([1010], signing_key=key).version == 4


def test_a_run_directory_restored_behind_its_ledger_commits_nothing(run, tmp_path):
    backup = tmp_path / "backup"
    shutil.copytree(run, backup)
    Fitted.load(run).forget([1010], requested_by="dave")  # version 4, after the backup
    for name in ("manifest.json", "versions"):  # the run directory restored; the ledger is the newer one
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
        shutil.move(backup / name, run / name)
    found = text(verify_run(run))
    assert "the ledger records 1 request(s) after this version" in found and "requested by dave" in found
    with pytest.raises(ExpungeError, match="after this version"):
        Fitted.load(run)  # serving this model would ignore dave's request
    before = snapshot(run)
    with pytest.raises(ExpungeError, match="restore the run directory that matches the ledger"):
        Fitted.load(run).forget([1011])
    assert snapshot(run) == before


def test_an_older_ledger_restored_behind_its_run_commits_nothing(run, tmp_path):
    old = tmp_path / "old"
    make_run(old)  # another history: its ledger is not this run's
    shutil.copy(old / "ledger.sqlite", run / "ledger.sqlite")
    assert "is not the row the manifest committed" in text(verify_run(run))
    assert_next_write_refused(run)


def test_a_ledger_two_rows_behind_commits_nothing(run):
    tamper(run, "DELETE FROM entries WHERE seq >= 2;")
    assert "requests 2..2 are not in this ledger" in text(verify_run(run))
    assert_next_write_refused(run, "restore ledger.sqlite")


def test_an_edited_version_number_commits_nothing(run):
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["version"] = 7
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert "it says version 7" in text(verify_run(run))
    before = snapshot(run)
    with pytest.raises(ExpungeError, match="version 7"):
        Fitted.load(run)
    assert snapshot(run) == before


def test_a_damaged_trajectory_is_a_cache_mismatch_in_verify(run):
    params = run / "versions/000003/trajectory/params.npy"
    params.write_bytes(params.read_bytes()[:-10])
    result = verify_run(run)
    (problem,) = result.problems
    assert problem.cache and "retrain rebuilds it" in problem.fix


# ------------------------------------------------------------------ receipts


def test_a_receipt_checks_alone_and_against_its_run(run):
    receipt = make_receipt(run, 2)
    assert receipt["entry"]["requested_by"] == "alice" and receipt["entry"]["reference"] == "T-1"
    assert check_receipt(receipt).ok
    assert check_receipt(receipt, run=run, contains_id=1001).ok
    assert "id 1003 is not among" in text(check_receipt(receipt, contains_id=1003))
    with pytest.raises(ExpungeError, match="no ledger row for version 9"):
        make_receipt(run, 9)


@pytest.mark.parametrize("field, value", [("requested_by", "mallory"), ("ids_sha256", "0" * 64),
                                          ("model_hash_after", "f" * 64)])
def test_a_tampered_receipt_fails(run, field, value):
    receipt = make_receipt(run, 2)
    receipt["entry"][field] = value
    assert "does not hash to its entry_hash" in text(check_receipt(receipt))


def test_a_signed_receipt_checks_against_the_published_key_and_not_another(tmp_path):
    key, other = generate(tmp_path / "key"), generate(tmp_path / "other")
    signed = make_run(tmp_path / "signed", signing_key=key).path
    receipt = make_receipt(signed, 3)
    assert receipt["signing"]["key_id"] == key.key_id
    assert check_receipt(receipt, key.verifier(), pinned=True, run=signed).ok
    assert "not by the key given" in text(check_receipt(receipt, other.verifier(), pinned=True))
    # a forger who edits the row and recomputes its hash cannot sign it
    entry = receipt["entry"]
    entry["requested_by"] = "mallory"
    body = {k: v for k, v in entry.items() if k not in ("entry_hash", "signature")}
    from expunge.ledger import canonical, sha256_hex

    entry["entry_hash"] = sha256_hex(canonical(body))
    assert "signature does not match" in text(check_receipt(receipt, key.verifier(), pinned=True))


def test_a_receipt_is_not_in_a_rewritten_history(run, tmp_path):
    receipt = make_receipt(run, 2)
    rewritten = tmp_path / "rewritten"
    make_run(rewritten)
    manifest = json.loads((rewritten / "manifest.json").read_text())
    receipt["run_id"] = receipt["entry"]["run_id"] = manifest["run_id"]  # even claiming the other run's id
    body = {k: v for k, v in receipt["entry"].items() if k not in ("entry_hash", "signature")}
    from expunge.ledger import canonical, sha256_hex

    receipt["entry"]["entry_hash"] = sha256_hex(canonical(body))
    assert "does not hold this row" in text(check_receipt(receipt, run=rewritten))


# ------------------------------------------------------------------ migration from expunge-run/1


V1_SCHEMA = """
CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, version INTEGER NOT NULL UNIQUE,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), kind TEXT NOT NULL, method TEXT NOT NULL,
    n_rows INTEGER NOT NULL, ids_sha256 TEXT NOT NULL, model_hash TEXT NOT NULL, report TEXT NOT NULL);
CREATE TRIGGER requests_no_update BEFORE UPDATE ON requests BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER requests_no_delete BEFORE DELETE ON requests BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


def as_format_1(run, drop_last_row=False):
    """Rewrite a run as expunge-run/1 wrote it: short model hashes, an unchained ledger, last_report."""
    manifest = json.loads((run / "manifest.json").read_text())
    rows = [e for e in Fitted.load(run).ledger.entries()]
    (run / "ledger.sqlite").unlink()
    db = sqlite3.connect(run / "ledger.sqlite")
    db.executescript(V1_SCHEMA)
    for e in rows[: -1 if drop_last_row else None]:
        report = dict(e["report"], model_hash_before=(e["report"]["model_hash_before"] or "")[:16] or None,
                      model_hash_after=e["report"]["model_hash_after"][:16])
        db.execute("INSERT INTO requests (version, kind, method, n_rows, ids_sha256, model_hash, report) VALUES "
                   "(?, ?, ?, ?, ?, ?, ?)", (e["version"], e["kind"], e["method"], e["n_rows"], e["ids_sha256"],
                                             report["model_hash_after"], json.dumps(report)))
    db.commit()
    db.close()
    last = dict(rows[-1]["report"], model_hash_after=rows[-1]["report"]["model_hash_after"][:16])
    old = {k: v for k, v in manifest.items() if k not in ("ledger", "last_entry", "run_id")}
    old.update(format="expunge-run/1", model_hash=manifest["model_hash"][:16], last_report=last)
    (run / "manifest.json").write_text(json.dumps(old))


@pytest.mark.parametrize("crashed", [False, True])
def test_a_run_of_the_earlier_format_is_refused_then_migrates_once(run, crashed):
    as_format_1(run, drop_last_row=crashed)
    with pytest.raises(ExpungeError, match="expunge migrate"):
        Fitted.load(run)
    summary = migrate_run(run)
    assert summary["rows"] == 3 and (run / V1_LEDGER).exists()
    assert bool(summary["warnings"]) == crashed  # the row a crash kept out is carried over from the manifest
    result = verify_run(run)
    assert result.ok, text(result)
    assert any("migrated from an unchained expunge-run/1" in w for w in result.warnings)
    rows = Fitted.load(run).ledger.entries()
    assert all(r["migrated"] for r in rows) and [r["requested_by"] for r in rows] == [None, None, None]
    report = Fitted.load(run).forget([1010], requested_by="erin")
    assert report.version == 4 and verify_run(run).ok
    with pytest.raises(ExpungeError, match="already in the current format"):
        migrate_run(run)


def test_migration_refuses_a_run_whose_weights_do_not_match(run):
    as_format_1(run)
    weights = run / "versions/000003/weights.safetensors"
    tensors = load_file(weights)
    save_file({"w": tensors["w"] * 2, "w0": tensors["w0"]}, str(weights))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = file_sha256(weights)
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExpungeError, match="does not match the manifest's model hash"):
        migrate_run(run)
    assert json.loads((run / "manifest.json").read_text())["format"] == "expunge-run/1"


def test_manifest_digest_ignores_only_the_chain_fields():
    manifest = {"version": 1, "files": {"a": "1"}, "ledger": {"length": 1}, "last_entry": {}}
    assert manifest_digest(manifest) == manifest_digest({"version": 1, "files": {"a": "1"}})
    assert manifest_digest(manifest) != manifest_digest({"version": 1, "files": {"a": "2"}})


@pytest.mark.parametrize("method", ["certified", "sisa"])
def test_runs_with_state_of_their_own_verify_and_their_swapped_weights_are_found(tmp_path, method):
    from expunge.unlearn.certified import CertifiedRemoval
    from expunge.unlearn.sisa import SISA

    data = dataset()
    if method == "certified":
        data = IndexedDataset.from_arrays(data.X / np.linalg.norm(data.X, axis=1, keepdims=True), data.y, ids=data.ids)
        run = CertifiedRemoval(lam=1e-2).fit(data, out=tmp_path / "run")
        weights, key = run.path / "versions/000002/weights.safetensors", "W"
    else:
        run = SISA(shards=2, workers=1).fit(data, TrainRecipe(model="logreg", epochs=1, batch_size=64), out=tmp_path / "run")
        weights, key = run.path / "versions/000002/sisa/shard000_slice000.safetensors", "w"
    run.forget([1001, 1002], requested_by="alice")
    result = verify_run(run.path)
    assert result.ok, text(result)
    tensors = load_file(weights)
    save_file({**tensors, key: tensors[key] * 2}, str(weights))
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["files"][str(weights.relative_to(run.path / "versions/000002"))] = file_sha256(weights)
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    found = text(verify_run(run.path))
    assert "does not hash to the model hash" in found and "manifest.json: its content" in found
