"""Per-layer blocks of MinNorm-OG's projection, registered by module type.

Each module here holds one layer kind and registers its block with :func:`register_block`; importing
this package registers them all. To cover a layer of your own, subclass :class:`Block` (or
:class:`RowsBlock` for small per-feature parameters) and decorate it with ``@register_block(MyLayer)``;
the projection's check against autograd (once per model and input shape) falls back to the
``torch.func`` Jacobian if the block is wrong.
"""

from overunlearn.linalg.blocks import attention, conv, embedding, gpt2_conv1d, linear, moe, norms, vit  # noqa: F401  (registration)
from overunlearn.linalg.blocks.base import Block, Budget, Decline, RowsBlock, block_for, register_block
from overunlearn.linalg.blocks.conv import patches1d, patches2d
from overunlearn.linalg.blocks.norms import ScaleNormBlock

__all__ = ["Block", "Budget", "Decline", "RowsBlock", "ScaleNormBlock", "block_for", "patches1d", "patches2d",
           "register_block"]
