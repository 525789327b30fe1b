"""Ledger: hash-chained rows in SQLite; appending only what follows the head; reading never writes."""

import sqlite3

import pytest

from expunge.errors import ExpungeError
from expunge.ledger import GENESIS, Entry, Ledger, canonical, ids_digest, make_entry, sha256_hex


def report(kind="forget", ids=(3, 1, 2), before="m0", after="m1", method="deltagrad"):
    return {"kind": kind, "method": method, "ids": list(ids), "model_hash_before": before, "model_hash_after": after,
            "seconds": 0.5, "guarantee": {"kind": "exact"}, "metrics": {"rows": 10}}


def chain(n=3, run_id="run", signer=None):
    entries, prev = [], None
    for v in range(1, n + 1):
        prev = make_entry(prev, run_id=run_id, version=v, report=report(ids=(v,), before=f"m{v - 1}", after=f"m{v}"),
                          state_sha256=f"s{v}", request={"requested_by": "dpo@example.org", "reason": "art. 17",
                                                         "reference": f"T-{v}"}, signer=signer)
        entries.append(prev)
    return entries


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "ledger.sqlite")


def test_canonical_json_ignores_key_order_and_spacing():
    assert canonical({"b": 1, "a": [1, 2.5]}) == canonical({"a": [1, 2.5], "b": 1}) == b'{"a":[1,2.5],"b":1}'


def test_each_row_commits_to_the_one_before_and_to_the_request():
    first, second, third = chain()
    assert first.body["prev_hash"] == GENESIS and second.body["prev_hash"] == first.entry_hash
    assert third.body["prev_hash"] == second.entry_hash and [e.seq for e in (first, second, third)] == [1, 2, 3]
    assert second.entry_hash == sha256_hex(canonical(second.body))
    body = second.body
    assert (body["requested_by"], body["reason"], body["reference"]) == ("dpo@example.org", "art. 17", "T-2")
    assert (body["model_hash_before"], body["model_hash_after"], body["state_sha256"]) == ("m1", "m2", "s2")
    assert body["ids_sha256"] == ids_digest([2]) and body["n_rows"] == 1 and body["guarantee"] == {"kind": "exact"}
    assert body["signer"] is None and second.signature is None


def test_a_new_ledger_is_empty_and_reading_it_creates_nothing(ledger):
    assert ledger.read() == [] and ledger.head() is None and ledger.length() == 0
    assert not ledger.path.exists()


def test_append_then_read_round_trips(ledger):
    entries = chain()
    for e in entries:
        ledger.append(e)
    assert ledger.read() == entries
    assert ledger.head() == entries[-1] and ledger.row(2) == entries[1] and ledger.length() == 3
    assert ledger.entries()[1]["reference"] == "T-2" and ledger.entries()[1]["entry_hash"] == entries[1].entry_hash


def test_entries_survive_reopening(tmp_path):
    entries = chain(1)
    Ledger(tmp_path / "l.sqlite").append(entries[0])
    assert Ledger(tmp_path / "l.sqlite").read() == entries


def test_ids_digest_ignores_order():
    assert ids_digest([3, 1, 2]) == ids_digest([1, 2, 3]) != ids_digest([1, 2])


@pytest.mark.parametrize("skip", [0, 1])
def test_only_the_row_that_follows_the_head_is_appended(ledger, skip):
    entries = chain()
    ledger.append(entries[0])
    with pytest.raises(ExpungeError, match="does not follow"):
        ledger.append(entries[2] if skip else entries[0])  # a gap, or the same row twice
    assert ledger.length() == 1


def test_a_row_of_another_chain_is_refused(ledger):
    ledger.append(chain()[0])
    with pytest.raises(ExpungeError, match="does not follow"):
        ledger.append(chain(run_id="other")[1])  # seq 2, but linked to another run's row 1


@pytest.mark.parametrize("statement", ["UPDATE entries SET body = 'x'", "DELETE FROM entries"])
def test_update_and_delete_are_refused_by_triggers(ledger, statement):
    for e in chain():
        ledger.append(e)
    db = sqlite3.connect(ledger.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
    finally:
        db.close()
    assert len(ledger.read()) == 3


def test_a_damaged_ledger_file_is_a_clear_error_naming_the_recovery(ledger):
    ledger.path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ExpungeError, match="damaged.*restore it from a backup"):
        ledger.read()


def test_a_row_that_is_not_json_is_a_clear_error(ledger):
    ledger.append(chain(1)[0])
    db = sqlite3.connect(ledger.path)
    db.executescript("DROP TRIGGER entries_no_update; UPDATE entries SET body = '{not json';")
    db.close()
    with pytest.raises(ExpungeError, match="row 1 .* not valid JSON"):
        ledger.read()


def test_a_ledger_of_the_earlier_format_names_the_migration(ledger):
    db = sqlite3.connect(ledger.path)
    db.execute("CREATE TABLE requests (seq INTEGER PRIMARY KEY, version INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(ExpungeError, match="expunge migrate"):
        ledger.read()


def test_entry_dict_round_trip():
    (entry,) = chain(1)
    assert Entry.from_dict(entry.to_dict()) == entry


def test_rows_sharing_a_version_are_appended_together_or_not_at_all(ledger):
    first, = chain(1)
    batch, prev = [], first
    for i in range(3):
        prev = make_entry(prev, run_id="run", version=2, report=report(ids=(10 + i,), before="m1", after="m2"),
                          state_sha256="s2", request={}, batch={"id": "b", "index": i, "size": 3}, request_id=f"q{i}")
        batch.append(prev)
    ledger.append(first)
    with pytest.raises(ExpungeError, match="does not follow"):
        ledger.append_all([batch[0], batch[2]])  # a gap inside the batch: nothing of it is written
    assert ledger.length() == 1
    ledger.append_all(batch)
    assert ledger.read() == [first, *batch] and [e.version for e in ledger.read()] == [1, 2, 2, 2]
    assert batch[1].body["request_id"] == "q1" and "batch" not in first.body  # rows served alone hash as before


def test_a_ledger_made_with_one_row_per_version_is_widened_once_keeping_its_rows_and_triggers(ledger):
    first, _ = chain(2)
    db = sqlite3.connect(ledger.path)  # the schema before batches: version UNIQUE
    db.executescript("CREATE TABLE entries (seq INTEGER PRIMARY KEY, version INTEGER NOT NULL UNIQUE, "
                     "entry_hash TEXT NOT NULL UNIQUE, body TEXT NOT NULL, signature TEXT);"
                     "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
                     "BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;")
    db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
               (1, 1, first.entry_hash, canonical(first.body).decode(), None))
    db.commit()
    db.close()
    twin = make_entry(first, run_id="run", version=2, report=report(ids=(9,), before="m1", after="m2"),
                      state_sha256="s2", request={}, batch={"id": "b", "index": 0, "size": 2}, request_id="q0")
    last = make_entry(twin, run_id="run", version=2, report=report(ids=(8,), before="m1", after="m2"),
                      state_sha256="s2", request={}, batch={"id": "b", "index": 1, "size": 2}, request_id="q1")
    ledger.append_all([twin, last])
    assert [e.seq for e in ledger.read()] == [1, 2, 3]
    db = sqlite3.connect(ledger.path)
    try:
        for statement in ("DELETE FROM entries", "UPDATE entries SET body = 'x'"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
    finally:
        db.close()
