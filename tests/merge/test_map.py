"""MAP and its variants on synthetic problems whose front is known.

Metric t is sigmoid(3 - 4 ||c - a_t||^2): each task prefers its own point a_t, and the Pareto set is
the convex hull of the a_t (a segment for two tasks, a triangle for three)."""

import json

import numpy as np
import pytest

from expunge import ExpungeError
from expunge.merge import (Evaluations, Metric, bayesian_map_front, grid_front, igd, map_front, nested_map_front,
                           shared_coefficient_front)

A2 = np.array([[0.9, 0.2], [0.15, 0.8]])
A3 = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9]])


def problem(A):
    metrics = [Metric.accuracy(f"t{i}") for i in range(len(A))]

    def objective(c):
        return {f"t{i}": float(1 / (1 + np.exp(-(3 - 4 * np.sum((c - a) ** 2))))) for i, a in enumerate(A)}

    return objective, metrics


def true_values(objective, C, metrics):
    return np.array([[objective(c)[m.name] for m in metrics] for c in C])


def distance_to_segment(C, a, b):
    t = np.clip(((C - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(C - (a + t[:, None] * (b - a)), axis=1)


def segment_front(objective, metrics, a, b, n=400):
    t = np.linspace(0, 1, n)[:, None]
    return true_values(objective, a + t * (b - a), metrics)


def triangle_front(objective, metrics, A, n=60):
    """The true front: the metrics over a fine barycentric grid of the triangle of the a_t."""
    weights = np.array([(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]) / n
    return true_values(objective, weights @ A, metrics)


@pytest.mark.parametrize("search", ["grid", "nsga2"])
def test_map_finds_the_known_two_task_front(search):
    objective, metrics = problem(A2)
    result = map_front(objective, metrics, 2, search=search, generations=100)
    assert result.n_evaluations == 12 + 3  # 2 (T+1)(T+2)/2 design points + a quarter held out
    assert all(r == pytest.approx(1.0) for r in result.r_squared().values())
    C = result.front_c()
    assert min(np.linalg.norm(C - A2[0], axis=1)) < 0.05 and min(np.linalg.norm(C - A2[1], axis=1)) < 0.05
    reevaluated = true_values(objective, C, metrics)
    truth = segment_front(objective, metrics, *A2)
    assert igd(reevaluated, truth, metrics) < 0.005  # the whole front is covered
    assert igd(truth, reevaluated, metrics) < 0.005  # and every point found is on it
    assert np.allclose(result.front_values("predicted"), reevaluated, atol=1e-6)  # the surrogate is exact here
    if search == "grid":  # exact up to the grid's resolution, in the coefficients too
        assert distance_to_segment(C, *A2).max() < 0.02
    json.dumps(result.to_dict())


@pytest.mark.parametrize("search", ["grid", "nsga3"])
def test_map_on_three_tasks_finds_the_triangle(search):
    objective, metrics = problem(A3)
    result = map_front(objective, metrics, 3, search=search, generations=100)
    assert result.n_evaluations == 20 + 5
    reevaluated = true_values(objective, result.front_c(), metrics)
    truth = triangle_front(objective, metrics, A3)
    if search == "grid":  # exact up to the grid's resolution: on the true front, and covering it
        assert igd(truth, reevaluated, metrics) < 0.01 and igd(reevaluated, truth, metrics) < 0.01
    else:  # NSGA-III's ~90 points lie near the front; a few linger where the front is flat in one metric
        assert igd(truth, reevaluated, metrics) < 0.03
    chosen = result.choose({"t0": 1.0})  # the best t0 is sigmoid(3) = 0.9526, at a_0
    assert objective(np.array(chosen["c"]))["t0"] > 0.94


def test_bayesian_map_adds_points_in_rounds_and_finds_the_front():
    objective, metrics = problem(A2)
    result = bayesian_map_front(objective, metrics, 2, points=12, rounds=2, search="grid")
    assert result.details["initial"] == 8 and [len(a) for a in result.details["added"]] == [2, 2]
    assert result.n_evaluations == 12 + 3
    assert distance_to_segment(result.front_c(), *A2).max() < 0.02


def test_nested_map_merges_pairwise_and_follows_preferences():
    objective, metrics = problem(A3)
    ev = Evaluations(objective, 3)
    toward_0 = nested_map_front(ev, metrics, 3, preferences={"t0": 4, "t1": 1, "t2": 1}, search="grid")
    toward_2 = nested_map_front(ev, metrics, 3, preferences={"t0": 1, "t1": 1, "t2": 4}, search="grid")
    assert len(toward_0.details["levels"]) == 2
    first = toward_0.details["levels"][0]["pair"]
    assert len(first) == 2 and all("+" not in name for name in first)
    c0, c2 = np.array(toward_0.details["chosen"]["c"]), np.array(toward_2.details["chosen"]["c"])
    assert np.linalg.norm(c0 - A3[0]) < np.linalg.norm(c2 - A3[0])
    assert np.linalg.norm(c2 - A3[2]) < np.linalg.norm(c0 - A3[2])
    # the shared evaluations count each merge once: the one-hot points and the first level are common
    assert len(ev) < toward_0.n_evaluations + toward_2.n_evaluations
    reevaluated = true_values(objective, toward_0.front_c(), metrics)
    assert np.allclose(toward_0.front_values("predicted"), reevaluated, atol=0.02)


def test_evaluations_are_cached_and_counted():
    calls = []

    def objective(c):
        calls.append(tuple(c))
        return {"a": float(c[0]), "b": float(1 - c[0])}

    ev = Evaluations(objective, 1)
    ev([0.5]), ev([0.5]), ev([0.25])
    assert len(calls) == 2 and len(ev) == 2
    with pytest.raises(ExpungeError, match="outside the bounds"):
        ev([1.5])
    bad = Evaluations(lambda c: {"a": float("nan")}, 1)
    with pytest.raises(ExpungeError, match="non-finite"):
        bad([0.5])


def test_baselines_evaluate_what_they_say():
    objective, metrics = problem(A2)
    grid = grid_front(objective, metrics, 2, steps=5)
    assert grid.n_evaluations == 25 and all(p["measured"] is not None for p in grid.front)
    shared = shared_coefficient_front(objective, metrics, 2, steps=6)
    assert shared.n_evaluations == 6 and all(p["c"][0] == p["c"][1] for p in shared.front)


def test_bad_requests_are_refused():
    objective, metrics = problem(A2)
    with pytest.raises(ExpungeError, match="at least 6"):
        map_front(objective, metrics, 2, points=4)
    with pytest.raises(ExpungeError, match="no metrics"):
        map_front(objective, [], 2)
    with pytest.raises(ExpungeError, match="not metric 'zz'"):
        map_front(objective, [Metric.accuracy("t0"), Metric.accuracy("zz")], 2)
    with pytest.raises(ExpungeError, match="one metric per task vector"):
        nested_map_front(objective, metrics[:1], 2)
    with pytest.raises(ExpungeError, match="share one goal"):
        nested_map_front(objective, [Metric.accuracy("t0"), Metric("t1", goal="min")], 2)
    with pytest.raises(ExpungeError, match="box \\[0, 1\\]"):
        nested_map_front(objective, metrics, 2, bounds=(0.0, 1.5))
    with pytest.raises(ExpungeError, match="unknown search"):
        map_front(objective, metrics, 2, search="random")
