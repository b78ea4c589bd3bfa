r"""Exact unlearning for the linear model ``f(theta, x) = theta^T x`` (paper Section 4.1, Appendices B, C, E).

Notation: ``X`` is the ``n x m`` matrix whose rows are the inputs, ``S = row(X)`` and
``S_r = row(X_r)`` the span of the retain inputs. With ``bias=True`` every input is
augmented to ``[x; 1]`` and ``theta = [w; b]``, so the bias counts in the norm -- exactly
what MinNorm-OG does on an ``nn.Linear`` with a bias, whose output gradient is ``[x; 1]``.

Results implemented here:

* **Lemma 3** -- the min-norm solution of ``X theta = y`` is ``X^+ y``, the unique
  feasible vector in ``row(X)`` (:func:`min_norm_interpolator`).
* **Lemma 4** -- the feasible set is ``theta^* + ker X`` (:func:`random_interpolator`
  draws a point of it).
* **Lemma 5 / Theorem 2** -- for any interpolator ``theta^*`` of ``D`` and any
  ``D_r \subseteq D``: ``theta_r^* = P_{S_r}(theta^*)`` (:func:`project_onto_span`).
* **Appendix E** -- ``argmin_{Delta perp G} ||theta + Delta||^2 + lambda ||Delta||^2
  = -P_{G^perp}(theta) / (1 + lambda)`` (:func:`orthogonal_prox_step`), and
  :func:`prox_step_kkt`, the same minimiser from the generic KKT system (no
  projection formula used), to check the closed form against.
* **Schedule** (Appendix F.1.10) -- ``lambda_0 = 1/lambda_reg - 1``,
  ``lambda <- (lambda + 1)/gamma - 1``; :func:`lambda_schedule` runs that recursion and
  :func:`projection_only_iterate` the ``k``-step formula
  ``theta_k = theta_r^* + prod_{j<k}(1 - c_j) P_{S_r^perp} theta^*``.
* **Ridge** -- plain GD on ``J + lambda_k ||theta||^2`` from an interpolator only scales
  the ``S_r^perp`` component by ``prod_k (1 - 2 eta lambda_k)`` (:func:`ridge_perp_factor`).
* **Proposition 2** -- gradient descent from 0 on least squares converges to ``X^+ y``,
  which lies in ``S`` (:func:`gd_least_squares`).

Everything is float64 numpy; no torch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

__all__ = [
    "augment",
    "span_basis",
    "project_onto_span",
    "project_onto_complement",
    "min_norm_interpolator",
    "random_interpolator",
    "orthogonal_prox_step",
    "prox_step_kkt",
    "lambda_schedule",
    "projection_coefficients",
    "projection_only_iterate",
    "ridge_perp_factor",
    "gd_least_squares",
]


def _matrix(X: ArrayLike) -> Array:
    A = np.asarray(X, dtype=np.float64)
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2:
        raise ValueError(f"expected a 2-d matrix of inputs, got shape {A.shape}")
    return A


def augment(X: ArrayLike) -> Array:
    """``[X, 1]``: append a column of ones, so that ``[x; 1]^T [w; b] = w^T x + b``."""
    A = _matrix(X)
    return np.hstack([A, np.ones((A.shape[0], 1))])


def _design(X: ArrayLike, bias: bool) -> Array:
    return augment(X) if bias else _matrix(X)


def span_basis(X: ArrayLike, bias: bool = False, rtol: float = 1e-10) -> Array:
    r"""Orthonormal basis ``Q`` (``m x s``, columns) of ``row(X)``, ``s = rank(X)``.

    Computed from the SVD; singular values below ``rtol * sigma_max`` are treated as 0,
    so duplicated or dependent rows are handled.
    """
    A = _design(X, bias)
    if A.shape[0] == 0:
        return np.zeros((A.shape[1], 0))
    _, sv, vt = np.linalg.svd(A, full_matrices=False)
    if sv.size == 0 or sv[0] == 0:
        return np.zeros((A.shape[1], 0))
    rank = int(np.sum(sv > rtol * sv[0]))
    return vt[:rank].T


def project_onto_span(X: ArrayLike, theta: ArrayLike, bias: bool = False) -> Array:
    r"""``P_{row(X)}(theta) = Q Q^T theta``: Euclidean projection onto the span of the inputs.

    With ``X = X_r`` and ``theta = theta^*`` interpolating ``D``, this is Lemma 5's
    ``theta_r^*``: the min-norm interpolator of the retain set.
    """
    Q = span_basis(X, bias)
    t = np.asarray(theta, dtype=np.float64)
    return Q @ (Q.T @ t)


def project_onto_complement(X: ArrayLike, theta: ArrayLike, bias: bool = False) -> Array:
    r"""``P_{row(X)^perp}(theta) = theta - P_{row(X)}(theta)``."""
    t = np.asarray(theta, dtype=np.float64)
    return t - project_onto_span(X, t, bias)


def min_norm_interpolator(X: ArrayLike, y: ArrayLike, bias: bool = False) -> Array:
    r"""``X^+ y``: the minimum-l2-norm solution of ``X theta = y`` (Lemma 3).

    With ``bias=True`` returns ``[w; b] = [X, 1]^+ y`` (length ``m + 1``, bias last), the
    interpolator minimising ``||w||^2 + b^2``. If ``X theta = y`` has no solution this is
    the min-norm least-squares solution.
    """
    A = _design(X, bias)
    return np.linalg.pinv(A) @ np.asarray(y, dtype=np.float64)


def random_interpolator(X: ArrayLike, y: ArrayLike, rng: np.random.Generator, scale: float = 1.0,
                        bias: bool = False) -> Array:
    r"""A random point of the feasible set ``X^+ y + ker X`` (Lemma 4): the min-norm interpolator
    plus ``scale`` times a random vector projected onto ``ker X = row(X)^perp``."""
    A = _design(X, bias)
    z = rng.standard_normal(A.shape[1])
    return min_norm_interpolator(X, y, bias) + scale * project_onto_complement(X, z, bias)


def orthogonal_prox_step(theta: ArrayLike, G: ArrayLike, lam: float) -> Array:
    r"""Closed form of Appendix E: ``theta + Delta~`` with

    ``Delta~ = argmin_{Delta perp row(G)} ||theta + Delta||^2 + lam ||Delta||^2
    = -P_{row(G)^perp}(theta) / (1 + lam)``.

    ``G`` is ``k x d`` (one gradient per row); ``lam = inf`` returns ``theta`` unchanged.
    MinNorm-OG applies it with ``1/(1 + lam) = c_k``.
    """
    if lam < 0:
        raise ValueError(f"lam={lam} must be >= 0")
    t = np.asarray(theta, dtype=np.float64)
    if np.isinf(lam):
        return t.copy()
    return t - project_onto_complement(G, t) / (1.0 + lam)


def prox_step_kkt(theta: ArrayLike, G: ArrayLike, lam: float) -> Array:
    r"""The same minimiser as :func:`orthogonal_prox_step`, from the KKT system of the QP.

    Stationarity ``2(theta + Delta) + 2 lam Delta + G^T mu = 0`` and feasibility ``G Delta = 0``:

    ``[[2(1+lam) I, G^T], [G, 0]] [Delta; mu] = [-2 theta; 0]``,

    solved by least squares (``G`` may be rank deficient: ``mu`` is then not unique but
    ``Delta`` is). Returns ``theta + Delta``. An independent oracle: no projection is formed.
    """
    t = np.asarray(theta, dtype=np.float64)
    Gm = _matrix(G)
    k, d = Gm.shape
    K = np.zeros((d + k, d + k))
    K[:d, :d] = 2.0 * (1.0 + lam) * np.eye(d)
    K[:d, d:] = Gm.T
    K[d:, :d] = Gm
    rhs = np.concatenate([-2.0 * t, np.zeros(k)])
    sol = np.linalg.lstsq(K, rhs, rcond=None)[0]
    return t + sol[:d]


def lambda_schedule(reg_coef: float, decay: float, k: int) -> Array:
    r"""``lambda_0 .. lambda_{k-1}`` from the paper's recursion (Appendix F.1.10).

    ``lambda_0 = 1/lambda_reg - 1`` and ``lambda_{j+1} = (lambda_j + 1)/gamma - 1``. Each
    step's coefficient is ``c_j = 1/(1 + lambda_j)``, which equals ``lambda_reg gamma^j``.
    ``reg_coef = 0`` gives ``lambda = inf`` (no projection).
    """
    if not 0.0 <= reg_coef <= 1.0 or not 0.0 < decay <= 1.0:
        raise ValueError("need 0 <= reg_coef <= 1 and 0 < decay <= 1")
    lam = np.inf if reg_coef == 0 else 1.0 / reg_coef - 1.0
    out = np.empty(k)
    for j in range(k):
        out[j] = lam
        lam = (lam + 1.0) / decay - 1.0
    return out


def projection_coefficients(reg_coef: float, decay: float, k: int) -> Array:
    """``c_j = 1 / (1 + lambda_j)`` for ``j < k``, from :func:`lambda_schedule`."""
    return 1.0 / (1.0 + lambda_schedule(reg_coef, decay, k))


def projection_only_iterate(X_r: ArrayLike, theta_star: ArrayLike, coefs: ArrayLike, bias: bool = False) -> Array:
    r"""``theta_k`` after projection steps ``theta <- theta - c_j P_{S_r^perp} theta`` with coefficients ``coefs``.

    For a fixed span (a linear model with all retain gradients), the steps commute with the
    decomposition ``theta = P_{S_r} theta + P_{S_r^perp} theta``, so
    ``theta_k = P_{S_r} theta^* + prod_j (1 - c_j) P_{S_r^perp} theta^*``.
    """
    t = np.asarray(theta_star, dtype=np.float64)
    inside = project_onto_span(X_r, t, bias)
    factor = float(np.prod(1.0 - np.asarray(coefs, dtype=np.float64)))
    return inside + factor * (t - inside)


def ridge_perp_factor(lr: float, reg_coef: float, decay: float, steps: int) -> float:
    r"""``prod_{k<steps} (1 - 2 lr lambda_k)`` with ``lambda_k = reg_coef decay^k``.

    Plain GD on ``J(theta; D_r) + lambda_k ||theta||^2`` has ``grad J in S_r`` for the linear
    model, so the ``S_r^perp`` component of ``theta`` is only multiplied by ``1 - 2 lr lambda_k``
    per step. With ``decay < 1`` the infinite product converges to a positive limit when
    ``2 lr reg_coef < 1``: Ridge never removes the forget component.
    """
    k = np.arange(steps)
    return float(np.prod(1.0 - 2.0 * lr * reg_coef * decay**k))


def gd_least_squares(X: ArrayLike, y: ArrayLike, lr: float | None = None, steps: int = 5000,
                     theta0: ArrayLike | None = None) -> Array:
    r"""Gradient descent on ``J(theta) = (1/n) ||X theta - y||^2`` (Proposition 2).

    Started from ``theta0 = 0`` every iterate lies in ``row(X) = S`` (each gradient
    ``(2/n) X^T (X theta - y)`` does), so the limit is the min-norm interpolator ``X^+ y``.
    ``lr`` defaults to ``1 / L`` with ``L = 2 sigma_max(X)^2 / n`` the smoothness constant.
    """
    A = _matrix(X)
    yv = np.asarray(y, dtype=np.float64)
    n = A.shape[0]
    if lr is None:
        lr = n / (2.0 * np.linalg.norm(A, 2) ** 2)
    theta = np.zeros(A.shape[1]) if theta0 is None else np.asarray(theta0, dtype=np.float64).copy()
    for _ in range(steps):
        theta -= lr * (2.0 / n) * (A.T @ (A @ theta - yv))
    return theta
