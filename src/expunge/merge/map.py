"""MAP: the Pareto front of merges from a few evaluated ones (Li, Zhang, Bu et al., "MAP: low-compute
model merging with amortized Pareto fronts via quadratic approximation", ICLR 2025).

Plain MAP evaluates the merge at the design points (design.py), fits one quadratic surrogate per metric
(surrogate.py), scores each fit's R^2 on a few held-out points, and searches the surrogates for the
front (search.py). Two variants, as in the paper:

- Bayesian MAP starts from a smaller design and adds points in rounds where the surrogate is uncertain.
  The authors bin directions of c and sample where the fit's error is large; here the uncertainty is
  the jackknife spread of the surrogate's prediction (refit without each design point in turn),
  looked at only near the predicted front, and a batch is spread out by discounting candidates close
  to points already chosen.
- Nested MAP, for many tasks: merge the two tasks whose own models score closest (as the authors'
  code pairs them), with a two-coefficient MAP on the pair and the user's preferences picking the
  merge; the merged pair becomes one task, and so on until one model is left. Each level costs a
  two-coefficient design instead of a T-coefficient one, and the result depends on the preferences.

Every function takes the objective c -> {metric: value} (evaluation.py) and returns a FrontResult.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from ..errors import ExpungeError
from .design import default_heldout, default_points, design_points, space_filling
from .evaluation import Evaluations, Objective, evaluations
from .front import pick, preference_weights
from .objectives import Metric, check_metrics, table
from .result import FrontResult
from .search import search_front
from .surrogate import Quadratic, fit_quadratic, n_coefficients, r_squared


def fit_surrogates(C, Y, metrics: Sequence[Metric]) -> dict[str, Quadratic]:
    """One quadratic per metric (columns of Y in the order of ``metrics``)."""
    return {m.name: fit_quadratic(C, Y[:, j], m.link, m.name) for j, m in enumerate(metrics)}


def predictor(surrogates: Mapping[str, Quadratic], metrics: Sequence[Metric]):
    return lambda C: np.column_stack([surrogates[m.name].predict(C) for m in metrics])


def _measure(ev: Evaluations, C: np.ndarray, metrics: Sequence[Metric]) -> tuple[np.ndarray, list[dict]]:
    rows = [ev(c) for c in C]
    return table(rows, metrics), [{"c": np.asarray(c, dtype=float).tolist(), "metrics": r} for c, r in zip(C, rows)]


def _heldout_scores(ev, surrogates, metrics, C_held) -> tuple[dict[str, float | None], list[dict]]:
    if len(C_held) == 0:
        return {m.name: None for m in metrics}, []
    Y_held, used = _measure(ev, C_held, metrics)
    predicted = predictor(surrogates, metrics)(C_held)
    return {m.name: r_squared(Y_held[:, j], predicted[:, j]) for j, m in enumerate(metrics)}, used


def _surrogate_table(surrogates, r2) -> dict[str, dict]:
    return {name: {**q.to_dict(), "r2_heldout": r2[name]} for name, q in surrogates.items()}


def _front_points(C, F, metrics) -> list[dict]:
    return [{"c": c.tolist(), "predicted": {m.name: float(f[j]) for j, m in enumerate(metrics)}, "measured": None}
            for c, f in zip(C, F)]


def _dedupe(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        key = tuple(np.round(r["c"], 12))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def map_front(objective: Objective | Evaluations, metrics: Sequence[Metric], n_vars: int, *,
              points: int | None = None, heldout: int | None = None, bounds: tuple[float, float] = (0.0, 1.0),
              search: str = "auto", seed: int = 0, generations: int = 200) -> FrontResult:
    """Plain MAP: ``points`` design points (default 2 (T+1)(T+2)/2, one-hot ones included), quadratic
    surrogates, R^2 on ``heldout`` extra points (default a quarter of the design), front by ``search``."""
    metrics = check_metrics(metrics)
    ev = evaluations(objective, n_vars, bounds)
    points = default_points(n_vars) if points is None else points
    C = design_points(n_vars, points, bounds, seed)
    Y, used = _measure(ev, C, metrics)
    surrogates = fit_surrogates(C, Y, metrics)
    heldout = default_heldout(points) if heldout is None else heldout
    r2, used_held = _heldout_scores(ev, surrogates, metrics, space_filling(heldout, n_vars, bounds, seed + 1))
    C_front, F_front = search_front(predictor(surrogates, metrics), metrics, n_vars, bounds, search, seed, generations)
    return FrontResult("map", metrics, tuple(bounds), _dedupe(used + used_held), _front_points(C_front, F_front, metrics),
                       _surrogate_table(surrogates, r2),
                       {"points": points, "heldout": heldout, "search": search, "seed": seed})


def jackknife_spread(C, Y, metrics: Sequence[Metric], candidates: np.ndarray) -> np.ndarray:
    """Per candidate, the jackknife standard deviation of each metric's surrogate prediction (refit
    without each design point in turn), scaled by that metric's range over the design, combined as
    the root mean square over metrics."""
    n = len(C)
    spread = np.zeros(len(candidates))
    for j, m in enumerate(metrics):
        predictions = np.stack([fit_quadratic(np.delete(C, i, 0), np.delete(Y[:, j], i), m.link, m.name)
                                .predict(candidates) for i in range(n)])
        variance = (n - 1) / n * ((predictions - predictions.mean(0)) ** 2).sum(0)
        scale = max(float(np.ptp(Y[:, j])), 1e-12)
        spread += variance / scale**2
    return np.sqrt(spread / len(metrics))


def _near_front(F: np.ndarray, metrics: Sequence[Metric], fraction: float = 0.1) -> np.ndarray:
    """Indices of the candidates in the first non-dominated layers, at least ``fraction`` of them."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    from .objectives import minimised

    fronts = NonDominatedSorting().do(minimised(F, metrics))
    chosen: list[int] = []
    for layer in fronts:
        chosen.extend(int(i) for i in layer)
        if len(chosen) >= fraction * len(F):
            break
    return np.array(sorted(chosen))


