"""The forgetting trade-off between a model before and after a deletion."""

import numpy as np
import pytest
import torch

from expunge import ExpungeError
from expunge.merge import Metric, measured_tradeoff, tradeoff_front
from expunge.models import small_cnn

from .test_vectors import nudged

FORGET, RETAIN = Metric("forget", goal="min", link="sigmoid"), Metric.accuracy("retain")


def family():
    torch.manual_seed(0)
    before = small_cnn(16, 3)
    after = nudged(before, 1, scale=0.5)
    direction = {k: after.state_dict()[k] - v for k, v in before.state_dict().items()}
    norm2 = sum(float((d * d).sum()) for d in direction.values())

    def evaluate(state):
        """c recovered from the weights; forgetting falls with c, utility falls faster past c = 0.8."""
        c = sum(float(((state[k] - before.state_dict()[k]) * d).sum()) for k, d in direction.items()) / norm2
        return {"forget": float(1 / (1 + np.exp(-(2 - 4 * c)))), "retain": float(1 / (1 + np.exp(-(3 - 2 * (c - 0.2) ** 2))))}

    return before, after, evaluate


def test_tradeoff_front_is_the_curve_between_before_and_after():
    before, after, evaluate = family()
    result = tradeoff_front(before, after, evaluate, FORGET, RETAIN)
    assert result.method == "tradeoff-map" and result.n_evaluations == 6 + 2
    assert all(r > 0.99 for r in result.r_squared().values())
    C = result.front_c()[:, 0]
    # forget falls with c throughout; retain rises up to c = 0.2: c < 0.2 is dominated, [0.2, 1] is the front
    assert C.min() == pytest.approx(0.2, abs=0.01) and C.max() == pytest.approx(1.0)
    measured = measured_tradeoff(before, after, evaluate, FORGET, RETAIN, steps=11)
    assert measured.n_evaluations == 11
    assert sorted(round(c, 1) for c in measured.front_c()[:, 0]) == [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_tradeoff_can_extrapolate_past_the_deletion_when_asked():
    before, after, evaluate = family()
    result = tradeoff_front(before, after, evaluate, FORGET, RETAIN, bounds=(0.0, 1.5))
    assert result.front_c().max() == pytest.approx(1.5)
    with pytest.raises(ExpungeError, match="must contain \\[0, 1\\]"):
        tradeoff_front(before, after, evaluate, FORGET, RETAIN, bounds=(0.0, 0.5))
    with pytest.raises(ExpungeError, match="different names"):
        tradeoff_front(before, after, evaluate, FORGET, Metric.accuracy("forget"))


def test_the_chosen_tradeoff_point_materialises():
    from expunge.merge import interpolation, materialise

    before, after, evaluate = family()
    result = tradeoff_front(before, after, evaluate, FORGET, RETAIN)
    state, point = materialise(interpolation(before, after), result, {"forget": 1.0, "retain": 1.0})
    assert evaluate(state)["forget"] == pytest.approx(point["predicted"]["forget"], abs=0.02)
