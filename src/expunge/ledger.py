"""Append-only ledger of every request made of a run (SQLite, one file in the run directory).

Rows can be inserted, never changed or deleted: triggers abort UPDATE and DELETE. The ledger is
written right after the manifest commits a version; a crash between the two is repaired when the
run is next opened, from the report the manifest carries (``sync``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL UNIQUE,
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    ids_sha256 TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    report TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS requests_no_update BEFORE UPDATE ON requests
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS requests_no_delete BEFORE DELETE ON requests
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""


def ids_digest(ids) -> str:
    return hashlib.sha256(json.dumps(sorted(int(i) for i in ids)).encode()).hexdigest()


class Ledger:
    def __init__(self, path):
        self.path = Path(path)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self):
        """One connection per call, committed on success and always closed."""
        db = sqlite3.connect(self.path)
        try:
            db.execute("PRAGMA synchronous=FULL")
            with db:
                yield db
        finally:
            db.close()

    def append(self, version: int, report: dict) -> None:
        ids = report.get("ids", [])
        with self._connect() as db:
            db.execute(
                "INSERT INTO requests (version, kind, method, n_rows, ids_sha256, model_hash, report)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, report["kind"], report["method"], len(ids), ids_digest(ids),
                 report["model_hash_after"], json.dumps(report)),
            )

    def last_version(self) -> int:
        with self._connect() as db:
            (v,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM requests").fetchone()
        return v

    def sync(self, manifest: dict) -> None:
        """Append the manifest's last report if a crash kept it out of the ledger."""
        if self.last_version() < manifest["version"] and manifest.get("last_report"):
            self.append(manifest["version"], manifest["last_report"])

    def entries(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM requests ORDER BY seq").fetchall()
        return [dict(r, report=json.loads(r["report"])) for r in rows]
