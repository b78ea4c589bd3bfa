"""Projection of a vector onto the row span of a ``k x d`` matrix (``k << d``).

Fast path (:func:`project_onto_span`): the ``k x k`` Gram matrix ``G = J J^T`` and
``b = J v`` are accumulated in float64 over column chunks of ``J`` (so no float64 copy
of ``J`` is ever held), then ``G a = b`` is solved by a symmetric eigendecomposition
that discards eigenvalues below ``rcond * max_eigenvalue`` (robust to duplicate or
linearly dependent rows), and ``P v = J^T a``. Cost: ``O(d k^2)`` flops, memory ``O(k^2)``
beyond ``J`` itself.

Reference (:func:`project_onto_span_qr`): reduced QR of ``J^T`` in float64, as the
authors' code does it. It assumes ``J`` has full row rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 1 << 20


def gram_and_rhs(jac: Tensor, v: Tensor, chunk: int = _CHUNK) -> tuple[Tensor, Tensor]:
    """``(J J^T, J v)`` in float64, accumulated over column chunks of ``J``."""
    k, d = jac.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=jac.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=jac.device)
    for s in range(0, d, chunk):
        block = jac[:, s : s + chunk].double()
        gram += block @ block.T
        rhs += block @ v[s : s + chunk].double()
    return gram, rhs


def solve_gram(gram: Tensor, rhs: Tensor, rcond: float = 1e-12) -> Tensor:
    """Minimum-norm solution of ``G a = b`` for symmetric PSD ``G`` (pseudo-inverse)."""
    evals, evecs = torch.linalg.eigh(gram)
    top = evals.max().clamp_min(0.0)
    keep = evals > rcond * top
    if not bool(keep.any()):
        return torch.zeros_like(rhs)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv * (evecs.T @ rhs))


def project_onto_span(jac: Tensor, v: Tensor, rcond: float = 1e-12, chunk: int = _CHUNK) -> Tensor:
    """``P_span(J^T) v``: the component of ``v`` (shape ``(d,)``) in the span of the rows of ``jac``."""
    if jac.dim() != 2 or v.dim() != 1 or jac.shape[1] != v.shape[0]:
        raise ValueError(f"expected jac (k, d) and v (d,), got {tuple(jac.shape)} and {tuple(v.shape)}")
    if jac.shape[0] == 0:
        return torch.zeros_like(v)
    if not torch.isfinite(jac).all():
        raise FloatingPointError("the output Jacobian contains NaN or infinite values")
    gram, rhs = gram_and_rhs(jac, v, chunk)
    alpha = solve_gram(gram, rhs, rcond)
    out = torch.empty_like(v)
    for s in range(0, v.shape[0], chunk):
        out[s : s + chunk] = (jac[:, s : s + chunk].double().T @ alpha).to(v.dtype)
    return out


def project_onto_span_qr(jac: Tensor, v: Tensor) -> Tensor:
    """Reference: ``Q Q^T v`` with ``Q`` from a float64 reduced QR of ``J^T``."""
    if jac.shape[0] == 0:
        return torch.zeros_like(v)
    q, _ = torch.linalg.qr(jac.double().T, mode="reduced")
    return (q @ (q.T @ v.double())).to(v.dtype)
