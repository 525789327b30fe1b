"""From zoo models to a front and a merged model: every method end to end on a tiny CNN."""

import json

import numpy as np
import pytest
import torch

from expunge import ExpungeError
from expunge.merge import (METHODS, Metric, TaskVectors, find_front, load_state, materialise, module_evaluator,
                           process)
from expunge.models import small_cnn

from .test_vectors import nudged


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = small_cnn(16, 3)
    models = [nudged(base, seed, scale=0.06) for seed in (1, 2)]
    X = torch.randn(64, 16)
    # task n: agree with fine-tuned model n; the metric is the mean probability of its labels (smooth in c)
    labels = [m(X).argmax(1) for m in models]

    def scorer(y):
        return lambda module: float(torch.softmax(module(X), 1)[torch.arange(len(y)), y].mean())

    evaluate = module_evaluator(base, {"a": scorer(labels[0]), "b": scorer(labels[1])})
    vectors = TaskVectors.from_models(base, models, names=["a", "b"])
    return base, vectors, evaluate


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_a_front_and_materialises_a_merge(setup, method):
    base, vectors, evaluate = setup
    metrics = [Metric.accuracy("a"), Metric.accuracy("b")]
    result = find_front(vectors, evaluate, metrics, method, steps=5, preferences={"a": 2, "b": 1})
    assert result.method == method and result.front and result.n_evaluations > 0
    json.loads(json.dumps(result.to_dict()))
    merged_vectors = process(vectors, method)
    state, point = materialise(vectors, result, {"a": 2, "b": 1})  # processed as the method did
    again, _ = materialise(merged_vectors, result, {"a": 2, "b": 1})  # or processed already
    assert all(torch.equal(state[k], again[k]) for k in state)
    expected = merged_vectors.merge(point["c"])
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    model = load_state(base, state)
    assert evaluate(model.state_dict()).keys() == {"a", "b"}


def test_materialise_refuses_vectors_the_front_was_not_found_for(setup):
    base, vectors, evaluate = setup
    result = find_front(vectors, evaluate, [Metric.accuracy("a"), Metric.accuracy("b")], "map")
    other = TaskVectors.from_models(base, [nudged(base, 7, scale=0.06), nudged(base, 8, scale=0.06)], names=["a", "b"])
    with pytest.raises(ExpungeError, match="not the ones the front was found for"):
        materialise(other, result)


def test_one_hot_points_measure_the_fine_tuned_models(setup):
    base, vectors, evaluate = setup
    result = find_front(vectors, evaluate, [Metric.accuracy("a"), Metric.accuracy("b")], "map")
    first = next(r for r in result.evaluated if r["c"] == [1.0, 0.0])
    assert first["metrics"] == evaluate(vectors.merge([1.0, 0.0]))
    assert result.details["vectors"]["names"] == ["a", "b"]
    assert all(r2 is not None and np.isfinite(r2) for r2 in result.r_squared().values())


def test_unknown_method_is_refused(setup):
    base, vectors, evaluate = setup
    with pytest.raises(ExpungeError, match="unknown merge method"):
        find_front(vectors, evaluate, [Metric.accuracy("a"), Metric.accuracy("b")], "average")
