"""AdamW on fixed parameter tensors, one call of PyTorch's fused kernel per step.

The ensemble trainer and the batched unlearning runner step the same few stacked tensors tens of
thousands of times. ``torch.optim.AdamW(..., fused=True)`` runs the same kernel, but its
``Optimizer.step`` machinery (hooks, grouping by device and dtype, state lookup) costs about
0.3-0.6 ms per call on CPU -- 6% of a training step of five 300-300 MLPs. :class:`FusedAdamW`
holds the moments itself and calls ``torch._fused_adamw_`` with the arguments ``torch.optim``
passes (float32 step counter, ``amsgrad=False``, ``maximize=False``), so the update is the same bit
for bit; where the kernel is unavailable it runs ``torch.optim.AdamW``'s single-tensor formula
as plain tensor operations. ``tests/test_poison.py`` holds both paths to ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class FusedAdamW:
    """AdamW (decoupled weight decay) for ``params`` whose gradients live in ``grads``.

    ``grads[i]`` is read at every :meth:`step` (write the gradient into it in place); the tensors
    are not ``nn.Parameter``s and need no ``.grad``. Betas and eps default to PyTorch's.
    """

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None) -> None:
        self.params, self.grads = list(params), list(grads)
        if len(self.params) != len(self.grads) or any(p.shape != g.shape for p, g in zip(self.params, self.grads)):
            raise ValueError("FusedAdamW needs one gradient tensor of the same shape per parameter tensor")
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.step_t = torch.zeros((), dtype=torch.float32, device=dev)
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else bool(fused)

    def load(self, exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], step: Tensor) -> None:
        """Continue from moments ``exp_avg`` / ``exp_avg_sq`` after ``step`` steps."""
        self.exp_avg = [t.contiguous() for t in exp_avg]
        self.exp_avg_sq = [t.contiguous() for t in exp_avg_sq]
        self.step_t = step.clone()

    def step(self) -> None:
        self.step_t.add_(1)
        b1, b2 = self.betas
        if self.fused:
            try:
                # one step tensor per parameter, as torch.optim keeps them; the kernel only reads it
                torch._fused_adamw_(self.params, self.grads, self.exp_avg, self.exp_avg_sq, [],
                                    [self.step_t] * len(self.params), lr=self.lr, beta1=b1, beta2=b2,
                                    weight_decay=self.weight_decay, eps=self.eps, amsgrad=False,
                                    maximize=False, grad_scale=None, found_inf=None)
                return
            except (RuntimeError, NotImplementedError, TypeError):  # pragma: no cover - no such kernel here
                self.fused = False
        step = float(self.step_t)
        bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
        for p, g, m, v in zip(self.params, self.grads, self.exp_avg, self.exp_avg_sq, strict=True):
            p.mul_(1.0 - self.lr * self.weight_decay)
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / (bc2 ** 0.5)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / bc1)


__all__ = ["FusedAdamW"]
