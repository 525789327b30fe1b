"""The audit commands end to end on digits: who asked is recorded and exported, `verify` says what does not
match (exit 1), receipts check with the published key, read-only commands never write, private runs keep
their guarantee unless it is dropped, and four processes forgetting at once all land in the ledger once."""

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import expunge

from .helpers import TRAIN, assert_clean_failure, invoke, snapshot, squash, write_ids


def test_forget_records_who_asked_and_ledger_exports_it(run, tmp_path, digits_train):
    ids = write_ids(tmp_path / "ids.txt", digits_train.ids[:3])
    result = invoke("forget", run, "--ids", ids, "--no-compare", "--quiet", "--requested-by", "dpo@example.org",
                    "--reason", "GDPR art. 17", "--reference", "TICKET-42")
    assert result.exit_code == 0, result.output
    out, table = tmp_path / "ledger.csv", tmp_path / "ledger.json"
    result = invoke("ledger", run, "--csv", out, "--json", table)
    assert result.exit_code == 0, result.output
    assert squash("dpo@example.org") in squash(result.output) and squash("TICKET-42") in squash(result.output)
    rows = list(csv.DictReader(out.open()))
    assert [r["kind"] for r in rows] == ["train", "forget"]
    forget = rows[1]
    assert (forget["requested_by"], forget["reason"], forget["reference"]) == ("dpo@example.org", "GDPR art. 17",
                                                                                "TICKET-42")
    assert forget["guarantee_kind"] == "approximate" and forget["model_hash_before"] == rows[0]["model_hash_after"]
    assert len(forget["model_hash_after"]) == 64 and forget["prev_hash"] == rows[0]["entry_hash"]
    entries = json.loads(table.read_text())
    assert entries[1]["reason"] == "GDPR art. 17" and entries[1]["report"]["ids"] == sorted(digits_train.ids[:3].tolist())


def test_verify_passes_then_names_every_mismatch_with_exit_code_one(run, tmp_path):
    result = invoke("verify", run, "--json", tmp_path / "ok.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok.json").read_text())["ok"] is True
    db = sqlite3.connect(run / "ledger.sqlite")
    db.executescript("DROP TRIGGER entries_no_update; UPDATE entries SET body = replace(body, '\"kind\":\"train\"', "
                     "'\"kind\":\"other\"');")
    db.close()
    (run / "versions/000001/rows.npz").write_bytes(b"garbage")
    result = invoke("verify", run, "--json", tmp_path / "bad.json")
    assert result.exit_code == 1, result.output
    found = json.loads((tmp_path / "bad.json").read_text())
    wheres = {p["where"] for p in found["problems"]}
    assert {"ledger row 1 (version 1)", "versions/000001/rows.npz"} <= wheres
    assert squash("does not hash") in squash(result.output)


def test_verify_without_a_run_or_receipt_is_a_clean_error():
    assert_clean_failure(invoke("verify"), "give a run directory")


def test_read_only_commands_never_write_even_with_a_row_pending(run):
    db = sqlite3.connect(run / "ledger.sqlite")
    db.executescript("DROP TRIGGER entries_no_delete; DELETE FROM entries WHERE seq = 1;")  # as a crash leaves it
    db.close()
    before = snapshot(run)
    result = invoke("ledger", run)
    assert result.exit_code == 0 and "1*" in result.output and squash("next forget or add appends it") in squash(result.output)
    assert invoke("info", run).exit_code == 0
    assert invoke("verify", run).exit_code == 1  # the ledger file lacks a row the manifest holds
    assert snapshot(run) == before
    result = invoke("forget", run, "--ratio", "0.01", "--no-compare")
    assert result.exit_code == 0 and squash("appended from the manifest") in squash(result.output)
    assert invoke("verify", run).exit_code == 0


