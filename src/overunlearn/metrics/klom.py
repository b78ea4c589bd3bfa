"""KLoM, "KL divergence of margins" (Georgiev, Rinberg, Park, Garg, Ilyas, Madry & Neel, 2024,
*Attribute-to-Delete: Machine Unlearning via Datamodel Matching*, appendix E.1).

For every example ``x`` the margins of ``N`` **unlearned** models (originals trained with
their own seeds on ``D_r + D_f``, then unlearned) and of ``N`` **oracle** models (retrained
on ``D_r`` only, own seeds) form two samples. KLoM(x) is the KL divergence
``KL(P_unlearned || P_oracle)`` between their histograms:

1. clip every margin to ``[-clip, clip]`` (``clip = 100``);
2. bin both samples with ``bins = 20`` equal-width bins. With ``edges="shared"`` (default)
   the bins span ``[min, max]`` of the two clipped samples together, so bin ``b`` means the
   same margin interval for both; ``edges="separate"`` gives each sample its own
   ``[min, max]`` range, as the public EasyDUB evaluation code does (there bin ``b`` of the
   two histograms can cover different intervals; we expose it for comparability only);
3. ``p``, ``q`` = bin frequencies; where ``p > 0`` the oracle frequency is floored,
   ``q <- max(q, eps)`` with ``eps = 1e-5``; KLoM = ``sum_{p_b > 0} p_b log(p_b / q_b)``.

Lower is better; 0 means the two histograms coincide. With finite ``N`` the value of two
samples from the *same* distribution is positive (the noise floor): compare with the
ground-truth row of :func:`overunlearn.privacy.runner.privacy_report`, which splits the
oracles in two halves. Margins are ``z_y - logsumexp_{i!=y} z_i`` for classifiers and the
signed error for regression (:mod:`overunlearn.metrics.signals`). Everything is vectorized
over examples; the binning reproduces ``numpy.histogram`` with ``numpy.linspace`` edges
exactly (including its closed last bin); a constant sample (zero-width range) fills the
first bin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


def _bin_index(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each value ``v`` ``(n, m)`` for per-row edges ``linspace(lo, hi, bins + 1)``."""
    edges = np.linspace(lo, hi, bins + 1, axis=-1)  # (n, bins + 1)
    width = hi - lo
    safe = np.where(width > 0, width, 1.0)
    idx = np.floor((v - lo[:, None]) / safe[:, None] * bins)
    idx = np.where(width[:, None] > 0, idx, 0)
    idx = np.clip(idx, 0, bins - 1).astype(np.int64)
    # correct floating-point misses exactly as numpy.histogram does
    e_lo = np.take_along_axis(edges, idx, axis=1)
    idx = idx - (v < e_lo)
    idx = np.clip(idx, 0, bins - 1)
    e_hi = np.take_along_axis(edges, idx + 1, axis=1)
    idx = idx + ((v >= e_hi) & (idx != bins - 1))
    # a constant sample (zero-width range) goes to the first bin
    return np.where(width[:, None] > 0, idx, 0)


def _hist_probs(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    n, m = v.shape
    idx = _bin_index(v, lo, hi, bins)
    flat = (np.arange(n)[:, None] * bins + idx).ravel()
    counts = np.bincount(flat, minlength=n * bins).reshape(n, bins)
    return counts / float(m)


def klom_values(unlearned: np.ndarray, oracle: np.ndarray, *, bins: int = 20, clip: float = 100.0,
                eps: float = 1e-5, edges: Literal["shared", "separate"] = "shared") -> np.ndarray:
    """Per-example KLoM: ``unlearned`` is ``(n_u, n)``, ``oracle`` ``(n_o, n)``; returns ``(n,)``."""
    u = np.asarray(unlearned, dtype=np.float64)
    o = np.asarray(oracle, dtype=np.float64)
    if u.ndim != 2 or o.ndim != 2 or u.shape[1] != o.shape[1]:
        raise ValueError(f"expected (n_unlearned, n) and (n_oracle, n) margin arrays, got {u.shape} and {o.shape}")
    if u.shape[0] == 0 or o.shape[0] == 0:
        raise ValueError("KLoM needs at least one unlearned and one oracle model")
    if np.isnan(u).any() or np.isnan(o).any():
        raise ValueError("margins contain NaN")
    if bins < 1:
        raise ValueError(f"bins={bins} must be >= 1")
    u = np.clip(u, -clip, clip).T  # (n, n_u)
    o = np.clip(o, -clip, clip).T
    if edges == "shared":
        lo = np.minimum(u.min(axis=1), o.min(axis=1))
        hi = np.maximum(u.max(axis=1), o.max(axis=1))
        p, q = _hist_probs(u, lo, hi, bins), _hist_probs(o, lo, hi, bins)
    elif edges == "separate":
        p = _hist_probs(u, u.min(axis=1), u.max(axis=1), bins)
        q = _hist_probs(o, o.min(axis=1), o.max(axis=1), bins)
    else:
        raise ValueError(f"edges={edges!r} is not one of 'shared', 'separate'")
    pos = p > 0
    q_safe = np.where(pos, np.maximum(q, eps), 1.0)
    terms = np.where(pos, p * np.log(np.where(pos, p, 1.0) / q_safe), 0.0)
    return terms.sum(axis=1)


@dataclass(frozen=True)
class KLoMResult:
    """Per-example KLoM of one set of examples and its aggregates."""

    per_example: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        v = self.per_example
        if v.size == 0:
            return {"mean": float("nan"), "median": float("nan"), "p95": float("nan"), "p99": float("nan"),
                    "max": float("nan")}
        return {"mean": float(v.mean()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def klom(unlearned: np.ndarray, oracle: np.ndarray, **kw) -> KLoMResult:
    """KLoM of every example (see the module docstring); keyword arguments go to :func:`klom_values`."""
    return KLoMResult(klom_values(unlearned, oracle, **kw))


def klom_splits(unlearned: Mapping[str, np.ndarray], oracle: Mapping[str, np.ndarray], **kw) -> dict[str, KLoMResult]:
    """KLoM on several splits at once (e.g. ``forget``, ``retain``, ``test``): ``{split: result}``."""
    missing = set(unlearned) ^ set(oracle)
    if missing:
        raise ValueError(f"unlearned and oracle margins must have the same splits; differing: {sorted(missing)}")
    return {k: klom(unlearned[k], oracle[k], **kw) for k in unlearned}
