"""SISA (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): exact unlearning by sharded,
sliced training.

The rows are split into S disjoint shards (a seeded permutation), each shard into R slices. Shard
s trains one model in R stages: stage r trains on slices 0..r, starting from stage r-1's weights,
and saves a checkpoint. Predictions aggregate the S final models (majority vote or mean softmax).
Deleting rows retrains only their shards, from the checkpoint before the earliest affected slice;
added rows join the last slice of a shard chosen by a keyed hash of their id. Every stage is a
pure function of (start weights, rows, seeds), run single-threaded, so the result is bit-identical
to training the ensemble from scratch on the remaining rows. Shards train in parallel, in local
worker processes or on Ray.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import IndexedDataset
from ..errors import ExpungeError
from ..models import DTYPES, FlatModel, build_model, weights_hash
from ..recipe import TrainRecipe, _mix64
from .base import UpdateReport
from .run import TabularRun

FOLDER, ASSIGNMENT = "sisa", "sisa/assignment.npz"


@dataclass(frozen=True)
class SISAConfig:
    shards: int = 5
    slices: int = 1
    aggregation: str = "vote"  # or "mean" (mean of softmax outputs)
    backend: str = "local"     # or "ray"
    workers: int | None = None  # local worker processes; default: one per CPU core
    address: str | None = None  # Ray cluster to join; default: start a local one

    def __post_init__(self):
        if self.shards < 1 or self.slices < 1:
            raise ExpungeError(f"SISA needs at least one shard and one slice, got {self.shards} and {self.slices}")
        if self.aggregation not in ("vote", "mean"):
            raise ExpungeError(f"aggregation must be 'vote' or 'mean', got {self.aggregation!r}")
        if self.backend not in ("local", "ray"):
            raise ExpungeError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.workers is not None and self.workers < 1:
            raise ExpungeError(f"workers must be at least 1 (or omitted for one per core), got {self.workers}")


def _key(*values: int) -> int:
    """A fixed 63-bit hash of small integers (seeds for shards and stages)."""
    h = np.uint64(0x9E3779B97F4A7C15)
    for v in values:
        h = _mix64(np.array([h ^ np.uint64(int(v) % 2**64)], np.uint64))[0]
    return int(h >> np.uint64(1))


def assign(n_rows: int, config: SISAConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, slice) of each original row: a seeded permutation cut into equal shards, each
    shard's rows (in row order) cut into equal slices."""
    order = np.random.default_rng(_key(seed, 17)).permutation(n_rows)
    shard = np.empty(n_rows, np.int64)
    shard[order] = np.arange(n_rows) * config.shards // max(n_rows, 1)
    slice_ = np.empty(n_rows, np.int64)
    for s in range(config.shards):
        rows = np.flatnonzero(shard == s)
        slice_[rows] = np.arange(len(rows)) * config.slices // max(len(rows), 1)
    return shard, slice_


