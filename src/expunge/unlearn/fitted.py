"""Fitted: a gradient-trained model (logistic regression, MLP) and its cached trajectory, updated
by DeltaGrad or exact retraining (see run.py for what every run shares)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import IndexedDataset, load_dataset, preprocess
from ..errors import ExpungeError
from ..models import DTYPES, FlatModel, build_model, weights_hash
from ..recipe import BatchPlan, TrainRecipe
from ..train import Workspace, train
from ..trajectory import Trajectory
from .base import UpdateReport, Updater
from .registry import OWN_RUN, find, make_updater, run_class
from .run import RunModel, TabularRun

WEIGHTS, TRAJECTORY = "weights.safetensors", "trajectory"


class FitMixin:
    """``Updater.fit(data, recipe) -> Fitted``: train once, recording what this method needs."""

    def fit(self, data: IndexedDataset, recipe: TrainRecipe, out=None, test=None, source=None,
            progress: bool = False, signing_key=None) -> "Fitted":
        return Fitted.train(data, recipe, updater=self, out=out, test=test, source=source, progress=progress,
                            signing_key=signing_key)


class Fitted(TabularRun):
    def __init__(self, run, manifest: dict, universe: IndexedDataset, active: np.ndarray,
                 test: IndexedDataset | None, w: torch.Tensor | None = None, w0: torch.Tensor | None = None,
                 trajectory: Trajectory | None = None):
        super().__init__(run, manifest, universe, active, test)
        self.recipe = TrainRecipe.from_dict(manifest["recipe"])
        self.w, self.w0, self.trajectory = w, w0, trajectory
        self.trajectory_problem: str | None = None  # why a trajectory the manifest lists could not be used
        self.flat = FlatModel(build_model(self.recipe, universe.n_features, self.n_classes))
        self.plan = BatchPlan.for_recipe(self.recipe, self.n_base)
        self.ws = self._workspace(universe)
        self.updater = make_updater(manifest["method"]["name"], **manifest["method"]["config"])

    @property
    def rates(self) -> np.ndarray | None:
        """The learning rate applied at each iteration of the current model's training (None for runs written before
        rates were recorded, or after an update that leaves no trajectory)."""
        if self.trajectory is None or self.trajectory.rates is None:
            return None
        return np.asarray(self.trajectory.rates)

    @property
    def model(self) -> torch.nn.Module:
        """The current model as a plain ``torch.nn.Module``."""
        return self.flat.set_flat(self.w)

    def current_model_hash(self) -> str:
        return weights_hash(self.w)

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        return weights_hash(load_file(folder / WEIGHTS)["w"])

    def accuracy(self, data: IndexedDataset | None = None, w: torch.Tensor | None = None) -> float | None:
        """Accuracy of the current model (or of weights ``w``) on ``data``, default the test split."""
        data = self.test if data is None else data
        if data is None or len(data) == 0:
            return None
        X = torch.from_numpy(data.X).to(self.flat.dtype)
        pred = self.flat.predict(self.w if w is None else w, X).numpy()
        return float((pred == data.y).mean())

    # ------------------------------------------------------------------ merging (see RunModel)

    def architecture(self) -> dict:
        return {"kind": "zoo", "model": self.recipe.model, "hidden": list(self.recipe.hidden), "dtype": self.recipe.dtype,
                "n_features": self.universe.n_features, "n_classes": self.n_classes, "n_params": self.flat.n_params}

    def model_state(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}

    def evaluation_set(self, spec, name: str) -> tuple[IndexedDataset, dict]:
        """A dataset spec (as `expunge train --data` takes it) read with the run's recorded reading spec and
        preprocessing; its held-out split is scored when it has one (MNIST folders, .npz with x_test, digits),
        else all its rows. An IndexedDataset is scored as it is."""
        if isinstance(spec, IndexedDataset):
            data, info = spec, {"data": spec.name, "split": "given"}
        else:
            if not isinstance(spec, str) or not spec.strip():
                raise ExpungeError(f"evaluation set {name!r}: give a dataset (digits, a .npz, a table, an MNIST folder)")
            read = self.manifest["data"].get("read")
            if read and read.get("test"):
                read = {**read, "test": None}
            try:
                train, test = load_dataset(spec, read_spec=read)
            except FileNotFoundError as e:
                raise ExpungeError(f"evaluation set {name!r}: {spec} cannot be read ({e})") from None
            spec_pre = self.manifest["data"].get("preprocess")
            if spec_pre:
                train = preprocess(train, **spec_pre)
                test = preprocess(test, **spec_pre) if test is not None else None
            data, split = (test, "test") if test is not None and len(test) else (train, "all rows")
            info = {"data": spec, "split": split}
        if len(data) == 0:
            raise ExpungeError(f"evaluation set {name!r} has no rows")
        if data.n_features != self.universe.n_features:
            raise ExpungeError(f"evaluation set {name!r} has {data.n_features} features; the models take "
                               f"{self.universe.n_features}")
        if data.y.min() < 0 or data.y.max() >= self.n_classes:
            raise ExpungeError(f"evaluation set {name!r} has labels outside 0..{self.n_classes - 1}, the models' classes")
        return data, {**info, "rows": len(data), "fingerprint": data.fingerprint()}

    def state_score(self, data: IndexedDataset):
        """state -> accuracy on ``data``."""
        X = torch.from_numpy(data.X).to(self.flat.dtype)
        return lambda state: float((self.flat.predict(state["w"], X).numpy() == data.y).mean())

    def write_merged(self, state: dict[str, torch.Tensor], out, record: dict, files: dict[str, bytes],
                     signing_key=None) -> RunModel:
        return run_class("merge").create(self, state["w"], out, record, files, signing_key)

    def _workspace(self, universe: IndexedDataset) -> Workspace:
        dtype = DTYPES[self.recipe.dtype]
        return Workspace(self.flat, self.recipe, self.plan, torch.from_numpy(universe.X).to(dtype),
                         torch.from_numpy(universe.y), universe.ids)

    @classmethod
    def train(cls, data: IndexedDataset, recipe: TrainRecipe, updater: "str | Updater" = "deltagrad", out=None,
              test: IndexedDataset | None = None, source: str | None = None, progress: bool = False,
              preprocess: dict | None = None, signing_key=None, init: Fitted | None = None) -> Fitted:
        """Train on ``data`` and write a new run directory at ``out`` (a temporary one if omitted).

        ``source`` is the spec ``load_dataset`` reads the data back from; without it the data is
        stored in the run directory; ``preprocess`` (``data.preprocess`` arguments) is re-applied to it
        when the run is reopened. ``signing_key`` (a key file; default $EXPUNGE_SIGNING_KEY) signs the
        run's ledger rows from the first on. ``init``: fine-tune from this run's current model instead of
        the recipe's initialisation (it becomes w0, so updates and exact retraining start from it too);
        the manifest records it, which is how `expunge merge` knows the runs share a base.
        """
        updater = make_updater(updater)
        if getattr(find(updater.name), "updates", None) == OWN_RUN:
            raise ExpungeError(f"{updater.name} trains its own way: use its updater's fit(data, ...)")
        if recipe.optimizer != "SGD":
            raise ExpungeError(f"DeltaGrad and exact retraining replay plain SGD, not {recipe.optimizer}; "
                               "use --method sisa for other optimizers")
        _check_auto_rate(recipe, updater.name)

        def fit(fitted: "Fitted", stage: Path):
            trajectory = Trajectory.create(stage / TRAJECTORY, fitted.plan.n_iterations, fitted.flat.n_params,
                                           fitted.flat.dtype)
            w = train(fitted.ws, fitted.active, fitted.w0, trajectory, progress)
            return "train", w, trajectory, {"kind": "exact", "iterations": fitted.plan.n_iterations}

        return cls._train_run(data, recipe, updater, out, test, source, preprocess, fit, signing_key, init)

    @classmethod
    def _train_run(cls, data: IndexedDataset, recipe: TrainRecipe, updater: Updater, out, test, source, preprocess,
                   fit, signing_key=None, init: Fitted | None = None) -> Fitted:
        """Make the run directory, train with ``fit(fitted, stage) -> (method, w, trajectory, guarantee)``
        and commit the first version (a failed training leaves no run behind)."""
        run, manifest, created, signer = cls._new_run(data, out, test, source,
                                                      {"name": updater.name, "config": updater.config()}, preprocess,
                                                      signing_key)
        manifest["recipe"] = recipe.to_dict()
        if init is not None:
            manifest["init"] = init.init_record()
        with cls._creating(run, manifest, created, data, test, source):
            fitted = cls(run, manifest, data, np.ones(len(data), bool), test)
            if init is not None:
                fitted.check_same_architecture(init, "--init")
            fitted.w0, fitted._signer = (fitted.flat.get_flat() if init is None else init.w.clone()), signer
            with run.staging() as stage:
                start = time.perf_counter()
                method, w, trajectory, guarantee = fit(fitted, stage)
                report = UpdateReport(method, "train", [], time.perf_counter() - start, None, weights_hash(w),
                                      guarantee, fitted._metrics(w, fitted.active))
                fitted._commit_weights(stage, trajectory, report, w, data, fitted.active)
        return fitted

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> "Fitted":
        tensors = load_file(folder / WEIGHTS)
        trajectory, problem = None, None
        listed = any(rel.startswith(TRAJECTORY + "/") for rel in manifest["files"])
        broken = sorted(rel for rel in damaged if rel.startswith(TRAJECTORY + "/"))
        if broken:
            problem = f"{', '.join(broken)} of version {manifest['version']} does not match its hash"
        elif listed:
            try:
                trajectory = Trajectory.open(folder / TRAJECTORY)
            except ExpungeError as e:
                problem = str(e)
        fitted = cls(run, manifest, universe, active, test, tensors["w"], tensors["w0"], trajectory)
        fitted.trajectory_problem = problem
        return fitted

    def _update(self, kind: str, ids: np.ndarray, universe: IndexedDataset, new_active: np.ndarray,
                method, compare: bool, progress: bool) -> UpdateReport:
        updater = self.updater if method is None else make_updater(method)
        if not hasattr(updater, "update"):  # certified, sisa: they train runs of their own
            raise ExpungeError(f"{updater.name} needs a run trained for it (expunge train --method {updater.name})")
        _check_auto_rate(self.recipe, updater.name)
        if getattr(updater, "reads_trajectory", False) and self.trajectory is None and self.trajectory_problem:
            raise ExpungeError(f"the cached trajectory is damaged ({self.trajectory_problem}); update with --method "
                               "retrain, which rebuilds it")
        old_active = np.concatenate([self.active, np.zeros(len(universe) - len(self.active), bool)])
        ws = self._workspace(universe) if universe is not self.universe else self.ws
        with self.run.staging() as stage:
            trajectory = Trajectory.create(stage / TRAJECTORY, self.plan.n_iterations, self.flat.n_params,
                                           self.flat.dtype)
            start = time.perf_counter()
            w, guarantee = updater.update(ws, old_active, new_active, self.w0, self.trajectory, trajectory,
                                          progress, w=self.w)
            seconds = time.perf_counter() - start
            if not getattr(updater, "writes_trajectory", True):
                # scrubbing and fine-tuning leave no trajectory: DeltaGrad needs a retrain after them
                shutil.rmtree(stage / TRAJECTORY)
                trajectory = None
            for name, content in getattr(updater, "evidence", {}).items():  # files the update is judged by
                (stage / name).write_bytes(content)
            metrics = self._metrics(w, new_active)
            metrics["dist_to_previous"] = float((w - self.w).norm())
            if compare and not getattr(find(updater.name), "reference", False):  # else it is the reference
                start = time.perf_counter()
                w_ref = self._reference(ws, new_active, progress)
                metrics.update(retrain_s=time.perf_counter() - start, dist_to_retrain=float((w - w_ref).norm()),
                               dist_previous_to_retrain=float((self.w - w_ref).norm()),
                               acc_retrain=self.accuracy(w=w_ref))
                metrics["speedup"] = metrics["retrain_s"] / seconds
            report = UpdateReport(updater.name, kind, ids.tolist(), seconds, weights_hash(self.w),
                                  weights_hash(w), guarantee, metrics)
            self._commit_weights(stage, trajectory, report, w, universe, new_active, ws)
        return report

    def _reference(self, ws: Workspace, new_active: np.ndarray, progress: bool) -> torch.Tensor:
        """The exact reference for --compare: retraining on the new rows with the run's recipe."""
        return train(ws, new_active, self.w0, progress=progress)

    def _metrics(self, w: torch.Tensor, active: np.ndarray) -> dict:
        metrics = {"rows": int(active.sum())}
        acc = self.accuracy(w=w)
        if acc is not None:
            metrics["test_acc"] = acc
        return metrics

    def _commit_weights(self, stage: Path, trajectory: Trajectory | None, report: UpdateReport, w: torch.Tensor,
                        universe: IndexedDataset, active: np.ndarray, ws: Workspace | None = None,
                        changes: dict | None = None) -> None:
        """Write weights and trajectory into the staged version, commit it, then take them in memory."""
        if trajectory is not None:
            trajectory.flush()
        save_file({"w": w.contiguous(), "w0": self.w0.contiguous()}, str(stage / WEIGHTS))

        def adopt(folder: Path) -> None:
            self.w = w
            self.trajectory = Trajectory.open(folder / TRAJECTORY) if trajectory is not None else None
            self.trajectory_problem = None
            if ws is not None:
                self.ws = ws

        self._commit(stage, report, universe, active, adopt, changes)


def _check_auto_rate(recipe: TrainRecipe, method: str) -> None:
    """GeN's rates depend on the rows (its probes read them): only exact retraining recomputes them without the
    removed rows. Every other method keeps or replays rates that removed rows helped choose."""
    if recipe.lr_auto and method != "retrain":
        raise ExpungeError(f"this run's learning rate is automatic (GeN, --lr auto): its rates depend on the rows, so "
                           f"only exact retraining recomputes them without a removed row; use --method retrain, not "
                           f"{method}")
