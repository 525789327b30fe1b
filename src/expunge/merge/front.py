"""Pareto fronts: the non-dominated filter, front quality (pymoo's IGD and hypervolume), thinning a dense
front to a few representative points, and picking the point that fits a user's preferences.

All functions take metric values in their natural orientation (accuracies up, losses down) together
with the Metric list that says which is which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ExpungeError
from .objectives import Metric, minimised


def non_dominated(F, metrics: Sequence[Metric]) -> np.ndarray:
    """Indices of the rows of F no other row dominates (pymoo's filter; duplicates are all kept)."""
    from pymoo.util.nds.non_dominated_sorting import find_non_dominated

    F = minimised(F, metrics)
    if len(F) == 0:
        return np.zeros(0, dtype=int)
    return np.sort(np.asarray(find_non_dominated(F), dtype=int))


def igd(F, reference, metrics: Sequence[Metric]) -> float:
    """Inverted generational distance: the mean, over the points of the ``reference`` front, of the
    Euclidean distance to the nearest point of F (in metric units: 0.01 is one accuracy point)."""
    from pymoo.indicators.igd import IGD

    if len(F) == 0 or len(reference) == 0:
        raise ExpungeError("IGD needs a non-empty front and a non-empty reference front")
    return float(IGD(minimised(reference, metrics))(minimised(F, metrics)))


def igd_plus(F, reference, metrics: Sequence[Metric]) -> float:
    """IGD+ (Ishibuchi et al. 2015, pymoo): like IGD, but a front point better than a reference point in some
    metric is not penalised for it, so a front that beats the reference is not scored as far from it."""
    from pymoo.indicators.igd_plus import IGDPlus

    if len(F) == 0 or len(reference) == 0:
        raise ExpungeError("IGD+ needs a non-empty front and a non-empty reference front")
    return float(IGDPlus(minimised(reference, metrics))(minimised(F, metrics)))


def hypervolume(F, reference_point, metrics: Sequence[Metric]) -> float:
    """Volume dominated by F and bounded by ``reference_point`` (given in metric orientation: for
    accuracies, a point below the front), by pymoo. Points that do not dominate it add nothing."""
    from pymoo.indicators.hv import HV

    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=minimised(reference_point, metrics)[0])(minimised(F, metrics)))


def thin(F, k: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``k`` rows of F spread over it: k-means (scikit-learn) on the min-max
    scaled values, and the row nearest each centre."""
    F = np.atleast_2d(np.asarray(F, dtype=np.float64))
    if len(F) <= k:
        return np.arange(len(F))
    from sklearn.cluster import KMeans

    span = F.max(0) - F.min(0)
    scaled = (F - F.min(0)) / np.where(span > 0, span, 1.0)
    centres = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(scaled).cluster_centers_
    nearest = {int(np.argmin(((scaled - centre) ** 2).sum(1))) for centre in centres}
    return np.array(sorted(nearest))


def preference_weights(preferences: Mapping[str, float] | None, metrics: Sequence[Metric]) -> np.ndarray:
    """Weights per metric from ``{name: weight}`` (missing names weigh 0; None: all equal), summing to 1."""
    names = [m.name for m in metrics]
    if preferences is None:
        return np.full(len(metrics), 1.0 / len(metrics))
    unknown = sorted(set(preferences) - set(names))
    if unknown:
        raise ExpungeError(f"preferences name unknown metric(s) {unknown}; the metrics are {names}")
    w = np.array([float(preferences.get(n, 0.0)) for n in names])
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ExpungeError(f"preference weights must be non-negative numbers, not all zero; got {dict(preferences)}")
    return w / w.sum()


def pick(F, metrics: Sequence[Metric], preferences: Mapping[str, float] | None = None) -> int:
    """Index of the front point with the best preference-weighted sum of its metrics (maximised
    metrics counted up, minimised ones down), as the MAP authors choose a merge from the front."""
    F = np.atleast_2d(np.asarray(F, dtype=np.float64))
    if len(F) == 0:
        raise ExpungeError("the front is empty; nothing to pick")
    return int(np.argmin(minimised(F, metrics) @ preference_weights(preferences, metrics)))
