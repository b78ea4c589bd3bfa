"""``nn.Linear`` on inputs with any leading dimensions (``(n, in)``, ``(n, T, in)``, ...)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Decline, first_input, register_block, stock
from overunlearn.linalg.blocks.positional import PositionalBlock


@register_block(nn.Linear)
class LinearBlock(PositionalBlock):
    """A sample's weight row is ``sum_t d_t a_t^T`` over its positions (one position for 2-D inputs)."""

    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return stock(module, nn.Linear)

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "input")
        if x.dim() < 2 or not isinstance(output, Tensor):
            raise Decline
        self.a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        self.output, self.batch, self.saved = output, x.shape[0], [x]


@register_block("transformers.models.falcon.modeling_falcon.FalconLinear")
class FalconLinearBlock(LinearBlock):
    """Falcon's ``FalconLinear``: ``input @ weight.T + bias`` written out, a linear layer's arithmetic."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        own = next(t for t in type(module).__mro__ if t.__name__ == "FalconLinear")
        return stock(module, own)
