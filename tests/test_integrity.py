"""Integrity: the chain's checks, and the manifest reconciled with its ledger (head only, or in full)."""

import json
import sqlite3

import pytest

from expunge.integrity import check_chain, manifest_digest, reconcile
from expunge.ledger import Ledger, make_entry
from expunge.signing import HMAC, generate


def state(v, signer=None):
    """The manifest of version v, without its chain fields."""
    manifest = {"format": "expunge-run/2", "run_id": "r", "version": v, "model_hash": f"m{v}", "files": {"w": str(v)},
                "method": {"name": "deltagrad"}, "data": {}}
    if signer is not None:
        manifest["signing"] = signer.describe()
    return manifest


def manifest_at(entry, signer=None):
    return dict(state(entry.version, signer), ledger={"length": entry.seq, "head": entry.entry_hash},
                last_entry=entry.to_dict())


def build(tmp_path, n=4, signer=None, appended=None):
    """A manifest at version n and a ledger holding its first ``appended`` rows (default all)."""
    entries, prev = [], None
    for v in range(1, n + 1):
        prev = make_entry(prev, run_id="r", version=v, state_sha256=manifest_digest(state(v, signer)), request={},
                          signer=signer,
                          report={"kind": "forget" if v > 1 else "train", "method": "deltagrad", "ids": [v],
                                  "model_hash_before": f"m{v - 1}" if v > 1 else None, "model_hash_after": f"m{v}"})
        entries.append(prev)
    manifest = manifest_at(prev, signer)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for e in entries[: n if appended is None else appended]:
        ledger.append(e)
    return manifest, ledger, entries


def tamper(ledger, sql):
    db = sqlite3.connect(ledger.path)
    db.executescript("DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;" + sql)
    db.close()


def whats(problems):
    return " | ".join(f"{p.where}: {p.what}" for p in problems)


def test_a_consistent_run_reconciles_in_both_modes(tmp_path):
    manifest, ledger, _ = build(tmp_path)
    for full in (False, True):
        state = reconcile(manifest, ledger, "RUN", full=full)
        assert state.ok and state.pending is None, whats(state.problems)


def test_an_edited_row_is_found_by_the_full_check(tmp_path):
    manifest, ledger, _ = build(tmp_path)
    tamper(ledger, "UPDATE entries SET body = replace(body, '\"ids\":[2]', '\"ids\":[9]') WHERE seq = 2;")
    assert reconcile(manifest, ledger, "RUN").ok  # the cheap check reads the head only
    problems = reconcile(manifest, ledger, "RUN", full=True).problems
    assert "ledger row 2 (version 2): its content does not hash to its entry_hash" in whats(problems)


def test_an_edited_row_with_its_hash_recomputed_breaks_the_link(tmp_path):
    manifest, ledger, entries = build(tmp_path)
    forged = make_entry(entries[0], run_id="r", version=2, state_sha256=None, request={"requested_by": "someone else"},
                        report={"kind": "forget", "method": "deltagrad", "ids": [2], "model_hash_before": "m1",
                                "model_hash_after": "m2"})
    tamper(ledger, f"UPDATE entries SET body = '{json.dumps(forged.body)}', entry_hash = '{forged.entry_hash}' "
                   "WHERE seq = 2;")
    problems = whats(reconcile(manifest, ledger, "RUN", full=True).problems)
    assert "ledger row 3 (version 3): it does not link to the row before it" in problems


def test_a_deleted_middle_row_is_found(tmp_path):
    manifest, ledger, _ = build(tmp_path)
    tamper(ledger, "DELETE FROM entries WHERE seq = 2;")
    problems = whats(reconcile(manifest, ledger, "RUN", full=True).problems)
    assert "it is row 2 of the file but says seq 3" in problems and "does not link" in problems


def test_a_ledger_one_row_behind_is_pending_and_proven_by_the_manifest(tmp_path):
    manifest, ledger, entries = build(tmp_path, appended=3)
    for full in (False, True):
        state = reconcile(manifest, ledger, "RUN", full=full)
        assert state.ok and state.pending == entries[3]


def test_a_missing_ledger_is_refused_unless_the_manifest_holds_all_of_it(tmp_path):
    manifest, ledger, _ = build(tmp_path, appended=0)
    state = reconcile(manifest, ledger, "RUN")
    assert "ledger.sqlite: is missing, but the manifest records 4 request(s)" in whats(state.problems)
    assert "restore ledger.sqlite from the backup" in state.problems[0].fix
    (tmp_path / "one").mkdir()
    one, ledger_one, entries = build(tmp_path / "one", n=1, appended=0)
    assert reconcile(one, ledger_one, "RUN").pending == entries[0]


