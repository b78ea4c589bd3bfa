"""Shared algebra of layers that apply one linear map at ``T`` positions of each sample.

``nn.Linear`` on ``(n, ..., in)`` inputs (``T`` = the product of the middle dimensions; ``T = 1`` for
2-D inputs), GPT-2's ``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d`` on their unfolded patches: with sample
``i``'s inputs ``A_i`` (``T x p``) and the output gradients ``D_r`` (``T x o``) of Jacobian row ``r``
(sample ``i``), the row of the weight is ``D_r^T A_i`` and of the bias ``sum_t D_r[t]``.

* Ghost form: ``<D_r^T A_i, D_s^T A_j> = sum_{t,t'} (D_r D_s^T)[t,t'] (A_i A_j^T)[t,t']``: cost
  ``(k T)^2 o + (n T)^2 p``, two ``(k T)^2`` float64 matrices, and no rows;
* formed rows: one batched product per head and slice of the first dimension, ``k T o p`` flops,
  then their float64 Gram, ``k^2 o p``.

The engine picks per layer (``Budget.positional``); ``T = 1`` (a linear layer on 2-D inputs) always
takes the ghost form (``k^2 (o + p)`` against ``k^2 o p``). ``J^T alpha`` needs no rows in either
form: ``sum_i S_i^T A_i`` with ``S_i = sum_h alpha_{h n + i} D_{h n + i}``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from overunlearn.linalg.blocks.base import Block, Budget, count


class PositionalBlock(Block):
    """Subclasses set ``self.a`` (``(n, T, p)``, detached) in ``__init__`` and may override
    :meth:`positions` (the output gradient as ``(k, T, o)``). ``layout`` is the weight's layout:
    ``"op"`` (``(out, in...)``, as ``nn.Linear`` and convolutions) or ``"po"`` (``(in, out)``, as GPT-2's
    ``Conv1D``)."""

    layout: ClassVar[str] = "op"
    a: Tensor

    def positions(self, deltas: Tensor) -> Tensor:
        """``(k, *out_shape)`` output gradients as ``(k, T, o)``."""
        return deltas.reshape(deltas.shape[0], -1, deltas.shape[-1])

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        super().bind(deltas, n, heads)
        self.d = self.positions(deltas)
        if self.d.shape[1] != self.t:
            raise ValueError("output positions do not match the input positions")

    @property
    def t(self) -> int:
        """Positions per sample."""
        return int(self.a.shape[1])

    @property
    def width(self) -> int:
        """Input features ``p`` at each position."""
        return int(self.a.shape[2])

    def _w2(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor as a matrix in its layout: ``(o, p)`` or ``(p, o)``."""
        return w.reshape(w.shape[0], -1) if self.layout == "op" else w.reshape(-1, w.shape[-1])

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        if name != "weight":
            return False
        if self.t == 1:
            return True
        o, p = self.d.shape[2], self.width
        return budget.positional(self.n, self.heads, o, p, self.t)

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        k, t, o = self.d.shape
        n, p = self.a.shape[0], self.a.shape[2]
        dd = self.d.reshape(k * t, o).double()
        aa = self.a.reshape(n * t, p).double()
        g_d = dd @ dd.T
        g_a = aa @ aa.T
        if t == 1:
            gram = g_d * (g_a if self.heads == 1 else g_a[self.idx][:, self.idx])
        else:
            g_a = g_a.view(n, t, n, t)
            if self.heads > 1:
                g_a = g_a[self.idx][:, :, self.idx]
            gram = (g_d.view(k, t, k, t) * g_a).sum(dim=(1, 3))
        w = self._w2(v).double()
        y = aa @ (w.T if self.layout == "op" else w)  # (n T, o): this weight's outputs
        rhs = (self.d.double() * self.per_row(y.view(n, t, o))).sum(dim=(1, 2))
        return gram, rhs

    def rows(self, name: str, index: Tensor, scratch: Tensor | None = None) -> Tensor:
        n, k = self.n, self.k
        if name == "bias":
            return self.d[:, :, index].sum(1)
        c = count(index, self.d.shape[2] if self.layout == "op" else self.a.shape[2])
        if self.layout == "op":
            left, right = self.d[:, :, index].transpose(1, 2), self.a  # (k, c, T), (n, T, p)
        else:
            left, right = self.a[:, :, index].transpose(1, 2), self.d  # (n, c, T), (k, T, o)
        width = right.shape[2]
        if scratch is not None and scratch.numel() >= k * c * width and scratch.dtype == self.d.dtype:
            out = scratch[: k * c * width].view(k, c, width)
        else:
            out = torch.empty(k, c, width, dtype=self.d.dtype, device=self.d.device)
        for h in range(self.heads):
            rows_h = slice(h * n, (h + 1) * n)
            lh = left[rows_h] if left.shape[0] == k else left
            rh = right[rows_h] if right.shape[0] == k else right
            torch.bmm(lh, rh, out=out[rows_h])
        return out.view(k, c * width)

    def _summed(self, alpha: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``S_i = sum_h alpha_{h n + i} D_{h n + i}``: ``(n, T, o)`` in ``dtype`` (the model's by default)."""
        dtype = dtype or self.d.dtype
        scaled = self.d.to(dtype) * alpha.to(dtype)[:, None, None]
        return scaled.view(self.heads, self.n, *scaled.shape[1:]).sum(0) if self.heads > 1 else scaled

    def back_flops(self, name: str) -> int:
        p = self.module._parameters[name]
        return self.n * self.t * p.numel()

    def back(self, name: str, alpha: Tensor, exact: bool = False) -> Tensor:
        """``J_p^T alpha``; ``exact``: summed in float64 (the engine asks for it when ``alpha``'s terms cancel)."""
        p = self.module._parameters[name]
        s = self._summed(alpha, torch.float64 if exact else None)
        if name == "bias":
            return s.sum(dim=(0, 1)).reshape(p.shape).to(p.dtype)
        s2 = s.reshape(-1, s.shape[2])
        a2 = self.a.reshape(-1, self.a.shape[2]).to(s2.dtype)
        g = s2.T @ a2 if self.layout == "op" else a2.T @ s2
        return g.reshape(p.shape).to(p.dtype)
