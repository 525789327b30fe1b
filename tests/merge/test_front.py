"""Non-dominated filter, IGD, hypervolume, thinning and picking on hand-built points."""

import numpy as np
import pytest

from expunge import ExpungeError
from expunge.merge import Metric, hypervolume, igd, igd_plus, non_dominated, pick, thin

ACC = [Metric.accuracy("a"), Metric.accuracy("b")]


def test_non_dominated_filter_on_hand_built_points():
    F = np.array([[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9], [0.5, 0.2], [0.9, 0.1]])
    # (0.4, 0.4) and (0.5, 0.2) are dominated by (0.5, 0.5); the duplicate (0.9, 0.1) is kept twice
    assert non_dominated(F, ACC).tolist() == [0, 1, 3, 5]
    mixed = [Metric("forget", goal="min"), Metric.accuracy("retain")]
    G = np.array([[0.1, 0.8], [0.2, 0.9], [0.2, 0.7], [0.05, 0.6], [0.3, 0.9]])
    # minimise forget, maximise retain: (0.2, 0.7) loses to (0.1, 0.8), (0.3, 0.9) to (0.2, 0.9)
    assert non_dominated(G, mixed).tolist() == [0, 1, 3]


def test_igd_is_the_mean_distance_from_each_reference_point():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert igd(reference, reference, ACC) == 0.0
    F = np.array([[1.0, 0.0], [0.0, 0.9]])
    assert igd(F, reference, ACC) == pytest.approx(0.05)
    assert igd(np.array([[0.5, 0.5]]), reference, ACC) == pytest.approx(np.sqrt(0.5))
    better = np.array([[1.0, 0.2], [0.2, 1.0]])  # beats both reference points: IGD counts that, IGD+ does not
    assert igd(better, reference, ACC) == pytest.approx(0.2) and igd_plus(better, reference, ACC) == 0.0
    assert igd_plus(F, reference, ACC) == pytest.approx(0.05)


def test_hypervolume_of_rectangles():
    F = np.array([[0.5, 1.0], [1.0, 0.5]])
    # union of [0,0.5]x[0,1] and [0,1]x[0,0.5] above the reference point (0, 0): 0.5 + 0.5 - 0.25
    assert hypervolume(F, [0.0, 0.0], ACC) == pytest.approx(0.75)
    assert hypervolume(np.array([[-0.1, 0.5]]), [0.0, 0.0], ACC) == 0.0  # does not dominate the reference point


def test_thin_keeps_spread_points():
    F = np.column_stack([np.linspace(0, 1, 200), 1 - np.linspace(0, 1, 200) ** 2])
    keep = thin(F, 10)
    assert len(keep) == 10 and len(set(keep.tolist())) == 10
    assert F[keep, 0].min() < 0.1 and F[keep, 0].max() > 0.9
    assert thin(F[:5], 10).tolist() == [0, 1, 2, 3, 4]


def test_pick_follows_preferences():
    F = np.array([[0.9, 0.5], [0.72, 0.72], [0.5, 0.9]])
    assert pick(F, ACC, {"a": 1, "b": 0}) == 0
    assert pick(F, ACC, {"a": 1, "b": 1}) == 1
    assert pick(F, ACC, {"b": 3}) == 2
    with pytest.raises(ExpungeError, match="unknown metric"):
        pick(F, ACC, {"c": 1})
    with pytest.raises(ExpungeError, match="non-negative"):
        pick(F, ACC, {"a": -1})
