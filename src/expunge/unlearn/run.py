"""RunModel: a trained model bound to its run directory, serving forget and add requests.

What every run shares lives here: a universe of rows with stable ids (``ids``, ``rows_of``, ``take``,
``fingerprint``, ``len``: an ``IndexedDataset`` of features and labels, or an LM ``Corpus``) read back from its
source and checked by fingerprint, the mask of active rows, request validation, the guarantees a run keeps,
save/load, and the commit of a new version with its ledger row. ``TabularRun`` adds what runs on features
and labels share (their data files, the number of classes, added rows); each method's subclass (``Fitted``
for gradient-trained models, ``CertifiedFitted`` for certified removal, ``LMRun`` for language models, ...)
computes updates and writes its own files. ``RunModel.load`` reads the manifest, finds the run class its
method names, and lets that class read its own data.

Opening a run checks its manifest against the ledger's head and the current version's files (integrity.py);
a request then takes the run's lock, checks the whole chain, computes into a staging folder and only then
commits. A request that fails at any point leaves the run directory as it was.

A batch of requests (``forget_batch``, ``add_batch``: the deletion-request service) is one update and one
version, with one ledger row per request; the rows name the batch and each request, so whoever applied the
batch can tell from the run itself, after a crash, whether it committed (``batch_rows``).
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
from ..integrity import Problem, batch_of, manifest_digest, manifest_rows, reconcile
from ..ledger import Entry, Ledger, make_entry
from ..signing import ED25519, load_signer, verifier_from_pem
from ..tables import integer_values
from .base import UpdateReport
from .registry import (CERTIFIED, EXACT, KIND_NAMES, PRIVATE, TABULAR, find, get, kind_of, resolve, run_class,
                       runs_of_kind)

ROWS, BASE = "rows.npz", "base.npz"  # the tabular runs' data files
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


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch: its id (the service's), the ids it names (to forget; or, for an addition, the ids
    of its rows, ``None`` for fresh ones), its rows to add (an IndexedDataset or (X, y)), and who asked."""

    request_id: str
    ids: tuple | None
    request: Request = Request()
    rows: object = None


