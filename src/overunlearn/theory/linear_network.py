r"""Exact unlearning for L-layer linear networks (paper Section 4.2, Appendix D).

Model: ``f(theta, x) = c^T A_{L-1} ... A_1 x`` with ``A_l`` of shape ``h_l x h_{l-1}``
(``h_0 = m``) and ``c`` of length ``h_{L-1}``; ``theta = [c; vec(A_1); ...; vec(A_{L-1})]``.
Layers are passed as a list ``As = [A_1, ..., A_{L-1}]`` (``L - 1`` matrices, ``L`` blocks
in all counting ``c``); ``As = []`` is the linear model ``f = c^T x`` (``L = 1``).

The same network as a PyTorch module is ``nn.Sequential(Linear(h_0, h_1, bias=False), ...,
Linear(h_{L-1}, 1, bias=False))`` with weights ``A_1, ..., A_{L-1}, c^T``.

Results implemented here:

* effective predictor ``w(theta) = A_1^T ... A_{L-1}^T c`` (:func:`effective_predictor`),
  so that ``f(theta, x) = w(theta)^T x``;
* **Lemma 1** (predictor norm, eqn (8)): with ``b = A_2^T ... A_{L-1}^T c``,
  ``Delta_{A_1} = -b (P_{S_r^perp} w)^T / ||b||^2`` and every other block 0 is orthogonal to
  every retain output gradient (``grad_{A_1} f = b x^T``) and gives
  ``w(theta + Delta) = P_{S_r} w(theta)`` (:func:`lemma1_delta_A1`, :func:`unlearn_predictor_norm`);
* **Theorem 4** (parameter norm): the balanced rank-1 factorisation of ``w_r^*`` with
  ``||theta||^2 = L rho^{2/L}``, ``rho = ||w_r^*||`` (:func:`balanced_factorization`), the
  minimum over all factorisations (:func:`min_factorization_norm_sq`);
* **Appendix D.4.1**: the counterexample showing that the drift regulariser is needed
  (:func:`counterexample_d41`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from overunlearn.theory.linear import project_onto_complement

Array = NDArray[np.float64]

__all__ = [
    "effective_predictor",
    "backprop_vector",
    "network_output",
    "parameter_norm_sq",
    "first_layer_gradient",
    "lemma1_delta_A1",
    "unlearn_predictor_norm",
    "interpolating_first_layer",
    "balanced_factorization",
    "min_factorization_norm_sq",
    "random_factorization",
    "Counterexample",
    "counterexample_d41",
]


def _layers(As: Sequence[ArrayLike]) -> list[Array]:
    out = [np.asarray(A, dtype=np.float64) for A in As]
    for i in range(1, len(out)):
        if out[i].shape[1] != out[i - 1].shape[0]:
            raise ValueError(f"A_{i + 1} has {out[i].shape[1]} columns but A_{i} has {out[i - 1].shape[0]} rows")
    return out


def backprop_vector(c: ArrayLike, As: Sequence[ArrayLike]) -> Array:
    r"""``b = A_2^T ... A_{L-1}^T c`` (in ``R^{h_1}``), so that ``w = A_1^T b``; for ``L = 2``, ``b = c``.

    ``grad_{A_1} f(theta, x) = b x^T``.
    """
    layers = _layers(As)
    b = np.asarray(c, dtype=np.float64)
    for A in reversed(layers[1:]):
        b = A.T @ b
    return b


def effective_predictor(c: ArrayLike, As: Sequence[ArrayLike]) -> Array:
    r"""``w(theta) = A_1^T A_2^T ... A_{L-1}^T c`` in ``R^m``: ``f(theta, x) = w(theta)^T x``."""
    layers = _layers(As)
    if not layers:
        return np.asarray(c, dtype=np.float64).copy()
    return layers[0].T @ backprop_vector(c, layers)


def network_output(c: ArrayLike, As: Sequence[ArrayLike], X: ArrayLike) -> Array:
    """``f(theta, x_i) = c^T A_{L-1} ... A_1 x_i`` for every row of ``X``, layer by layer."""
    H = np.asarray(X, dtype=np.float64).T
    for A in _layers(As):
        H = A @ H
    return np.asarray(c, dtype=np.float64) @ H


def parameter_norm_sq(c: ArrayLike, As: Sequence[ArrayLike]) -> float:
    r"""``||theta||_2^2 = ||c||^2 + sum_l ||A_l||_F^2``."""
    return float(np.sum(np.asarray(c, dtype=np.float64) ** 2) + sum(np.sum(A**2) for A in _layers(As)))


def first_layer_gradient(c: ArrayLike, As: Sequence[ArrayLike], x: ArrayLike) -> Array:
    r"""``grad_{A_1} f(theta, x) = b x^T`` (shape ``h_1 x m``)."""
    return np.outer(backprop_vector(c, As), np.asarray(x, dtype=np.float64))


def lemma1_delta_A1(c: ArrayLike, As: Sequence[ArrayLike], X_r: ArrayLike) -> Array:
    r"""Lemma 1's first-layer update ``Delta_{A_1} = -b (P_{S_r^perp} w(theta))^T / ||b||_2^2``.

    ``S_r = row(X_r)``. Properties (Lemma 1): ``<Delta_{A_1}, b x^T>_F = -(x^T P_{S_r^perp} w)
    = 0`` for every retain ``x``, and ``w(theta + Delta) = w - P_{S_r^perp} w = P_{S_r} w``.
    Raises ``ValueError`` if ``b = 0`` (then ``f`` does not depend on ``A_1``).
    """
    layers = _layers(As)
    if not layers:
        raise ValueError("Lemma 1 needs at least one hidden layer (As non-empty)")
    b = backprop_vector(c, layers)
    nb = float(b @ b)
    if nb == 0.0:
        raise ValueError("b = A_2^T ... A_{L-1}^T c is zero: the output does not depend on A_1")
    w = layers[0].T @ b
    return -np.outer(b, project_onto_complement(X_r, w)) / nb


def unlearn_predictor_norm(c: ArrayLike, As: Sequence[ArrayLike], X_r: ArrayLike) -> tuple[Array, list[Array]]:
    r"""Theorem 3's solution: ``(c, [A_1 + Delta_{A_1}, A_2, ...])`` whose predictor is ``P_{S_r} w(theta)``.

    If ``theta`` interpolates ``D`` the new predictor is ``X_r^+ y_r``, the min-norm predictor of ``D_r``.
    """
    layers = _layers(As)
    new = [A.copy() for A in layers]
    new[0] = new[0] + lemma1_delta_A1(c, layers, X_r)
    return np.asarray(c, dtype=np.float64).copy(), new


def interpolating_first_layer(c: ArrayLike, As_rest: Sequence[ArrayLike], w: ArrayLike, A1_init: ArrayLike) -> Array:
    r"""A first layer ``A_1`` with ``w(theta) = w`` given the other layers, closest to ``A1_init``.

    ``A_1 = A1_init + b (w - A1_init^T b)^T / ||b||^2`` with ``b = A_2^T ... A_{L-1}^T c``
    (``As_rest = [A_2, ..., A_{L-1}]``); then ``A_1^T b = w``. Used to build random networks
    whose predictor interpolates ``D``.
    """
    A0 = np.asarray(A1_init, dtype=np.float64)
    b = backprop_vector(c, [A0, *As_rest])
    nb = float(b @ b)
    if nb == 0.0:
        raise ValueError("b is zero: no first layer can realise a nonzero predictor")
    return A0 + np.outer(b, np.asarray(w, dtype=np.float64) - A0.T @ b) / nb


def _unit(v: ArrayLike) -> Array:
    u = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(u)
    if n == 0:
        raise ValueError("unit vectors must be nonzero")
    return u / n


def balanced_factorization(w: ArrayLike, hidden: Sequence[int], units: Sequence[ArrayLike] | None = None,
                           rng: np.random.Generator | None = None) -> tuple[Array, list[Array]]:
    r"""Theorem 4's minimum-parameter-norm network with predictor ``w``.

    ``hidden = [h_1, ..., h_{L-1}]``; ``v_l`` unit vectors in ``R^{h_l}`` (``units``, or random
    from ``rng``, or ``e_1``). With ``rho = ||w||``:

    ``c = rho^{1/L} v_{L-1}``, ``A_l = rho^{1/L} v_l v_{l-1}^T`` (``l >= 2``),
    ``A_1 = rho^{1/L} v_1 (w / rho)^T``.

    Then ``w(theta) = w`` and ``||theta||^2 = L rho^{2/L}`` -- the minimum over all
    factorisations by AM-GM (:func:`min_factorization_norm_sq`). ``w = 0`` gives all zeros.
    """
    wv = np.asarray(w, dtype=np.float64)
    L = len(hidden) + 1
    if units is not None:
        if len(units) != len(hidden):
            raise ValueError(f"need {len(hidden)} unit vectors, got {len(units)}")
        vs = [_unit(u) for u in units]
    elif rng is not None:
        vs = [_unit(rng.standard_normal(h)) for h in hidden]
    else:
        vs = [np.eye(h)[0] for h in hidden]
    for v, h in zip(vs, hidden, strict=True):
        if v.shape != (h,):
            raise ValueError(f"unit vector of shape {v.shape} for a layer of width {h}")
    rho = float(np.linalg.norm(wv))
    if not hidden:
        return wv.copy(), []
    if rho == 0.0:
        return np.zeros(hidden[-1]), [np.zeros((hidden[0], wv.size))] + [
            np.zeros((hidden[i], hidden[i - 1])) for i in range(1, len(hidden))
        ]
    s = rho ** (1.0 / L)
    As = [s * np.outer(vs[0], wv / rho)]
    for i in range(1, len(hidden)):
        As.append(s * np.outer(vs[i], vs[i - 1]))
    return s * vs[-1], As


def min_factorization_norm_sq(w: ArrayLike, L: int) -> float:
    r"""``L ||w||^{2/L}``: the least ``||theta||^2`` of any ``L``-block linear network with predictor ``w`` (Theorem 4)."""
    return float(L * np.linalg.norm(np.asarray(w, dtype=np.float64)) ** (2.0 / L))


def random_factorization(w: ArrayLike, hidden: Sequence[int], rng: np.random.Generator,
                         noise: float = 1.0) -> tuple[Array, list[Array]]:
    r"""A random (generally unbalanced) factorisation with predictor ``w``: random ``c, A_2, ...``
    and ``A_1`` from :func:`interpolating_first_layer` around a random matrix scaled by ``noise``."""
    if not hidden:
        return np.asarray(w, dtype=np.float64).copy(), []
    wv = np.asarray(w, dtype=np.float64)
    c = rng.standard_normal(hidden[-1])
    rest = [rng.standard_normal((hidden[i], hidden[i - 1])) for i in range(1, len(hidden))]
    A1 = interpolating_first_layer(c, rest, wv, noise * rng.standard_normal((hidden[0], wv.size)))
    return c, [A1, *rest]


@dataclass(frozen=True)
class Counterexample:
    r"""Appendix D.4.1: a two-layer linear network ``f = c^T A x`` and an update that satisfies the
    linearised constraint yet destroys interpolation.

    ``D = {(e_1, 1), (e_2, 1)}``, ``D_r = {(e_1, 1)}``, ``c^* = e_1 + e_2``, ``A^* = I_m``;
    ``Delta_c = -e_3``, ``Delta_A = e_3 e_1^T - e_2 e_2^T - e_3 e_3^T``.
    """

    X: Array
    y: Array
    X_r: Array
    y_r: Array
    c: Array
    A: Array
    delta_c: Array
    delta_A: Array

    def linearized_constraint(self) -> Array:
        r"""``Delta_c^T A^* x + c^{*T} Delta_A x`` for each retain ``x`` (zero: the update is feasible for (6))."""
        return self.X_r @ (self.A.T @ self.delta_c) + self.X_r @ (self.delta_A.T @ self.c)

    def predictor_after(self) -> Array:
        r"""``w(theta^* + Delta) = (A^* + Delta_A)^T (c^* + Delta_c)`` (zero: ``R = 0``, a global minimiser of (6))."""
        return (self.A + self.delta_A).T @ (self.c + self.delta_c)


def counterexample_d41(m: int = 3) -> Counterexample:
    """Build the Appendix D.4.1 counterexample in ``R^m`` (``m >= 3``)."""
    if m < 3:
        raise ValueError(f"the counterexample needs m >= 3, got {m}")
    E = np.eye(m)
    e1, e2, e3 = E[0], E[1], E[2]
    return Counterexample(
        X=np.stack([e1, e2]),
        y=np.array([1.0, 1.0]),
        X_r=e1[None, :].copy(),
        y_r=np.array([1.0]),
        c=e1 + e2,
        A=np.eye(m),
        delta_c=-e3,
        delta_A=np.outer(e3, e1) - np.outer(e2, e2) - np.outer(e3, e3),
    )
