"""Ledger: append-only SQLite record of requests, and repair from the manifest after a crash."""

import sqlite3

import pytest

from expunge.ledger import Ledger, ids_digest


def report(kind="forget", ids=(3, 1, 2), model="abc123", method="deltagrad"):
    return {"kind": kind, "method": method, "ids": list(ids), "model_hash_after": model, "seconds": 0.5,
            "metrics": {"rows": 10}}


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "ledger.sqlite")


def test_new_ledger_is_empty(ledger):
    assert ledger.entries() == []
    assert ledger.last_version() == 0


def test_append_then_entries_round_trip(ledger):
    first, second = report("train", ids=(), model="m1", method="train"), report("forget", ids=(5, 4), model="m2")
    ledger.append(1, first)
    ledger.append(2, second)
    entries = ledger.entries()
    assert [e["version"] for e in entries] == [1, 2]
    assert [e["kind"] for e in entries] == ["train", "forget"]
    assert entries[1]["method"] == "deltagrad"
    assert entries[1]["n_rows"] == 2 and entries[0]["n_rows"] == 0
    assert entries[1]["ids_sha256"] == ids_digest([4, 5])
    assert entries[1]["model_hash"] == "m2"
    assert entries[0]["report"] == first and entries[1]["report"] == second
    assert entries[0]["at"] and entries[0]["seq"] < entries[1]["seq"]
    assert ledger.last_version() == 2


def test_entries_survive_reopening(tmp_path):
    Ledger(tmp_path / "l.sqlite").append(1, report())
    assert [e["version"] for e in Ledger(tmp_path / "l.sqlite").entries()] == [1]


def test_ids_digest_ignores_order():
    assert ids_digest([3, 1, 2]) == ids_digest([1, 2, 3]) != ids_digest([1, 2])


def test_a_version_is_recorded_once(ledger):
    ledger.append(1, report())
    with pytest.raises(sqlite3.IntegrityError):
        ledger.append(1, report())


def test_update_is_refused(ledger):
    ledger.append(1, report())
    db = sqlite3.connect(ledger.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE requests SET kind = 'add'")
    finally:
        db.close()
    assert ledger.entries()[0]["kind"] == "forget"


def test_delete_is_refused(ledger):
    ledger.append(1, report())
    db = sqlite3.connect(ledger.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM requests")
    finally:
        db.close()
    assert len(ledger.entries()) == 1


def test_sync_appends_last_report_when_behind(ledger):
    ledger.append(1, report("train", ids=(), model="m1"))
    manifest = {"version": 2, "last_report": report("forget", ids=(7,), model="m2")}
    ledger.sync(manifest)
    entries = ledger.entries()
    assert [e["version"] for e in entries] == [1, 2]
    assert entries[1]["report"] == manifest["last_report"]


def test_sync_does_nothing_when_up_to_date(ledger):
    ledger.append(1, report("train", ids=(), model="m1"))
    ledger.append(2, report("forget", ids=(7,), model="m2"))
    before = ledger.entries()
    ledger.sync({"version": 2, "last_report": report("forget", ids=(7,), model="m2")})
    assert ledger.entries() == before


def test_sync_without_last_report_does_nothing(ledger):
    ledger.sync({"version": 3})
    assert ledger.entries() == []
