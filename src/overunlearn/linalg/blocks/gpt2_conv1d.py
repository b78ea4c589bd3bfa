"""Hugging Face GPT-2's ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): ``y = x @ W + b`` with
``W`` stored ``(in, out)``; a linear layer in the other layout. Registered by name, so that
transformers is never imported here."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Decline, first_input, register_block, stock
from overunlearn.linalg.blocks.positional import PositionalBlock


@register_block("transformers.pytorch_utils.Conv1D")
class GPT2Conv1DBlock(PositionalBlock):
    layout = "po"
    positionwise = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        base = next(t for t in type(module).__mro__ if t.__name__ == "Conv1D")
        return stock(module, base) and module.weight.dim() == 2

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "x")
        if x.dim() < 2 or not isinstance(output, Tensor):
            raise Decline
        self.a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
        self.output, self.batch, self.saved = output, x.shape[0], [x]
