"""RunModel: a trained model bound to its run directory, serving forget and add requests.

What every method shares lives here: the data the run was trained on (read back from its source
and checked by fingerprint), the mask of active rows, request validation, the guarantees a run keeps,
save/load, and the commit of a new version with its ledger row. Each method's subclass (``Fitted`` for
gradient-trained models, ``CertifiedFitted`` for certified removal, ...) computes updates and writes its
own files.

Opening a run checks its manifest against the ledger's head and the current version's files (integrity.py);
a request then takes the run's lock, checks the whole chain, computes into a staging folder and only then
commits. A request that fails at any point leaves the run directory as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..artifact import FORMAT, LOCK_WAIT, RunDirectory, file_sha256, fsync_path
from ..data import IndexedDataset, load_dataset, preprocess
from ..errors import ExpungeError
from ..integrity import Problem, manifest_digest, reconcile
from ..ledger import Entry, Ledger, make_entry
from ..signing import ED25519, load_signer, verifier_from_pem
from ..tables import integer_values
from .base import UpdateReport
from .registry import CERTIFIED, EXACT, PRIVATE, find, get, run_class

ROWS, BASE = "rows.npz", "base.npz"
MAX_TEXT = 2000  # characters of --requested-by, --reason, --reference


@dataclass(frozen=True)
class Request:
    """Who asked for a change, why, and the asker's own reference (a ticket, a case number)."""

    requested_by: str | None = None
    reason: str | None = None
    reference: str | None = None

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT or not value.strip()):
                raise ExpungeError(f"{name.replace('_', '-')} must be non-empty text of at most {MAX_TEXT} characters")


