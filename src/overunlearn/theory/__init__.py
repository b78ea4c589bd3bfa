"""Exact solvers from the paper (linear model, linear networks, two-layer width) used as test oracles.

* :mod:`overunlearn.theory.linear` -- Lemmas 3-5 / Theorem 2 (``theta_r^* = P_{S_r} theta^*``),
  Appendix E's closed form and a KKT oracle, the lambda schedule, Ridge's shrinkage,
  Proposition 2 (GD from zero).
* :mod:`overunlearn.theory.linear_network` -- effective predictor, Lemma 1, Theorem 4's
  balanced factorisation, the Appendix D.4.1 counterexample.
* :mod:`overunlearn.theory.two_layer` -- Lemma 6 (reduced column-echelon sparsification),
  Proposition 1 (pruning), Theorem 5 (width reduction).

All are float64 numpy; see ``docs/theory.md``.
"""

from overunlearn.theory import linear, linear_network, two_layer
from overunlearn.theory.linear import min_norm_interpolator, orthogonal_prox_step, project_onto_span
from overunlearn.theory.linear_network import balanced_factorization, effective_predictor, lemma1_delta_A1
from overunlearn.theory.two_layer import lemma6_sparsify, prune_inactive, reduce_width

__all__ = [
    "linear",
    "linear_network",
    "two_layer",
    "min_norm_interpolator",
    "orthogonal_prox_step",
    "project_onto_span",
    "effective_predictor",
    "lemma1_delta_A1",
    "balanced_factorization",
    "lemma6_sparsify",
    "prune_inactive",
    "reduce_width",
]
