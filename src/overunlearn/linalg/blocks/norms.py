"""Normalisation layers whose affine parameters act per feature: ``y = weight * xhat + bias``.

The rows are ``sum over positions of d * xhat`` (weight) and ``sum of d`` (bias): formed directly,
``k x features`` each. ``xhat`` is recomputed from the captured input the way the layer computes it:
``nn.LayerNorm`` and ``nn.RMSNorm`` through their functional kernels without affine parameters;
BatchNorm in eval mode from its running statistics; the RMSNorm of Hugging Face models -- Llama's
``weight * norm(x)``, Gemma's ``(1 + weight) * norm(x)`` -- by calling the module itself
(:class:`ScaleNormBlock`, registered for every ``transformers.models.*RMSNorm``; users may register it
for their own such modules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from overunlearn.linalg.blocks.base import Decline, RowsBlock, first_input, register_block, stock


class AffineNormBlock(RowsBlock):
    """Subclasses implement :meth:`normalised` (``xhat`` of the captured input ``self.x``) and set
    ``self.feature_dims`` (how many trailing dimensions the affine parameters span; BatchNorm: see
    its block)."""

    feature_dims = 1

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "input", "hidden_states", "x")
        if x.dim() < 2 or not isinstance(output, Tensor) or output.shape != x.shape:
            raise Decline
        norm = getattr(module, "normalized_shape", None)
        if norm is not None and (x.dim() <= len(norm) or tuple(x.shape[x.dim() - len(norm):]) != tuple(norm)):
            raise Decline  # it would normalise over the samples' dimension
        self.x = x.detach()
        self.output, self.batch, self.saved = output, x.shape[0], [x]

    def normalised(self) -> Tensor:
        raise NotImplementedError

    def _reduce(self, t: Tensor) -> Tensor:
        """Sum ``(k, *shape)`` over every dimension but the rows and the features: ``(k, features)``."""
        keep = self.feature_dims
        return t.reshape(t.shape[0], -1, *t.shape[t.dim() - keep:]).sum(1).reshape(t.shape[0], -1)

    def all_rows(self, name: str) -> Tensor:
        d = self.deltas
        if name == "bias":
            return self._reduce(d)
        with torch.no_grad():
            xhat = self.normalised()
        return self._reduce(d * self.per_row(xhat).to(d.dtype))


@register_block(nn.LayerNorm)
class LayerNormBlock(AffineNormBlock):
    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return stock(module, nn.LayerNorm) and module.elementwise_affine

    @property
    def feature_dims(self) -> int:  # type: ignore[override]
        return len(self.module.normalized_shape)

    def normalised(self) -> Tensor:
        m = self.module
        return torch.nn.functional.layer_norm(self.x, m.normalized_shape, None, None, m.eps)


@register_block(nn.RMSNorm)
class RMSNormBlock(AffineNormBlock):
    param_names = ("weight",)
    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return stock(module, nn.RMSNorm) and module.elementwise_affine

    @property
    def feature_dims(self) -> int:  # type: ignore[override]
        return len(self.module.normalized_shape)

    def normalised(self) -> Tensor:
        m = self.module
        return torch.nn.functional.rms_norm(self.x, m.normalized_shape, None, m.eps)


@register_block("transformers.models.*RMSNorm", "transformers.models.cohere*.Cohere*LayerNorm")
class ScaleNormBlock(AffineNormBlock):
    """A module whose output is elementwise affine in its one weight over the trailing dimensions,
    ``f(x) + weight * g(x)`` with ``f``, ``g`` free of parameters (Llama's RMSNorm: ``f = 0``; Gemma's:
    ``f = g``): ``xhat = g(x)`` is the module's own output with ``weight`` set to ones minus its output
    with ``weight`` set to zeros, so it follows the module's arithmetic (float32 upcasts included; for
    these two forms the difference is exact). A module that is not of this form fails the engine's
    check against autograd. Calls with tensor arguments besides the input are declined."""

    param_names = ("weight",)
    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        w = module._parameters.get("weight")
        return (isinstance(w, nn.Parameter) and w.dim() >= 1 and len(module._parameters) == 1
                and not any(True for _ in module.children())
                and not module._forward_hooks and not module._forward_pre_hooks)

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        extra = [a for a in args[1:] if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
        if len(extra) > (0 if args else 1):  # (without positional arguments, the input is a keyword one)
            raise Decline
        super().__init__(module, args, kwargs, output)
        if self.x.dim() <= self.feature_dims or tuple(self.x.shape[self.x.dim() - self.feature_dims:]) != \
                tuple(module.weight.shape):
            raise Decline

    @property
    def feature_dims(self) -> int:  # type: ignore[override]
        return self.module.weight.dim()

    def normalised(self) -> Tensor:
        w = self.module.weight
        call = torch.func.functional_call
        return call(self.module, {"weight": torch.ones_like(w)}, (self.x,)) - \
            call(self.module, {"weight": torch.zeros_like(w)}, (self.x,))


@register_block(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormBlock(AffineNormBlock):
    """BatchNorm in eval mode with running statistics (the engine runs the model in eval mode; a
    BatchNorm without running statistics makes the whole model decline): per channel (dimension 1)."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        base = next(t for t in type(module).__mro__ if t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        return (stock(module, base) and isinstance(module, _BatchNorm) and module.affine
                and module.running_mean is not None and module.running_var is not None)

    def _reduce(self, t: Tensor) -> Tensor:
        return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t

    def normalised(self) -> Tensor:
        m = self.module
        shape = (1, -1) + (1,) * (self.x.dim() - 2)
        return (self.x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
