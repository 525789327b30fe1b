"""Audit: verify a whole run, issue and check receipts, and migrate runs of an earlier format.

``verify_run`` recomputes everything a run directory claims: the ledger's chain (every row's hash, link,
ids digest and signature), the manifest against the chain's head, every file of the current version
against the manifest, and the model hash of every retained version from its weights. It reports each
mismatch with its fix instead of stopping at the first.

A receipt is one ledger row (one request: a batch's requests share a version and each has its row), self-contained: the row's body (the request, the guarantee, the model
hashes), its hash, its signature, and the signing key's public half. A third party checks it without the
run (``check_receipt``: hash and signature, against the operator's published key when given) and, given
the run, that the run's ledger still holds exactly that row.

``migrate_run`` chains the ledger of an expunge-run/1 run once: its rows are carried over in order,
marked ``migrated`` (they were never chained, so they prove only what the old ledger said), and the old
ledger file is kept beside the new one as ledger.v1.sqlite.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import FORMAT, OLD_FORMATS, RunDirectory, fsync_path, write_atomic
from ..errors import ExpungeError
from ..integrity import Problem, Reconciliation, check_entry, manifest_digest, manifest_rows, reconcile
from ..ledger import Entry, Ledger, ids_digest, make_entry, now
from ..signing import ED25519, load_signer, verifier_from_pem
from .registry import run_class
from .run import reading_verifier, refusal

RECEIPT_FORMAT = "expunge-receipt/1"
V1_LEDGER = "ledger.v1.sqlite"


@dataclass
class Verification:
    """What a check found: mismatches (each with its fix), warnings (what was not or could not be
    checked), and a line per thing that was checked."""

    subject: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"subject": self.subject, "ok": self.ok, "problems": [p.to_dict() for p in self.problems],
                "warnings": self.warnings, "checked": self.checked}


def _key_for(signing: dict | None, verifier, pinned: bool, result: Verification, where: str):
    """The verifier to check ``signing``'s signatures with, noting how far the check can be trusted."""
    if not signing:
        if not pinned:
            result.warnings.append(f"{where} is not signed: its hashes show it is consistent, not who wrote it")
        return verifier
    if pinned:
        return verifier
    if signing.get("alg") == ED25519 and signing.get("public_key"):
        embedded = verifier_from_pem(signing["public_key"], f"the public key {where} records")
        if embedded.key_id != signing.get("key_id"):
            result.problems.append(Problem(where, "the public key it records is not the key its rows name",
                                           "check it against the operator's published key (--public-key)"))
        result.warnings.append(f"signatures were checked against the public key {where} records (id {embedded.key_id}); "
                               "pin the operator's published key with --public-key to rule out a substituted key")
        return embedded
    result.warnings.append(f"{where} is signed with HMAC key {signing.get('key_id')}: its signatures can only be "
                           "checked with that secret (--signing-key)")
    return None


