"""The request ledger: one hash-chained row per request, in SQLite (RUN/ledger.sqlite).

A row's body says what was asked and what it did: the request (kind, method, the digest and count of the
ids, who asked, why, an external reference), the guarantee, the model hashes before and after, the digest
of the manifest it committed (``state_sha256``), its place (``seq``, ``version``) and ``prev_hash``, the
hash of the row before it (64 zeros for the first). A request served alone makes one version and one row;
a batch of requests (the deletion-request service) makes one version and one row per request, consecutive,
each naming the batch (``batch``: id, index, size) and the request (``request_id``), all with the version,
model hashes and manifest digest they share. ``entry_hash`` is the SHA-256 of the body's canonical
JSON; ``signature``, when the run has a signing key (signing.py), signs that hash. Editing, removing or
reordering a row breaks the chain; rewriting the whole chain consistently needs the signing key. The
manifest records the chain's length and head, so a deleted or swapped ledger is noticed too. Triggers
still refuse UPDATE and DELETE: they stop an honest mistake, the chain stops the rest.

The rows are made before the manifest commits its version and appended right after, in one transaction; a
crash between the two leaves them in the manifest (``last_entry``, and ``batch_entries`` for a batch's
earlier rows), and the next write appends them (integrity.py).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .errors import ExpungeError

FORMAT = "expunge-ledger/2"
GENESIS = "0" * 64

TRIGGERS = [
    "CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries "
    "BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END",
]
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    version INTEGER NOT NULL,
    entry_hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    signature TEXT
);
CREATE INDEX IF NOT EXISTS entries_version ON entries (version);
""" + "".join(f"{t};\n" for t in TRIGGERS)
# ledgers made before batches held one row per version (version UNIQUE): appending widens them once
WIDEN = [
    "CREATE TABLE entries_wide (seq INTEGER PRIMARY KEY, version INTEGER NOT NULL, entry_hash TEXT NOT NULL UNIQUE, "
    "body TEXT NOT NULL, signature TEXT)",
    "INSERT INTO entries_wide SELECT seq, version, entry_hash, body, signature FROM entries",
    "DROP TABLE entries",  # drops its triggers first, so no trigger fires
    "ALTER TABLE entries_wide RENAME TO entries",
    "CREATE INDEX entries_version ON entries (version)",
    *TRIGGERS,
]


def canonical(obj) -> bytes:
    """The one byte string hashed for ``obj``: JSON with sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_digest(ids) -> str:
    return sha256_hex(json.dumps(sorted(int(i) for i in ids)).encode())


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Entry:
    """One ledger row: its body, the body's hash, and the signature of that hash (or None)."""

    body: dict
    entry_hash: str
    signature: str | None = None

    @property
    def seq(self) -> int:
        return self.body["seq"]

    @property
    def version(self) -> int:
        return self.body["version"]

    def recomputed_hash(self) -> str:
        return sha256_hex(canonical(self.body))

    def to_dict(self) -> dict:
        return {**self.body, "entry_hash": self.entry_hash, "signature": self.signature}

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        body = {k: v for k, v in d.items() if k not in ("entry_hash", "signature")}
        return cls(body, d["entry_hash"], d.get("signature"))


def make_entry(prev: Entry | None, *, run_id: str, version: int, report: dict, state_sha256: str | None,
               request: dict, signer=None, at: str | None = None, migrated: bool = False,
               model_hash_after: str | None = None, batch: dict | None = None, request_id: str | None = None) -> Entry:
    """The row that follows ``prev`` for ``report`` (an UpdateReport's dict), signed by ``signer`` if given.
    ``batch`` ({"id", "index", "size"}) and ``request_id`` place a row in a batch of requests sharing one version.
    ``at``, ``migrated`` and ``model_hash_after`` are for rows carried over from an older ledger."""
    ids = report.get("ids", [])
    body = {
        "format": FORMAT, "run_id": run_id, "seq": 1 if prev is None else prev.seq + 1, "version": version,
        "at": at or now(), "kind": report["kind"], "method": report["method"], "n_rows": len(ids),
        "ids_sha256": ids_digest(ids), "guarantee": report.get("guarantee"),
        "requested_by": request.get("requested_by"), "reason": request.get("reason"),
        "reference": request.get("reference"), "model_hash_before": report.get("model_hash_before"),
        "model_hash_after": model_hash_after or report["model_hash_after"], "state_sha256": state_sha256,
        "prev_hash": GENESIS if prev is None else prev.entry_hash,
        "signer": None if signer is None else {"alg": signer.alg, "key_id": signer.key_id},
        "migrated": migrated, "report": report,
    }
    if batch is not None:  # only batch rows carry these, so that rows made before batches hash as they did
        body.update(batch=batch, request_id=request_id)
    body = json.loads(json.dumps(body))  # the body as it reads back (tuples as lists, ...)
    entry_hash = sha256_hex(canonical(body))
    return Entry(body, entry_hash, None if signer is None else signer.sign(entry_hash.encode()))


