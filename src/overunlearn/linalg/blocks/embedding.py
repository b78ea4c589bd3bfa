"""``nn.Embedding``: sample ``i``'s weight row is the scatter of its output gradients onto its token ids.

* Formed rows, restricted to the ids present in the batch (``support``): ``k T E`` to scatter,
  ``k^2 |ids| E`` for their Gram;
* ghost form: ``G_rs = sum_{t,t'} [id_{i,t} = id_{j,t'}] (d_{r,t} . d_{s,t'})``: ``(k T)^2 E``.

``padding_idx`` receives no gradient (as in PyTorch's backward); ``max_norm`` (renormalises the
weight in place) and ``scale_grad_by_freq`` (couples the samples) are declined. A subclass with a
forward of its own that computes the ids it looks up (OPT's learned positions) is read by replaying
the call (:func:`_computed_ids`). Hugging Face's scaled
word embeddings (Gemma's: the embedding times a constant ``embed_scale``) take
:class:`ScaledEmbeddingBlock`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Block, Budget, Decline, count, first_input, register_block, stock


def _computed_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> Tensor:
    """The ids an embedding with a forward of its own looked up in this call (OPT's learned positions
    compute them from the attention mask): the call replayed with the weight replaced by each row's
    index shows them. Declined unless the replay is a lookup (every entry of an output row equal to a
    whole index in range; ids of one dimension only if the input has their shape, since a table shared by
    every sample looks the same) and the call's output is exactly the weight's rows at
    those ids (not scaled or shifted). Declined too: a ``padding_idx`` (whether the forward masks that
    row's gradient cannot be read from values), and submodules (the replay would call them again)."""
    if module.padding_idx is not None or next(module.children(), None) is not None:
        raise Decline
    w = module.weight
    vocab, width = w.shape
    index = torch.arange(vocab, dtype=torch.float64, device=w.device)[:, None].expand(vocab, width)
    # (the module's forward itself, not its __call__: this runs inside the engine's forward hook)
    saved = module._parameters["weight"]
    module._parameters["weight"] = index  # type: ignore[assignment]
    try:
        with torch.no_grad():
            got = module.forward(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a forward that cannot take the replacement weight
        raise Decline from exc
    finally:
        module._parameters["weight"] = saved
    if not isinstance(got, Tensor) or got.shape != output.shape or got.dim() < 2 or got.dtype != torch.float64:
        raise Decline
    ids = got[..., 0]
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if ids.dim() < 2 and (x is None or tuple(x.shape) != tuple(ids.shape)):
        raise Decline  # one id per row but not one per input row: a table shared by every sample
    if not (torch.equal(got, ids[..., None].expand_as(got)) and torch.equal(ids, ids.round())
            and bool(((ids >= 0) & (ids < vocab)).all())):
        raise Decline
    ids = ids.long()
    if not torch.equal(output.detach(), w.detach()[ids]):
        raise Decline
    return ids


@register_block(nn.Embedding)
class EmbeddingBlock(Block):
    param_names = ("weight",)
    positionwise = True
    #: the call's first input holds the ids even if the module has a forward of its own
    ids_are_the_input = False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        # (an own forward is accepted: see _computed_ids)
        plain = stock(module, type(module))
        return plain and module.max_norm is None and not module.scale_grad_by_freq

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        if not isinstance(output, Tensor):
            raise Decline
        if type(module).forward is nn.Embedding.forward or self.ids_are_the_input:
            ids = first_input(args, kwargs, "input")
            saved = [ids]
        else:
            ids, saved = _computed_ids(module, args, kwargs, output), []
        if ids.dim() < 1 or ids.is_floating_point():
            raise Decline
        self.ids = ids.detach().reshape(ids.shape[0], -1)  # (n, T)
        self.valid = (self.ids != module.padding_idx) if module.padding_idx is not None else None
        self.output, self.batch, self.saved = output, ids.shape[0], saved

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        super().bind(deltas, n, heads)
        d = deltas.reshape(deltas.shape[0], -1, deltas.shape[-1])
        if self.valid is not None:
            d = d * self.per_row(self.valid).unsqueeze(-1).to(d.dtype)
        self.d = d  # (k, T, E)

    def support(self, name: str) -> Tensor | None:
        ids = self.ids if self.valid is None else self.ids[self.valid]
        return torch.unique(ids)

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        k, t, e = self.d.shape
        if (k * t) ** 2 > budget.max_ghost_entries:
            return False
        ghost = (k * t) ** 2 * e + (self.n * t) ** 2
        rows = k * t * e + k * k * int(self.support(name).numel()) * e
        return ghost < rows

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        k, t, e = self.d.shape
        dd = self.d.reshape(k * t, e).double()
        ids = self.per_row(self.ids).reshape(-1)
        same = (ids[:, None] == ids[None, :]).to(torch.float64)
        gram = ((dd @ dd.T) * same).view(k, t, k, t).sum(dim=(1, 3))
        rhs = (self.d.double() * v.double()[self.per_row(self.ids)]).sum(dim=(1, 2))
        return gram, rhs

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        k, t, e = self.d.shape
        vocab = self.module.weight.shape[0]
        c = count(index, vocab)
        where = torch.full((vocab,), -1, dtype=torch.long, device=self.ids.device)
        where[index] = torch.arange(c, device=self.ids.device)
        pos = self.per_row(where[self.ids])  # (k, T): column slot of each token, -1 if not in index
        keep = pos >= 0
        slot = (torch.arange(k, device=pos.device)[:, None] * c + pos)[keep]
        out = torch.zeros(k * c, e, dtype=self.d.dtype, device=self.d.device)
        out.index_add_(0, slot, self.d[keep])
        return out.view(k, c * e)

    def back(self, name: str, alpha: Tensor, exact: bool = False) -> Tensor:
        """``J^T alpha``; ``exact``: summed in float64 (the engine asks for it when ``alpha``'s terms cancel)."""
        w = self.module.weight
        dtype = torch.float64 if exact else self.d.dtype
        scaled = self.d.to(dtype) * alpha.to(dtype)[:, None, None]
        out = torch.zeros(w.shape, dtype=dtype, device=w.device)
        out.index_add_(0, self.per_row(self.ids).reshape(-1), scaled.reshape(-1, scaled.shape[-1]))
        return out.to(w.dtype)


@register_block("transformers.models.*ScaledWordEmbedding")
class ScaledEmbeddingBlock(EmbeddingBlock):
    """An ``nn.Embedding`` whose output is multiplied by a constant ``embed_scale`` (a number or a
    one-element tensor): its output gradients, scaled by it, are a plain embedding's."""

    ids_are_the_input = True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        scale = getattr(module, "embed_scale", None)
        w = module._parameters.get("weight")
        return (isinstance(module, nn.Embedding) and isinstance(w, nn.Parameter) and "weight" not in module.__dict__
                and (isinstance(scale, (int, float)) or (isinstance(scale, Tensor) and scale.numel() == 1))
                and module.max_norm is None and not module.scale_grad_by_freq
                and not module._forward_hooks and not module._forward_pre_hooks)

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        scale = self.module.embed_scale
        scale = scale.to(self.module.weight.dtype) if isinstance(scale, Tensor) else scale
        super().bind(deltas * scale, n, heads)
