"""MAP's surrogate: a metric as a full quadratic in the merge coefficients, seen through a link.

metric(c) ~ link(b_0 + sum_i b_i c_i + sum_{i<=j} b_ij c_i c_j), (T+1)(T+2)/2 coefficients for T
coefficients c. The link keeps the prediction in the metric's range: the sigmoid for accuracies (in
[0, 1]), softplus for losses (positive), the identity otherwise. Fitting is least squares on the metric
itself (as the MAP authors do), started from the closed-form least-squares fit in link space, which is
already exact when the data are a linked quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit, logit

from ..errors import ExpungeError

LINKS = ("sigmoid", "softplus", "identity")
_EPS = 1e-4  # keeps logit / inverse softplus finite for metrics at the edge of their range


def n_coefficients(n_vars: int) -> int:
    return (n_vars + 1) * (n_vars + 2) // 2


def quadratic_features(C: np.ndarray) -> np.ndarray:
    """Rows [1, c_1..c_T, c_i c_j for i <= j] for each row c of C (shape (n, T))."""
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    pairs = list(combinations_with_replacement(range(C.shape[1]), 2))
    return np.column_stack([np.ones(len(C)), C] + [C[:, i] * C[:, j] for i, j in pairs])


def _apply(link: str, z: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        return expit(z)
    if link == "softplus":
        return np.logaddexp(0.0, z)
    return z


def _inverse(link: str, y: np.ndarray) -> np.ndarray:
    if link == "sigmoid":
        return logit(np.clip(y, _EPS, 1 - _EPS))
    if link == "softplus":
        y = np.maximum(y, _EPS)
        return y + np.log(-np.expm1(-y))  # log(exp(y) - 1), stable for large y
    return y


def check_range(link: str, y: np.ndarray, name: str) -> None:
    """Refuse metric values the link cannot produce, naming the fix."""
    if not np.isfinite(y).all():
        raise ExpungeError(f"metric {name!r} has non-finite values; the evaluation must return numbers")
    if link == "sigmoid" and ((y < 0).any() or (y > 1).any()):
        raise ExpungeError(f"metric {name!r} takes values outside [0, 1] ({y.min():.4g}..{y.max():.4g}); the sigmoid "
                           "link is for accuracies: use link='softplus' for losses or 'identity'")
    if link == "softplus" and (y < 0).any():
        raise ExpungeError(f"metric {name!r} takes negative values ({y.min():.4g}); the softplus link is for "
                           "non-negative losses: use link='identity'")


@dataclass
class Quadratic:
    """A fitted surrogate: ``predict(C)`` gives the metric at each row of C."""

    coef: np.ndarray
    link: str
    n_vars: int

    def predict(self, C) -> np.ndarray:
        return _apply(self.link, quadratic_features(C) @ self.coef)

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "link": self.link, "n_vars": self.n_vars}

    @classmethod
    def from_dict(cls, d: dict) -> "Quadratic":
        return cls(np.asarray(d["coef"], dtype=np.float64), d["link"], int(d["n_vars"]))


def fit_quadratic(C, y, link: str = "sigmoid", name: str = "metric") -> Quadratic:
    """Least-squares fit of link(quadratic(c)) to the metric values ``y`` at the points ``C``."""
    if link not in LINKS:
        raise ExpungeError(f"unknown link {link!r}; choose one of {', '.join(LINKS)}")
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    check_range(link, y, name)
    X = quadratic_features(C)
    if len(y) != len(X):
        raise ExpungeError(f"{len(X)} points but {len(y)} metric values")
    if len(y) < X.shape[1] or np.linalg.matrix_rank(X) < X.shape[1]:
        raise ExpungeError(f"a full quadratic in {C.shape[1]} coefficient(s) has {X.shape[1]} parameters; "
                           f"the {len(y)} point(s) given do not determine them (need at least {X.shape[1]} "
                           "points in general position)")
    start, *_ = np.linalg.lstsq(X, _inverse(link, y), rcond=None)
    if link == "identity":
        return Quadratic(start, link, C.shape[1])
    fit = least_squares(lambda b: _apply(link, X @ b) - y, start, method="lm" if len(y) > X.shape[1] else "trf")
    best = fit.x if np.sum(fit.fun**2) <= np.sum((_apply(link, X @ start) - y) ** 2) else start
    return Quadratic(best, link, C.shape[1])


def r_squared(y_true, y_pred) -> float | None:
    """1 - SS_res / SS_tot; None when the true values do not vary (R^2 is undefined there)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    total = float(np.sum((y_true - y_true.mean()) ** 2))
    if len(y_true) < 2 or total == 0.0:
        return None
    return 1.0 - float(np.sum((y_true - y_pred) ** 2)) / total