def refusal(problems: list[Problem], path) -> ExpungeError:
    """One error for the problems that keep a run from being used."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return ExpungeError(f"{path} failed its integrity check: {first}{more}. `expunge verify {path}` lists every mismatch")


def reading_verifier(manifest: dict):
    """What opening a run can check signatures with: the operator's key if the environment names the run's
    key, else the Ed25519 public key the run records (a self-consistency check: pin a key with verify)."""
    signing = manifest.get("signing")
    if not signing:
        return None
    try:
        signer = load_signer(None)
    except ExpungeError:  # a bad $EXPUNGE_SIGNING_KEY is the write commands' concern, not a reader's
        signer = None
    if signer is not None and signer.key_id == signing.get("key_id"):
        return signer.verifier()
    if signing.get("alg") == ED25519 and signing.get("public_key"):
        return verifier_from_pem(signing["public_key"], "the public key manifest.json records")
    return None


class RunModel:
    # "retrain" on this kind of run is the run's own retraining (private runs retrain privately,
    # certified runs with fresh noise): it keeps the run's guarantees
    own_retraining = False

    def __init__(self, run: RunDirectory, manifest: dict, universe: IndexedDataset, active: np.ndarray,
                 test: IndexedDataset | None):
        self.run, self.manifest = run, manifest
        self.universe, self.active, self.test = universe, active, test
        self.n_base, self.n_classes = manifest["data"]["n_base"], manifest["data"]["n_classes"]
        self.pending: Entry | None = None  # the manifest's last row, missing from the ledger file (a crash)
        self.cache_problems: list[Problem] = []  # damaged caches (a trajectory): retraining rebuilds them
        self._signer = None  # the key the write in progress signs with
        self._writing: dict | None = None  # the request in progress: its Request, guarantees it ends, notes

    # ------------------------------------------------------------------ views

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def data(self) -> IndexedDataset:
        """The rows the current model is trained on."""
        return self.universe.take(np.flatnonzero(self.active))

    @property
    def ledger(self) -> Ledger:
        return self.run.ledger

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    def guarantees(self) -> set[str]:
        """What the current model promises: what its method holds, less what an update ended."""
        held = set(get(self.manifest["method"]["name"]).holds)
        if PRIVATE in held and "privacy" not in self.manifest:
            held.discard(PRIVATE)
        return held

    def current_model_hash(self) -> str:
        """The hash of the model in memory, as the ledger records it."""
        raise NotImplementedError

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        """The hash of the model stored in a version folder (for `expunge verify`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ creating, opening, copying

    @staticmethod
    def _new_run(data: IndexedDataset, out, test: IndexedDataset | None, source: str | None,
                 method: dict, preprocess_spec: dict | None = None, signing_key=None):
        """Check the training data, the signing key and the target folder; return the run, its first
        manifest, whether the folder is new (so a failed training can remove it), and the signer."""
        if len(data) == 0:
            raise ExpungeError("the training data is empty")
        if data.y.min() < 0:
            raise ExpungeError("labels must be integers 0..K-1")
        signer = load_signer(signing_key)
        if out is None:
            out, created = Path(tempfile.mkdtemp(prefix="expunge-run-")), True
        else:
            out, created = Path(out), not Path(out).exists()
            if out.exists() and not out.is_dir():
                raise ExpungeError(f"{out} is a file; --out must name a new (or empty) directory")
        run = RunDirectory(out)
        if run.exists():
            raise ExpungeError(f"{out} already holds a run; choose another --out or remove it first")
        if run.ledger.exists():
            raise ExpungeError(f"{out} holds a ledger but no manifest (a damaged run?); choose another --out")
        n_classes = max(data.n_classes, test.n_classes if test is not None else 0)
        manifest = {
            "run_id": uuid.uuid4().hex,
            "data": {"name": data.name, "source": source, "fingerprint": data.fingerprint(), "n_base": len(data),
                     "n_features": data.n_features, "n_classes": n_classes, "preprocess": preprocess_spec,
                     "read": data.read_spec},
            "method": method,
            "version": 0,
        }
        return run, manifest, created, signer
    @classmethod
    @contextlib.contextmanager
    def _creating(cls, run: RunDirectory, manifest: dict, created: bool, data: IndexedDataset,
                  test: IndexedDataset | None, source: str | None):
        """The frame of every training: hold the lock, keep a copy of data with no source, and
        remove a half-made run directory if training fails."""
        try:
            with run.lock():
                if source is None:
                    cls._store_base(run, data, test, manifest)
                yield
        except BaseException:
            if created:
                shutil.rmtree(run.path, ignore_errors=True)
            raise

    @staticmethod
    def _store_base(run: RunDirectory, data: IndexedDataset, test: IndexedDataset | None, manifest: dict) -> None:
        """Keep a copy of data that has no loadable source, so the run can be reopened."""
        arrays = {"X": data.X, "y": data.y, "ids": data.ids}
        if test is not None:
            arrays.update(X_test=test.X, y_test=test.y, ids_test=test.ids)
        run.path.mkdir(parents=True, exist_ok=True)
        tmp = run.path / f".{BASE}.{uuid.uuid4().hex[:8]}.tmp.npz"
        np.savez(tmp, **arrays)
        fsync_path(tmp)
        tmp.replace(run.path / BASE)
        fsync_path(run.path)
        manifest["data"]["base_sha256"] = file_sha256(run.path / BASE)

    @classmethod
    def load(cls, path, data: IndexedDataset | None = None, test: IndexedDataset | None = None,
             preprocessed: bool = False) -> "RunModel":
        """Open a run directory, checking its manifest against the ledger's head and every file of the
        current version against the manifest (a damaged cache is noted in ``cache_problems``, not refused).

        ``data`` must be the dataset the run was trained on; by default it is read back from the
        source recorded at training time (or from the copy stored in the run directory). ``test``
        is the held-out split accuracies are reported on (by default the source's). The run's
        preprocessing (class selection, row scaling) is applied to them unless ``preprocessed``.
        Opening never writes: a row the ledger file lacks is kept in ``pending`` for the next write."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        state = reconcile(manifest, run.ledger, str(run.path), verifier=reading_verifier(manifest))
        problems = state.problems + run.check_files(manifest)
        if any(not p.cache for p in problems):
            raise refusal([p for p in problems if not p.cache], run.path)
        folder = run.current(manifest)
        base, source_test = cls._base_data(run, manifest, data, preprocessed)
        with np.load(folder / ROWS) as rows:
            added = IndexedDataset(rows["X"], rows["y"], rows["ids"], base.name)
            active = rows["active"]
        universe = base.concat(added) if len(added) else base
        model_class = run_class(manifest["method"]["name"])
        caches = [p for p in problems if p.cache]
        damaged = {p.where.split("/", 2)[2] for p in caches}  # paths inside the version folder
        model = model_class._open(run, manifest, folder, universe, active, source_test if test is None else test,
                                  damaged)
        model.pending, model.cache_problems = state.pending, caches
        if model.current_model_hash() != manifest["model_hash"]:
            raise refusal([Problem(f"versions/{folder.name}", "the stored model does not hash to the model hash the "
                                   "manifest and ledger record", f"restore {folder.name} from a backup of this run")],
                          run.path)
        return model

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path, data: IndexedDataset | None = None, test: IndexedDataset | None = None,
               wait: float = LOCK_WAIT):
        """Hold the run's lock from loading to the end of the block, so that requests made in it never meet a
        newer version written by another process (waits up to ``wait`` seconds for another writer)::

            with RunModel.locked("runs/digits") as run:
                run.forget(ids)
        """
        run = RunDirectory(path)
        if not run.exists():
            run.read_manifest()  # says it is not a run, before the lock file would be made
        with run.lock(wait):
            yield cls.load(path, data, test)

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> "RunModel":
        raise NotImplementedError

    @staticmethod
    def _base_data(run: RunDirectory, manifest: dict, data: IndexedDataset | None, preprocessed: bool = False):
        info, test = manifest["data"], None
        if data is None and info.get("source"):
            data, test = load_dataset(info["source"], read_spec=info.get("read"))  # read as at training
        if data is not None and info.get("preprocess") and not preprocessed:  # the same selection and scaling as at training
            data = preprocess(data, **info["preprocess"])
            test = preprocess(test, **info["preprocess"]) if test is not None else None
        if data is None:
            base = run.path / BASE
            if not base.exists() or file_sha256(base) != info.get("base_sha256"):
                raise ExpungeError(f"{base} is missing or corrupted; the run's training data cannot be recovered")
            with np.load(base) as z:
                data = IndexedDataset(z["X"], z["y"], z["ids"], info["name"])
                if "X_test" in z.files:
                    test = IndexedDataset(z["X_test"], z["y_test"], z["ids_test"], f"{info['name']}-test")
        if data.fingerprint() != info["fingerprint"]:
            raise ExpungeError(
                f"this dataset ({data.name}, {len(data)} rows, fingerprint {data.fingerprint()}) is not the one "
                f"{run.path} was trained on ({info['name']}, {info['n_base']} rows, fingerprint {info['fingerprint']}); "
                "pass the run's own training data"
            )
        return data, test

    def save(self, path) -> "RunModel":
        """Copy this run (current version, ledger, stored data) to a new directory and open it."""
        target = Path(path)
        if target.exists() and any(target.iterdir()):
            raise ExpungeError(f"{target} exists and is not empty; save to a new directory")
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        keep = self.run.current(self.manifest).name
        with self.run.lock():  # no writer changes the run halfway through the copy
            if self.run.read_manifest().get("ledger") != self.manifest.get("ledger"):
                raise ExpungeError(f"{self.path} changed since it was loaded; load it again before saving a copy")
            shutil.copytree(self.path, tmp, ignore=lambda d, names: [
                n for n in names if n == ".lock" or (Path(d).name == "versions" and n != keep)])
        if target.exists():
            target.rmdir()
        tmp.replace(target)
        return RunModel.load(target, self.universe.take(np.arange(self.n_base)), self.test, preprocessed=True)

    # ------------------------------------------------------------------ requests

    def forget(self, ids, method=None, compare: bool = False, progress: bool = False, *, requested_by: str | None = None,
               reason: str | None = None, reference: str | None = None, drop_privacy: bool = False,
               signing_key=None) -> UpdateReport:
        """Remove the rows with these ids and update the model; ``compare`` also retrains exactly
        and reports the distance to that reference.

        ``requested_by``, ``reason`` and ``reference`` go into the ledger row. A method that would end the
        run's privacy guarantee is refused unless ``drop_privacy`` (which the manifest and ledger record).
        ``signing_key``: a key file (or signing.Signer) to sign the ledger row with; default
        $EXPUNGE_SIGNING_KEY; required once the run is signed."""
        request = Request(requested_by, reason, reference)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            raise ExpungeError("no ids given: name at least one row to forget")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ExpungeError(f"ids appear more than once in the request: {unique[counts > 1][:5].tolist()}; list each once")
        rows = self.universe.rows_of(ids)
        if not self.active[rows].all():
            gone = ids[~self.active[rows]]
            raise ExpungeError(f"{len(gone)} id(s) were already deleted, e.g. {gone[:5].tolist()}; drop them from the request")
        new_active = self.active.copy()
        new_active[rows] = False
        if not new_active.any():
            raise ExpungeError("the request deletes every row of the training data; nothing would be left to train on")
        return self._serve("forget", ids, self.universe, new_active, method, compare, progress, request, drop_privacy,
                           signing_key)

    def sample_ids(self, ratio: float, seed: int = 0) -> np.ndarray:
        """A random ``ratio`` of the current rows' ids (at least one), for experiments."""
        if not 0 < ratio < 1:
            raise ExpungeError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
        if seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {seed}")
        current = self.universe.ids[self.active]
        k = max(1, int(round(ratio * len(current))))
        return np.sort(np.random.default_rng(seed).choice(current, k, replace=False))

    def add(self, X, y=None, ids=None, method=None, compare: bool = False, progress: bool = False, *,
            requested_by: str | None = None, reason: str | None = None, reference: str | None = None,
            drop_privacy: bool = False, signing_key=None) -> UpdateReport:
        """Add rows (an IndexedDataset, or arrays X, y and optional ids) and update the model.

        Rows without ids get fresh ones. A previously deleted id may be added back with its
        original features, which puts it back in its original place in the batch plan. The keyword
        arguments are those of ``forget``."""
        request = Request(requested_by, reason, reference)
        if isinstance(X, IndexedDataset):
            X, y, ids = X.X, X.y, X.ids
        try:
            X = np.asarray(X, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise ExpungeError(f"new rows must have numeric features ({e})") from e
        y = integer_values(np.ravel(y), "the new rows' labels", "labels must be integers 0..K-1")  # never truncated
        X = X.reshape(len(X), -1) if X.ndim != 2 else X
        if len(X) == 0:
            raise ExpungeError("no rows given to add")
        if X.shape[1] != self.universe.n_features:
            raise ExpungeError(f"new rows have {X.shape[1]} features but the model takes {self.universe.n_features}; "
                               "add rows with the same columns, in the same order")
        if len(y) != len(X):
            raise ExpungeError(f"{len(X)} rows but {len(y)} labels")
        if y.min() < 0 or y.max() >= self.n_classes:
            raise ExpungeError(f"labels must lie in 0..{self.n_classes - 1} (the model's classes); got {sorted(set(y.tolist()))[:5]}")
        if ids is None:
            ids = self.universe.ids.max() + 1 + np.arange(len(X))
        ids = integer_values(np.ravel(ids), "the new rows' ids", "ids must be integers")
        new = IndexedDataset(X, y, ids, "new rows")  # checks unique ids, finite values
        known = np.isin(ids, self.universe.ids)
        universe, new_active = self.universe, self.active.copy()
        if known.any():
            rows = universe.rows_of(ids[known])
            if self.active[rows].any():
                dup = ids[known][self.active[rows]]
                raise ExpungeError(f"{len(dup)} id(s) are already in the training data, e.g. {dup[:5].tolist()}; "
                                   "give new rows new ids (or none)")
            same = np.array_equal(universe.X[rows], new.X[known]) and np.array_equal(universe.y[rows], new.y[known])
            if not same:
                raise ExpungeError("ids that were deleted earlier can only be added back with their original features "
                                   "and labels; give changed rows new ids")
            new_active[rows] = True
        if (~known).any():
            universe = universe.concat(new.take(np.flatnonzero(~known)))
            new_active = np.concatenate([new_active, np.ones(int((~known).sum()), bool)])
        return self._serve("add", ids, universe, new_active, method, compare, progress, request, drop_privacy,
                           signing_key)

    def _update(self, kind: str, ids: np.ndarray, universe: IndexedDataset, new_active: np.ndarray,
                method, compare: bool, progress: bool) -> UpdateReport:
        """Compute the update and ``_commit`` it (called with the run locked and checked)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ writing

    def _serve(self, kind, ids, universe, new_active, method, compare, progress, request: Request,
               drop_privacy: bool, signing_key) -> UpdateReport:
        """Check the guarantees the request keeps, then, holding the lock: check the run, sign, update, commit."""
        ends = self._guarantees_ended(method, drop_privacy)
        with self.run.lock():
            signer, notes = self._prepare_write(signing_key)
            self._signer, self._writing = signer, {"request": request, "ends": ends, "notes": notes}
            try:
                return self._update(kind, ids, universe, new_active, method, compare, progress)
            finally:
                self._signer = self._writing = None

    def _method_name(self, method) -> str:
        name = getattr(method, "name", method) or self.manifest["method"]["name"]
        return self.manifest["method"]["name"] if name == "retrain" and self.own_retraining else name

    def _guarantees_ended(self, method, drop_privacy: bool) -> list[str]:
        """The run's guarantees an update by ``method`` would end: refused, except privacy when the
        caller drops it explicitly."""
        name, held = self._method_name(method), self.guarantees()
        own = name == self.manifest["method"]["name"]
        found = find(name)
        lost = set() if own else held - set(found.keeps if found else ())
        if drop_privacy and PRIVATE not in lost:
            why = "this run is not private" if PRIVATE not in held else f"{name} keeps the privacy guarantee"
            raise ExpungeError(f"--drop-privacy: {why}; drop the flag")
        if PRIVATE in lost and not drop_privacy:
            pr = self.manifest.get("privacy", {})
            raise ExpungeError(
                f"this run is differentially private (epsilon {pr.get('epsilon_pld', float('nan')):.3g} at delta "
                f"{pr.get('delta', float('nan')):g}), and {name} is not a private update: the model would no longer be "
                "private. Use the run's own update (dp: private retraining), or pass --drop-privacy (Python: "
                "drop_privacy=True) to end the privacy guarantee, which the manifest and the ledger then record")
        if CERTIFIED in lost:
            raise ExpungeError(f"this run's removals are (epsilon, delta)-certified, and {name} carries no certificate; "
                               "update it with certified (the Newton step) or retrain (fresh noise)")
        if EXACT in lost:
            raise ExpungeError(f"this run is exact (equal to training from scratch on its rows), and {name} is not; "
                               f"update it with {self.manifest['method']['name']}")
        return sorted(lost)

    def _prepare_write(self, signing_key):
        """Under the lock, before anything is written: the handle is current, the whole chain checks out,
        the signing key is the run's. Appends the row a crash kept out of the ledger (proven by the
        manifest). Returns the signer and notes on what was repaired."""
        on_disk = self.run.read_manifest()
        if on_disk.get("version") != self.version or on_disk.get("ledger") != self.manifest.get("ledger"):
            raise ExpungeError(f"{self.path} changed since it was loaded (version {self.version} -> "
                               f"{on_disk.get('version')}); load it again, or hold the lock from loading to updating "
                               "(`with RunModel.locked(path) as run: ...`)")
        signer, signing = load_signer(signing_key), self.manifest.get("signing")
        if signing and signer is None:
            raise ExpungeError(f"{self.path}'s ledger is signed (key {signing['key_id']}, {signing['alg']}); give that key "
                               "with --signing-key FILE or $EXPUNGE_SIGNING_KEY (Python: signing_key=)")
        if signing and signer.key_id != signing["key_id"]:
            raise ExpungeError(f"the signing key given (id {signer.key_id}) is not {self.path}'s (id {signing['key_id']}); "
                               "give the key the run is signed with")
        state = reconcile(on_disk, self.ledger, str(self.path), full=True,
                          verifier=signer.verifier() if signer else reading_verifier(on_disk))
        if state.problems:
            raise refusal(state.problems, self.path)
        notes = []
        if state.pending is not None:
            self.ledger.append(state.pending)
            notes.append(f"ledger row {state.pending.seq} (version {state.pending.version}), which a crash had kept out "
                         "of the ledger file, was appended from the manifest before this request")
            self.pending = None
        return signer, notes

    def _commit(self, stage: Path, report: UpdateReport, universe: IndexedDataset, active: np.ndarray,
                adopt=lambda folder: None, changes: dict | None = None) -> Path:
        """Add the data state to the staged version (whose method files are written), seal it, make its
        ledger row (chained to the current head, signed) and commit version and manifest; then take the
        whole new state in memory at once (``adopt(folder)`` takes the method's own), and only then
        append the row (a crash before that leaves it in the manifest, and the next write appends it).
        ``changes`` are set in the new manifest (None removes a key). Returns the new version's folder."""
        added = universe.take(np.arange(self.n_base, len(universe)))
        with open(stage / ROWS, "wb") as f:
            np.savez(f, X=added.X, y=added.y, ids=added.ids, active=active)
        writing = self._writing or {"request": Request(), "ends": [], "notes": []}
        version = report.version = self.version + 1
        report.notes = list(writing["notes"])
        manifest = {k: v for k, v in self.manifest.items() if k not in ("version", "files", "ledger", "last_entry")}
        manifest.update(format=FORMAT, version=version, files=self.run.seal(stage), model_hash=report.model_hash_after)
        for key, value in (changes or {}).items():
            if value is None:
                manifest.pop(key, None)
            else:
                manifest[key] = value
        if PRIVATE in writing["ends"]:  # --drop-privacy: the model is no longer the private release it was
            ended = {"version": version, "method": report.method, "privacy": manifest.pop("privacy", None)}
            manifest["privacy_ended"] = ended
            report.guarantee = dict(report.guarantee, privacy_ended=ended)
        if self._signer is not None:
            manifest["signing"] = self._signer.describe()
        manifest = json.loads(json.dumps(manifest))  # as it reads back, so that its digest is reproducible
        prev = Entry.from_dict(self.manifest["last_entry"]) if "last_entry" in self.manifest else None
        entry = make_entry(prev, run_id=manifest["run_id"], version=version, report=report.to_dict(),
                           state_sha256=manifest_digest(manifest), request=asdict(writing["request"]),
                           signer=self._signer)
        manifest.update(ledger={"length": entry.seq, "head": entry.entry_hash}, last_entry=entry.to_dict())
        manifest = self.run.commit(stage, manifest)
        folder = self.run.current(manifest)
        self.manifest, self.universe, self.active = manifest, universe, active
        adopt(folder)
        self.ledger.append(entry)
        return folder