def test_an_older_ledger_is_refused_naming_the_missing_requests(tmp_path):
    manifest, ledger, _ = build(tmp_path, appended=2)
    problems = reconcile(manifest, ledger, "RUN", full=True).problems
    assert "requests 3..3 are not in this ledger" in whats(problems)


def test_a_manifest_behind_its_ledger_lists_the_requests_it_does_not_reflect(tmp_path):
    _, ledger, entries = build(tmp_path)
    old_manifest = manifest_at(entries[1])  # the run directory as a backup taken at version 2 left it
    for full in (False, True):
        problems = reconcile(old_manifest, ledger, "RUN", full=full).problems
        text = whats(problems)
        assert "the ledger records 2 request(s) after this version" in text and "version 3: forget 1 row(s)" in text
        assert "restore the run directory that matches the ledger" in problems[-1].fix


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(version=7), "it says version 7"),
    (lambda m: m["files"].update(w="other"), "its content"),
    (lambda m: m.update(model_hash="x"), "its model hash"),
    (lambda m: m["last_entry"].update(reason="edited"), "does not hash"),
    (lambda m: m.pop("last_entry"), "names no ledger head"),
])
def test_an_edited_manifest_is_found_by_the_cheap_check(tmp_path, edit, words):
    manifest, ledger, _ = build(tmp_path)
    edit(manifest)
    assert words in whats(reconcile(manifest, ledger, "RUN").problems)


@pytest.mark.parametrize("kind", ["ed25519", HMAC])
def test_signatures_are_checked_and_a_rewritten_chain_without_the_key_fails(tmp_path, kind):
    signer = generate(tmp_path / "key", kind)
    (tmp_path / "run").mkdir()
    manifest, ledger, entries = build(tmp_path / "run", signer=signer)
    assert check_chain(entries, signer.verifier(), pinned=True) == []
    forger = generate(tmp_path / "forger", kind)  # someone with file access and a key of their own
    (tmp_path / "forged").mkdir()
    _, _, forged = build(tmp_path / "forged", signer=forger)
    problems = whats(check_chain(forged, signer.verifier(), pinned=True))
    assert f"signed by key {forger.key_id}" in problems
    stripped = [entries[0], type(entries[1])(entries[1].body, entries[1].entry_hash, None)] + entries[2:]
    assert "carries no signature" in whats(check_chain(stripped, signer.verifier()))


def test_an_unsigned_row_after_signed_ones_is_found(tmp_path):
    signer = generate(tmp_path / "key")
    first = make_entry(None, run_id="r", version=1, state_sha256=None, request={}, signer=signer,
                       report={"kind": "train", "method": "deltagrad", "ids": [], "model_hash_after": "m1"})
    second = make_entry(first, run_id="r", version=2, state_sha256=None, request={},
                        report={"kind": "forget", "method": "deltagrad", "ids": [1], "model_hash_before": "m1",
                                "model_hash_after": "m2"})
    assert "is not signed" in whats(check_chain([first, second], signer.verifier()))


def test_model_continuity_and_versions_are_checked(tmp_path):
    first = make_entry(None, run_id="r", version=1, state_sha256=None, request={},
                       report={"kind": "train", "method": "deltagrad", "ids": [], "model_hash_after": "m1"})
    second = make_entry(first, run_id="r", version=3, state_sha256=None, request={},
                        report={"kind": "forget", "method": "deltagrad", "ids": [1], "model_hash_before": "mX",
                                "model_hash_after": "m2"})
    text = whats(check_chain([first, second]))
    assert "versions must rise by one" in text and "model_hash_before is not the model the row before produced" in text


def test_a_malformed_row_is_a_problem_not_a_crash(tmp_path):
    manifest, ledger, _ = build(tmp_path)
    tamper(ledger, "UPDATE entries SET body = '{\"seq\": \"two\"}' WHERE seq = 2;")
    problems = whats(reconcile(manifest, ledger, "RUN", full=True).problems)
    assert "ledger row two (version ?): it is malformed" in problems
    manifest["last_entry"] = {"entry_hash": "x"}
    assert "malformed" in whats(reconcile(manifest, ledger, "RUN").problems)


def test_a_pinned_key_needs_the_last_row_signed_which_covers_an_unsigned_start(tmp_path):
    signer = generate(tmp_path / "key")
    unsigned = make_entry(None, run_id="r", version=1, state_sha256=None, request={},
                          report={"kind": "train", "method": "deltagrad", "ids": [], "model_hash_after": "m1"})
    signed = make_entry(unsigned, run_id="r", version=2, state_sha256=None, request={}, signer=signer,
                        report={"kind": "forget", "method": "deltagrad", "ids": [1], "model_hash_before": "m1",
                                "model_hash_after": "m2"})
    assert check_chain([unsigned, signed], signer.verifier(), pinned=True) == []  # signing began at row 2
    assert "it is not signed, but a key was given" in whats(check_chain([unsigned], signer.verifier(), pinned=True))


