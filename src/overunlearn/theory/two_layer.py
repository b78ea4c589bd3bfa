r"""Width reduction for two-layer perceptrons (paper Section 4.3, Lemma 6, Proposition 1, Theorem 5).

Model: ``f(theta, x) = c^T phi(A x)`` with ``c in R^h``, ``A in R^{h x m}`` (row ``i`` is
``a_i^T``) and ``phi`` applied element-wise. Complexity: the number of active neurons
``R(theta) = #{i : |c_i| ||a_i|| > 0}``. (A hidden bias is the special case of inputs
augmented with a constant 1 and a last column of ``A`` holding the bias.)

With the drift regulariser of eqn (12) only ``c`` may move, and ``f`` is linear in ``c``:
on the retain inputs ``f(theta, X_r) = Phi_r c`` with ``Phi_r = phi(X_r A^T)`` (``n_r x h``),
and ``grad_c f(theta, x) = phi(A x)``. So ``Delta_c`` keeps every retain output exactly
iff ``Delta_c in G^perp``, ``G = row(Phi_r)``, ``s = dim G = rank(Phi_r) <= n_r``.

* **Lemma 6** (:func:`lemma6_sparsify`): take a basis ``P`` of ``G^perp`` (``h - s``
  columns) and its reduced column-echelon form ``P~`` with pivot rows ``j_1 < ... < j_{h-s}``
  (``P~[j_i, :] = e_i^T``). Then ``Delta_c = -sum_i c_{j_i} p~_i`` lies in ``G^perp`` and
  zeroes every pivot coordinate of ``c + Delta_c``, so ``||c + Delta_c||_0 <= s``.
* **Proposition 1** (:func:`prune_inactive`): zero the rows of ``A`` whose ``c_i = 0``:
  ``A^ = (1_{c != 0} 1^T) . A``. ``f`` and ``R`` are unchanged and ``A^`` has at most ``R``
  nonzero rows.
* **Theorem 5** (:func:`reduce_width`): both together give an interpolator of ``D_r`` with
  at most ``s <= n_r`` active neurons.

The echelon form is computed by our own Gauss-Jordan elimination on ``P^T`` with
partial pivoting and an explicit tolerance (``pivoting="canonical"``: the leftmost pivots,
as in the paper), or with the pivot rows chosen by a column-pivoted QR, which is better
conditioned (``pivoting="qr"``); both zero ``h - s`` coordinates of ``c``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]
Activation = Callable[[Array], Array]

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "features",
    "two_layer_output",
    "fit_output_layer",
    "numerical_rank",
    "orthogonal_complement_basis",
    "reduced_column_echelon",
    "lemma6_sparsify",
    "active_neurons",
    "prune_inactive",
    "WidthReduction",
    "reduce_width",
]


def _silu(z: Array) -> Array:
    return z / (1.0 + np.exp(-z))


ACTIVATIONS: dict[str, Activation] = {
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "silu": _silu,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "identity": lambda z: z,
}


def get_activation(phi: str | Activation) -> Activation:
    """An element-wise activation by name (``tanh``, ``relu``, ``silu``, ``sigmoid``, ``identity``) or a callable."""
    if callable(phi):
        return phi
    try:
        return ACTIVATIONS[phi]
    except KeyError:
        raise ValueError(f"unknown activation {phi!r}; choose one of {sorted(ACTIVATIONS)} or pass a callable") from None


def features(A: ArrayLike, X: ArrayLike, phi: str | Activation = "tanh") -> Array:
    r"""``Phi = phi(X A^T)``: row ``i`` is ``phi(A x_i)`` = ``grad_c f(theta, x_i)`` (shape ``n x h``)."""
    return get_activation(phi)(np.asarray(X, dtype=np.float64) @ np.asarray(A, dtype=np.float64).T)


def two_layer_output(c: ArrayLike, A: ArrayLike, X: ArrayLike, phi: str | Activation = "tanh") -> Array:
    r"""``f(theta, x_i) = c^T phi(A x_i)`` for every row of ``X``."""
    return features(A, X, phi) @ np.asarray(c, dtype=np.float64)


def fit_output_layer(A: ArrayLike, X: ArrayLike, y: ArrayLike, phi: str | Activation = "tanh") -> Array:
    r"""``c^* = Phi^+ y``: the min-norm output layer; it interpolates ``D`` whenever ``rank(Phi) = n``."""
    return np.linalg.pinv(features(A, X, phi)) @ np.asarray(y, dtype=np.float64)


def numerical_rank(M: ArrayLike, rtol: float = 1e-10) -> int:
    """Number of singular values above ``rtol * sigma_max``."""
    sv = np.linalg.svd(np.atleast_2d(np.asarray(M, dtype=np.float64)), compute_uv=False)
    if sv.size == 0 or sv[0] == 0:
        return 0
    return int(np.sum(sv > rtol * sv[0]))


def orthogonal_complement_basis(G: ArrayLike, rtol: float = 1e-10) -> Array:
    r"""Orthonormal basis (columns, ``h x (h - s)``) of ``row(G)^perp``, ``s`` the numerical rank of ``G``."""
    Gm = np.atleast_2d(np.asarray(G, dtype=np.float64))
    if Gm.shape[0] == 0:
        return np.eye(Gm.shape[1])
    return scipy.linalg.null_space(Gm, rcond=rtol)


def reduced_column_echelon(P: ArrayLike, tol: float = 1e-9,
                           pivoting: Literal["canonical", "qr"] = "canonical") -> tuple[Array, list[int]]:
    r"""Reduced column-echelon form ``P~`` of ``P`` (``h x k``) and its pivot rows.

    ``P~`` spans the same column space as ``P``; its ``r = rank(P)`` columns satisfy
    ``P~[j_i, :] = e_i^T`` for the pivot rows ``j_1 < ... < j_r`` (exactly: those entries are
    set to 0 and 1, not left to round-off).

    ``pivoting="canonical"``: Gauss-Jordan on ``P^T`` scanning coordinates left to right; a
    coordinate becomes a pivot if some remaining row has an entry above ``tol * max|P|`` there
    (the largest such entry is used, partial pivoting). ``pivoting="qr"``: the pivot rows are
    the first ``r`` columns chosen by a column-pivoted QR of ``P^T`` (sorted), and
    ``P~ = P (P[J, :])^{-1}``, the same object for that pivot set, better conditioned.
    """
    Pm = np.asarray(P, dtype=np.float64)
    if Pm.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {Pm.shape}")
    h, k = Pm.shape
    if k == 0:
        return np.zeros((h, 0)), []
    scale = float(np.max(np.abs(Pm))) or 1.0
    if pivoting == "qr":
        U, sv, _ = np.linalg.svd(Pm, full_matrices=False)
        r = int(np.sum(sv > tol * max(float(sv[0]), 1e-300))) if sv.size else 0
        if r == 0:
            return np.zeros((h, 0)), []
        B = U[:, :r]  # orthonormal basis of the column space
        _, _, perm = scipy.linalg.qr(B.T, mode="economic", pivoting=True)
        piv = sorted(int(j) for j in perm[:r])
        out = B @ np.linalg.inv(B[piv, :])
        out[piv, :] = np.eye(r)
        return out, piv
    if pivoting != "canonical":
        raise ValueError(f"pivoting={pivoting!r} is not one of 'canonical', 'qr'")
    M = Pm.T.copy()  # rows = basis vectors
    piv: list[int] = []
    row = 0
    for j in range(h):
        if row == k:
            break
        col = np.abs(M[row:, j])
        best = int(np.argmax(col))
        if col[best] <= tol * scale:
            M[row:, j] = 0.0
            continue
        best += row
        if best != row:
            M[[row, best]] = M[[best, row]]
        M[row] /= M[row, j]
        for i in range(k):
            if i != row and M[i, j] != 0.0:
                M[i] -= M[i, j] * M[row]
        M[:, j] = 0.0
        M[row, j] = 1.0
        piv.append(j)
        row += 1
    return M[:row].T.copy(), piv


def lemma6_sparsify(c: ArrayLike, G: ArrayLike, rtol: float = 1e-10, tol: float = 1e-9,
                    pivoting: Literal["canonical", "qr"] = "canonical") -> tuple[Array, Array]:
    r"""Lemma 6: ``(c + Delta_c, Delta_c)`` with ``Delta_c in row(G)^perp`` and ``||c + Delta_c||_0 <= rank(G)``.

    ``G`` (``k x h``) spans the subspace ``G`` (for Theorem 5, ``G = Phi_r``). With ``P~`` the
    reduced column-echelon form of a basis of ``G^perp`` and pivot rows ``j_i``,
    ``Delta_c = -sum_i c_{j_i} p~_i``; the pivot coordinates of the result are exactly 0.
    """
    cv = np.asarray(c, dtype=np.float64)
    basis = orthogonal_complement_basis(G, rtol)
    Pt, piv = reduced_column_echelon(basis, tol, pivoting)
    delta = -(Pt @ cv[piv]) if piv else np.zeros_like(cv)
    new = cv + delta
    new[piv] = 0.0
    return new, delta


def active_neurons(c: ArrayLike, A: ArrayLike, tol: float = 0.0) -> int:
    r"""``R(theta) = #{i : |c_i| ||a_i||_2 > tol}``."""
    cv = np.asarray(c, dtype=np.float64)
    return int(np.sum(np.abs(cv) * np.linalg.norm(np.asarray(A, dtype=np.float64), axis=1) > tol))


