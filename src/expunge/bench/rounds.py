"""How many interleaved rounds a timing benchmark runs: enough for its headline ratios to be stable.

A timing benchmark measures what it compares side by side, in rounds (retraining, then the update; or
every mode of a model in turn), and takes in each round the ratio it reports (a speedup, a throughput
ratio). One round on a shared machine can be far off (a dp-engine ratio of 0.85x read 0.58x to 0.89x over
three rounds), so rounds are added until every tracked ratio's interquartile range across rounds is under
``rel_iqr`` (5%) of its median: never fewer than ``floor`` rounds (a spread needs a few), never more than
``ceiling``, and past the floor no more once ``time_cap_s`` seconds are spent. The row reports each ratio's
median over rounds with its IQR, min and max, the per-round values, the number of rounds and why they
stopped (``stable``, ``ceiling``, ``time cap``, or ``fixed`` when ``--repeats N`` set the count).

    rule = RoundRule.for_repeats(repeats)        # None: the rule above; N: exactly N rounds
    rounds = Rounds(rule)
    while rounds.more():
        ...time one round of each side...
        rounds.add(speedup=retrain_s / update_s)  # one or more named ratios per round
    row.update(rounds.fields())                   # speedup, speedup_iqr, _min, _max, _rounds; rounds, rounds_stop

A benchmark whose rows are not one per measurement (dp-engine: a row per mode, all modes timed in the same
rounds) takes ``rounds.ratio_fields(name, key)`` per row instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import ExpungeError

STABLE, CEILING, TIME_CAP, FIXED = "stable", "ceiling", "time cap", "fixed"


@dataclass(frozen=True)
class RoundRule:
    floor: int = 5             # at least this many rounds
    ceiling: int = 25          # at most this many
    rel_iqr: float = 0.05      # stable: every ratio's IQR across rounds is under this fraction of its median
    time_cap_s: float = 300.0  # past the floor, stop adding rounds once this many seconds are spent
    fixed: int | None = None   # exactly this many rounds (``--repeats N``), whatever the spread

    def __post_init__(self):
        if self.fixed is not None and self.fixed < 1:
            raise ExpungeError(f"--repeats must be at least 1, got {self.fixed}")
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"round rule needs 1 <= floor <= ceiling, got floor {self.floor}, ceiling {self.ceiling}")

    @classmethod
    def for_repeats(cls, repeats: int | None, **overrides) -> RoundRule:
        """The rule a benchmark's ``repeats`` argument asks for: None chooses, N fixes the count."""
        return replace(cls(**overrides), fixed=repeats)

    def describe(self) -> dict:
        """For the results file's provenance."""
        if self.fixed is not None:
            return {"fixed": self.fixed}
        return {k: v for k, v in asdict(self).items() if k != "fixed"}


def relative_iqr(values) -> float:
    """Interquartile range over |median| (0 for identical values; inf when the median is 0 and they differ)."""
    v = np.asarray([x for x in values if math.isfinite(x)], float)
    if len(v) == 0:
        return math.inf
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    return 0.0 if iqr == 0 else (iqr / abs(median) if median else math.inf)


def stop_reason(ratios: dict[str, list[float]], rounds: int, elapsed_s: float, rule: RoundRule) -> str | None:
    """Why to stop after ``rounds`` rounds with these per-round ratios, or None to run another."""
    if rule.fixed is not None:
        return FIXED if rounds >= rule.fixed else None
    if rounds < rule.floor:
        return None
    if all(relative_iqr(values) < rule.rel_iqr for values in ratios.values()):
        return STABLE
    if rounds >= rule.ceiling:
        return CEILING
    if elapsed_s >= rule.time_cap_s:
        return TIME_CAP
    return None


class Rounds:
    """The rounds of one measurement: ask ``more()``, ``add()`` each round's ratios, then read ``fields()``.
    The clock starts at construction (``clock`` is injectable for tests)."""

    def __init__(self, rule: RoundRule, clock: Callable[[], float] = time.perf_counter):
        self.rule, self.clock = rule, clock
        self.start = clock()
        self.count = 0
        self.ratios: dict[str, list[float]] = {}
        self.stop: str | None = None

    def add(self, **ratios: float) -> None:
        """Record one round; every round must name the same ratios (none is allowed: a round with nothing to
        compare only counts)."""
        if self.count and set(ratios) != set(self.ratios):
            raise ValueError(f"round {self.count + 1} has ratios {sorted(ratios)}, earlier rounds {sorted(self.ratios)}")
        for name, value in ratios.items():
            self.ratios.setdefault(name, []).append(float(value))
        self.count += 1

    def more(self) -> bool:
        self.stop = stop_reason(self.ratios, self.count, self.clock() - self.start, self.rule)
        return self.stop is None

    def median(self, name: str) -> float:
        return float(np.median(self.ratios[name]))

    def ratio_fields(self, name: str, key: str | None = None) -> dict:
        """One ratio's median with its spread across rounds, and the rounds themselves, under ``key`` (default:
        its name): key, key_iqr, key_min, key_max, key_rounds."""
        key = key or name
        values = self.ratios[name]
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return {key: float(median), f"{key}_iqr": float(q3 - q1), f"{key}_min": float(min(values)),
                f"{key}_max": float(max(values)), f"{key}_rounds": list(values)}

    def fields(self) -> dict:
        """Every ratio's ``ratio_fields``, how many rounds ran (``rounds``) and why they stopped (``rounds_stop``)."""
        out = {}
        for name in self.ratios:
            out.update(self.ratio_fields(name))
        return {**out, "rounds": self.count, "rounds_stop": self.stop}


# -- showing a ratio with its spread (tables and plots) --------------------------------------------------------

def spread_text(row: dict, name: str, fmt: str = ".2f") -> str:
    """'2.41-2.55, 1.2%': a row's ratio ``name`` from its min to its max across rounds, and its IQR as a share of
    its median ('-' when the row has no spread). Tables head the column SPREAD_HEADER."""
    if row.get(name) is None or f"{name}_iqr" not in row:
        return "-"
    iqr = row[f"{name}_iqr"] / abs(row[name]) if row[name] else math.inf
    return f"{row[f'{name}_min']:{fmt}}-{row[f'{name}_max']:{fmt}}, {100 * iqr:.1f}%"


SPREAD_HEADER = "min-max, IQR"


def rounds_text(row: dict) -> str:
    """'7 stable', '25 ceiling', '3 fixed'."""
    return f"{row['rounds']} {row.get('rounds_stop') or ''}".strip() if "rounds" in row else "-"


def error_bars(rows: list[dict], name: str) -> np.ndarray:
    """Matplotlib's yerr for the medians of ``name``: from the min to the max across rounds."""
    low = [r[name] - r.get(f"{name}_min", r[name]) if r.get(name) is not None else 0 for r in rows]
    high = [r.get(f"{name}_max", r[name]) - r[name] if r.get(name) is not None else 0 for r in rows]
    return np.array([low, high], float)