def test_a_pending_row_is_checked_as_the_chains_next_link(tmp_path):
    _, ledger, entries = build(tmp_path, appended=3)
    forged = make_entry(entries[2], run_id="r", version=4, state_sha256=manifest_digest(state(4)), request={},
                        report={"kind": "forget", "method": "deltagrad", "ids": [4], "model_hash_before": "mX",
                                "model_hash_after": "m4"})
    manifest = manifest_at(forged)
    assert reconcile(manifest, ledger, "RUN").pending == forged  # the cheap check sees a crash's leftover
    state_ = reconcile(manifest, ledger, "RUN", full=True)
    assert "model_hash_before is not the model the row before produced" in whats(state_.problems)


# ------------------------------------------------------------------ batches: one version, a row per request


def build_batch(tmp_path, size=3, appended=None):
    """Version 1 (training), then version 2 made by a batch of ``size`` requests; the ledger holds its first
    ``appended`` rows (default all); the manifest carries the batch's rows."""
    first = make_entry(None, run_id="r", version=1, state_sha256=manifest_digest(state(1)), request={},
                       report={"kind": "train", "method": "deltagrad", "ids": [], "model_hash_after": "m1"})
    entries, prev = [first], first
    for i in range(size):
        prev = make_entry(prev, run_id="r", version=2, state_sha256=manifest_digest(state(2)),
                          request={"requested_by": f"person {i}"}, batch={"id": "b", "index": i, "size": size},
                          request_id=f"q{i}", report={"kind": "forget", "method": "deltagrad", "ids": [10 + i],
                                                      "model_hash_before": "m1", "model_hash_after": "m2"})
        entries.append(prev)
    manifest = dict(manifest_at(prev), batch_entries=[e.to_dict() for e in entries[1:-1]])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.append_all(entries[: len(entries) if appended is None else appended])
    return manifest, ledger, entries


def test_a_batch_reconciles_in_both_modes(tmp_path):
    manifest, ledger, entries = build_batch(tmp_path)
    assert check_chain(entries) == []
    for full in (False, True):
        result = reconcile(manifest, ledger, "RUN", full=full)
        assert result.ok and result.pending_rows == [], whats(result.problems)


@pytest.mark.parametrize("appended", [1, 2, 3])
def test_a_batch_the_ledger_lacks_is_pending_in_full_from_the_manifest(tmp_path, appended):
    manifest, ledger, entries = build_batch(tmp_path, appended=appended)
    for full in (False, True):
        result = reconcile(manifest, ledger, "RUN", full=full)
        assert result.ok and result.pending_rows == entries[appended:] and result.pending == entries[-1]


def test_a_removed_batch_row_is_found(tmp_path):
    manifest, ledger, _ = build_batch(tmp_path)
    tamper(ledger, "DELETE FROM entries WHERE seq = 3;")
    problems = whats(reconcile(manifest, ledger, "RUN", full=True).problems)
    assert "it is row 3 of batch b, but the row before it is not that batch's previous row" in problems


def test_a_batch_row_must_share_its_batchs_version_and_models(tmp_path):
    _, _, entries = build_batch(tmp_path)
    odd = make_entry(entries[1], run_id="r", version=2, state_sha256=manifest_digest(state(2)), request={},
                     batch={"id": "b", "index": 1, "size": 3}, request_id="q1",
                     report={"kind": "forget", "method": "deltagrad", "ids": [11], "model_hash_before": "m1",
                             "model_hash_after": "mX"})
    assert "does not share its batch's version" in whats(check_chain(entries[:2] + [odd]))


def test_a_ledger_ending_inside_a_batch_is_found(tmp_path):
    _, _, entries = build_batch(tmp_path)
    assert "rows after it are missing" in whats(check_chain(entries[:3]))
    assert "rows after it are missing" in whats(check_chain(entries[:3] + [make_entry(
        entries[2], run_id="r", version=3, state_sha256=None, request={},
        report={"kind": "forget", "method": "deltagrad", "ids": [5], "model_hash_before": "m2",
                "model_hash_after": "m3"})]))


def test_a_manifest_that_lost_the_batchs_earlier_rows_is_found(tmp_path):
    manifest, ledger, _ = build_batch(tmp_path, appended=1)
    manifest.pop("batch_entries")
    result = reconcile(manifest, ledger, "RUN")
    assert "incomplete or out of order" in whats(result.problems) and result.pending_rows == []
