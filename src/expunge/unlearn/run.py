"""RunModel: a trained model bound to its run directory, serving forget and add requests.

What every method shares lives here: the data the run was trained on (read back from its source
and checked by fingerprint), the mask of active rows, request validation, save/load, and the commit
of a new version followed by its ledger row. Each method's subclass (``Fitted`` for gradient-trained
models, ``CertifiedFitted`` for certified removal) computes updates and writes its own files.

Every request is validated first, computed into a staging folder and only then committed (see
artifact.py). A request that fails at any point leaves the run directory as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from ..artifact import RunDirectory, file_sha256, fsync_path
from ..data import IndexedDataset, load_dataset, preprocess
from ..errors import ExpungeError
from ..ledger import Ledger
from ..tables import integer_values
from .base import UpdateReport
from .registry import run_class

ROWS, BASE = "rows.npz", "base.npz"


class RunModel:
    def __init__(self, run: RunDirectory, manifest: dict, universe: IndexedDataset, active: np.ndarray,
                 test: IndexedDataset | None):
        self.run, self.manifest = run, manifest
        self.universe, self.active, self.test = universe, active, test
        self.n_base, self.n_classes = manifest["data"]["n_base"], manifest["data"]["n_classes"]

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
        return Ledger(self.path / "ledger.sqlite")

    # ------------------------------------------------------------------ creating, opening, copying

    @staticmethod
    def _new_run(data: IndexedDataset, out, test: IndexedDataset | None, source: str | None,
                 method: dict, preprocess_spec: dict | None = None) -> tuple[RunDirectory, dict, bool]:
        """Check the training data and the target folder; return the run, its first manifest, and
        whether the folder is new (so a failed training can remove it)."""
        if len(data) == 0:
            raise ExpungeError("the training data is empty")
        if data.y.min() < 0:
            raise ExpungeError("labels must be integers 0..K-1")
        if out is None:
            out, created = Path(tempfile.mkdtemp(prefix="expunge-run-")), True
        else:
            out, created = Path(out), not Path(out).exists()
            if out.exists() and not out.is_dir():
                raise ExpungeError(f"{out} is a file; --out must name a new (or empty) directory")
        run = RunDirectory(out)
        if run.exists():
            raise ExpungeError(f"{out} already holds a run; choose another --out or remove it first")
        n_classes = max(data.n_classes, test.n_classes if test is not None else 0)
        manifest = {
            "data": {"name": data.name, "source": source, "fingerprint": data.fingerprint(), "n_base": len(data),
                     "n_features": data.n_features, "n_classes": n_classes, "preprocess": preprocess_spec,
                     "read": data.read_spec},
            "method": method,
            "version": 0,
        }
        return run, manifest, created

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
        """Open a run directory, checking every file against the manifest.

        ``data`` must be the dataset the run was trained on; by default it is read back from the
        source recorded at training time (or from the copy stored in the run directory). ``test``
        is the held-out split accuracies are reported on (by default the source's). The run's
        preprocessing (class selection, row scaling) is applied to them unless ``preprocessed``."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        folder = run.verify(manifest)
        Ledger(run.path / "ledger.sqlite").sync(manifest)
        base, source_test = cls._base_data(run, manifest, data, preprocessed)
        with np.load(folder / ROWS) as rows:
            added = IndexedDataset(rows["X"], rows["y"], rows["ids"], base.name)
            active = rows["active"]
        universe = base.concat(added) if len(added) else base
        model_class = run_class(manifest["method"]["name"])
        return model_class._open(run, manifest, folder, universe, active, source_test if test is None else test)

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test) -> "RunModel":
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
        shutil.copytree(self.path, tmp, ignore=lambda d, names: [
            n for n in names if n == ".lock" or (Path(d).name == "versions" and n != keep)])
        if target.exists():
            target.rmdir()
        tmp.replace(target)
        return RunModel.load(target, self.universe.take(np.arange(self.n_base)), self.test, preprocessed=True)

    # ------------------------------------------------------------------ requests

    def forget(self, ids, method=None, compare: bool = False, progress: bool = False) -> UpdateReport:
        """Remove the rows with these ids and update the model; ``compare`` also retrains exactly
        and reports the distance to that reference."""
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
        return self._update("forget", ids, self.universe, new_active, method, compare, progress)

    def sample_ids(self, ratio: float, seed: int = 0) -> np.ndarray:
        """A random ``ratio`` of the current rows' ids (at least one), for experiments."""
        if not 0 < ratio < 1:
            raise ExpungeError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
        if seed < 0:
            raise ExpungeError(f"seed must be a non-negative integer, got {seed}")
        current = self.universe.ids[self.active]
        k = max(1, int(round(ratio * len(current))))
        return np.sort(np.random.default_rng(seed).choice(current, k, replace=False))

    def add(self, X, y=None, ids=None, method=None, compare: bool = False, progress: bool = False) -> UpdateReport:
        """Add rows (an IndexedDataset, or arrays X, y and optional ids) and update the model.

        Rows without ids get fresh ones. A previously deleted id may be added back with its
        original features, which puts it back in its original place in the batch plan."""
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
        return self._update("add", ids, universe, new_active, method, compare, progress)

    def _update(self, kind: str, ids: np.ndarray, universe: IndexedDataset, new_active: np.ndarray,
                method, compare: bool, progress: bool) -> UpdateReport:
        raise NotImplementedError

    def _check_current(self) -> None:
        """Refuse to write from a handle that another process has overtaken."""
        on_disk = self.run.read_manifest()["version"]
        if on_disk != self.version:
            raise ExpungeError(f"{self.path} changed since it was loaded (version {self.version} -> {on_disk}); "
                               "load it again")

    def _commit(self, stage: Path, report: UpdateReport, universe: IndexedDataset, active: np.ndarray,
                adopt=lambda folder: None) -> Path:
        """Add the data state to the staged version (whose method files are written) and commit it;
        then take the whole new state in memory at once (``adopt(folder)`` takes the method's own),
        and only then append the ledger row (a crash before it is repaired from the manifest on the
        next load). Returns the new version's folder."""
        added = universe.take(np.arange(self.n_base, len(universe)))
        with open(stage / ROWS, "wb") as f:
            np.savez(f, X=added.X, y=added.y, ids=added.ids, active=active)
        report.version = self.version + 1
        manifest = {k: v for k, v in self.manifest.items() if k not in ("version", "files")}
        manifest = self.run.commit(stage, dict(manifest, model_hash=report.model_hash_after,
                                               last_report=report.to_dict()))
        folder = self.run.current(manifest)
        self.manifest, self.universe, self.active = manifest, universe, active
        adopt(folder)
        Ledger(self.path / "ledger.sqlite").append(manifest["version"], report.to_dict())
        return folder