def verify_run(path, verifier=None, pinned: bool = False) -> Verification:
    """Recompute everything the run directory at ``path`` claims (see the module docstring)."""
    run = RunDirectory(path)
    result = Verification(str(run.path))
    try:
        manifest = run.read_manifest()
    except ExpungeError as e:
        result.problems.append(Problem("manifest.json", str(e), "see the message"))
        return result
    key = _key_for(manifest.get("signing"), verifier, pinned, result, "the run")
    try:
        state = reconcile(manifest, run.ledger, str(run.path), full=True, verifier=key, pinned=pinned)
    except ExpungeError as e:  # an unreadable ledger: say so, and go on checking the files and the model
        state = Reconciliation(problems=[Problem("ledger.sqlite", str(e), "restore it from a backup of this run")])
    result.problems += state.problems
    rows = state.entries or []
    result.checked.append(f"ledger: {len(rows)} row(s), their hashes and links" +
                          (f", signatures against key {key.key_id}" if key is not None and manifest.get("signing") else ""))
    if state.pending_rows:
        seqs = [e.seq for e in state.pending_rows]
        rows = f"row {seqs[0]}" if len(seqs) == 1 else f"rows {seqs[0]}..{seqs[-1]}"
        result.problems.append(Problem("ledger.sqlite", f"it lacks {rows} (version {state.pending.version}), which the "
                                       "manifest holds, chained to the ledger's last row (a crash between commit and "
                                       "append, or removed last rows)",
                                       "the next forget or add appends them from the manifest; nothing is lost"))
    result.checked.append(f"manifest: version {manifest['version']}, digest and model hash against ledger row "
                          f"{manifest.get('ledger', {}).get('length')}")
    files = run.check_files(manifest)
    result.problems += files
    result.checked.append(f"files: {len(manifest['files'])} of version {manifest['version']}"
                          + (f" and {manifest['data'].get('base_file', 'base.npz')}" if manifest["data"].get("base_sha256") else ""))
    current = run.current(manifest)
    for folder in sorted(p for p in run.versions.iterdir() if p.is_dir()) if run.versions.is_dir() else []:
        if folder != current:
            result.warnings.append(f"versions/{folder.name} is not the current version (left by an interrupted write; "
                                   "the next write removes it)")
            continue
        try:
            stored = run_class(manifest["method"]["name"]).stored_model_hash(folder, manifest)
        except Exception as e:  # a missing or unreadable weights file, already reported above as a file problem
            result.problems.append(Problem(f"versions/{folder.name}", f"its model cannot be read ({e})",
                                           f"restore {folder.name} from a backup of this run"))
            continue
        if stored != manifest.get("model_hash"):
            result.problems.append(Problem(f"versions/{folder.name}", "its model does not hash to the model hash the "
                                           "manifest and ledger record", f"restore {folder.name} from a backup of this run"))
        result.checked.append(f"model: version {manifest['version']} hashes to {stored[:16]}...")
    if manifest.get("migrated"):
        result.warnings.append(f"rows 1..{manifest['migrated']['rows']} were migrated from an unchained "
                               f"{manifest['migrated']['from']} ledger on {manifest['migrated']['at']}: they prove "
                               "only what that ledger said")
    return result


# ------------------------------------------------------------------ receipts


def make_receipt(path, version: int | None = None, seq: int | None = None) -> dict:
    """The receipt of one request: the one that made ``version``, or the one in ledger row ``seq`` (a version made by
    a batch holds a row per request). The run must pass its integrity check."""
    if (version is None) == (seq is None):
        raise ExpungeError("name the request by its version or by its ledger row (seq), one of the two")
    run = RunDirectory(path)
    manifest = run.read_manifest()
    state = reconcile(manifest, run.ledger, str(run.path), full=True, verifier=reading_verifier(manifest))
    if state.problems:
        raise refusal(state.problems, run.path)
    rows = (state.entries or []) + state.pending_rows
    if seq is not None:
        found = [e for e in rows if e.seq == seq]
        if not found:
            raise ExpungeError(f"{run.path} has no ledger row {seq}; its rows are 1..{len(rows)}")
    else:
        found = [e for e in rows if e.version == version]
        if not found:
            raise ExpungeError(f"{run.path} has no ledger row for version {version}; its versions are "
                               f"{', '.join(str(v) for v in dict.fromkeys(e.version for e in rows))}")
        if len(found) > 1:
            raise ExpungeError(f"version {version} of {run.path} was made by a batch of {len(found)} requests (ledger rows "
                               f"{found[0].seq}..{found[-1].seq}); name one request's row with --seq")
    entry = found[0]
    signer, signing = entry.body.get("signer"), manifest.get("signing")
    key = None
    if signer is not None:
        if not signing or signing.get("key_id") != signer["key_id"]:
            raise ExpungeError(f"ledger row {entry.seq} is signed by key {signer['key_id']}, which {run.path} no longer "
                               "records; the receipt could not name its public key")
        key = {"alg": signing["alg"], "key_id": signing["key_id"], "public_key": signing.get("public_key")}
    return {"format": RECEIPT_FORMAT, "issued_at": now(), "run_id": manifest["run_id"], "entry": entry.to_dict(),
            "signing": key}