def test_signed_run_receipt_checks_with_the_public_key_and_a_tampered_one_fails(tmp_path):
    key, run = tmp_path / "keys" / "operator", tmp_path / "signed"
    assert invoke("keygen", key).exit_code == 0
    assert invoke("train", "--data", "digits", "--out", run, *TRAIN, "--signing-key", key, "--quiet").exit_code == 0
    assert_clean_failure(invoke("forget", run, "--ratio", "0.01", "--no-compare"), "ledger is signed", "--signing-key")
    result = invoke("forget", run, "--ratio", "0.01", "--no-compare", "--quiet", "--signing-key", key,
                    "--requested-by", "alice", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    some_id = json.loads((tmp_path / "f.json").read_text())["ids"][0]
    receipt = tmp_path / "receipt.json"
    assert invoke("receipt", run, "--version", "2", "--out", receipt).exit_code == 0
    public = Path(f"{key}.pub")
    ok = invoke("verify", "--receipt", receipt, "--public-key", public, "--id", some_id)
    assert ok.exit_code == 0, ok.output
    assert invoke("verify", run, "--receipt", receipt, "--public-key", public).exit_code == 0
    assert invoke("verify", run, "--public-key", public).exit_code == 0
    data = json.loads(receipt.read_text())
    data["entry"]["requested_by"] = "mallory"
    receipt.write_text(json.dumps(data))
    bad = invoke("verify", "--receipt", receipt, "--public-key", public)
    assert bad.exit_code == 1 and squash("does not hash") in squash(bad.output)
    assert_clean_failure(invoke("receipt", run, "--version", "9"), "no ledger row for version 9")


def test_a_private_run_refuses_finetune_unless_privacy_is_dropped(tmp_path):
    run = tmp_path / "dp"
    assert invoke("train", "--data", "digits", "--out", run, "--dp", "--epsilon", "3", "--batch-size", "256",
                  "--epochs", "1", "--quiet").exit_code == 0
    before = snapshot(run)
    for method in ("finetune", "fisher"):
        result = invoke("forget", run, "--ratio", "0.01", "--method", method, "--no-compare")
        assert_clean_failure(result, "differentially private", "--drop-privacy")
    assert snapshot(run) == before
    result = invoke("forget", run, "--ratio", "0.01", "--method", "finetune", "--drop-privacy", "--no-compare",
                    "--reason", "takedown now, private retraining tonight")
    assert result.exit_code == 0, result.output
    info = invoke("info", run, "--json", "-")
    summary, _ = json.JSONDecoder().raw_decode(info.stdout, info.stdout.index('{\n  "run"'))
    assert "privacy" not in summary and summary["privacy_ended"]["version"] == 2 and summary["guarantees"] == []
    assert squash("guarantee ended at version 2") in squash(info.stdout)
    ledger = invoke("ledger", run, "--json", tmp_path / "l.json")
    assert ledger.exit_code == 0
    assert json.loads((tmp_path / "l.json").read_text())[-1]["guarantee"]["privacy_ended"]["method"] == "finetune"


@pytest.mark.slow
def test_four_processes_forgetting_at_once_all_land_in_the_ledger_once(run, tmp_path, digits_train):
    chunks = [digits_train.ids[i * 5:(i + 1) * 5] for i in range(4)]
    env = dict(os.environ, PYTHONPATH=str(Path(expunge.__file__).parents[1]))
    procs = []
    for i, chunk in enumerate(chunks):
        ids = write_ids(tmp_path / f"ids{i}.txt", chunk)
        procs.append(subprocess.Popen([sys.executable, "-m", "expunge", "forget", str(run), "--ids", str(ids),
                                       "--no-compare", "--quiet", "--requested-by", f"process {i}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    entries = json.loads(invoke("ledger", run, "--json", "-").stdout.split("\n[", 1)[1].join(["[", ""]))
    forgets = [e for e in entries if e["kind"] == "forget"]
    assert sorted(e["requested_by"] for e in forgets) == [f"process {i}" for i in range(4)]
    by_asker = {e["requested_by"]: sorted(e["report"]["ids"]) for e in forgets}
    assert by_asker == {f"process {i}": sorted(chunk.tolist()) for i, chunk in enumerate(chunks)}
    assert [e["version"] for e in entries] == [1, 2, 3, 4, 5]
    assert invoke("verify", run).exit_code == 0


def test_a_damaged_ledger_or_manifest_is_a_clean_error_naming_the_recovery(run, tmp_path):
    (run / "ledger.sqlite").write_bytes(b"not a database at all" * 50)
    assert_clean_failure(invoke("info", run), "ledger is damaged", "restore it from a backup")
    assert_clean_failure(invoke("forget", run, "--ratio", "0.01"), "ledger is damaged")
    result = invoke("verify", run, "--json", tmp_path / "v.json")
    assert result.exit_code == 1 and json.loads((tmp_path / "v.json").read_text())["problems"][0]["where"] == "ledger.sqlite"
    (run / "manifest.json").write_text("{truncated")
    assert_clean_failure(invoke("info", run), "not valid JSON", "restore manifest.json from a backup")
    assert_clean_failure(invoke("ledger", run), "restore manifest.json from a backup")


def test_migrate_on_a_current_run_is_a_clean_error(run):
    assert_clean_failure(invoke("migrate", run), "already in the current format")


def test_a_batch_has_a_receipt_per_request_named_by_its_ledger_row(run, digits_train, tmp_path):
    from expunge.unlearn.run import BatchItem, Request, RunModel

    ids = [int(i) for i in digits_train.ids[:3]]
    RunModel.load(run).forget_batch("b1", [BatchItem("q1", tuple(ids[:2]), Request("ann")),
                                           BatchItem("q2", tuple(ids[2:]), Request("bo"))])
    assert_clean_failure(invoke("receipt", run, "--version", "2"), "batch of 2 requests", "--seq")
    assert_clean_failure(invoke("receipt", run), "--version V", "--seq ROW")
    out = tmp_path / "receipt.json"
    assert invoke("receipt", run, "--seq", "3", "--out", out).exit_code == 0
    assert json.loads(out.read_text())["entry"]["request_id"] == "q2"
    assert invoke("verify", "--receipt", out, run).exit_code == 0
    listed = invoke("ledger", run, "--csv", tmp_path / "ledger.csv")
    assert "2 (1/2)" in listed.output and "2 (2/2)" in listed.output
    assert "q1,b1,0,2" in (tmp_path / "ledger.csv").read_text()
