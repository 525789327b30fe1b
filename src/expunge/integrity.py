"""What must agree inside a run directory, and what to do when it does not.

    the ledger's chain      every row hashes to its entry_hash, links to the row before, is signed by the
                            run's key once the run has one (ledger.py)
    manifest <-> ledger     the manifest names the chain's length and head and carries its last row (and the
                            rows before it of the same batch); they commit to the manifest's digest, version
                            and model hash
    manifest <-> files      every file of the current version has the hash the manifest records

Opening a run checks the head and the current version (``reconcile(full=False)``); writing checks the
whole chain first (``full=True``) and refuses on any problem, before anything is written. The one thing a
write repairs is the rows a crash kept out of the ledger file (one, or a whole batch): the manifest holds
them, chained to the ledger's head, so appending them is proven, never guessed. A manifest and ledger further apart (a restored
backup, an edited file) are reported with the fix and left alone: no request is lost or invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ledger import GENESIS, Entry, Ledger, canonical, ids_digest, sha256_hex

# manifest fields that describe the chain rather than the state the chain commits to
CHAIN_FIELDS = ("ledger", "last_entry", "batch_entries")


@dataclass(frozen=True)
class Problem:
    """One mismatch: where it is, what does not match, and the fix. ``cache`` problems (a damaged
    trajectory) do not block opening the run: the method that needs the cache refuses, retraining rebuilds it."""

    where: str
    what: str
    fix: str
    cache: bool = False

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; {self.fix}"

    def to_dict(self) -> dict:
        return {"where": self.where, "what": self.what, "fix": self.fix, "cache": self.cache}


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without the chain fields: what a ledger row commits to."""
    return sha256_hex(canonical({k: v for k, v in manifest.items() if k not in CHAIN_FIELDS}))


def _prefix_equal(a: str | None, b: str | None) -> bool:
    """Hashes migrated from an older ledger were cut to 16 hex digits: compare on the common prefix."""
    if a is None or b is None:
        return a == b
    n = min(len(a), len(b))
    return a[:n] == b[:n]


# what every row's body must hold, and of which type, before anything else about it can be checked
FIELDS = {"seq": int, "version": int, "prev_hash": str, "run_id": str, "model_hash_after": str, "report": dict}


def well_formed(entry: Entry) -> bool:
    body = entry.body
    return isinstance(body, dict) and isinstance(entry.entry_hash, str) and all(
        isinstance(body.get(k), t) and not isinstance(body.get(k), bool) for k, t in FIELDS.items())


def check_entry(entry: Entry, where: str, verifier=None, pinned: bool = False, must_sign: bool = False) -> list[Problem]:
    """A row on its own: its form, its hash, its ids digest, its signature (checked when ``verifier`` holds the
    key it names). ``pinned``: ``verifier`` is the key the caller trusts, so a row signed by another key is a
    mismatch; ``must_sign``: an unsigned row is one too (the row that must authenticate what precedes it)."""
    restore = "restore the ledger from a backup of this run"
    if not well_formed(entry):
        return [Problem(where, f"it is malformed (it lacks or garbles one of {', '.join(FIELDS)})", restore)]
    problems = []
    if entry.recomputed_hash() != entry.entry_hash:
        problems.append(Problem(where, "its content does not hash to its entry_hash: the row was edited", restore))
    if "batch" in entry.body and (batch_of(entry) is None or not 0 <= entry.body["batch"]["index"] < entry.body["batch"]["size"]):
        problems.append(Problem(where, "its batch field is malformed", restore))
    report = entry.body["report"]
    if "ids" in report and not entry.body.get("migrated"):
        if ids_digest(report["ids"]) != entry.body.get("ids_sha256") or len(report["ids"]) != entry.body.get("n_rows"):
            problems.append(Problem(where, "its ids digest or count does not match the ids it lists", restore))
    signer = entry.body.get("signer")
    if signer is None:
        if must_sign:
            problems.append(Problem(where, "it is not signed, but a key was given to check it with",
                                    "a run signs its rows only when written with --signing-key (or $EXPUNGE_SIGNING_KEY)"))
    elif not isinstance(signer, dict) or not isinstance(entry.signature, str):
        problems.append(Problem(where, "it names a signing key but carries no signature: the signature was removed",
                                restore))
    elif verifier is not None:
        if verifier.key_id != signer.get("key_id") or verifier.alg != signer.get("alg"):
            if pinned:
                problems.append(Problem(where, f"it is signed by key {signer.get('key_id')} ({signer.get('alg')}), not by "
                                        f"the key given ({verifier.key_id})", "check that you have the operator's key"))
        elif not verifier.check(entry.entry_hash.encode(), entry.signature):
            problems.append(Problem(where, "its signature does not match its content", restore))
    return problems