def read_receipt(path) -> dict:
    try:
        receipt = json.loads(Path(path).read_text())
    except OSError as e:
        raise ExpungeError(f"cannot read the receipt {path} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpungeError(f"{path} is not a receipt (not valid JSON: {e})") from None
    if not isinstance(receipt, dict) or receipt.get("format") != RECEIPT_FORMAT or "entry" not in receipt:
        raise ExpungeError(f"{path} is not a receipt (format {RECEIPT_FORMAT}); make one with `expunge receipt RUN "
                           "--version V`")
    return receipt


def check_receipt(receipt: dict, verifier=None, pinned: bool = False, run=None, contains_id: int | None = None,
                  subject: str = "receipt") -> Verification:
    """Check a receipt on its own, and against the run directory ``run`` when given."""
    result = Verification(subject)
    try:
        entry = Entry.from_dict(receipt["entry"])
        body = entry.body
        body["seq"], body["version"], body["report"]  # noqa: B018  (a receipt's row has these)
    except (KeyError, TypeError, AttributeError):
        result.problems.append(Problem(subject, "its ledger row is malformed", "ask the operator for a new receipt"))
        return result
    where = f"receipt (ledger row {entry.seq}, version {entry.version})"
    signing = receipt.get("signing")
    if body.get("signer") and (signing or {}).get("key_id") != body["signer"].get("key_id"):
        result.problems.append(Problem(where, "the key it names is not the key its row was signed with",
                                       "ask the operator for a new receipt"))
    key = _key_for(signing, verifier, pinned, result, "the receipt")
    result.problems += check_entry(entry, where, key, pinned)
    if body.get("run_id") != receipt.get("run_id"):
        result.problems.append(Problem(where, "its row belongs to another run than the receipt names",
                                       "ask the operator for a new receipt"))
    result.checked.append(f"row: hash {entry.entry_hash[:16]}..." + (", signature" if key and body.get("signer") else ""))
    if contains_id is not None:
        ids = body["report"].get("ids", [])
        if int(contains_id) not in ids:
            result.problems.append(Problem(where, f"id {contains_id} is not among the {len(ids)} id(s) of this request",
                                           "check the id, or ask for the receipt of the request that named it"))
        else:
            result.checked.append(f"id {contains_id} is among the request's {len(ids)} id(s)")
    if run is not None:
        run_check = verify_run(run, verifier, pinned)
        result.problems += run_check.problems
        result.warnings += [w for w in run_check.warnings if w not in result.warnings]
        result.checked += [f"run {run}: {line}" for line in run_check.checked]
        manifest_run_id = _run_id(run)
        rows = [e for e in _rows_with_pending(run) if e.seq == entry.seq]
        if manifest_run_id != receipt.get("run_id"):
            result.problems.append(Problem(where, f"it was issued by another run ({receipt.get('run_id')}) than {run} "
                                           f"({manifest_run_id})", "check it against the run that issued it"))
        elif not rows or rows[0].entry_hash != entry.entry_hash:
            result.problems.append(Problem(where, f"{run}'s ledger does not hold this row (its row {entry.seq} differs "
                                           "or is missing): the run's history was rewritten after the receipt was issued",
                                           "ask the operator to explain; keep the receipt as evidence"))
        else:
            result.checked.append(f"run {run}: its ledger row {entry.seq} is this row")
    return result


def _run_id(path) -> str | None:
    try:
        return RunDirectory(path).read_manifest().get("run_id")
    except ExpungeError:
        return None


def _rows_with_pending(path) -> list[Entry]:
    run = RunDirectory(path)
    try:
        rows = run.ledger.read()
        held = manifest_rows(run.read_manifest())
    except ExpungeError:
        return []
    return rows + [e for e in held if isinstance(e.body.get("seq"), int) and (not rows or e.seq > rows[-1].seq)]


# ------------------------------------------------------------------ migration


def _v1_rows(path: Path) -> list[dict]:
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT version, at, kind, method, ids_sha256, model_hash, report FROM requests "
                              "ORDER BY seq").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise ExpungeError(f"{path} cannot be read as an expunge-run/1 ledger ({e}); restore it from a backup") from None
    keys = ("version", "at", "kind", "method", "ids_sha256", "model_hash", "report")
    return [dict(zip(keys, row), report=json.loads(row[-1])) for row in rows]