def assign_added(ids: np.ndarray, config: SISAConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Added rows go to the last slice of a shard picked by a keyed hash of the id."""
    salt = np.uint64(_key(seed, 29))
    shard = (_mix64(ids.astype(np.uint64) ^ salt) % np.uint64(config.shards)).astype(np.int64)
    return shard, np.full(len(ids), config.slices - 1, np.int64)


def stage_epochs(recipe: TrainRecipe, slices: int) -> int:
    """Epochs per stage, so that the last slice is seen about recipe.epochs / R times and the
    first about recipe.epochs times (the paper keeps the total work close to unsliced training).
    Each stage counts its epochs from 0, so an ``lr_steps`` schedule applies within a stage."""
    return max(1, math.ceil(recipe.epochs / slices))


@dataclass
class ShardJob:
    """Everything one worker needs to (re)train shard ``shard`` from ``start_stage`` on."""

    shard: int
    start_stage: int
    slices: int
    recipe: dict
    n_features: int
    n_classes: int
    X: np.ndarray
    y: np.ndarray
    slice_of_row: np.ndarray
    start: np.ndarray | None  # flat weights after stage start_stage - 1 (None: the shard's initial weights)


def train_shard(job: ShardJob) -> list[np.ndarray]:
    """Train stages start_stage..R-1 of one shard; return the checkpoint (flat weights) of each."""
    torch.set_num_threads(1)  # determinism: the same arithmetic in every process and backend
    recipe = TrainRecipe.from_dict({**job.recipe, "seed": _key(job.recipe["seed"], job.shard) % 2**31})
    model = build_model(recipe, job.n_features, job.n_classes)
    flat = FlatModel(model)
    if job.start is not None:
        flat.set_flat(torch.from_numpy(job.start))
    dtype = DTYPES[recipe.dtype]
    X_all, y_all = torch.from_numpy(job.X).to(dtype), torch.from_numpy(job.y)
    checkpoints = []
    for stage in range(job.start_stage, job.slices):
        rows = torch.from_numpy(np.flatnonzero(job.slice_of_row <= stage))
        if len(rows):
            X, y = X_all[rows], y_all[rows]
            optimizer = getattr(torch.optim, recipe.optimizer)(model.parameters(), lr=recipe.lr,
                                                               weight_decay=recipe.weight_decay)
            generator = torch.Generator().manual_seed(_key(recipe.seed, job.shard, stage) % 2**63)
            batch = recipe.batch_size or len(rows)
            for epoch in range(stage_epochs(recipe, job.slices)):
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr_at(epoch)
                order = torch.randperm(len(rows), generator=generator)
                for i in range(0, len(rows), batch):
                    idx = order[i : i + batch]
                    optimizer.zero_grad()
                    torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                    optimizer.step()
        checkpoints.append(flat.get_flat().numpy())
    return checkpoints


def _train_inline(job: ShardJob) -> list[np.ndarray]:
    threads = torch.get_num_threads()
    try:
        return train_shard(job)
    finally:
        torch.set_num_threads(threads)


def run_jobs(jobs: list[ShardJob], config: SISAConfig) -> list[list[np.ndarray]]:
    """Train shards in parallel: Ray tasks, or local worker processes (inline for a single job)."""
    if not jobs:
        return []
    if config.backend == "ray":
        try:
            import ray
        except ImportError:
            raise ExpungeError("the ray backend needs Ray: pip install 'expunge[ray]' (or use --backend local)") from None
        if not ray.is_initialized():
            ray.init(address=config.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        task = ray.remote(num_cpus=1)(train_shard)
        # Ray hands back read-only arrays: copy them so they behave like the local backend's
        return [[np.array(w) for w in ws] for ws in ray.get([task.remote(job) for job in jobs])]
    workers = min(config.workers or os.cpu_count() or 1, len(jobs))
    if workers == 1:
        return [_train_inline(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_shard, jobs))


class SISAEnsemble(torch.nn.Module):
    """The aggregated shard models as one module: mean of softmax, or the fraction of votes."""

    def __init__(self, models: list[torch.nn.Module], aggregation: str):
        super().__init__()
        self.models, self.aggregation = torch.nn.ModuleList(models), aggregation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([m(x) for m in self.models])
        if self.aggregation == "mean":
            return outputs.softmax(-1).mean(0)
        votes = torch.nn.functional.one_hot(outputs.argmax(-1), outputs.shape[-1]).to(outputs.dtype)
        return votes.mean(0)


class SISA:
    """The SISA updater: ``fit`` trains the sharded, sliced ensemble into a run directory."""

    name = "sisa"

    def __init__(self, shards: int = 5, slices: int = 1, aggregation: str = "vote", backend: str = "local",
                 workers: int | None = None, address: str | None = None):
        self.settings = SISAConfig(shards, slices, aggregation, backend, workers, address)

    def config(self) -> dict:
        return asdict(self.settings)

    def fit(self, data: IndexedDataset, recipe: TrainRecipe, out=None, test=None, source=None,
            progress: bool = False, preprocess: dict | None = None, signing_key=None) -> "SISAFitted":
        return SISAFitted.train(data, recipe, self.settings, out=out, test=test, source=source, preprocess=preprocess,
                                signing_key=signing_key)


class SISAFitted(TabularRun):
    def __init__(self, run, manifest, universe, active, test, shard, slice_, checkpoints):
        super().__init__(run, manifest, universe, active, test)
        self.recipe = TrainRecipe.from_dict(manifest["recipe"])
        self.settings = SISAConfig(**manifest["method"]["config"])
        self.shard, self.slice, self.checkpoints = shard, slice_, checkpoints

    # ------------------------------------------------------------------ views

    def ensemble(self, checkpoints: dict | None = None, active: np.ndarray | None = None,
                 shard: np.ndarray | None = None) -> torch.nn.Module:
        """The non-empty shards' final models as one ``torch.nn.Module`` (current state by default)."""
        checkpoints = self.checkpoints if checkpoints is None else checkpoints
        active = self.active if active is None else active
        shard = self.shard if shard is None else shard
        models = []
        for s in range(self.settings.shards):
            if (active & (shard[: len(active)] == s)).any():
                model = build_model(self.recipe, self.universe.n_features, self.n_classes)
                FlatModel(model).set_flat(torch.from_numpy(checkpoints[(s, self.settings.slices - 1)]))
                models.append(model)
        return SISAEnsemble(models, self.settings.aggregation).eval()

    @property
    def model(self) -> torch.nn.Module:
        return self.ensemble()

    def current_model_hash(self) -> str:
        return _hash(self.checkpoints)

    @classmethod
    def stored_model_hash(cls, folder: Path, manifest: dict) -> str:
        return _hash(cls._checkpoints(folder, SISAConfig(**manifest["method"]["config"])))

    @staticmethod
    def _checkpoints(folder: Path, settings: SISAConfig) -> dict:
        return {(s, r): load_file(folder / FOLDER / _checkpoint_name(s, r))["w"].numpy()
                for s in range(settings.shards) for r in range(settings.slices)}

    def accuracy(self, data: IndexedDataset | None = None, ensemble: torch.nn.Module | None = None) -> float | None:
        data = self.test if data is None else data
        if data is None or len(data) == 0:
            return None
        with torch.no_grad():
            scores = (ensemble or self.model)(torch.from_numpy(data.X).to(DTYPES[self.recipe.dtype]))
        return float((scores.argmax(1).numpy() == data.y).mean())

    def rows_processed(self, jobs: list[ShardJob]) -> int:
        """Rows fed through training by these jobs (rows per stage times epochs per stage)."""
        epochs = stage_epochs(self.recipe, self.settings.slices)
        return sum(int((job.slice_of_row <= stage).sum()) * epochs
                   for job in jobs for stage in range(job.start_stage, job.slices))

    # ------------------------------------------------------------------ training

    def _job(self, s: int, start_stage: int, universe: IndexedDataset, active: np.ndarray, shard: np.ndarray,
             slice_: np.ndarray) -> ShardJob:
        rows = np.flatnonzero(active & (shard == s))  # in universe order: the same for any history
        start = self.checkpoints[(s, start_stage - 1)] if start_stage > 0 else None
        return ShardJob(s, start_stage, self.settings.slices, self.recipe.to_dict(), universe.n_features,
                        self.n_classes, universe.X[rows], universe.y[rows], slice_[rows], start)

    @classmethod
    def train(cls, data: IndexedDataset, recipe: TrainRecipe, settings: SISAConfig, out=None, test=None,
              source=None, preprocess: dict | None = None, signing_key=None) -> "SISAFitted":
        if settings.shards > len(data):
            raise ExpungeError(f"{settings.shards} shards for {len(data)} rows: use at most one shard per row")
        if recipe.lr_auto:
            raise ExpungeError("SISA does not set its shards' rates with GeN yet: give a fixed --lr (lr_auto is for "
                               "runs updated by exact retraining)")
        run, manifest, created, signer = cls._new_run(data, out, test, source,
                                                      {"name": "sisa", "config": asdict(settings)}, preprocess,
                                                      signing_key)
        manifest["recipe"] = recipe.to_dict()
        with cls._creating(run, manifest, created, data, test, source):
            shard, slice_ = assign(len(data), settings, recipe.seed)
            active = np.ones(len(data), bool)
            model = cls(run, manifest, data, active, test, shard, slice_, {})
            model._signer = signer
            jobs = [model._job(s, 0, data, active, shard, slice_) for s in range(settings.shards)]
            start = time.perf_counter()
            results = run_jobs(jobs, settings)
            seconds = time.perf_counter() - start
            checkpoints = {(job.shard, stage): w for job, ws in zip(jobs, results)
                           for stage, w in zip(range(job.start_stage, job.slices), ws)}
            report = UpdateReport("sisa", "train", [], seconds, None, _hash(checkpoints), {"kind": "exact"},
                                  {"rows": len(data), "rows_processed": model.rows_processed(jobs),
                                   "test_acc": model.accuracy(ensemble=model.ensemble(checkpoints))})
            model._commit_state(report, checkpoints, set(checkpoints), data, active, shard, slice_)
        return model

    @classmethod
    def _open(cls, run, manifest, folder: Path, universe, active, test, damaged=frozenset()) -> "SISAFitted":
        with np.load(folder / ASSIGNMENT) as z:
            shard, slice_ = z["shard"], z["slice"]
        checkpoints = cls._checkpoints(folder, SISAConfig(**manifest["method"]["config"]))
        return cls(run, manifest, universe, active, test, shard, slice_, checkpoints)

    # ------------------------------------------------------------------ requests

    def _update(self, kind, ids, universe, new_active, method, compare, progress) -> UpdateReport:
        name = getattr(method, "name", method) or "sisa"
        if name != "sisa":
            raise ExpungeError(f"a SISA run is updated by retraining its affected shards, not by {name!r}")
        shard, slice_ = self.shard, self.slice
        if len(universe) > len(self.universe):
            extra_shard, extra_slice = assign_added(universe.ids[len(self.universe):], self.settings, self.recipe.seed)
            shard, slice_ = np.concatenate([shard, extra_shard]), np.concatenate([slice_, extra_slice])
        old_active = np.concatenate([self.active, np.zeros(len(universe) - len(self.active), bool)])
        changed = np.flatnonzero(old_active != new_active)
        earliest = {}
        for row in changed:
            earliest[shard[row]] = min(earliest.get(shard[row], self.settings.slices), slice_[row])
        jobs = [self._job(int(s), int(r), universe, new_active, shard, slice_) for s, r in sorted(earliest.items())]
        start = time.perf_counter()
        results = run_jobs(jobs, self.settings)
        seconds = time.perf_counter() - start
        checkpoints = dict(self.checkpoints)
        fresh = set()
        for job, ws in zip(jobs, results):
            for stage, w in zip(range(job.start_stage, job.slices), ws):
                checkpoints[(job.shard, stage)] = w
                fresh.add((job.shard, stage))
        all_jobs = [self._job(s, 0, universe, new_active, shard, slice_) for s in range(self.settings.shards)]
        metrics = {"rows": int(new_active.sum()), "shards_retrained": len(jobs),
                   "stages_retrained": len(fresh), "rows_processed": self.rows_processed(jobs),
                   "rows_full_retrain": self.rows_processed(all_jobs)}
        if compare:  # retrain the whole ensemble from scratch: the reference, and the time it takes
            t0 = time.perf_counter()
            reference = run_jobs(all_jobs, self.settings)
            metrics["retrain_s"] = time.perf_counter() - t0
            metrics["speedup"] = metrics["retrain_s"] / max(seconds, 1e-9)
            metrics["identical_to_retrain"] = all(
                np.array_equal(checkpoints[(job.shard, stage)], w)
                for job, ws in zip(all_jobs, reference) for stage, w in enumerate(ws))
        metrics["test_acc"] = self.accuracy(ensemble=self.ensemble(checkpoints, new_active, shard))
        report = UpdateReport("sisa", kind, ids.tolist(), seconds, _hash(self.checkpoints), _hash(checkpoints),
                              {"kind": "exact"}, metrics)
        self._commit_state(report, checkpoints, fresh, universe, new_active, shard, slice_)
        return report

    def _commit_state(self, report, checkpoints, fresh, universe, active, shard, slice_) -> None:
        """Stage the checkpoints (unchanged ones hard-linked from the current version: files are
        never modified in place) and the assignment, commit, then take them in memory."""
        current = self.run.current(self.manifest) / FOLDER if self.version else None

        def adopt(folder: Path) -> None:
            self.checkpoints, self.shard, self.slice = checkpoints, shard, slice_

        with self.run.staging() as stage:
            (stage / FOLDER).mkdir()
            for (s, r), w in checkpoints.items():
                target = stage / FOLDER / _checkpoint_name(s, r)
                if (s, r) not in fresh and current is not None:
                    os.link(current / target.name, target)
                else:
                    save_file({"w": torch.from_numpy(w)}, str(target))
            with open(stage / ASSIGNMENT, "wb") as f:
                np.savez(f, shard=shard, slice=slice_)
            self._commit(stage, report, universe, active, adopt)


def _checkpoint_name(shard: int, stage: int) -> str:
    return f"shard{shard:03d}_slice{stage:03d}.safetensors"


def _hash(checkpoints: dict) -> str:
    return weights_hash(torch.from_numpy(np.concatenate([checkpoints[k] for k in sorted(checkpoints)])))
