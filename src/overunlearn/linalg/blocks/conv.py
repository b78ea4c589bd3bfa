"""``nn.Conv1d`` and ``nn.Conv2d`` (one group, zero padding given as numbers): linear layers applied
at the output positions to the unfolded input patches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Decline, first_input, register_block, stock
from overunlearn.linalg.blocks.positional import PositionalBlock


def patches2d(a: Tensor, m: nn.Conv2d) -> Tensor:
    """``F.unfold(a, ...)`` for the convolution ``m``: ``(n, C_in k_h k_w, T)``, from strided views and
    one copy (``F.unfold`` launches one CUDA kernel per sample)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    if ph or pw:
        a = torch.nn.functional.pad(a, (pw, pw, ph, ph))
    p = a.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # (n, C, H', W', eh, ew)
    if dh > 1 or dw > 1:
        p = p[..., ::dh, ::dw]
    n, c, ho, wo = p.shape[:4]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def patches1d(a: Tensor, m: nn.Conv1d) -> Tensor:
    """The unfolded patches of a 1-D convolution: ``(n, C_in k, L')``."""
    (k,), (s,), (pd,), (dl,) = m.kernel_size, m.stride, m.padding, m.dilation
    if pd:
        a = torch.nn.functional.pad(a, (pd, pd))
    p = a.unfold(2, (k - 1) * dl + 1, s)  # (n, C, L', e)
    if dl > 1:
        p = p[..., ::dl]
    n, c, lo = p.shape[:3]
    return p.permute(0, 1, 3, 2).reshape(n, c * k, lo)


def _positions(a: Tensor, m: nn.Module) -> int:
    """The number of output positions the convolution ``m`` has on input ``a`` (views only, no copy)."""
    size = 1
    for i, (k, s, pd, dl) in enumerate(zip(m.kernel_size, m.stride, m.padding, m.dilation)):
        size *= max(0, (a.shape[2 + i] + 2 * pd - dl * (k - 1) - 1) // s + 1)
    return size


def _plain(m: nn.Module, base: type) -> bool:
    return (stock(m, base) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


class _ConvBlock(PositionalBlock):
    """The unfolded patches (``a``, ``k_h k_w`` times the input) are made from the kept input when
    needed and dropped when the engine is done with them (:meth:`done`), so that only one layer's are
    held at a time."""

    dims: int = 2

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "input")
        if x.dim() != self.dims + 2 or not isinstance(output, Tensor):
            raise Decline
        self.x = x.detach()
        self._a: Tensor | None = None
        self.output, self.batch, self.saved = output, x.shape[0], [x]
        self.out_positions = int(output[0, 0].numel())

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        if _positions(self.x, self.module) != self.out_positions:
            raise Decline
        super().bind(deltas, n, heads)

    @property
    def a(self) -> Tensor:  # type: ignore[override]
        """The unfolded patches, ``(n, T, patch)``."""
        if self._a is None:
            unfold = patches2d if self.dims == 2 else patches1d
            self._a = unfold(self.x, self.module).transpose(1, 2)
        return self._a

    @a.setter
    def a(self, value: Tensor) -> None:
        # patches a subclass sets itself are not recomputable from the input: done() keeps them
        self._a, self._set_a = value, True

    def done(self) -> None:
        if not getattr(self, "_set_a", False):
            self._a = None

    @property
    def t(self) -> int:
        return self.out_positions

    @property
    def width(self) -> int:
        return int(self.module.weight[0].numel())

    def positions(self, deltas: Tensor) -> Tensor:
        return deltas.reshape(deltas.shape[0], deltas.shape[1], -1).transpose(1, 2)


@register_block(nn.Conv2d)
class Conv2dBlock(_ConvBlock):
    dims = 2

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return _plain(module, nn.Conv2d)


@register_block(nn.Conv1d)
class Conv1dBlock(_ConvBlock):
    dims = 1

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return _plain(module, nn.Conv1d)