def migrate_run(path, signing_key=None) -> dict:
    """Chain the ledger of an expunge-run/1 run and rewrite its manifest in the current format. Returns a
    summary (rows carried over, warnings)."""
    run = RunDirectory(path)
    with run.lock(wait=0):
        manifest = run.read_manifest(formats=OLD_FORMATS + (FORMAT,))
        if manifest["format"] == FORMAT:
            raise ExpungeError(f"{run.path} is already in the current format ({FORMAT}); nothing to migrate")
        problems = [p for p in run.check_files(manifest) if not p.cache]
        if problems:
            raise refusal(problems, run.path)
        signer = load_signer(signing_key)
        old = run.path / V1_LEDGER if (run.path / V1_LEDGER).exists() else run.ledger.path
        rows = _v1_rows(old) if old.exists() else []
        warnings = []
        last = manifest.get("last_report")
        if (not rows or rows[-1]["version"] < manifest["version"]) and last:  # the crash repair of format 1
            rows.append({"version": manifest["version"], "at": now(), "kind": last["kind"], "method": last["method"],
                         "ids_sha256": ids_digest(last.get("ids", [])), "model_hash": last["model_hash_after"],
                         "report": last})
            warnings.append(f"version {manifest['version']} was missing from the old ledger; carried over from the "
                            "manifest's last report")
        if not rows or rows[-1]["version"] != manifest["version"]:
            raise ExpungeError(f"{old} does not end at the manifest's version {manifest['version']}; restore the ledger "
                               "that goes with this run before migrating")
        versions = [r["version"] for r in rows]
        gaps = sorted(set(range(1, manifest["version"] + 1)) - set(versions))
        if gaps:
            warnings.append(f"the old ledger has no rows for versions {gaps}: they cannot be recovered")
        folder = run.current(manifest)
        full_hash = run_class(manifest["method"]["name"]).stored_model_hash(folder, manifest)
        if not full_hash.startswith(manifest["model_hash"]):
            raise refusal([Problem(f"versions/{folder.name}", "the stored model does not match the manifest's model hash",
                                   f"restore {folder.name} from a backup of this run")], run.path)
        new = {k: v for k, v in manifest.items() if k != "last_report"}
        new.update(format=FORMAT, run_id=new.get("run_id") or os.urandom(16).hex(), model_hash=full_hash,
                   migrated={"from": manifest["format"], "at": now(), "rows": len(rows)})
        if signer is not None:
            new["signing"] = signer.describe()
        new = json.loads(json.dumps(new))
        entries, prev = [], None
        for i, row in enumerate(rows):
            if ids_digest(row["report"].get("ids", [])) != row["ids_sha256"]:
                warnings.append(f"version {row['version']}: the old row's ids digest does not match its ids")
            final = i == len(rows) - 1
            prev = make_entry(prev, run_id=new["run_id"], version=row["version"], report=row["report"],
                              state_sha256=manifest_digest(new) if final else None, request={}, signer=signer,
                              at=row["at"], migrated=True, model_hash_after=full_hash if final else row["model_hash"])
            entries.append(prev)
        new.update(ledger={"length": prev.seq, "head": prev.entry_hash}, last_entry=prev.to_dict())
        tmp = run.path / ".ledger.migrating.sqlite"
        tmp.unlink(missing_ok=True)
        staged = Ledger(tmp)
        for entry in entries:
            staged.append(entry)
        fsync_path(tmp)
        if old == run.ledger.path and old.exists():  # keep the old ledger as evidence
            os.replace(old, run.path / V1_LEDGER)
        os.replace(tmp, run.ledger.path)
        fsync_path(run.path)
        write_atomic(run.manifest_path, json.dumps(new, indent=2).encode())
    return {"run": str(run.path), "rows": len(entries), "version": new["version"], "old_ledger": V1_LEDGER,
            "signed": signer is not None, "warnings": warnings}
