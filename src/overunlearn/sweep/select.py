"""Selecting hyperparameters from seed results: best mean (one metric) and Pareto fronts.

Both rules act on **means over seeds** of each hyperparameter setting, as in the paper
as in the authors' reference code (`grid_utils.pareto`):

* **Best mean** (one metric): the setting with the best mean; ties (equal means) are broken
  by the smallest *central range* -- the spread between the sorted per-seed values at index
  2 and ``n - 3`` (for 10 seeds: 3rd lowest to 3rd highest). With fewer than 6 seeds the
  innermost non-degenerate pair is used (index ``k = min(2, ceil((n-1)/2) - 1)``), so the
  rule still separates settings; remaining ties go to the smaller standard error, then to
  the earlier setting in grid order.
* **Pareto front** (two or more metrics, any directions, any signs): the settings whose mean
  vector no other setting weakly improves in every metric and strictly in one. For two
  metrics without ties this is exactly the paper's rule -- sort by the first metric (best
  first) and keep a point if it strictly improves the second over every point kept so far
  (:func:`paper_front`); the general rule also handles ties in the first metric, where the
  paper's sweep can keep a dominated point. Of several settings with identical mean vectors
  only the first (grid order) is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeedStats:
    """Summary of one metric over seeds."""

    n: int
    mean: float
    se: float  # standard error of the mean (sample std / sqrt(n)); NaN for n < 2
    median: float
    lo: float  # central range (see module docstring)
    hi: float
    std: float

    @property
    def central_width(self) -> float:
        return self.hi - self.lo


def central_index(n: int) -> int:
    """Lower index of the central range: 2 for n >= 6 (the paper's 10 seeds), less for fewer seeds."""
    if n < 2:
        return 0
    return max(0, min(2, math.ceil((n - 1) / 2) - 1))


def central_range(values: Sequence[float]) -> tuple[float, float]:
    """Sorted values at index ``k`` and ``n - 1 - k`` (``k = central_index(n)``)."""
    v = sorted(float(x) for x in values)
    if not v:
        return math.nan, math.nan
    k = central_index(len(v))
    return v[k], v[len(v) - 1 - k]


def seed_stats(values: Sequence[float]) -> SeedStats:
    arr = np.asarray([float(x) for x in values], dtype=float)
    n = int(arr.size)
    if n == 0:
        nan = math.nan
        return SeedStats(0, nan, nan, nan, nan, nan, nan)
    std = float(arr.std(ddof=1)) if n > 1 else math.nan
    lo, hi = central_range(arr.tolist())
    return SeedStats(n=n, mean=float(arr.mean()), se=std / math.sqrt(n) if n > 1 else math.nan,
                     median=float(np.median(arr)), lo=lo, hi=hi, std=std)


def _sign(direction: str) -> float:
    if direction == "min":
        return 1.0
    if direction == "max":
        return -1.0
    raise ValueError(f"direction={direction!r} must be 'min' or 'max'")


def best_mean(candidates: Sequence[Sequence[float]], direction: str) -> int:
    """Index of the best candidate (each a list of per-seed values) by mean, ties by central range.

    Candidates whose mean is not finite are never chosen; raises ``ValueError`` if none is finite.
    """
    sign = _sign(direction)
    best: tuple[float, float, float, int] | None = None
    for i, vals in enumerate(candidates):
        st = seed_stats(vals)
        if not math.isfinite(st.mean):
            continue
        se = st.se if math.isfinite(st.se) else math.inf
        key = (sign * st.mean, st.central_width, se, i)
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError("no candidate has a finite mean")
    return best[3]


def _oriented(points: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"points must be an (n, m) array, got shape {pts.shape}")
    if pts.shape[1] != len(directions):
        raise ValueError(f"{pts.shape[1]} metrics but {len(directions)} directions")
    if pts.shape[1] < 2:
        raise ValueError("a Pareto front needs two or more metrics; use best_mean for one")
    return pts * np.array([_sign(d) for d in directions])  # every column: smaller is better


def pareto_front(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, ordered best-first by the first metric.

    ``points[i]`` is the vector of mean metrics of setting ``i``; ``directions[j]`` is
    ``"min"`` or ``"max"``. Rows with a non-finite entry are ignored. Of identical rows only
    the first is kept.
    """
    o = _oriented(np.asarray(points, dtype=float), directions)
    finite = [i for i in range(o.shape[0]) if np.all(np.isfinite(o[i]))]
    # lexicographic order (then index): a point can only be dominated by one before it
    order = sorted(finite, key=lambda i: (*o[i].tolist(), i))
    kept: list[int] = []
    for i in order:
        p = o[i]
        dominated = False
        for j in kept:
            q = o[j]
            if np.all(q <= p):  # q weakly better everywhere: dominates, or is an identical row kept first
                dominated = True
                break
        if not dominated:
            kept.append(i)
    return kept


def paper_front(points: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """The reference code's two-metric rule, for comparison: sort by metric 0 (best first, stable),
    keep a point if it strictly improves metric 1 over every point kept so far."""
    o = _oriented(np.asarray(points, dtype=float), directions)
    if o.shape[1] != 2:
        raise ValueError("the paper's rule is defined for two metrics")
    finite = [i for i in range(o.shape[0]) if np.all(np.isfinite(o[i]))]
    order = sorted(finite, key=lambda i: o[i, 0])
    kept: list[int] = []
    best2 = math.inf
    for i in order:
        if o[i, 1] < best2:
            kept.append(i)
            best2 = o[i, 1]
    return kept
