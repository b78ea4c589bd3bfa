"""Selection rules: best mean with the central-range tie-break, Pareto fronts in any direction."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from overunlearn.sweep.select import (
    best_mean,
    central_index,
    central_range,
    paper_front,
    pareto_front,
    seed_stats,
)


def test_central_range_uses_indices_2_and_n_minus_3_for_ten_seeds():
    vals = [9, 1, 8, 2, 7, 3, 6, 4, 5, 10]
    assert central_index(10) == 2
    assert central_range(vals) == (3.0, 8.0)  # sorted[2], sorted[7]


@pytest.mark.parametrize("n,k", [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 2), (7, 2), (20, 2)])
def test_central_index_never_degenerates(n, k):
    assert central_index(n) == k
    assert k <= n - 1 - k


def test_seed_stats():
    st = seed_stats([1.0, 2.0, 3.0, 4.0])
    assert st.n == 4 and st.mean == 2.5 and st.median == 2.5
    assert st.se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    one = seed_stats([5.0])
    assert one.mean == 5.0 and math.isnan(one.se)


def test_best_mean_directions():
    cands = [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]]
    assert best_mean(cands, "min") == 1
    assert best_mean(cands, "max") == 0


def test_best_mean_tie_broken_by_central_range():
    wide = [0, 0, 0, 10, 10, 10, 10, 20, 20, 20]  # mean 10, central range (0, 20)
    narrow = [0, 5, 9, 10, 10, 10, 10, 11, 15, 20]  # mean 10, central range (9, 11)
    assert np.mean(wide) == np.mean(narrow) == 10
    assert best_mean([wide, narrow], "min") == 1
    assert best_mean([wide, narrow], "max") == 1
    # identical on every criterion: the first in grid order wins
    assert best_mean([narrow, list(narrow)], "min") == 0


def test_best_mean_skips_non_finite():
    assert best_mean([[math.nan, 1.0], [2.0, 2.0]], "min") == 1
    with pytest.raises(ValueError):
        best_mean([[math.nan]], "min")


def test_front_max_min_like_label_erasure():
    # (retain accuracy: max, forget error: min)
    pts = [(0.90, 0.60), (0.80, 0.30), (0.85, 0.50), (0.70, 0.35), (0.60, 0.10), (0.50, 0.10)]
    front = pareto_front(pts, ["max", "min"])
    assert front == [0, 2, 1, 4]  # best accuracy first; (0.70, .35) dominated by (0.80, .30); (.5,.1) by (.6,.1)
    assert paper_front(pts, ["max", "min"]) == front


def test_front_all_directions_and_negative_values():
    pts = np.array([(-1.0, -5.0), (-2.0, -3.0), (-3.0, -4.0), (0.5, -6.0)])
    # min/min: (-2, -3) is dominated by (-3, -4); the others trade off
    assert pareto_front(pts, ["min", "min"]) == [2, 0, 3]  # best (smallest) first metric first
    # max/max: (0.5, -6) has the best first metric, (-2, -3) the best second, (-3, -4) is dominated
    assert pareto_front(pts, ["max", "max"]) == [3, 0, 1]
    # check against brute force for every direction pair
    for dirs in (["min", "min"], ["min", "max"], ["max", "min"], ["max", "max"]):
        assert sorted(pareto_front(pts, dirs)) == sorted(_brute(pts, dirs))
    # flipping every sign and every direction gives the same front
    assert pareto_front(-pts, ["max", "max"]) == pareto_front(pts, ["min", "min"])


def _brute(pts, dirs):
    s = np.array([1 if d == "min" else -1 for d in dirs])
    o = np.asarray(pts, float) * s
    keep = []
    for i in range(len(o)):
        dominated = any(np.all(o[j] <= o[i]) and np.any(o[j] < o[i]) for j in range(len(o)) if j != i)
        duplicate_earlier = any(np.all(o[j] == o[i]) for j in range(i))
        if not dominated and not duplicate_earlier:
            keep.append(i)
    return keep


def test_front_ties():
    # identical points: only the first is kept
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)], ["min", "min"]) == [0]
    # a tie in the first metric: the paper's sweep keeps a dominated point, the general rule does not
    pts = [(0.8, 0.5), (0.8, 0.3)]
    assert paper_front(pts, ["max", "min"]) == [0, 1]
    assert pareto_front(pts, ["max", "min"]) == [1]
    # a tie in the second metric: only the better first metric survives
    assert pareto_front([(0.7, 0.2), (0.9, 0.2)], ["max", "min"]) == [1]


def test_front_three_metrics_and_random_agreement():
    rng = random.Random(0)
    for _ in range(50):
        n, m = rng.randint(1, 12), rng.choice([2, 3])
        pts = np.array([[rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0]) for _ in range(m)] for _ in range(n)])
        dirs = [rng.choice(["min", "max"]) for _ in range(m)]
        front = pareto_front(pts, dirs)
        assert sorted(front) == sorted(_brute(pts, dirs))
        if m == 2 and len({p[0] for p in pts.tolist()}) == n:  # no ties in the sort key
            assert front == paper_front(pts, dirs)


def test_front_ignores_non_finite_and_validates():
    assert pareto_front([(math.nan, 1.0), (1.0, 1.0)], ["min", "min"]) == [1]
    with pytest.raises(ValueError):
        pareto_front([(1.0,)], ["min"])
    with pytest.raises(ValueError):
        pareto_front([(1.0, 2.0)], ["min", "up"])
