"""The quadratic surrogate: exact recovery of a known linked quadratic, R^2, refusals."""

import numpy as np
import pytest

from expunge import ExpungeError
from expunge.merge import fit_quadratic, quadratic_features, r_squared
from expunge.merge.design import design_points
from expunge.merge.surrogate import n_coefficients


def test_features_are_constant_linear_and_all_products():
    X = quadratic_features(np.array([[2.0, 3.0]]))
    assert X.tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]
    assert quadratic_features(np.zeros((4, 3))).shape == (4, n_coefficients(3)) == (4, 10)


@pytest.mark.parametrize("link", ["identity", "sigmoid", "softplus"])
def test_fit_recovers_a_known_quadratic_exactly(link):
    rng = np.random.default_rng(0)
    coef = rng.normal(size=n_coefficients(3))
    C = design_points(3, 20, seed=1)
    z = quadratic_features(C) @ coef
    y = {"identity": z, "sigmoid": 1 / (1 + np.exp(-z)), "softplus": np.log1p(np.exp(z))}[link]
    fit = fit_quadratic(C, y, link)
    assert np.allclose(fit.coef, coef, atol=1e-6)
    elsewhere = rng.random((50, 3))
    truth = quadratic_features(elsewhere) @ coef
    expected = {"identity": truth, "sigmoid": 1 / (1 + np.exp(-truth)), "softplus": np.log1p(np.exp(truth))}[link]
    assert np.allclose(fit.predict(elsewhere), expected, atol=1e-8)
    assert r_squared(expected, fit.predict(elsewhere)) == pytest.approx(1.0)


def test_fit_is_least_squares_on_the_metric():
    """With noise the fit minimises the squared error of the metric: no coefficient change lowers it."""
    rng = np.random.default_rng(1)
    C = rng.random((30, 2))
    y = np.clip(1 / (1 + np.exp(-(1 + C[:, 0] - 2 * C[:, 1] ** 2))) + rng.normal(0, 0.02, 30), 0, 1)
    fit = fit_quadratic(C, y, "sigmoid")
    loss = lambda coef: np.sum((1 / (1 + np.exp(-quadratic_features(C) @ coef)) - y) ** 2)
    for _ in range(20):
        assert loss(fit.coef) <= loss(fit.coef + rng.normal(0, 1e-3, fit.coef.shape)) + 1e-12


def test_r_squared():
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert r_squared([1, 2, 3], [2, 2, 2]) == 0.0
    assert r_squared([1, 1, 1], [1, 1, 1]) is None


def test_bad_fits_are_refused():
    C = design_points(2, 12, seed=0)
    with pytest.raises(ExpungeError, match="do not determine"):
        fit_quadratic(C[:5], np.full(5, 0.5), "sigmoid")
    with pytest.raises(ExpungeError, match="outside \\[0, 1\\]"):
        fit_quadratic(C, np.linspace(0, 2, 12), "sigmoid")
    with pytest.raises(ExpungeError, match="negative"):
        fit_quadratic(C, np.linspace(-1, 1, 12), "softplus")
    with pytest.raises(ExpungeError, match="unknown link"):
        fit_quadratic(C, np.linspace(0, 1, 12), "tanh")
    with pytest.raises(ExpungeError, match="at least 6"):
        design_points(2, 4)
