"""Hugging Face ViT's embeddings module (``ViTEmbeddings``): its own parameters ``cls_token`` and
``position_embeddings`` enter its output additively (``cat(cls, patches) + position_embeddings``, then
dropout, off in eval mode), so their rows are the output gradient itself: position ``t`` for the
position embeddings, position 0 for the class token. The patch projection inside is a ``Conv2d``
with a block of its own. Registered by name (transformers is never imported here); interpolated
position encodings are declined."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Decline, RowsBlock, first_input, register_block


@register_block("transformers.models.vit.modeling_vit.ViTEmbeddings")
class ViTEmbeddingsBlock(RowsBlock):
    param_names = ("cls_token", "position_embeddings")

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        pos = module._parameters.get("position_embeddings")
        return isinstance(pos, nn.Parameter) and pos.dim() == 3 and pos.shape[0] == 1 \
            and not module._forward_hooks and not module._forward_pre_hooks

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "pixel_values")
        interpolate = kwargs.get("interpolate_pos_encoding", args[2] if len(args) > 2 else False)
        if interpolate or not isinstance(output, Tensor) or output.shape[1:] != module.position_embeddings.shape[1:]:
            raise Decline
        self.output, self.batch, self.saved = output, x.shape[0], []

    def all_rows(self, name: str) -> Tensor:
        d = self.deltas
        return d[:, 0].reshape(self.k, -1) if name == "cls_token" else d.reshape(self.k, -1)
