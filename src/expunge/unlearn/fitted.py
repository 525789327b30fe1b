"""Fitted: a trained model bound to its run directory, which forget and add requests update.

Every request is validated first, computed into a staging folder, compared with exact retraining
if asked, and only then committed (see artifact.py) and written to the ledger. A request that
fails at any point leaves the run directory as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..artifact import RunDirectory, file_sha256, fsync_path
from ..data import IndexedDataset, load_dataset
from ..errors import ExpungeError
from ..ledger import Ledger
from ..models import DTYPES, FlatModel, build_model, weights_hash
from ..recipe import BatchPlan, TrainRecipe
from ..train import Workspace, train
from ..trajectory import Trajectory
from .base import UpdateReport, Updater

WEIGHTS, ROWS, TRAJECTORY, BASE = "weights.safetensors", "rows.npz", "trajectory", "base.npz"


def make_updater(method: "str | Updater", **config) -> Updater:
    """An updater from its name (``deltagrad``, ``retrain``) and settings, or the one given."""
    if not isinstance(method, str):
        return method
    from .deltagrad import DeltaGrad
    from .retrain import Retrain

    if method == "deltagrad":
        return DeltaGrad(**config)
    if method == "retrain":
        return Retrain()
    raise ExpungeError(f"unknown method {method!r}; choose deltagrad or retrain")


class Fitted:
    def __init__(self, run: RunDirectory, manifest: dict, universe: IndexedDataset, active: np.ndarray,
                 w: torch.Tensor, w0: torch.Tensor, trajectory: Trajectory | None, test: IndexedDataset | None):
        self.run, self.manifest = run, manifest
        self.recipe = TrainRecipe.from_dict(manifest["recipe"])
        data = manifest["data"]
        self.n_base, self.n_classes = data["n_base"], data["n_classes"]
        self.universe, self.active = universe, active
        self.w, self.w0, self.trajectory, self.test = w, w0, trajectory, test
        self.flat = FlatModel(build_model(self.recipe, universe.n_features, self.n_classes))
        self.plan = BatchPlan.for_recipe(self.recipe, self.n_base)
        self.ws = self._workspace(universe)
        self.updater = make_updater(manifest["method"]["name"], **manifest["method"]["config"])

    # ------------------------------------------------------------------ views

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def version(self) -> int:
        return self.manifest["version"]

    @property
    def model(self) -> torch.nn.Module:
        """The current model as a plain ``torch.nn.Module``."""
        return self.flat.set_flat(self.w)

    @property
    def data(self) -> IndexedDataset:
        """The rows the current model is trained on."""
        return self.universe.take(np.flatnonzero(self.active))

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.path / "ledger.sqlite")

    def accuracy(self, data: IndexedDataset | None = None, w: torch.Tensor | None = None) -> float | None:
        """Accuracy of the current model (or of weights ``w``) on ``data``, default the test split."""
        data = self.test if data is None else data
        if data is None or len(data) == 0:
            return None
        X = torch.from_numpy(data.X).to(self.flat.dtype)
        pred = self.flat.predict(self.w if w is None else w, X).numpy()
        return float((pred == data.y).mean())

    def _workspace(self, universe: IndexedDataset) -> Workspace:
        dtype = DTYPES[self.recipe.dtype]
        return Workspace(self.flat, self.recipe, self.plan, torch.from_numpy(universe.X).to(dtype),
                         torch.from_numpy(universe.y), universe.ids)

    # ------------------------------------------------------------------ train / load / save

    @classmethod
    def train(cls, data: IndexedDataset, recipe: TrainRecipe, updater: "str | Updater" = "deltagrad", out=None,
              test: IndexedDataset | None = None, source: str | None = None, progress: bool = False) -> "Fitted":
        """Train on ``data`` and write a new run directory at ``out`` (a temporary one if omitted).

        ``source`` is the spec ``load_dataset`` reads the data back from; without it the data is
        stored in the run directory.
        """
        updater = make_updater(updater)
        if len(data) == 0:
            raise ExpungeError("the training data is empty")
        if data.y.min() < 0:
            raise ExpungeError("labels must be integers 0..K-1")
        out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="expunge-run-"))
        run = RunDirectory(out)
        if run.exists():
            raise ExpungeError(f"{out} already holds a run; choose another --out or remove it first")
        created = not out.exists()
        n_classes = max(data.n_classes, test.n_classes if test is not None else 0)
        manifest = {
            "recipe": recipe.to_dict(),
            "data": {"name": data.name, "source": source, "fingerprint": data.fingerprint(), "n_base": len(data),
                     "n_features": data.n_features, "n_classes": n_classes},
            "method": {"name": updater.name, "config": updater.config()},
        }
        try:
            return cls._train_into(run, manifest, data, recipe, test, source, progress)
        except BaseException:
            if created:  # a failed training leaves no half-made run directory behind
                shutil.rmtree(out, ignore_errors=True)
            raise

    @classmethod
    def _train_into(cls, run, manifest, data, recipe, test, source, progress) -> "Fitted":
        with run.lock():
            if source is None:
                cls._store_base(run, data, test, manifest)
            fitted = cls(run, dict(manifest, version=0), data, np.ones(len(data), bool), None, None, None, test)
            fitted.w0 = fitted.flat.get_flat()
            with run.staging() as stage:
                trajectory = Trajectory.create(stage / TRAJECTORY, fitted.plan.n_iterations, fitted.flat.n_params,
                                               fitted.flat.dtype)
                start = time.perf_counter()
                w = train(fitted.ws, fitted.active, fitted.w0, trajectory, progress)
                seconds = time.perf_counter() - start
                report = UpdateReport("train", "train", [], seconds, None, weights_hash(w),
                                      {"kind": "exact", "iterations": fitted.plan.n_iterations},
                                      fitted._metrics(w))
                fitted._commit(stage, trajectory, report, w, data, fitted.active)
        return fitted

    @staticmethod
    def _store_base(run: RunDirectory, data: IndexedDataset, test: IndexedDataset | None, manifest: dict) -> None:
        arrays = {"X": data.X, "y": data.y, "ids": data.ids}
        if test is not None:
            arrays.update(X_test=test.X, y_test=test.y, ids_test=test.ids)
        tmp = run.path / f".{BASE}.{uuid.uuid4().hex[:8]}.tmp.npz"
        np.savez(tmp, **arrays)
        fsync_path(tmp)
        tmp.replace(run.path / BASE)
        fsync_path(run.path)
        manifest["data"]["base_sha256"] = file_sha256(run.path / BASE)

    @classmethod
    def load(cls, path, data: IndexedDataset | None = None, test: IndexedDataset | None = None) -> "Fitted":
        """Open a run directory, checking every file against the manifest.

        ``data`` must be the dataset the run was trained on; by default it is read back from the
        source recorded at training time (or from the copy stored in the run directory). ``test``
        is the held-out split accuracies are reported on (by default the source's)."""
        run = RunDirectory(path)
        manifest = run.read_manifest()
        folder = run.verify(manifest)
        Ledger(run.path / "ledger.sqlite").sync(manifest)
        base, source_test = cls._base_data(run, manifest, data)
        test = source_test if test is None else test
        with np.load(folder / ROWS) as rows:
            added = IndexedDataset(rows["X"], rows["y"], rows["ids"], base.name)
            active = rows["active"]
        universe = base.concat(added) if len(added) else base
        tensors = load_file(folder / WEIGHTS)
        trajectory = Trajectory.open(folder / TRAJECTORY)
        return cls(run, manifest, universe, active, tensors["w"], tensors["w0"], trajectory, test)

    @staticmethod
    def _base_data(run: RunDirectory, manifest: dict, data: IndexedDataset | None):
        info, test = manifest["data"], None
        if data is None and info.get("source"):
            data, test = load_dataset(info["source"])
        elif data is None:
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

    def save(self, path) -> "Fitted":
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
        return Fitted.load(target, self.universe.take(np.arange(self.n_base)), self.test)

    # ------------------------------------------------------------------ requests

    def forget(self, ids, method: "str | Updater | None" = None, compare: bool = False,
               progress: bool = False) -> UpdateReport:
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

    def add(self, X, y=None, ids=None, method: "str | Updater | None" = None, compare: bool = False,
            progress: bool = False) -> UpdateReport:
        """Add rows (an IndexedDataset, or arrays X, y and optional ids) and update the model.

        Rows without ids get fresh ones. A previously deleted id may be added back with its
        original features, which puts it back in its original place in the batch plan."""
        if isinstance(X, IndexedDataset):
            X, y, ids = X.X, X.y, X.ids
        X = np.asarray(X, dtype=np.float32)
        X = X.reshape(len(X), -1) if X.ndim != 2 else X
        y = np.asarray(y, dtype=np.int64).reshape(-1)
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
        ids = np.asarray(ids, dtype=np.int64)
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
        updater = self.updater if method is None else make_updater(method)
        old_active = np.concatenate([self.active, np.zeros(len(universe) - len(self.active), bool)])
        ws = self._workspace(universe) if universe is not self.universe else self.ws
        with self.run.lock():
            on_disk = self.run.read_manifest()["version"]
            if on_disk != self.version:
                raise ExpungeError(f"{self.path} changed since it was loaded (version {self.version} -> {on_disk}); "
                                   "load it again")
            with self.run.staging() as stage:
                trajectory = Trajectory.create(stage / TRAJECTORY, self.plan.n_iterations, self.flat.n_params,
                                               self.flat.dtype)
                start = time.perf_counter()
                w, guarantee = updater.update(ws, old_active, new_active, self.w0, self.trajectory, trajectory,
                                              progress)
                seconds = time.perf_counter() - start
                metrics = self._metrics(w, new_active)
                metrics["dist_to_previous"] = float((w - self.w).norm())
                if compare and updater.name != "retrain":
                    start = time.perf_counter()
                    w_ref = train(ws, new_active, self.w0, progress=progress)
                    metrics.update(retrain_s=time.perf_counter() - start, dist_to_retrain=float((w - w_ref).norm()),
                                   dist_previous_to_retrain=float((self.w - w_ref).norm()),
                                   acc_retrain=self.accuracy(w=w_ref))
                    metrics["speedup"] = metrics["retrain_s"] / seconds
                report = UpdateReport(updater.name, kind, ids.tolist(), seconds, weights_hash(self.w),
                                      weights_hash(w), guarantee, metrics)
                self._commit(stage, trajectory, report, w, universe, new_active)
                self.ws = ws
        return report

    def _metrics(self, w: torch.Tensor, active: np.ndarray | None = None) -> dict:
        metrics = {"rows": int((self.active if active is None else active).sum())}
        acc = self.accuracy(w=w)
        if acc is not None:
            metrics["test_acc"] = acc
        return metrics

    def _commit(self, stage: Path, trajectory: Trajectory, report: UpdateReport, w: torch.Tensor,
                universe: IndexedDataset, active: np.ndarray) -> None:
        """Write weights and rows into the staged version, commit it, append to the ledger, and
        only then take the new state in memory."""
        trajectory.flush()
        save_file({"w": w.contiguous(), "w0": self.w0.contiguous()}, str(stage / WEIGHTS))
        added = universe.take(np.arange(self.n_base, len(universe)))
        with open(stage / ROWS, "wb") as f:
            np.savez(f, X=added.X, y=added.y, ids=added.ids, active=active)
        report.version = self.version + 1
        manifest = {k: v for k, v in self.manifest.items() if k not in ("version", "files")}
        manifest = self.run.commit(stage, dict(manifest, model_hash=report.model_hash_after,
                                               last_report=report.to_dict()))
        self.manifest, self.w, self.universe, self.active = manifest, w, universe, active
        self.trajectory = Trajectory.open(self.run.current(manifest) / TRAJECTORY)
        Ledger(self.path / "ledger.sqlite").append(manifest["version"], report.to_dict())