def row_label(entry: Entry) -> str:
    body = entry.body if isinstance(entry.body, dict) else {}
    return f"ledger row {body.get('seq', '?')} (version {body.get('version', '?')})"


def check_chain(entries: list[Entry], verifier=None, pinned: bool = False) -> list[Problem]:
    """Every row, and every link between rows (see the module docstring). With a ``pinned`` key the last row
    must be signed by it: its signature covers its hash, which chains every row before it."""
    problems, prev, signed_by = [], None, None
    restore = "restore the ledger from a backup of this run"
    for i, entry in enumerate(entries):
        where = row_label(entry)
        found = check_entry(entry, where, verifier, pinned, must_sign=pinned and i == len(entries) - 1)
        problems += found
        if not well_formed(entry):
            prev = entry
            continue
        if entry.body["seq"] != i + 1:
            problems.append(Problem(where, f"it is row {i + 1} of the file but says seq {entry.body['seq']}: a row "
                                    "before it was removed or rows were reordered", restore))
        expected = GENESIS if i == 0 else getattr(prev, "entry_hash", None)
        if entry.body["prev_hash"] != expected:
            problems.append(Problem(where, "it does not link to the row before it (prev_hash differs): a row was removed, "
                                    "inserted or edited", restore))
        continues = prev is not None and well_formed(prev) and continues_batch(prev, entry)
        if batch_of(entry) and batch_of(entry)["index"] > 0 and not continues:
            problems.append(Problem(where, f"it is row {batch_of(entry)['index'] + 1} of batch {batch_of(entry)['id']}, but "
                                    "the row before it is not that batch's previous row: rows were removed or reordered",
                                    restore))
        if prev is not None and well_formed(prev):
            if prev.body["run_id"] != entry.body["run_id"]:
                problems.append(Problem(where, "it belongs to another run (run_id differs)", restore))
            if continues:  # the next request of the same batch: the same version, models and state
                if any(entry.body.get(k) != prev.body.get(k) for k in SHARED):
                    problems.append(Problem(where, "it does not share its batch's version, model hashes and manifest "
                                            "digest", restore))
            else:
                problems += _incomplete(prev, row_label(prev), restore)
                step = entry.version - prev.version
                if (step != 1 and not entry.body.get("migrated")) or step < 1:
                    problems.append(Problem(where, f"its version follows version {prev.version}: versions must rise "
                                            "by one", restore))
                if not _prefix_equal(entry.body.get("model_hash_before"), prev.body["model_hash_after"]):
                    problems.append(Problem(where, "its model_hash_before is not the model the row before produced",
                                            restore))
        signer = entry.body.get("signer")
        key_id = signer.get("key_id") if isinstance(signer, dict) else None
        if signed_by is not None and key_id != signed_by:
            problems.append(Problem(where, f"rows before it are signed by key {signed_by}, this one "
                                    + ("is not signed" if key_id is None else f"by key {key_id}"), restore))
        signed_by = signed_by or key_id
        prev = entry
    if prev is not None and well_formed(prev):
        problems += _incomplete(prev, row_label(prev), restore)
    return problems


# what the rows of one batch share
SHARED = ("version", "model_hash_before", "model_hash_after", "state_sha256", "run_id")


def batch_of(entry: Entry) -> dict | None:
    """The batch a row belongs to ({"id", "index", "size"}), or None for a request served alone."""
    batch = entry.body.get("batch") if isinstance(entry.body, dict) else None
    ok = isinstance(batch, dict) and isinstance(batch.get("id"), str) and all(
        isinstance(batch.get(k), int) and not isinstance(batch.get(k), bool) for k in ("index", "size"))
    return batch if ok else None