def _spread_batch(candidates, score, existing, k, bounds, total) -> np.ndarray:
    """Greedy batch: the best score, each candidate's score discounted by 1 - exp(-(d/d0)^2) where d is
    its distance to the nearest design or already chosen point (d0: half the design's typical spacing)."""
    lo, hi = bounds
    d0 = (hi - lo) / (2 * total ** (1 / candidates.shape[1]))
    taken = list(existing)
    picks = []
    for _ in range(min(k, len(candidates))):
        distance = np.min(np.linalg.norm(candidates[:, None, :] - np.asarray(taken)[None], axis=2), axis=1)
        value = score * (1 - np.exp(-((distance / d0) ** 2)))
        value[picks] = -np.inf
        best = int(np.argmax(value))
        picks.append(best)
        taken.append(candidates[best])
    return candidates[picks]


def bayesian_map_front(objective: Objective | Evaluations, metrics: Sequence[Metric], n_vars: int, *,
                       points: int | None = None, initial: int | None = None, rounds: int = 3,
                       heldout: int | None = None, bounds: tuple[float, float] = (0.0, 1.0), search: str = "auto",
                       seed: int = 0, candidates: int = 1024, generations: int = 200) -> FrontResult:
    """Bayesian (adaptive) MAP: ``initial`` design points (default (T+1)(T+2)/2 + T), then ``rounds``
    batches chosen where the surrogates are most uncertain near the predicted front, up to ``points``
    in all (default the plain design's size); held-out R^2 and the front search as in plain MAP."""
    metrics = check_metrics(metrics)
    ev = evaluations(objective, n_vars, bounds)
    points = default_points(n_vars) if points is None else points
    initial = n_coefficients(n_vars) + n_vars if initial is None else initial
    if initial <= n_coefficients(n_vars):
        raise ExpungeError(f"Bayesian MAP's jackknife needs more than {n_coefficients(n_vars)} initial points; "
                           f"got {initial}")
    if points < initial or rounds < 1:
        raise ExpungeError(f"Bayesian MAP needs points >= initial ({points} < {initial}?) and at least one round")
    C = design_points(n_vars, initial, bounds, seed)
    Y, used = _measure(ev, C, metrics)
    added = []
    batches = np.diff(np.linspace(initial, points, rounds + 1).round().astype(int))
    for r, size in enumerate(batches):
        if size == 0:
            continue
        pool = space_filling(candidates, n_vars, bounds, seed + 100 + r)
        near = _near_front(predictor(fit_surrogates(C, Y, metrics), metrics)(pool), metrics)
        pool = pool[near]
        new = _spread_batch(pool, jackknife_spread(C, Y, metrics, pool), C, size, bounds, points)
        Y_new, used_new = _measure(ev, new, metrics)
        C, Y, used = np.vstack([C, new]), np.vstack([Y, Y_new]), used + used_new
        added.append(new.tolist())
    surrogates = fit_surrogates(C, Y, metrics)
    heldout = default_heldout(points) if heldout is None else heldout
    r2, used_held = _heldout_scores(ev, surrogates, metrics, space_filling(heldout, n_vars, bounds, seed + 1))
    C_front, F_front = search_front(predictor(surrogates, metrics), metrics, n_vars, bounds, search, seed, generations)
    return FrontResult("bayesian-map", metrics, tuple(bounds), _dedupe(used + used_held),
                       _front_points(C_front, F_front, metrics), _surrogate_table(surrogates, r2),
                       {"points": points, "initial": initial, "rounds": rounds, "added": added, "heldout": heldout,
                        "search": search, "seed": seed})


