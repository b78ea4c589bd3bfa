"""Normalisation layers whose affine parameters act per feature: ``y = weight * xhat + bias``.

The rows are ``sum over positions of d * xhat`` (weight) and ``sum of d`` (bias): formed directly,
``k x features`` each. ``xhat`` is recomputed from the captured input the way the layer computes it:
``nn.LayerNorm`` and ``nn.RMSNorm`` through their functional kernels without affine parameters;
BatchNorm in eval mode from its running statistics; a Llama-style RMSNorm (``weight * norm(x)``)
by calling the module itself with its weight replaced by ones (:class:`ScaleNormBlock`, which users
may register for their own such modules).
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


@register_block("transformers.models.llama.modeling_llama.LlamaRMSNorm",
                "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
                "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm")
class ScaleNormBlock(AffineNormBlock):
    """A module computing ``weight * f(x)`` over the last dimension, ``f`` free of parameters (Llama's
    RMSNorm): ``xhat = f(x)`` is the module's own output with ``weight`` set to ones, so it matches
    the module's arithmetic (Llama's float32 upcast included)."""

    param_names = ("weight",)
    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        w = module._parameters.get("weight")
        return (isinstance(w, nn.Parameter) and w.dim() == 1 and len(module._parameters) == 1
                and not module._forward_hooks and not module._forward_pre_hooks)

    def normalised(self) -> Tensor:
        ones = torch.ones_like(self.module.weight)
        return torch.func.functional_call(self.module, {"weight": ones}, (self.x,))


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