def continues_batch(prev: Entry, entry: Entry) -> bool:
    """Whether ``entry`` is the row after ``prev`` in the same batch."""
    a, b = batch_of(prev), batch_of(entry)
    return bool(a and b and a["id"] == b["id"] and b["index"] == a["index"] + 1 and a["size"] == b["size"])


def _incomplete(last: Entry, where: str, restore: str) -> list[Problem]:
    """A batch's last row must be its row size-1: the rows after it were removed otherwise."""
    batch = batch_of(last)
    if batch is None or batch["index"] == batch["size"] - 1:
        return []
    return [Problem(where, f"it is row {batch['index'] + 1} of the {batch['size']} of batch {batch['id']}, and the rows "
                    "after it are missing", restore)]


def manifest_rows(manifest: dict) -> list[Entry]:
    """The rows the manifest carries: the rows of its last batch before its last row, then its last row (a request
    served alone: the last row only). Malformed rows are returned as they are, for the checks to report."""
    rows = [Entry.from_dict(e) for e in manifest.get("batch_entries") or [] if isinstance(e, dict) and "entry_hash" in e]
    if isinstance(manifest.get("last_entry"), dict) and "entry_hash" in manifest["last_entry"]:
        rows.append(Entry.from_dict(manifest["last_entry"]))
    return rows


@dataclass
class Reconciliation:
    """The manifest against its ledger: problems (each with its fix), and the rows the manifest proves are
    missing from the ledger file (``pending_rows``: a crash between commit and append; a write appends them)."""

    problems: list[Problem] = field(default_factory=list)
    pending_rows: list[Entry] = field(default_factory=list)
    entries: list[Entry] | None = None  # every row, when read in full

    @property
    def pending(self) -> Entry | None:
        """The last pending row (the manifest's head), or None."""
        return self.pending_rows[-1] if self.pending_rows else None

    @property
    def ok(self) -> bool:
        return not self.problems


def check_manifest_entry(manifest: dict, run_label: str, verifier=None, pinned: bool = False
                         ) -> tuple[list[Entry] | None, list[Problem]]:
    """The manifest's own rows (its last batch, or its last row), and whether the manifest is what they committed."""
    restore = (f"restore manifest.json from a backup of this run (the ledger's last row records the version, model "
               f"hash and manifest digest it must have; `expunge verify {run_label}` checks it)")
    info, last = manifest.get("ledger"), manifest.get("last_entry")
    if not isinstance(info, dict) or not isinstance(last, dict):
        return None, [Problem("manifest.json", "it names no ledger head", restore)]
    earlier = manifest.get("batch_entries") or []
    try:
        rows = [Entry.from_dict(e) for e in (earlier if isinstance(earlier, list) else [None])] + [Entry.from_dict(last)]
    except (KeyError, TypeError, AttributeError):
        rows = None
    if rows is None or not all(well_formed(e) for e in rows):
        return None, [Problem("manifest.json", "its copy of the last ledger row(s) is malformed", restore)]
    entry = rows[-1]
    problems = []
    for row in rows[:-1]:
        problems += check_entry(row, f"manifest.json (its copy of {row_label(row)})", verifier, pinned)
    problems += check_entry(entry, "manifest.json (its copy of the last ledger row)", verifier, pinned, must_sign=pinned)
    batch = batch_of(entry)
    if (batch and batch["size"] != len(rows)) or (not batch and len(rows) > 1) or any(
            not continues_batch(a, b) or a.entry_hash != b.body.get("prev_hash") for a, b in zip(rows, rows[1:])):
        problems.append(Problem("manifest.json", "its copies of the last batch's ledger rows are incomplete or out of "
                                "order", restore))
    if any(row.body.get(k) != entry.body.get(k) for row in rows[:-1] for k in SHARED):
        problems.append(Problem("manifest.json", "its copies of the last batch's rows do not share one version, model "
                                "and manifest digest", restore))
    if entry.entry_hash != info.get("head") or entry.body.get("seq") != info.get("length"):
        problems.append(Problem("manifest.json", "its ledger head does not match its copy of the last row", restore))
    body = entry.body
    if body.get("version") != manifest.get("version"):
        problems.append(Problem("manifest.json", f"it says version {manifest.get('version')}, but its ledger row "
                                f"committed version {body.get('version')}: the version number was edited", restore))
    if body.get("model_hash_after") != manifest.get("model_hash"):
        problems.append(Problem("manifest.json", "its model hash is not the one its ledger row committed", restore))
    if body.get("run_id") != manifest.get("run_id"):
        problems.append(Problem("manifest.json", "its run_id is not the one its ledger row names", restore))
    if body.get("state_sha256") != manifest_digest(manifest):
        problems.append(Problem("manifest.json", "its content (file hashes, method, data, privacy...) is not what its "
                                "ledger row committed: the manifest was edited", restore))
    signing = manifest.get("signing")
    if (signing or {}).get("key_id") != (body.get("signer") or {}).get("key_id"):
        problems.append(Problem("manifest.json", "its signing key is not the one its last ledger row was signed with",
                                restore))
    return rows, problems


