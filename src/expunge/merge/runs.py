"""Merging runs: what `expunge merge` and `expunge tradeoff` do, in Python.

``merge_runs(base, models, evals, method, out=...)`` takes a base run and runs fine-tuned from it, finds the
front of their merges on the named evaluation sets, picks the point the preferences favour (or merges at
the coefficients given) and writes the merged model as a new run, with the front as JSON and a plot in its
version folder. ``tradeoff_run(run, before, ...)`` finds the forgetting front between an earlier model of a
run and its current one and records the chosen point as the run's next version, with its ledger row.

Runs are read only through the run class's merging methods (RunModel.architecture, model_state,
evaluation_set, state_score, score, write_merged; unlearn/run.py): the zoo runs (scored by accuracy) and the
Hugging Face LM runs (scored by TOFU's answer probability, exp(-mean answer-token NLL) averaged over rows)
implement them and are merged by the same code. Both scores lie in [0, 1], higher is better, and are fitted
through a sigmoid. Every input is checked before a merge is evaluated and before anything is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpungeError
from ..unlearn import RunModel
from .design import default_heldout, default_points
from .evaluation import StateEvaluator
from .front import preference_weights
from .objectives import Metric
from .pipeline import METHODS, find_front, materialise, process
from .plot import front_png
from .result import FrontResult
from .tradeoff import measured_tradeoff, tradeoff_front
from .vectors import TaskVectors, check_bounds, interpolation

EXPLICIT_METHODS = ("task-arithmetic", "ties", "dare")  # what --c may be combined with: a merge, no search
TRADEOFF_METHODS = ("map", "grid")
DELETED, TEST, ROWS = "deleted", "test", "rows"  # trade-off evaluation sets named by the run itself
FRONT_JSON, FRONT_PNG = "front.json", "front.png"
MIN_COSINE = 0.3  # TaskVectors.from_models' check, for models whose run does not name its base


@dataclass
class MergeOutcome:
    run: RunModel         # the merged run (merge_runs) or the updated run (tradeoff_run)
    result: FrontResult   # the front
    chosen: dict          # {"c", "predicted", "measured"}
    record: dict          # what the manifest ("merge") or the ledger row's guarantee records

    def to_dict(self) -> dict:
        return {"run": str(self.run.path), "version": self.run.version, "model_hash": self.run.manifest["model_hash"],
                "chosen": self.chosen, "record": self.record, "front": self.result.to_dict()}


# ------------------------------------------------------------------ checks shared by both


def _open(run: RunModel | str | Path) -> RunModel:
    return run if isinstance(run, RunModel) else RunModel.load(run)


def _check_out(out) -> Path:
    if out is None:
        raise ExpungeError("name the merged run's directory (--out); it must not exist yet")
    out = Path(out)
    if out.exists():
        raise ExpungeError(f"{out} exists; --out must name a new directory (the merged run is written there)")
    return out


def _check_bounds(bounds) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ExpungeError(f"bounds must be two numbers LO,HI; got {bounds!r}") from None
    check_bounds([lo], 1, (lo, hi))  # refuses non-finite or reversed bounds
    return lo, hi


def _check_preferences(preferences: Mapping[str, float] | None, metrics: Sequence[Metric]) -> dict | None:
    if preferences is None:
        return None
    preference_weights(preferences, metrics)  # refuses unknown names and bad weights
    return {str(k): float(v) for k, v in preferences.items()}


def _check_points(points: int | None, n_vars: int) -> None:
    if points is not None and (not isinstance(points, (int, np.integer)) or points < 1):
        raise ExpungeError(f"--points must be a positive integer, got {points!r}")
    from .surrogate import n_coefficients

    if points is not None and points < n_coefficients(n_vars):
        raise ExpungeError(f"{points} design point(s) cannot fit a full quadratic in {n_vars} coefficient(s), which has "
                           f"{n_coefficients(n_vars)} parameters; use at least that many (MAP's default is "
                           f"{default_points(n_vars)})")


class _Counter:
    """A state evaluator that scores every metric and shows a progress bar (rich) while the searches run."""

    def __init__(self, scorers: Mapping[str, Callable], total: int | None, description: str, enabled: bool):
        self.scorers, self.total, self.description, self.enabled = dict(scorers), total, description, enabled
        self.bar = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            # on standard error, so that `--json -` output stays clean
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=self.total)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, state) -> dict[str, float]:
        scores = {name: score(state) for name, score in self.scorers.items()}
        if self.bar is not None:
            self.bar.advance(self.task)
        return scores


def _expected_evaluations(method: str, n_vars: int, points: int | None, steps: int, explicit: bool) -> int | None:
    if explicit:
        return 1
    if method in ("map", "ties", "dare"):
        n = points or default_points(n_vars)
        return n + default_heldout(n) + 1
    if method == "grid":
        return steps ** n_vars
    if method == "task-arithmetic":
        return steps
    return None  # the Bayesian and nested variants decide as they go


def _measured(point: dict, state, evaluate: StateEvaluator) -> dict:
    """The chosen point's metrics as measured (MAP's fronts hold predictions only)."""
    return dict(point["measured"]) if point.get("measured") else {k: float(v) for k, v in evaluate(state).items()}


def _files(result: FrontResult, chosen: dict, record: dict, title: str) -> dict[str, bytes]:
    payload = {"chosen": chosen, "record": record, "front": result.to_dict()}
    return {FRONT_JSON: (json.dumps(payload, indent=2) + "\n").encode(), FRONT_PNG: front_png(result, chosen, title)}


# ------------------------------------------------------------------ expunge merge


def _base_relation(base: RunModel, model: RunModel, name: str) -> str:
    """How we know ``model`` was fine-tuned from ``base``: its manifest's "init" record, or (runs that do not
    record one) the cosine check of TaskVectors.from_models."""
    init = model.manifest.get("init")
    if init is None:
        return f"cosine >= {MIN_COSINE} (the run does not record its start)"
    if init.get("run_id") != base.run_id:
        raise ExpungeError(f"model {name!r} ({model.path}) was fine-tuned from another run ({init.get('path')}, run id "
                           f"{init.get('run_id')}), not from the base {base.path}; merge runs fine-tuned from one base")
    if init.get("model_hash") != base.manifest["model_hash"]:
        raise ExpungeError(f"model {name!r} ({model.path}) was fine-tuned from version {init.get('version')} of the base "
                           f"{base.path}, whose model has changed since (now version {base.version}); task vectors need "
                           "the model they started from: give a copy of the base at that version")
    return "init"


def _names(models: Sequence[RunModel], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        return list(names)
    stems = [m.path.name for m in models]
    return stems if len(set(stems)) == len(stems) else [f"model{i + 1}" for i in range(len(models))]


def merge_runs(base, models: Sequence, evals: Mapping[str, object], method: str = "map", *, out,
               c: Sequence[float] | None = None, points: int | None = None, steps: int = 11,
               preferences: Mapping[str, float] | None = None, bounds: tuple[float, float] = (0.0, 1.0),
               density: float = 0.2, p: float = 0.5, names: Sequence[str] | None = None, search: str = "auto",
               seed: int = 0, signing_key=None, progress: bool = False) -> MergeOutcome:
    """Merge runs fine-tuned from ``base`` and write the merged model as a new run at ``out``.

    ``evals``: {task: evaluation set}, each scored by the base run's ``score``: for zoo runs a dataset spec or
    IndexedDataset scored by accuracy, for language-model runs TOFU QA pairs or documents (a path, or a Corpus)
    scored by answer probability (exp(-mean NLL of each row's target tokens), averaged). ``method``: one of
    pipeline.METHODS (map, bayesian-map, nested-map, ties, dare: MAP; grid, task-arithmetic: evaluated
    baselines). ``c``: merge at these coefficients instead of searching (task-arithmetic, ties or dare);
    a one-hot c gives that fine-tuned model bit for bit. ``preferences``: {task: weight} picking the front
    point (default: all tasks alike). The merged run's manifest records the base, the models, the task
    vectors' hashes, c, the predicted and the measured metrics ("merge"); its version folder holds
    front.json and front.png."""
    if method not in METHODS:
        raise ExpungeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    out = _check_out(out)
    bounds = _check_bounds(bounds)
    if not evals:
        raise ExpungeError("name at least one evaluation set: --eval TASK=DATA")
    metrics = [Metric.accuracy(str(name)) for name in evals]
    preferences = _check_preferences(preferences, metrics)
    if not models:
        raise ExpungeError("no models to merge; give at least one run fine-tuned from the base (--models RUN)")
    if c is not None:
        if method not in EXPLICIT_METHODS:
            raise ExpungeError(f"--c merges at the coefficients given; it goes with --method {', '.join(EXPLICIT_METHODS)}, "
                               f"not {method} (which searches for them)")
        c = check_bounds(c, len(models), bounds)
    _check_points(points, len(models))
    if steps < 2:
        raise ExpungeError(f"--steps must be at least 2, got {steps}")
    paths = [Path(m).resolve() for m in models if not isinstance(m, RunModel)]
    if len(set(paths)) != len(paths):
        raise ExpungeError("a run is given twice in --models; give each fine-tuned run once")

    base = _open(base)
    runs = [_open(m) for m in models]
    names = _names(runs, names)
    if len(names) != len(runs) or len(set(names)) != len(names):
        raise ExpungeError(f"give one distinct name per model: {len(runs)} model(s), names {names}")
    for name, run in zip(names, runs):
        if run.run_id == base.run_id:
            raise ExpungeError(f"model {name!r} is the base run itself; give runs fine-tuned from it")
        base.check_same_architecture(run, f"model {name!r}")
    relations = [_base_relation(base, run, name) for name, run in zip(names, runs)]
    eval_sets = {name: base.evaluation_set(spec, name) for name, spec in evals.items()}

    vectors = TaskVectors.from_models(base.model_state(), [r.model_state() for r in runs], names,
                                      min_cosine=None if all(r == "init" for r in relations) else MIN_COSINE)
    scorers = {name: base.state_score(data) for name, (data, _) in eval_sets.items()}
    total = _expected_evaluations(method, len(runs), points, steps, c is not None)
    with _Counter(scorers, total, f"merge ({method}): evaluating merges", progress) as evaluate:
        if c is not None:
            merged = process(vectors, method, density, p, seed)
            state = merged.merge(c, bounds)
            measured = evaluate(state)
            chosen = {"c": c.tolist(), "predicted": None, "measured": measured}
            result = FrontResult(method, metrics, bounds, [{"c": c.tolist(), "metrics": measured}], [chosen], {},
                                 {"vectors": merged.describe(), "given_c": True})
        else:
            result = find_front(vectors, evaluate, metrics, method, bounds=bounds, points=points, steps=steps,
                                preferences=preferences, density=density, p=p, search=search, seed=seed)
            state, point = materialise(vectors, result, preferences)
            chosen = {"c": point["c"], "predicted": point.get("predicted"), "measured": _measured(point, state, evaluate)}
    record = {
        "method": method, "score": base.score, "base": base.init_record(),
        "models": [{"name": n, **r.init_record(), "base_check": rel} for n, r, rel in zip(names, runs, relations)],
        "task_vectors": result.details["vectors"], "c": chosen["c"], "bounds": list(bounds), "preferences": preferences,
        "predicted": chosen["predicted"], "measured": chosen["measured"], "evaluations": result.n_evaluations,
        "r2_heldout": result.r_squared() or None, "eval": {name: info for name, (_, info) in eval_sets.items()},
        "settings": {"points": points, "steps": steps, "density": density, "p": p, "seed": seed, "search": search},
        "front": [FRONT_JSON, FRONT_PNG],
    }
    files = _files(result, chosen, record, f"merge of {', '.join(names)}")
    merged_run = base.write_merged(state, out, record, files, signing_key)
    return MergeOutcome(merged_run, result, chosen, record)


# ------------------------------------------------------------------ expunge tradeoff


def _ledger_rows(run: RunModel) -> dict[int, dict]:
    rows = {e["version"]: e for e in run.ledger.entries()}
    if run.pending is not None:
        rows[run.pending.version] = run.pending.to_dict()
    return rows


def _version_model(run: RunModel, which, what: str) -> tuple[RunModel, dict]:
    """The run (or the copy of it) holding the model of version ``which``: an int (or digits) is a version of
    ``run``, which keeps only its current model; a path is a copy of the run saved at some version,
    accepted when the run's ledger records that version with that very model hash."""
    rows = _ledger_rows(run)
    if isinstance(which, (int, np.integer)) or (isinstance(which, str) and which.strip().isdigit()):
        version = int(which)
        if version == run.version:
            return run, {"version": version, "model_hash": run.manifest["model_hash"], "from": "the run"}
        if version not in rows:
            raise ExpungeError(f"{run.path} has no version {version} (its ledger records versions "
                               f"{min(rows)}..{max(rows)}); give {what} as a version it records")
        raise ExpungeError(
            f"{run.path} keeps the weights of its current version only (version {run.version}); version {version}'s "
            f"were replaced when the next version was written. For {what}, give a copy of the run saved at version "
            f"{version} (made with `cp -r` or RunModel.save before the update): the run's ledger recorded its model "
            f"hash {rows[version]['model_hash_after'][:16]}..., which the copy must match")
    copy = RunModel.load(which)
    if copy.run_id != run.run_id:
        raise ExpungeError(f"{which} is not a copy of {run.path} (run id {copy.run_id}, not {run.run_id}); give a copy "
                           "of this run saved at the version meant")
    recorded = rows.get(copy.version)
    if recorded is None or recorded["model_hash_after"] != copy.manifest["model_hash"]:
        raise ExpungeError(f"{which} holds a version {copy.version} whose model {copy.manifest['model_hash'][:16]}... "
                           f"is not the one {run.path}'s ledger records for version {copy.version}; give an unaltered "
                           "copy of the run")
    run.check_same_architecture(copy, what)
    return copy, {"version": copy.version, "model_hash": copy.manifest["model_hash"], "from": str(Path(which).resolve())}


def _tradeoff_set(spec, run: RunModel, before: RunModel, name: str) -> tuple[object, dict]:
    """``deleted``: the rows active in the model before and not now; ``test``: the run's test split;
    ``rows``: its current rows; anything else: data as the run's evaluation_set reads it."""
    if spec == DELETED:
        n = len(before.active)
        gone = np.flatnonzero(before.active & ~run.active[:n])
        if len(gone) == 0:
            raise ExpungeError(f"{name}=deleted: no rows were deleted between version {before.version} and version "
                               f"{run.version}; give the forget set as a dataset")
        data = run.universe.take(gone)
        return data, {"data": DELETED, "rows": len(data), "fingerprint": data.fingerprint()}
    if spec == TEST:
        if run.test is None or len(run.test) == 0:
            raise ExpungeError(f"{name}=test: {run.path} has no test split; give the {name} set as data, or "
                               "'rows' (the run's current rows)")
        return run.test, {"data": TEST, "rows": len(run.test), "fingerprint": run.test.fingerprint()}
    if spec == ROWS:
        return run.data, {"data": ROWS, "rows": len(run.data), "fingerprint": run.data.fingerprint()}
    return run.evaluation_set(spec, name)


def tradeoff_run(run: RunModel, before, after=None, evals: Mapping[str, object] | None = None,
                 method: str = "map", *, points: int | None = None, steps: int = 21,
                 preferences: Mapping[str, float] | None = None, bounds: tuple[float, float] = (0.0, 1.0),
                 seed: int = 0, requested_by: str | None = None, reason: str | None = None,
                 reference: str | None = None, drop_privacy: bool = False, signing_key=None,
                 progress: bool = False) -> MergeOutcome:
    """The forgetting front between the model of version ``before`` and the current one, and the chosen point
    recorded as ``run``'s next version (an update by method "tradeoff", with its ledger row).

    ``run``: an open run, best held locked from loading (``with RunModel.locked(path) as run``).
    ``before``: a version number (only the current version's weights are kept by a run) or a copy of the run
    saved at that version. ``after``: the current version (the default; the point is written on top of it).
    ``evals``: {"forget": ..., "retain": ...}, each data as the run's evaluation_set reads it (a dataset; for
    an LM run QA pairs or documents) or ``deleted`` (the rows deleted since ``before``), ``test`` (the run's
    test split; LM runs have none) or ``rows`` (its current rows); default forget=deleted, retain=test. The
    forget score (the run's ``score``: accuracy, an LM run's answer probability) is minimised, the retain
    score maximised. ``method``: map (quadratic surrogates from ``points`` merges) or grid (``steps``
    evaluated merges). On an LM run the point is recorded by ``lm-tradeoff``; LoRA runs refuse it."""
    if method not in TRADEOFF_METHODS:
        raise ExpungeError(f"unknown trade-off method {method!r}; choose one of {', '.join(TRADEOFF_METHODS)}")
    evals = dict(evals or {"forget": DELETED, "retain": TEST})
    if set(evals) != {"forget", "retain"}:
        raise ExpungeError(f"the trade-off scores two sets, --eval forget=DATA and --eval retain=DATA; got {sorted(evals)}")
    metrics = [Metric("forget", goal="min", link="sigmoid"), Metric.accuracy("retain")]
    preferences = _check_preferences(preferences, metrics)
    bounds = _check_bounds(bounds)
    if not (bounds[0] <= 0 and bounds[1] >= 1):
        raise ExpungeError(f"the trade-off runs from the model before (c = 0) to the one after (c = 1); bounds {bounds} "
                           "must contain [0, 1] (widen them to extrapolate)")
    _check_points(points, 1)
    if steps < 2:
        raise ExpungeError(f"--steps must be at least 2, got {steps}")
    if after is not None and not (str(after).strip().isdigit() and int(after) == run.version):
        raise ExpungeError(f"--after must be {run.path}'s current version ({run.version}): the chosen point becomes its "
                           f"next version, on its current rows; got {after}")
    run.architecture()  # a run kind that cannot be merged is refused here
    source, before_info = _version_model(run, before, "--before")
    if before_info["version"] >= run.version:
        raise ExpungeError(f"--before must be an earlier version than the current one ({run.version}); got "
                           f"{before_info['version']}")
    after_info = {"version": run.version, "model_hash": run.manifest["model_hash"], "from": "the run"}
    sets = {name: _tradeoff_set(spec, run, source, name) for name, spec in evals.items()}

    scorers = {name: run.state_score(data) for name, (data, _) in sets.items()}
    before_state, after_state = source.model_state(), run.model_state()
    total = (points or default_points(1)) + default_heldout(points or default_points(1)) + 1 if method == "map" else steps
    with _Counter(scorers, total, "tradeoff: evaluating merges", progress) as evaluate:
        if method == "map":
            result = tradeoff_front(before_state, after_state, evaluate, *metrics, bounds=bounds, points=points, seed=seed)
        else:
            result = measured_tradeoff(before_state, after_state, evaluate, *metrics, bounds=bounds, steps=steps)
        state, point = materialise(interpolation(before_state, after_state), result, preferences)
        chosen = {"c": point["c"], "predicted": point.get("predicted"), "measured": _measured(point, state, evaluate)}
    record = {"method": method, "score": run.score, "before": before_info, "after": after_info, "c": chosen["c"], "bounds": list(bounds),
              "preferences": preferences, "predicted": chosen["predicted"], "measured": chosen["measured"],
              "evaluations": result.n_evaluations, "r2_heldout": result.r_squared() or None,
              "eval": {name: info for name, (_, info) in sets.items()}, "front": [FRONT_JSON, FRONT_PNG]}
    if not all(math.isfinite(v) for v in chosen["measured"].values()):
        raise ExpungeError(f"the chosen point's metrics are not finite: {chosen['measured']}")
    from ..unlearn.registry import make_updater, resolve
    from ..unlearn.tradeoff import TRADEOFF

    files = _files(result, chosen, record, f"forgetting trade-off of {run.path.name}, versions "
                   f"{before_info['version']} -> {after_info['version']}")
    updater = make_updater(resolve(TRADEOFF, run.kind), state=state, record=record, evidence=files)
    report = run.revise(updater, progress, kind="tradeoff", requested_by=requested_by, reason=reason,
                        reference=reference, drop_privacy=drop_privacy, signing_key=signing_key)
    record["report"] = report.to_dict()
    return MergeOutcome(run, result, chosen, record)