def _node_weights(tasks: list[int], weights: np.ndarray) -> np.ndarray:
    """A node's per-task weights for averaging its metrics: the preferences, equal if all are zero."""
    w = weights[tasks]
    return w / w.sum() if w.sum() > 0 else np.full(len(tasks), 1.0 / len(tasks))


def nested_map_front(objective: Objective | Evaluations, metrics: Sequence[Metric], n_vars: int, *,
                     preferences: Mapping[str, float] | None = None, points: int | None = None,
                     heldout: int | None = None, bounds: tuple[float, float] = (0.0, 1.0), search: str = "auto",
                     seed: int = 0, generations: int = 200) -> FrontResult:
    """Nested MAP: metric t belongs to task vector t. Pairs the two nodes whose own models score
    closest, runs a two-coefficient MAP (``points`` per level, default 12) on the pair with each node's
    objective the preference-weighted mean of its tasks' metrics, picks the merge by the preferences
    summed per node, and recurses on the merged node. The front returned is the last level's predicted
    front (over all tasks); ``details["chosen"]`` is the merge the preferences pick, measured."""
    metrics = check_metrics(metrics)
    if n_vars < 2 or len(metrics) != n_vars:
        raise ExpungeError(f"nested MAP merges task vectors pairwise and needs one metric per task vector "
                           f"(at least two); got {n_vars} vector(s) and {len(metrics)} metric(s)")
    if len({m.goal for m in metrics}) != 1:
        raise ExpungeError("nested MAP averages the metrics of merged tasks, so all must share one goal "
                           "(all maximised or all minimised)")
    if tuple(bounds) != (0.0, 1.0):
        raise ExpungeError(f"nested MAP runs in the box [0, 1]: it starts from each fine-tuned model (c one-hot) and "
                           f"scales merged models by d in [0, 1], which keeps every c inside; got bounds {bounds}")
    ev = evaluations(objective, n_vars, bounds)
    weights = preference_weights(preferences, metrics)
    eye = np.eye(n_vars)
    start = [ev(eye[t]) for t in range(n_vars)]
    used = [{"c": eye[t].tolist(), "metrics": start[t]} for t in range(n_vars)]
    nodes = [{"tasks": [t], "direction": eye[t], "score": start[t][metrics[t].name]} for t in range(n_vars)]
    levels = []
    while len(nodes) > 1:
        i, j = min(combinations(range(len(nodes)), 2), key=lambda p: abs(nodes[p[0]]["score"] - nodes[p[1]]["score"]))
        a, b = nodes[i], nodes[j]
        tasks = a["tasks"] + b["tasks"]
        task_metrics = [metrics[t] for t in tasks]
        lift = lambda D, a=a, b=b: np.outer(D[:, 0], a["direction"]) + np.outer(D[:, 1], b["direction"])
        level_points = default_points(2) if points is None else points
        D = design_points(2, level_points, bounds, seed + len(levels))
        Y, used_level = _measure(ev, lift(D), task_metrics)
        surrogates = fit_surrogates(D, Y, task_metrics)
        n_held = default_heldout(level_points) if heldout is None else heldout
        D_held = space_filling(n_held, 2, bounds, seed + 1000 + len(levels))
        Y_held, used_held = _measure(ev, lift(D_held), task_metrics) if n_held else (np.zeros((0, len(tasks))), [])
        per_task = predictor(surrogates, task_metrics)
        r2 = {m.name: (r_squared(Y_held[:, k], per_task(D_held)[:, k]) if n_held else None)
              for k, m in enumerate(task_metrics)}
        wa, wb = _node_weights(a["tasks"], weights), _node_weights(b["tasks"], weights)
        na = len(a["tasks"])
        node_metrics = [Metric("+".join(metrics[t].name for t in n["tasks"]), metrics[0].goal, metrics[0].link)
                        for n in (a, b)]

        def node_values(F, wa=wa, wb=wb, na=na):
            return np.column_stack([F[:, :na] @ wa, F[:, na:] @ wb])

        D_front, G_front = search_front(lambda D: node_values(per_task(D)), node_metrics, 2, bounds, search,
                                        seed, generations)
        choice = pick(G_front, node_metrics, {node_metrics[0].name: float(weights[a["tasks"]].sum()),
                                               node_metrics[1].name: float(weights[b["tasks"]].sum())})
        c_chosen = lift(D_front[choice:choice + 1])[0]
        measured = ev(c_chosen)
        used += used_level + used_held + [{"c": c_chosen.tolist(), "metrics": measured}]
        levels.append({"pair": [node_metrics[0].name, node_metrics[1].name], "points": level_points,
                       "heldout": n_held, "r2_heldout": r2, "chosen_d": D_front[choice].tolist(),
                       "chosen_c": c_chosen.tolist(), "measured": measured,
                       "surrogates": {k: q.to_dict() for k, q in surrogates.items()}})
        merged_score = float(np.array([measured[m.name] for m in task_metrics]) @ _node_weights(tasks, weights))
        merged = {"tasks": tasks, "direction": c_chosen, "score": merged_score}
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [merged]
    # the last level's surrogates cover every task: its front, in full coefficients, is the nested front
    order = [tasks.index(t) for t in range(n_vars)]
    F_tasks = per_task(D_front)[:, order]
    last = levels[-1]
    surrogates = {m.name: {**last["surrogates"][m.name], "r2_heldout": last["r2_heldout"][m.name],
                           "coefficients": "the last level's (d_a, d_b)"} for m in metrics}
    return FrontResult("nested-map", metrics, tuple(bounds), _dedupe(used),
                       _front_points(lift(D_front), F_tasks, metrics), surrogates,
                       {"levels": levels, "chosen": {"c": c_chosen.tolist(), "measured": measured},
                        "preferences": None if preferences is None else dict(preferences), "search": search,
                        "seed": seed})