def refusal(problems: list[Problem], path) -> ExpungeError:
    """One error for the problems that keep a run from being used."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return ExpungeError(f"{path} failed its integrity check: {first}{more}. `expunge verify {path}` lists every mismatch")


def guarantees_of(manifest: dict) -> set[str]:
    """What a run's current model promises, from its manifest: what its method holds, less what an update ended."""
    held = set(get(manifest["method"]["name"]).holds)
    if PRIVATE in held and "privacy" not in manifest:
        held.discard(PRIVATE)
    return held


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
    # what kind of data the run is trained on (registry.TABULAR or registry.LM): which methods can update it
    kind = TABULAR
    # "retrain" on this kind of run is the run's own retraining (private runs retrain privately,
    # certified runs with fresh noise): it keeps the run's guarantees
    own_retraining = False
    # the file that keeps a copy of training data with no loadable source
    base_file = BASE

    def __init__(self, run: RunDirectory, manifest: dict, universe, active: np.ndarray, test=None):
        self.run, self.manifest = run, manifest
        self.universe, self.active, self.test = universe, active, test
        self.n_base = manifest["data"]["n_base"]
        self.pending: Entry | None = None  # the manifest's last row, missing from the ledger file (a crash)
        self.pending_rows: list[Entry] = []  # every row the ledger file lacks (a whole batch, or just that one)
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
    def data(self):
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
        return guarantees_of(self.manifest)

    @staticmethod
    def current_rows(path) -> tuple[dict, np.ndarray, np.ndarray]:
        """Without loading the run: its manifest, the ids of the rows added since training, and the mask of active
        rows over the training rows then the added ones (what a service checks requests against between loads)."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        with np.load(run.current(manifest) / ROWS) as rows:
            return manifest, rows["ids"], rows["active"]

    def current_model_hash(self) -> str:
        """The hash of the model in memory, as the ledger records it."""
        raise NotImplementedError

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        """The hash of the model stored in a version folder (for `expunge verify`)."""
        raise NotImplementedError

    def accuracy(self, *args, **kwargs) -> float | None:
        """Test accuracy, for runs that have labels and a test split (None otherwise)."""
        return None

    # ------------------------------------------------------------------ merging
    # expunge.merge reads runs only through these methods, so that a kind of run becomes mergeable by
    # implementing them: the zoo runs (fitted.py) and the language-model runs (lm_run.py) do.

    # what ``state_score`` measures, in [0, 1], higher is better (the merge searches fit it through a sigmoid)
    score = "accuracy"

    def architecture(self) -> dict:
        """What must be equal for two runs' models to be merged (JSON): model kind, shapes, dtype, classes."""
        raise ExpungeError(f"{self.path} is a {self.manifest['method']['name']} run, whose model cannot be merged; "
                           "merge runs trained by gradient descent (expunge train with deltagrad, retrain or --dp)")

    def model_state(self) -> dict:
        """The current model as named tensors (what task vectors are taken of)."""
        self.architecture()
        raise NotImplementedError

    def evaluation_set(self, spec, name: str) -> tuple[object, dict]:
        """An evaluation set named ``name`` as this run's model reads it (``spec``: what `expunge merge --eval`
        takes for this kind of run, or data of the run's own type) and what to record about it."""
        self.architecture()
        raise NotImplementedError

    def state_score(self, data):
        """A function: a state of this architecture -> its ``score`` on ``data`` (an ``evaluation_set``, or rows
        of the run's own universe)."""
        self.architecture()
        raise NotImplementedError

    def write_merged(self, state: dict, out, record: dict, files: dict[str, bytes], signing_key=None) -> RunModel:
        """Write ``state`` as a new run at ``out`` built on this (the base) run; ``record`` goes into its manifest
        under "merge", ``files`` (name -> bytes) into its version folder."""
        self.architecture()
        raise NotImplementedError

    def init_record(self) -> dict:
        """How a run fine-tuned from this one names its start (manifest "init")."""
        return {"path": str(self.path.resolve()), "run_id": self.run_id, "version": self.version,
                "model_hash": self.manifest["model_hash"]}

    def check_same_architecture(self, other: RunModel, what: str) -> None:
        mine, theirs = self.architecture(), other.architecture()
        if mine != theirs:
            keys = ["kind"] if mine.get("kind") != theirs.get("kind") else sorted(set(mine) | set(theirs))  # zoo vs lm
            diff = {k: (theirs.get(k), mine.get(k)) for k in keys if mine.get(k) != theirs.get(k)}
            raise ExpungeError(f"{what} {other.path} has another architecture ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); "
                               "its model and this one cannot be merged or fine-tuned into each other")

    # ------------------------------------------------------------------ creating, opening, copying

    @staticmethod
    def _new_directory(out, signing_key=None):
        """Check the signing key and the target folder; return the run, whether the folder is new (so a failed
        training can remove it) and the signer."""
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
        return run, created, signer

    @staticmethod
    def _first_manifest(data: dict, method: dict) -> dict:
        return {"run_id": uuid.uuid4().hex, "data": data, "method": method, "version": 0}

    @classmethod
    @contextlib.contextmanager
    def _creating(cls, run: RunDirectory, manifest: dict, created: bool, data, test, source):
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

    @classmethod
    def _store_base(cls, run: RunDirectory, data, test, manifest: dict) -> None:
        """Keep a copy of data that has no loadable source (``base_file``, written by ``_write_base``), so the run
        can be reopened; the manifest records its hash (and its name, when it is not base.npz)."""
        run.path.mkdir(parents=True, exist_ok=True)
        tmp = run.path / f".{cls.base_file}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            cls._write_base(f, data, test)
        fsync_path(tmp)
        tmp.replace(run.path / cls.base_file)
        fsync_path(run.path)
        manifest["data"]["base_sha256"] = file_sha256(run.path / cls.base_file)
        if cls.base_file != BASE:
            manifest["data"]["base_file"] = cls.base_file

    @staticmethod
    def _write_base(f, data, test) -> None:
        """Write the stored copy of the training (and test) data to the open binary file ``f``."""
        raise NotImplementedError

    @classmethod
    def load(cls, path, data=None, test=None, preprocessed: bool = False) -> RunModel:
        """Open a run directory, checking its manifest against the ledger's head and every file of the
        current version against the manifest (a damaged cache is noted in ``cache_problems``, not refused).

        The run class is the one its manifest's method names; it reads its own data. ``data`` must be the data
        the run was trained on (an ``IndexedDataset``, or a ``Corpus`` for a language-model run); by default it
        is read back from the source recorded at training time (or from the copy stored in the run directory).
        ``test`` is the held-out split accuracies are reported on (by default the source's). The run's
        preprocessing (class selection, row scaling) is applied to them unless ``preprocessed``.
        Opening never writes: a row the ledger file lacks is kept in ``pending`` for the next write."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        state = reconcile(manifest, run.ledger, str(run.path), verifier=reading_verifier(manifest))
        problems = state.problems + run.check_files(manifest)
        if any(not p.cache for p in problems):
            raise refusal([p for p in problems if not p.cache], run.path)
        folder = run.current(manifest)
        model_class = run_class(manifest["method"]["name"])
        universe, active, test = model_class._read_data(run, manifest, folder, data, test, preprocessed)
        caches = [p for p in problems if p.cache]
        damaged = {p.where.split("/", 2)[2] for p in caches}  # paths inside the version folder
        model = model_class._open(run, manifest, folder, universe, active, test, damaged)
        model.pending, model.pending_rows, model.cache_problems = state.pending, state.pending_rows, caches
        if model.current_model_hash() != manifest["model_hash"]:
            raise refusal([Problem(f"versions/{folder.name}", "the stored model does not hash to the model hash the "
                                   "manifest and ledger record", f"restore {folder.name} from a backup of this run")],
                          run.path)
        return model

    @classmethod
    @contextlib.contextmanager
    def locked(cls, path, data=None, test=None, wait: float = LOCK_WAIT):
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
    def _read_data(cls, run: RunDirectory, manifest: dict, folder: Path, data, test, preprocessed: bool):
        """(universe, active rows, test split) of the current version: the training data (``data``, or read back
        from its source or stored copy, checked by fingerprint) with the version's own rows."""
        raise NotImplementedError

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> RunModel:
        raise NotImplementedError

    @staticmethod
    def _check_fingerprint(run: RunDirectory, info: dict, data) -> None:
        if data.fingerprint() != info["fingerprint"]:
            raise ExpungeError(
                f"this dataset ({data.name}, {len(data)} rows, fingerprint {data.fingerprint()}) is not the one "
                f"{run.path} was trained on ({info['name']}, {info['n_base']} rows, fingerprint {info['fingerprint']}); "
                "pass the run's own training data"
            )

    @classmethod
    def _stored_base(cls, run: RunDirectory, info: dict) -> Path:
        """The stored copy of the training data, checked against its recorded hash."""
        base = run.path / info.get("base_file", BASE)
        if not base.exists() or file_sha256(base) != info.get("base_sha256"):
            raise ExpungeError(f"{base} is missing or corrupted; the run's training data cannot be recovered")
        return base

    def save(self, path) -> RunModel:
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
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ExpungeError(f"ids appear more than once in the request: {unique[counts > 1][:5].tolist()}; list each once")
        new_active = self._forgotten(ids)
        return self._serve("forget", ids, self.universe, new_active, method, compare, progress, request, drop_privacy,
                           signing_key)[0]

    def _forgotten(self, ids: np.ndarray) -> np.ndarray:
        """The mask of active rows once ``ids`` (distinct) are forgotten; refused if any is unknown or gone."""
        if len(ids) == 0:
            raise ExpungeError("no ids given: name at least one row to forget")
        rows = self.universe.rows_of(ids)
        if not self.active[rows].all():
            gone = ids[~self.active[rows]]
            raise ExpungeError(f"{len(gone)} id(s) were already deleted, e.g. {gone[:5].tolist()}; drop them from the request")
        new_active = self.active.copy()
        new_active[rows] = False
        if not new_active.any():
            raise ExpungeError("the request deletes every row of the training data; nothing would be left to train on")
        return new_active

    def revise(self, updater, progress: bool = False, *, kind: str = "revise", requested_by: str | None = None,
               reason: str | None = None, reference: str | None = None, drop_privacy: bool = False,
               signing_key=None) -> UpdateReport:
        """Replace the model without changing its rows: ``updater`` computes the new weights (e.g. the chosen
        point of a forgetting trade-off, unlearn/tradeoff.py). Recorded as an ordinary version and ledger
        row of kind ``kind``; the keyword arguments are those of ``forget``."""
        request = Request(requested_by, reason, reference)
        return self._serve(kind, np.zeros(0, np.int64), self.universe, self.active.copy(), updater, False, progress,
                           request, drop_privacy, signing_key)[0]

    def sample_ids(self, ratio: float, seed: int = 0) -> np.ndarray:
        """A random ``ratio`` of the current rows' ids (at least one), for experiments."""
        if not 0 < ratio < 1:
            raise ExpungeError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
        if seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {seed}")
        current = self.universe.ids[self.active]
        k = max(1, int(round(ratio * len(current))))
        return np.sort(np.random.default_rng(seed).choice(current, k, replace=False))

    def add(self, *args, **kwargs) -> UpdateReport:
        """Add rows and update the model (runs on features and labels: see ``TabularRun.add``)."""
        raise ExpungeError(f"{self.path} is a {KIND_NAMES[self.kind]} run, which takes no added rows; train a new "
                           "run on the extended data")

    # ------------------------------------------------------------------ batches of requests

    def forget_batch(self, batch_id: str, items: list[BatchItem], method=None, progress: bool = False, *,
                     drop_privacy: bool = False, signing_key=None, committed=None) -> tuple[UpdateReport, list[Entry]]:
        """Forget the ids of several requests in one update: one new version, one ledger row per request (in the
        order given) naming ``batch_id`` and the request's id. Each request's ids must be distinct and present; two
        requests may name the same id (it is removed once, and both rows list it). ``committed()``, if given, is
        called after the version is committed and before the rows reach the ledger file (where a crash leaves
        them in the manifest). Returns the update's report (the union of the ids) and the rows."""
        items = self._batch_items(batch_id, items)
        named = [self._item_ids(item, item.ids) for item in items]
        for item, ids in zip(items, named):
            if len(np.unique(ids)) != len(ids):
                raise ExpungeError(f"request {item.request_id} names an id more than once; list each once")
        union = np.unique(np.concatenate(named))
        new_active = self._forgotten(union)
        return self._serve("forget", union, self.universe, new_active, method, False, progress, None, drop_privacy,
                           signing_key, batch=(batch_id, items), committed=committed)

    def add_batch(self, *args, **kwargs) -> tuple[UpdateReport, list[Entry]]:
        """Add the rows of several requests in one update (runs on features and labels: see ``TabularRun.add_batch``)."""
        raise ExpungeError(f"{self.path} is a {KIND_NAMES[self.kind]} run, which takes no added rows; train a new "
                           "run on the extended data")

    @staticmethod
    def _batch_items(batch_id: str, items: list[BatchItem]) -> list[BatchItem]:
        if not isinstance(batch_id, str) or not batch_id.strip():
            raise ExpungeError("a batch needs an id (a non-empty string)")
        items = list(items)
        if not items:
            raise ExpungeError(f"batch {batch_id} holds no requests")
        request_ids = [item.request_id for item in items]
        if len(set(request_ids)) != len(request_ids) or not all(isinstance(r, str) and r for r in request_ids):
            raise ExpungeError(f"batch {batch_id}: every request needs its own non-empty id")
        return items

    @staticmethod
    def _item_ids(item: BatchItem, ids) -> np.ndarray:
        return integer_values(np.ravel(np.asarray(ids)), f"the ids of request {item.request_id}", "ids must be integers")

    @classmethod
    def batch_rows(cls, path, batch_id: str) -> list[Entry]:
        """The ledger rows of batch ``batch_id`` in the run at ``path``, including rows a crash left only in the
        manifest (empty if the batch never committed). Reads only: what a worker checks after a crash."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        rows = [e for e in manifest_rows(manifest) if (batch_of(e) or {}).get("id") == batch_id]
        if rows:  # the last batch committed: the manifest holds all its rows
            return rows
        return [e for e in run.ledger.read() if (batch_of(e) or {}).get("id") == batch_id]

    def repair(self) -> list[Entry]:
        """Append the rows a crash kept out of the ledger file (proven by the manifest), holding the lock; returns
        them. Refused, like any write, if the run fails its integrity check."""
        with self.run.lock():
            on_disk = self.run.read_manifest()
            state = reconcile(on_disk, self.ledger, str(self.path), full=True, verifier=reading_verifier(on_disk))
            if state.problems:
                raise refusal(state.problems, self.path)
            self.ledger.append_all(state.pending_rows)
            if on_disk.get("ledger") == self.manifest.get("ledger"):
                self.pending, self.pending_rows = None, []
            return state.pending_rows

    def group_members(self) -> dict[str, np.ndarray]:
        """Named groups of rows a request can name instead of ids, each with its ids (deleted ones included)."""
        raise ExpungeError(f"{self.path} has no named groups of rows; name the rows by their ids")

    def _update(self, kind: str, ids: np.ndarray, universe, new_active: np.ndarray,
                method, compare: bool, progress: bool) -> UpdateReport:
        """Compute the update and ``_commit`` it (called with the run locked and checked)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ writing

    def _serve(self, kind, ids, universe, new_active, method, compare, progress, request: Request | None,
               drop_privacy: bool, signing_key, batch=None, committed=None) -> tuple[UpdateReport, list[Entry]]:
        """Check the guarantees the request keeps, then, holding the lock: check the run, sign, update, commit.
        Returns the report and the ledger rows made."""
        found = find(self._method_name(method))
        if found is not None and kind not in found.serves:
            raise ExpungeError(f"{found.name} does not serve {kind} requests: {found.summary}")
        ends = self._guarantees_ended(method, drop_privacy)
        with self.run.lock():
            signer, notes = self._prepare_write(signing_key)
            writing = {"request": request or Request(), "ends": ends, "notes": notes, "batch": batch,
                       "committed": committed, "entries": []}
            self._signer, self._writing = signer, writing
            try:
                return self._update(kind, ids, universe, new_active, method, compare, progress), writing["entries"]
            finally:
                self._signer = self._writing = None

    def _method_name(self, method) -> str:
        """The registered name of the request's method: the run's own by default; a name said for another kind of
        run resolved to this kind's (``retrain`` on a language-model run is ``lm-retrain``); ``retrain`` on a run
        with its own retraining is that retraining."""
        own = self.manifest["method"]["name"]
        name = resolve(getattr(method, "name", method) or own, self.kind)
        found = find(name)
        if found is not None and kind_of(found) != self.kind:
            usable = ", ".join(runs_of_kind(self.kind)) or "none"
            raise ExpungeError(f"{name} updates {KIND_NAMES[kind_of(found)]} runs; {self.path} is a "
                               f"{KIND_NAMES[self.kind]} run (methods for it: {usable})")
        retrain = resolve("retrain", self.kind)
        return own if name == retrain and self.own_retraining else name

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
        if state.pending_rows:
            self.ledger.append_all(state.pending_rows)
            seqs = [e.seq for e in state.pending_rows]
            rows = f"ledger row {seqs[0]}" if len(seqs) == 1 else f"ledger rows {seqs[0]}..{seqs[-1]}"
            notes.append(f"{rows} (version {state.pending.version}), which a crash had kept out of the ledger file, "
                         f"{'was' if len(seqs) == 1 else 'were'} appended from the manifest before this request")
            self.pending, self.pending_rows = None, []
        return signer, notes

    def _write_rows(self, stage: Path, universe, active: np.ndarray) -> None:
        """Write the version's data state (which rows are active, and any rows added) into the staged folder."""
        raise NotImplementedError

    def _commit(self, stage: Path, report: UpdateReport, universe, active: np.ndarray,
                adopt=lambda folder: None, changes: dict | None = None) -> Path:
        """Add the data state to the staged version (whose method files are written), seal it, make its
        ledger row (chained to the current head, signed) and commit version and manifest; then take the
        whole new state in memory at once (``adopt(folder)`` takes the method's own), and only then
        append the row (a crash before that leaves it in the manifest, and the next write appends it).
        ``changes`` are set in the new manifest (None removes a key). A private (re)training, whose guarantee
        carries its privacy figures, makes the model private again whatever came before. Returns the new
        version's folder."""
        self._write_rows(stage, universe, active)
        privacy = report.guarantee.get("privacy")
        if privacy is not None:
            changes = dict(changes or {}, privacy=privacy, privacy_ended=None)
        # the request in progress (set by _serve, or by a training that writes its own first version); what it
        # does not say takes the defaults, in place, since _serve reads the rows made back from it
        writing = self._writing if self._writing is not None else {}
        for key, default in (("request", Request()), ("ends", []), ("notes", []), ("batch", None), ("committed", None),
                             ("entries", [])):
            writing.setdefault(key, default)
        version = report.version = self.version + 1
        report.notes = list(writing["notes"])
        manifest = {k: v for k, v in self.manifest.items()
                    if k not in ("version", "files", "ledger", "last_entry", "batch_entries")}
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
        entries = self._entries(prev, manifest, report, writing)
        manifest.update(ledger={"length": entries[-1].seq, "head": entries[-1].entry_hash},
                        last_entry=entries[-1].to_dict())
        if len(entries) > 1:  # the batch's earlier rows: a crash before they reach the ledger file loses none
            manifest["batch_entries"] = [e.to_dict() for e in entries[:-1]]
        manifest = self.run.commit(stage, manifest)
        folder = self.run.current(manifest)
        self.manifest, self.universe, self.active = manifest, universe, active
        adopt(folder)
        writing["entries"] = entries
        if writing["committed"] is not None:
            writing["committed"]()
        self.ledger.append_all(entries)
        return folder

    def _entries(self, prev: Entry | None, manifest: dict, report: UpdateReport, writing: dict) -> list[Entry]:
        """The ledger rows of the version in ``manifest``: the request's, or one per request of a batch (each with
        its own ids, who asked and why, all sharing the report's models, seconds and guarantee)."""
        state = manifest_digest(manifest)
        if writing["batch"] is None:
            return [make_entry(prev, run_id=manifest["run_id"], version=manifest["version"], report=report.to_dict(),
                               state_sha256=state, request=asdict(writing["request"]), signer=self._signer)]
        batch_id, items = writing["batch"]
        entries = []
        for index, item in enumerate(items):
            row_report = dict(report.to_dict(), ids=sorted(int(i) for i in item.ids))
            prev = make_entry(prev, run_id=manifest["run_id"], version=manifest["version"], report=row_report,
                              state_sha256=state, request=asdict(item.request), signer=self._signer,
                              batch={"id": batch_id, "index": index, "size": len(items)}, request_id=item.request_id)
            entries.append(prev)
        return entries


