"""``nn.MultiheadAttention``: its input projections, its ``bias_k``/``bias_v`` and its ``out_proj``.

The module computes everything inside one call of ``F.multi_head_attention_forward`` from raw
parameters (``out_proj`` is a Linear submodule that is never called as a module), so the inputs and
output gradients of its projections are internal to the call. The block keeps the call's query, key
and value (batch-major, detached) and options, and in :meth:`bind` recomputes the attention for each
Jacobian row's sample with autograd on the projected ``q``, ``k``, ``v``; one batched
``torch.autograd.grad`` with the context's gradient ``D_r W_o`` (``D_r``: the output gradient of row
``r``) as ``grad_outputs`` gives every row's gradient with respect to ``q``, ``k`` and ``v``. Then
each projection is a linear map at ``T`` positions (``L`` query or ``S`` key positions) with rows
``G_r^T A_i``, as a linear layer's (:mod:`positional`: ghost or formed rows by the same flop rule):

* ``W_q`` / ``W_k`` / ``W_v`` (the thirds of ``in_proj_weight``, or ``q/k/v_proj_weight`` when
  ``kdim``/``vdim`` differ) and the thirds of ``in_proj_bias``: inputs query / key / value,
  gradients those of ``q`` / ``k`` / ``v``; the thirds occupy disjoint rows of ``in_proj_weight``,
  so its Gram is the sum of theirs;
* ``out_proj.weight`` / ``out_proj.bias``: inputs the context (attention output before
  ``out_proj``), gradients the output gradients themselves;
* ``bias_k`` / ``bias_v``: the gradient of the extra key / value position they append.

The attention weights the call may also return are not followed: a model whose scores use them
fails the engine's check against autograd and takes the vmapped Jacobian. Declined (their
parameters take the ``torch.func`` fallback): unbatched or nested inputs, dropout in training mode,
masks neither boolean nor of the query's floating dtype, autocast, and subclasses with their own
``forward``. Registered for ``nn.MultiheadAttention`` only; ``nn.TransformerEncoderLayer`` and
``nn.TransformerDecoderLayer`` call it as a module outside their no-grad fast path.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from overunlearn.linalg.blocks.base import Block, Budget, Decline, count, param_of, register_block
from overunlearn.linalg.blocks.positional import PositionalBlock

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class _Map(PositionalBlock):
    """One linear map inside the call: inputs ``a`` ``(n, T, p)``, its weight and bias given as tensors
    (slices of the module's parameters), output gradients given to :meth:`bind` as ``(k, T, o)``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, a: Tensor) -> None:
        Block.__init__(self, SimpleNamespace(_parameters={"weight": weight, "bias": bias}), (), {}, None)  # type: ignore[arg-type]
        self.a = a


def _additive(mask: Any, dtype: torch.dtype) -> Tensor | None:
    """A boolean or floating mask as the additive mask the call uses (``True``: ``-inf``)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.is_nested:
        raise Decline
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if mask.dtype != dtype:
        raise Decline
    return mask.detach()


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, heads: int) -> Tensor:
    """Attention of ``(r, L, E)`` queries over ``(r, S, E)`` keys and values, ``heads`` heads, an
    additive mask broadcastable to ``(r, heads, L, S)``: the context ``(r, L, E)``."""
    r, t, e = q.shape
    s, hd = k.shape[1], e // heads
    qh = q.view(r, t, heads, hd).transpose(1, 2)
    kh = k.view(r, s, heads, hd).transpose(1, 2)
    vh = v.view(r, s, heads, hd).transpose(1, 2)
    w = torch.matmul(qh * (1.0 / math.sqrt(hd)), kh.transpose(-2, -1))
    if mask is not None:
        w = w + mask
    return torch.matmul(torch.softmax(w, dim=-1), vh).transpose(1, 2).reshape(r, t, e)


@register_block(nn.MultiheadAttention)
class MultiheadAttentionBlock(Block):
    param_names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                   "bias_k", "bias_v", "out_proj.weight", "out_proj.bias")

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        from torch.nn.utils import parametrize

        out = getattr(module, "out_proj", None)
        return (type(module).forward is nn.MultiheadAttention.forward and isinstance(out, nn.Linear)
                and not parametrize.is_parametrized(module) and not parametrize.is_parametrized(out)
                and isinstance(out._parameters.get("weight"), nn.Parameter) and "weight" not in out.__dict__
                and not module._forward_hooks and not module._forward_pre_hooks)

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        m: nn.MultiheadAttention = module  # type: ignore[assignment]
        try:
            call = _SIGNATURE.bind(m, *args, **kwargs)
        except TypeError:
            raise Decline from None
        call.apply_defaults()
        o = call.arguments
        query, key, value = o["query"], o["key"], o["value"]
        if not all(isinstance(x, Tensor) and x.dim() == 3 and not x.is_nested for x in (query, key, value)):
            raise Decline
        if not isinstance(output, tuple) or not isinstance(output[0], Tensor):
            raise Decline
        if (m.training and m.dropout > 0) or torch.is_autocast_enabled():
            raise Decline
        dtype = query.dtype
        bm = (lambda x: x) if m.batch_first else (lambda x: x.transpose(0, 1))
        self.query, self.key, self.value = (bm(x).detach() for x in (query, key, value))
        n, t = self.query.shape[:2]
        s = self.key.shape[1]
        if self.key.shape[0] != n or self.value.shape[:2] != (n, s):
            raise Decline
        kpm = _additive(o["key_padding_mask"], dtype)
        am = _additive(o["attn_mask"], dtype)
        if o["is_causal"] and am is not None and kpm is None and not o["need_weights"]:
            # the call then ignores the mask and applies the causal one (top-left aligned)
            am = torch.zeros(t, s, dtype=dtype, device=query.device).masked_fill(
                torch.ones(t, s, dtype=torch.bool, device=query.device).tril().logical_not(), float("-inf"))
        self.mask = self._merged(am, kpm, n, t, s)
        out = bm(output[0])
        # the output, batch-major and fresh, is what the engine takes gradients for; the model gets
        # a value computed from it (a copy in the call's own layout)
        self.output = out.clone(memory_format=torch.contiguous_format)
        returned = self.output if m.batch_first else self.output.transpose(0, 1).clone(
            memory_format=torch.contiguous_format)
        self.module_output = (returned, *output[1:])
        self.batch = n
        self.saved = [x for x in {id(x): x for x in (query, key, value)}.values()]

    def _merged(self, am: Tensor | None, kpm: Tensor | None, n: int, t: int, s: int) -> Tensor | None:
        """The call's additive mask as ``(n | 1, heads | 1, L, S')`` over the keys after ``bias_k`` and
        the zero position (where the call pads the masks with zeros)."""
        m: nn.MultiheadAttention = self.module  # type: ignore[assignment]
        heads = m.num_heads
        extra = int(m.bias_k is not None) + int(m.add_zero_attn)
        mask = None
        if am is not None:
            if am.dim() == 2 and am.shape == (t, s):
                mask = am[None, None]
            elif am.dim() == 3 and am.shape == (n * heads, t, s):
                mask = am.view(n, heads, t, s)
            else:
                raise Decline
        if kpm is not None:
            if kpm.shape != (n, s):
                raise Decline
            mask = kpm[:, None, None] if mask is None else mask + kpm[:, None, None]
        if mask is not None and extra:
            mask = F.pad(mask, (0, extra))
        return mask

    # ---- the recomputation ----------------------------------------------------------------------

    def _weights(self) -> tuple[list[Tensor], list[Tensor | None]]:
        m: nn.MultiheadAttention = self.module  # type: ignore[assignment]
        e = m.embed_dim
        if m.in_proj_weight is not None:
            ws = list(m.in_proj_weight.detach().split(e))
        else:
            ws = [m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()]
        bs: list[Tensor | None] = list(m.in_proj_bias.detach().split(e)) if m.in_proj_bias is not None \
            else [None, None, None]
        return ws, bs

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        super().bind(deltas, n, heads)
        m: nn.MultiheadAttention = self.module  # type: ignore[assignment]
        ws, bs = self._weights()
        names = {n for n, _ in self.parameters()}
        want_q = bool(names & {"in_proj_weight", "in_proj_bias", "q_proj_weight"})
        want_k = bool(names & {"in_proj_weight", "in_proj_bias", "k_proj_weight", "bias_k"})
        want_v = bool(names & {"in_proj_weight", "in_proj_bias", "v_proj_weight", "bias_v"})
        wo = m.out_proj.weight.detach()
        with torch.no_grad():
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((self.query, self.key, self.value), ws, bs))
            r = q.shape[0]
            if m.bias_k is not None:
                k = torch.cat([k, m.bias_k.detach().expand(r, 1, -1)], 1)
                v = torch.cat([v, m.bias_v.detach().expand(r, 1, -1)], 1)
            if m.add_zero_attn:
                k = F.pad(k, (0, 0, 0, 1))
                v = F.pad(v, (0, 0, 0, 1))
        grads: dict[str, Tensor] = {}
        if want_q or want_k or want_v:
            leaves = {"q": self.per_row(q), "k": self.per_row(k), "v": self.per_row(v)}
            asked = [x for x, w in zip("qkv", (want_q, want_k, want_v)) if w]
            for x in asked:
                leaves[x] = leaves[x].clone().requires_grad_(True)
            mask = self.mask if self.mask is None or self.mask.shape[0] == 1 else self.per_row(self.mask)
            with torch.enable_grad():
                ctx = _attend(leaves["q"], leaves["k"], leaves["v"], mask, m.num_heads)
                got = torch.autograd.grad(ctx, [leaves[x] for x in asked], grad_outputs=deltas @ wo)
            grads = dict(zip(asked, got))
            context = ctx.detach()[:n]  # rows 0..n-1 are samples 0..n-1 (head-major rows)
        else:
            with torch.no_grad():
                context = _attend(q, k, v, self.mask, m.num_heads)
        s = self.key.shape[1]
        self.maps: dict[str, _Map] = {}
        for x, a, w, b in zip("qkv", (self.query, self.key, self.value), ws, bs):
            if x in grads:
                self.maps[x] = _Map(w, b, a)
                self.maps[x].bind(grads[x][:, : a.shape[1]], n, heads)
        if "out_proj.weight" in names or "out_proj.bias" in names:
            self.maps["o"] = _Map(wo, None if m.out_proj.bias is None else m.out_proj.bias.detach(), context)
            self.maps["o"].bind(deltas, n, heads)
        self.extra = {name: grads[x][:, s] for name, x in (("bias_k", "k"), ("bias_v", "v")) if name in names}
        self.deltas = None
        self.query = self.key = self.value = self.mask = None  # type: ignore[assignment]

    # ---- the algebra: each parameter as slices of its first dimension, one map each --------------

    def _parts(self, name: str) -> list[tuple[_Map, str, int, int]]:
        """``(map, "weight" | "bias", start, size)`` of parameter ``name``'s first-dimension ranges."""
        e = self.module.embed_dim  # type: ignore[union-attr]
        if name in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if name == "in_proj_weight" else "bias"
            return [(self.maps[x], kind, j * e, e) for j, x in enumerate("qkv")]
        if name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            return [(self.maps[name[0]], "weight", 0, e)]
        return [(self.maps["o"], name.rpartition(".")[2], 0, e)]

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        return name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight") \
            and all(mp.ghost_cheaper("weight", budget) for mp, _, _, _ in self._parts(name))

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        gram = rhs = None
        for mp, kind, start, size in self._parts(name):
            g, r = mp.ghost(kind, v[start : start + size])
            gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        assert gram is not None and rhs is not None
        return gram, rhs

    def rows(self, name: str, index: Tensor | slice) -> Tensor:
        if name in self.extra:
            return self.extra[name].reshape(self.k, 1, -1)[:, index].reshape(self.k, -1)
        p = param_of(self.module, name)
        assert p is not None
        out = []
        for mp, kind, start, size in self._parts(name):
            if isinstance(index, slice):
                lo, hi, _ = index.indices(p.shape[0])
                local: Tensor | slice = slice(max(lo, start) - start, min(hi, start + size) - start)
                if local.stop <= local.start:
                    continue
            else:
                local = index[(index >= start) & (index < start + size)] - start
                if local.numel() == 0:
                    continue
            out.append(mp.rows(kind, local))
        if not out:
            inner = p.numel() // max(p.shape[0], 1)
            return torch.zeros(self.k, count(index, p.shape[0]) * inner, dtype=p.dtype, device=p.device)
        return out[0] if len(out) == 1 else torch.cat(out, 1)

    def back(self, name: str, alpha: Tensor) -> Tensor:
        p = param_of(self.module, name)
        assert p is not None
        if name in self.extra:
            return (self.extra[name].double().T @ alpha).reshape(p.shape).to(p.dtype)
        parts = [mp.back(kind, alpha).reshape(size, -1) for mp, kind, _, size in self._parts(name)]
        return torch.cat(parts, 0).reshape(p.shape).to(p.dtype)

    def back_flops(self, name: str) -> int:
        if name in self.extra:
            return 0
        return sum(mp.back_flops(kind) for mp, kind, _, _ in self._parts(name))
