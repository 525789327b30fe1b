"""MAP's design: one-hot points first, then seeded space-filling points inside the box."""

import numpy as np

from expunge.merge.design import default_heldout, default_points, design_points, space_filling


def test_design_starts_with_the_one_hot_points_and_stays_in_the_box():
    C = design_points(3)
    assert len(C) == default_points(3) == 20 and default_heldout(20) == 5
    assert np.array_equal(C[:3], np.eye(3))
    assert (C >= 0).all() and (C <= 1).all() and len(np.unique(C, axis=0)) == 20
    assert np.array_equal(design_points(3, seed=4), design_points(3, seed=4))
    assert not np.array_equal(design_points(3, seed=4)[3:], design_points(3, seed=5)[3:])


def test_design_in_other_boxes():
    C = design_points(1, 6, bounds=(0.0, 1.5))
    assert C[0, 0] == 1.0 and (C <= 1.5).all() and C.max() > 1.0
    shifted = design_points(2, 6, bounds=(0.2, 0.8))  # e_1, e_2 lie outside: space-filling points only
    assert (shifted >= 0.2).all() and (shifted <= 0.8).all() and len(shifted) == 6


def test_space_filling_points_cover_the_box():
    P = space_filling(64, 2, (0.0, 1.0), seed=0)
    counts, _, _ = np.histogram2d(P[:, 0], P[:, 1], bins=4, range=[[0, 1], [0, 1]])
    assert counts.min() >= 2  # every quarter-by-quarter cell is visited (a Sobol set has 4 in each)
