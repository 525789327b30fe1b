"""A front as a picture (matplotlib): the evaluated merges, the front and the chosen point, for
`expunge merge` and `expunge tradeoff`. Two metrics: one panel; more: one panel per pair (at most three);
one metric: the metric against the first coefficient."""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np

from .result import FrontResult


def _values(points: list[dict], key: str, name: str) -> np.ndarray:
    return np.array([p[key][name] if p.get(key) else np.nan for p in points], dtype=np.float64)


def front_png(result: FrontResult, chosen: dict, title: str) -> bytes:
    """PNG bytes of the front of ``result`` with ``chosen`` ({"c", "predicted", "measured"}) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in result.metrics]
    pairs = list(combinations(range(len(names)), 2))[:3] or [(None, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.4), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        def xy(points, key, i=i, j=j):
            y = _values(points, key, names[j])
            x = np.array([p["c"][0] for p in points]) if i is None else _values(points, key, names[i])
            return x, y

        x, y = xy(result.evaluated, "metrics")
        ax.scatter(x, y, s=14, color="0.6", label=f"evaluated merges ({len(result.evaluated)})")
        for key, style, label in (("predicted", "--", "front, predicted by the surrogates"),
                                  ("measured", "-", "front, measured")):
            if any(p.get(key) for p in result.front):
                fx, fy = xy(result.front, key)
                order = np.argsort(fx)
                ax.plot(fx[order], fy[order], style, color="C0", marker=".", markersize=4, linewidth=1, label=label)
        for key, marker in (("predicted", "*"), ("measured", "P")):
            if chosen.get(key):
                cx, cy = xy([chosen], key)
                ax.scatter(cx, cy, s=140, marker=marker, color="C3", zorder=5, label=f"chosen ({key})")
        ax.set_xlabel("c" if i is None else f"{names[i]} ({result.metrics[i].goal})")
        ax.set_ylabel(f"{names[j]} ({result.metrics[j].goal})")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {result.method}, chosen c = {np.round(chosen['c'], 3).tolist()}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