def prune_inactive(c: ArrayLike, A: ArrayLike, tol: float = 0.0) -> tuple[Array, Array]:
    r"""Proposition 1: zero row ``i`` of ``A`` (and ``c_i``) wherever ``|c_i| <= tol``.

    ``A^ = (1_{c != 0} 1^T) . A``. The function is unchanged when ``tol = 0`` (the removed
    neurons had output weight exactly 0) and ``A^`` has at most ``||c||_0`` nonzero rows.
    """
    cv = np.asarray(c, dtype=np.float64).copy()
    Am = np.asarray(A, dtype=np.float64).copy()
    dead = np.abs(cv) <= tol
    cv[dead] = 0.0
    Am[dead, :] = 0.0
    return cv, Am


@dataclass(frozen=True)
class WidthReduction:
    """Result of :func:`reduce_width`: the new layers, ``s = rank(Phi_r)`` and the active width."""

    c: Array
    A: Array
    rank: int
    active: int

    @property
    def kept(self) -> Array:
        """Indices of the neurons still active."""
        return np.flatnonzero(self.c != 0.0)


def reduce_width(c: ArrayLike, A: ArrayLike, X_r: ArrayLike, phi: str | Activation = "tanh",
                 rtol: float = 1e-10, tol: float = 1e-9,
                 pivoting: Literal["canonical", "qr"] = "canonical") -> WidthReduction:
    r"""Theorem 5: keep the retain outputs ``Phi_r c`` and reduce the width to at most ``s = rank(Phi_r)``.

    Lemma 6 with ``G = row(Phi_r)`` moves only ``c`` (``Delta_A = 0``), then Proposition 1
    zeroes the rows of ``A`` whose output weight vanished. If ``(c, A)`` interpolates ``D``,
    the result interpolates ``D_r`` with ``R <= s <= n_r``.
    """
    Am = np.asarray(A, dtype=np.float64)
    Phi_r = features(Am, X_r, phi)
    s = numerical_rank(Phi_r, rtol)
    new_c, _ = lemma6_sparsify(c, Phi_r, rtol, tol, pivoting)
    pc, pA = prune_inactive(new_c, Am)
    return WidthReduction(c=pc, A=pA, rank=s, active=active_neurons(pc, pA))