class Ledger:
    """The ledger file. Reading never creates or changes it; only ``append`` writes."""

    def __init__(self, path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    @contextlib.contextmanager
    def _connect(self, write: bool = False):
        """One connection per call (read-only unless ``write``), committed on success and always closed."""
        try:
            if write:  # transactions by hand (append_all): BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error
                db = sqlite3.connect(self.path, isolation_level=None)
            else:
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as e:
            raise self._damaged(e) from None
        try:
            if write:
                db.execute("PRAGMA synchronous=FULL")
                try:
                    yield db
                    if db.in_transaction:
                        db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            else:
                with db:
                    yield db
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.IntegrityError):
                raise
            raise self._damaged(e) from None
        finally:
            db.close()

    def _damaged(self, e: Exception) -> ExpungeError:
        if "locked" in str(e):  # another process is appending (SQLite waited 5 s for it)
            return ExpungeError(f"{self.path} is being written by another process; try again in a moment")
        return ExpungeError(f"{self.path} cannot be read ({e}): the ledger is damaged; restore it from a backup "
                            f"of this run and check it with `expunge verify {self.path.parent}`")

    def _has_table(self, db, name: str) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def _rows(self, query: str, args=()) -> list[Entry]:
        if not self.exists():
            return []
        with self._connect() as db:
            if not self._has_table(db, "entries"):
                if self._has_table(db, "requests"):
                    raise ExpungeError(f"{self.path} is a ledger of an earlier expunge (not hash-chained); run "
                                       f"`expunge migrate {self.path.parent}` once to chain it")
                return []
            rows = db.execute(query, args).fetchall()
        entries = []
        for seq, entry_hash, body, signature in rows:
            try:
                parsed = json.loads(body)
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
            except (TypeError, ValueError) as e:
                raise ExpungeError(f"ledger row {seq} of {self.path} is not valid JSON ({e}): the ledger was "
                                   "edited or damaged; restore it from a backup of this run") from None
            entries.append(Entry(parsed, entry_hash, signature))
        return entries

    def read(self) -> list[Entry]:
        """Every row, in order."""
        return self._rows("SELECT seq, entry_hash, body, signature FROM entries ORDER BY seq")

    def row(self, seq: int) -> Entry | None:
        found = self._rows("SELECT seq, entry_hash, body, signature FROM entries WHERE seq = ?", (seq,))
        return found[0] if found else None

    def head(self) -> Entry | None:
        """The last row (None for an empty or missing ledger)."""
        found = self._rows("SELECT seq, entry_hash, body, signature FROM entries ORDER BY seq DESC LIMIT 1")
        return found[0] if found else None

    def length(self) -> int:
        if not self.exists():
            return 0
        with self._connect() as db:
            if not self._has_table(db, "entries"):
                return 0
            (n,) = db.execute("SELECT COUNT(*) FROM entries").fetchone()
        return n

    def entries(self) -> list[dict]:
        """Every row as a flat dict (body fields, entry_hash, signature), for display and export."""
        return [e.to_dict() for e in self.read()]

    def append(self, entry: Entry) -> None:
        """Add the row that follows the current head (refused if it does not: the chain never forks)."""
        self.append_all([entry])

    def append_all(self, entries: list[Entry]) -> None:
        """Add rows that follow the current head and each other, in one transaction: all of them or none."""
        if not entries:
            return
        with self._connect(write=True) as db:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")  # nobody appends between reading the head and inserting
            last = db.execute("SELECT seq, entry_hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, head = last if last else (0, GENESIS)
            for entry in entries:
                if entry.seq != seq + 1 or entry.body["prev_hash"] != head:
                    raise ExpungeError(f"ledger row {entry.seq} does not follow the ledger's last row {seq} of "
                                       f"{self.path}; nothing was appended (check the run with `expunge verify "
                                       f"{self.path.parent}`)")
                seq, head = entry.seq, entry.entry_hash
            self._widen(db)
            db.executemany("INSERT INTO entries (seq, version, entry_hash, body, signature) VALUES (?, ?, ?, ?, ?)",
                           [(e.seq, e.version, e.entry_hash, canonical(e.body).decode(), e.signature) for e in entries])

    @staticmethod
    def _widen(db) -> None:
        """Let rows share a version, in a ledger made when each version had one row (same rows, same triggers)."""
        unique = [name for _, name, is_unique, origin, _ in db.execute("PRAGMA index_list(entries)")
                  if is_unique and origin == "u"
                  and [c[2] for c in db.execute(f"PRAGMA index_info('{name}')")] == ["version"]]
        for statement in WIDEN if unique else ():
            db.execute(statement)