def _describe(entries: list[Entry]) -> str:
    parts = [f"version {e.body.get('version')}: {e.body.get('kind')} {e.body.get('n_rows')} row(s) by {e.body.get('method')}"
             + (f", requested by {e.body['requested_by']}" if e.body.get("requested_by") else "") for e in entries[:5]]
    return "; ".join(parts) + (f"; and {len(entries) - 5} more" if len(entries) > 5 else "")


def reconcile(manifest: dict, ledger: Ledger, run_label: str, full: bool = False, verifier=None,
              pinned: bool = False) -> Reconciliation:
    """Compare the manifest with its ledger: the head only, or (``full``) every row of the chain too."""
    result = Reconciliation()
    batch, result.problems = check_manifest_entry(manifest, run_label, verifier, pinned)
    if batch is None:
        return result
    entry, first = batch[-1], batch[0].seq
    manifest_ok, expected = not result.problems, entry.seq
    restore_ledger = (f"restore ledger.sqlite from the backup taken with this run directory (its row {expected} has "
                      f"hash {entry.entry_hash[:16]}...); until then nothing can be written to {run_label}")
    if full:
        result.entries = rows = ledger.read()
        length, head = len(rows), (rows[-1] if rows else None)
        at = (lambda seq: rows[seq - 1] if 0 < seq <= len(rows) else None)
    else:
        length, head = ledger.length(), ledger.head()
        if head is not None:
            result.problems += check_entry(head, f"{row_label(head)}, the last", verifier, pinned, must_sign=pinned)
        at = ledger.row
    if length == expected:
        if head is None or head.entry_hash != entry.entry_hash:
            result.problems.append(Problem("ledger.sqlite", f"its last row (seq {expected}) is not the row the manifest "
                                           "committed: the ledger or the manifest was replaced or edited", restore_ledger))
    elif first - 1 <= length < expected and batch[length - first + 1].body.get("prev_hash") == (
            head.entry_hash if head else GENESIS):
        if manifest_ok:  # proven by the manifest: a write appends them (else the manifest's problems say why not)
            result.pending_rows = batch[length - first + 1:]
    elif length < expected:
        what = ("is missing" if not ledger.exists() else f"has {length} row(s)") + \
            f", but the manifest records {expected} request(s)"
        if length < first - 1:
            what += f": requests {length + 1}..{first - 1} are not in this ledger (an older ledger restored?)"
        elif length:
            what += ", and the manifest's last row does not follow the ledger's last row"
        result.problems.append(Problem("ledger.sqlite", what, restore_ledger))
    else:
        later = [at(seq) for seq in range(expected + 1, length + 1)]
        mine = at(expected)
        if mine is None or mine.entry_hash != entry.entry_hash:
            result.problems.append(Problem("ledger.sqlite", f"it holds {length} rows and its row {expected} is not the "
                                           "row the manifest committed: it is another run's history", restore_ledger))
        else:
            result.problems.append(Problem(
                "manifest.json", f"the ledger records {length - expected} request(s) after this version that the model "
                f"does not reflect ({_describe([e for e in later if e is not None])}): the run directory was restored "
                "from an older backup, or its manifest replaced",
                "restore the run directory that matches the ledger (its manifest names ledger head "
                f"{head.entry_hash[:16]}...); if it is lost, those requests must be applied again to a newly trained "
                f"run (their ids: `expunge ledger {run_label} --json`)"))
    if full:  # every row, and the rows the manifest holds as the chain's next links when they are pending
        result.problems[:0] = check_chain(rows + result.pending_rows, verifier, pinned)
    return result