class TabularRun(RunModel):
    """A run on features and labels (``IndexedDataset``): its data files (base.npz for data without a source;
    rows.npz per version: rows added and the active mask), its number of classes, and added rows."""

    def __init__(self, run: RunDirectory, manifest: dict, universe: IndexedDataset, active: np.ndarray,
                 test: IndexedDataset | None):
        super().__init__(run, manifest, universe, active, test)
        self.n_classes = manifest["data"]["n_classes"]

    @classmethod
    def _new_run(cls, data: IndexedDataset, out, test: IndexedDataset | None, source: str | None,
                 method: dict, preprocess_spec: dict | None = None, signing_key=None):
        """Check the training data, the signing key and the target folder; return the run, its first
        manifest, whether the folder is new (so a failed training can remove it), and the signer."""
        if len(data) == 0:
            raise ExpungeError("the training data is empty")
        if data.y.min() < 0:
            raise ExpungeError("labels must be integers 0..K-1")
        run, created, signer = cls._new_directory(out, signing_key)
        n_classes = max(data.n_classes, test.n_classes if test is not None else 0)
        manifest = cls._first_manifest(
            {"name": data.name, "source": source, "fingerprint": data.fingerprint(), "n_base": len(data),
             "n_features": data.n_features, "n_classes": n_classes, "preprocess": preprocess_spec,
             "read": data.read_spec}, method)
        return run, manifest, created, signer

    @staticmethod
    def _write_base(f, data: IndexedDataset, test: IndexedDataset | None) -> None:
        arrays = {"X": data.X, "y": data.y, "ids": data.ids}
        if test is not None:
            arrays.update(X_test=test.X, y_test=test.y, ids_test=test.ids)
        np.savez(f, **arrays)

    @classmethod
    def _read_data(cls, run, manifest, folder, data, test, preprocessed):
        base, source_test = cls._base_data(run, manifest, data, preprocessed)
        with np.load(folder / ROWS) as rows:
            added = IndexedDataset(rows["X"], rows["y"], rows["ids"], base.name)
            active = rows["active"]
        universe = base.concat(added) if len(added) else base
        return universe, active, source_test if test is None else test

    @classmethod
    def _base_data(cls, run: RunDirectory, manifest: dict, data: IndexedDataset | None, preprocessed: bool = False):
        info, test = manifest["data"], None
        if data is None and info.get("source"):
            data, test = load_dataset(info["source"], read_spec=info.get("read"))  # read as at training
        if data is not None and info.get("preprocess") and not preprocessed:  # the same selection and scaling as at training
            data = preprocess(data, **info["preprocess"])
            test = preprocess(test, **info["preprocess"]) if test is not None else None
        if data is None:
            with np.load(cls._stored_base(run, info)) as z:
                data = IndexedDataset(z["X"], z["y"], z["ids"], info["name"])
                if "X_test" in z.files:
                    test = IndexedDataset(z["X_test"], z["y_test"], z["ids_test"], f"{info['name']}-test")
        cls._check_fingerprint(run, info, data)
        return data, test

    def _write_rows(self, stage: Path, universe: IndexedDataset, active: np.ndarray) -> None:
        added = universe.take(np.arange(self.n_base, len(universe)))
        with open(stage / ROWS, "wb") as f:
            np.savez(f, X=added.X, y=added.y, ids=added.ids, active=active)

    def add(self, X, y=None, ids=None, method=None, compare: bool = False, progress: bool = False, *,
            requested_by: str | None = None, reason: str | None = None, reference: str | None = None,
            drop_privacy: bool = False, signing_key=None) -> UpdateReport:
        """Add rows (an IndexedDataset, or arrays X, y and optional ids) and update the model.

        Rows without ids get fresh ones. A previously deleted id may be added back with its
        original features, which puts it back in its original place in the batch plan. The keyword
        arguments are those of ``forget``."""
        request = Request(requested_by, reason, reference)
        ids, universe, new_active = self._added(X, y, ids)
        return self._serve("add", ids, universe, new_active, method, compare, progress, request, drop_privacy,
                           signing_key)[0]

    def _added(self, X, y=None, ids=None) -> tuple[np.ndarray, IndexedDataset, np.ndarray]:
        """The ids, universe and mask of active rows once these rows are added (checked as ``add`` says)."""
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
        return ids, universe, new_active

    def add_batch(self, batch_id: str, items: list[BatchItem], method=None, progress: bool = False, *,
                  drop_privacy: bool = False, signing_key=None, committed=None) -> tuple[UpdateReport, list[Entry]]:
        """Add the rows of several requests in one update (see ``forget_batch``). Rows without ids get fresh ones,
        in request order; no id may be added twice."""
        items = self._batch_items(batch_id, items)
        X, y, given = [], [], []
        for item in items:
            rows = item.rows
            if isinstance(rows, IndexedDataset):
                rows, item = (rows.X, rows.y), BatchItem(item.request_id, tuple(rows.ids.tolist()), item.request)
            if rows is None or len(rows) != 2:
                raise ExpungeError(f"request {item.request_id} holds no rows to add: give (X, y) or an IndexedDataset")
            try:
                X.append(np.asarray(rows[0], dtype=np.float32).reshape(len(rows[0]), -1))
            except (ValueError, TypeError) as e:
                raise ExpungeError(f"request {item.request_id}: new rows must have numeric features ({e})") from e
            y.append(np.ravel(rows[1]))
            given.append(None if item.ids is None else self._item_ids(item, item.ids))
        start = max([int(self.universe.ids.max())] + [int(g.max()) for g in given if g is not None and len(g)]) + 1
        final = []
        for item, x, g in zip(items, X, given):
            if g is None:  # fresh ids, above every id known or given
                g, start = np.arange(start, start + len(x)), start + len(x)
            if len(g) != len(x):
                raise ExpungeError(f"request {item.request_id}: {len(x)} rows but {len(g)} ids")
            final.append(g)
        items = [BatchItem(item.request_id, tuple(int(i) for i in ids), item.request, item.rows)
                 for item, ids in zip(items, final)]
        all_ids, universe, new_active = self._added(np.concatenate(X), np.concatenate(y), np.concatenate(final))
        return self._serve("add", all_ids, universe, new_active, method, False, progress, None, drop_privacy,
                           signing_key, batch=(batch_id, items), committed=committed)

    def group_members(self) -> dict[str, np.ndarray]:
        """Named groups of rows a request can name instead of ids: here each class, ``class-K`` (the rows with label
        K, deleted ones included). Runs whose rows have groups of their own (documents by author) override this."""
        return {f"class-{k}": self.universe.ids[self.universe.y == k] for k in np.unique(self.universe.y).tolist()}
