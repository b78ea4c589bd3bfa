"""Hugging Face mixture-of-experts layers: the router and the fused experts of a ``*SparseMoeBlock``.

Mixtral, Qwen2-MoE, Qwen3-MoE and their kin compute, for each token ``x_t`` of the layer's input
``(n, L, H)``: router logits ``z_t = W_g x_t``, routing weights ``w_{t,j}`` and experts ``e_{t,j}``
(``j < K``) from them (softmax, top-k, maybe normalised: whatever the router module does after its
linear map), and the output ``sum_j w_{t,j} y_{t,e_{t,j}}`` with ``y_{t,e} = W_d[e] g(W_gu[e] x_t)``,
``g`` the experts' gating (``act(gate) * up``: their ``_apply_gate``). The fused expert weights
``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)`` are used by slicing, not by calling a
module, so the block is registered for the sparse MoE module and claims them by dotted names, with the
router's ``gate.weight``.

In :meth:`bind` it recomputes, expert by expert, the tokens routed to that expert, with autograd
through the gating only (one ``torch.autograd.grad`` per expert for all Jacobian rows). For row ``r``
(sample ``i``) with output gradients ``D_r``:

* ``down_proj[e]`` is a linear map at the positions of sample ``i`` routed to ``e``, with inputs
  ``g(W_gu[e] x_t)`` and output gradients ``w_{t,e} D_{r,t}``;
* ``gate_up_proj[e]``: inputs ``x_t``, output gradients ``g'^T (W_d[e]^T w_{t,e} D_{r,t})``;
* ``gate.weight``: inputs ``x_t`` at every position, output gradients ``dz_{r,t}``, the routing weights'
  gradients ``D_{r,t} . y_{t,e_{t,j}}`` taken back through the router's own post-processing of the
  logits -- read by *replaying* the router module with the weight ``[I_E | 0]`` on the input
  ``[z_t | 0]`` (so that its linear map returns ``z_t`` itself), which follows whatever the router does
  after its linear map without restating it.

Each expert's map (:class:`_Tokens`) keeps only the tokens routed to it, grouped by sample, unpadded
(on a GPU its formed rows are batched over samples of similar token counts); it takes the ghost form or formed rows by the engine's flop rule, as a linear layer's. Its rows
are formed in slices of output rows (:meth:`Block.units`), so a slice stays small however large one
expert is; experts that no token of the batch reaches have zero rows and are skipped
(:meth:`Block.support`). The router is a linear map at every position (``attention._Map``).

Under peft's LoRA (``ParamWrapper`` adapters, nested, on the router's weight and on each fused expert
weight: effective weight ``W + s B A``, per expert for 3-D weights), the experts are recomputed with the
effective weights and each expert's map becomes the factors' maps: ``A_e`` with output gradients
``s B_e^T d_t`` on the inputs ``a_t``, ``B_e`` with output gradients ``d_t`` on the inputs ``s A_e a_t``
(``B`` ``(out, r E)`` interleaves the experts); the names claimed then depend on the adapter
(:meth:`Block.claims`). One active, unmerged adapter without bias is read; anything else is declined.

Accepted only where the structure is the one described: a router ``gate`` (PhiMoE: ``router``) with a
2-D ``weight`` ``(E, H)``, ``H >= E``, callable with the hidden states alone, returning ``(logits,
weights, indices)``; experts decorated by transformers' ``use_experts_implementation`` with a gate,
``[gate; up]`` concatenated, no biases, not transposed, no post-expert norm, and exactly the two fused
parameters. Each call is declined (its parameters take the ``torch.func`` fallback) if the router
cannot be driven by the replay (it raises, or gives indices outside ``[0, E)``) or the replay of its
post-processing on its own logits does not reproduce its weights and indices. That the logits are the
router's linear map of the input, and that the layer combines the experts as described, is left to the
engine's check against autograd (a failure there takes the whole model to the vmapped Jacobian: e.g.
Laguna, which scales the experts' sum). Anything else in the MoE layer's forward (a shared expert, its
gate) is hooked as its own layers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from overunlearn.linalg.blocks.attention import _Map
from overunlearn.linalg.blocks.base import Block, Budget, Decline, count, first_input, register_block


def _router(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The MoE layer's router and its attribute: ``gate`` (Mixtral, Qwen) or ``router`` (PhiMoE)."""
    found = [(name, m) for name in ("gate", "router") if (m := module._modules.get(name)) is not None]
    return found[0] if len(found) == 1 else None


def _unwrap(m: nn.Module) -> tuple[nn.Module, str, dict[str, tuple[str, nn.Module]]]:
    """``m`` below peft's ``ParamWrapper`` LoRA wrappers (one per adapted parameter, nested): the wrapped
    module, its path below ``m`` (``"base_layer.base_layer."``), and the wrappers by the parameter they adapt,
    with their paths."""
    wrappers: dict[str, tuple[str, nn.Module]] = {}
    path = ""
    while type(m).__name__ == "ParamWrapper" and isinstance(getattr(m, "base_layer", None), nn.Module):
        wrappers[m.parameter_name] = (path, m)
        path += "base_layer."
        m = m.base_layer
    return m, path, wrappers


@dataclass(frozen=True)
class _Lora:
    """The one active adapter of a peft ``ParamWrapper``: ``delta = scaling * B A`` (per expert for 3-D
    parameters: ``A`` ``(E r, in)``, ``B`` ``(out, r E)``)."""

    path: str  # the wrapper's path in the MoE layer ("experts.", "experts.base_layer.", "gate.")
    wrapper: nn.Module
    adapter: str

    @property
    def a(self) -> Tensor:
        return self.wrapper.lora_A[self.adapter].weight

    @property
    def b(self) -> Tensor:
        return self.wrapper.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.wrapper.scaling[self.adapter])

    def names(self) -> tuple[str, str]:
        return f"{self.path}lora_A.{self.adapter}.weight", f"{self.path}lora_B.{self.adapter}.weight"


def _lora(path: str, wrapper: nn.Module) -> _Lora | None:
    """The wrapper's adapter if it is one plain active LoRA (no bias, not merged, adapters enabled)."""
    active = [a for a in getattr(wrapper, "active_adapters", []) if a in getattr(wrapper, "lora_A", {})]
    if len(active) != 1 or getattr(wrapper, "merged", True) or getattr(wrapper, "disable_adapters", True):
        return None
    a = active[0]
    la, lb = wrapper.lora_A[a], wrapper.lora_B[a]
    if not (isinstance(la, nn.Linear) and isinstance(lb, nn.Linear)) or la.bias is not None or lb.bias is not None:
        return None
    return _Lora(path, wrapper, a)


@dataclass(frozen=True)
class _Layout:
    """Where a MoE layer's parameters are: the router (maybe under a LoRA wrapper), the experts (maybe under
    one wrapper per fused weight), and the claimed parameter names."""

    router: nn.Module  # the module the layer calls (the wrapper, if any)
    router_base: nn.Module
    router_weight: str  # "gate.weight", "gate.base_layer.weight", "router.weight"
    router_lora: _Lora | None
    experts: nn.Module  # the module under the wrappers
    experts_path: str  # "experts.", "experts.base_layer.base_layer."
    expert_lora: dict[str, _Lora]  # by fused weight ("gate_up_proj", "down_proj")

    def names(self) -> tuple[str, ...]:
        out = [self.router_weight, f"{self.experts_path}gate_up_proj", f"{self.experts_path}down_proj"]
        for lora in (self.router_lora, *self.expert_lora.values()):
            if lora is not None:
                out.extend(lora.names())
        return tuple(out)


def _layout(module: nn.Module, plain: bool = True) -> _Layout | None:
    """The layer's :class:`_Layout`, or ``None`` where it is not the structure the block describes (with
    ``plain``: also where one of its modules has hooks or parametrizations, checked before the engine
    hooks the layer)."""
    found, experts_outer = _router(module), module._modules.get("experts")
    if found is None or experts_outer is None:
        return None
    name, router = found
    router_base, rpath, rwrap = _unwrap(router)
    experts, epath, ewrap = _unwrap(experts_outer)
    if set(rwrap) - {"weight"} or set(ewrap) - {"gate_up_proj", "down_proj"}:
        return None
    loras = {k: _lora(f"experts.{p}", w) for k, (p, w) in ewrap.items()}
    router_lora = _lora(f"{name}.{rwrap['weight'][0]}", rwrap["weight"][1]) if rwrap else None
    if any(v is None for v in loras.values()) or (rwrap and router_lora is None):
        return None
    modules = (module, router, router_base, experts_outer, experts, *(w for _, w in (*rwrap.values(), *ewrap.values())),
               *(m for lora in (router_lora, *loras.values()) if lora is not None
                 for m in (lora.wrapper.lora_A[lora.adapter], lora.wrapper.lora_B[lora.adapter])))
    if plain and not all(_plain(m) for m in modules):
        return None
    return _Layout(router, router_base, f"{name}.{rpath}weight", router_lora, experts, f"experts.{epath}",
                   loras)  # type: ignore[arg-type]


def _one_input(m: nn.Module) -> bool:
    """Whether ``m``'s forward can be called with the hidden states alone (MiniMax-M2's and DeepSeek-V4's
    routers also take a correction bias or the token ids)."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [q for q in params if q.default is q.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1


def _plain(m: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return not m._forward_hooks and not m._forward_pre_hooks and not parametrize.is_parametrized(m)


def _padded(count: Tensor) -> Tensor:
    """The lengths samples' token ``count`` s are padded to when an expert's rows are formed in batches:
    counts up to 8 as they are, larger ones rounded up to a quarter of their power of two (at most a
    quarter more products). Samples then fall into few groups of one length each, so that an expert costs
    a few batched products instead of one per sample and score (on a GPU, each one a kernel launch)."""
    bits = torch.frexp(count.double())[1].long()  # (the bit length of each count)
    step = torch.pow(2, (bits - 3).clamp_min(0))
    return torch.where(count <= 8, count, (count + step - 1) // step * step)


def _batched_rows(device: torch.device) -> bool:
    """Whether an expert's rows are formed by batched products over groups of samples (:class:`_Groups`)
    rather than one small product per sample and score: on a GPU, where each product is a kernel launch,
    yes; on a CPU no -- there ``bmm`` over a few samples of ~16 tokens each runs 2.5-4x slower than the
    loop of ``mm`` it replaces (docs/performance.md, "Mixtures of experts on blocks")."""
    return device.type != "cpu"


class _Groups:
    """One expert's tokens by sample (``sample``: each routed token's sample, ascending) for ``heads`` scores
    per sample, and, made on first use, the samples grouped by padded token count (:func:`_padded`): per
    group its Jacobian rows ``(heads g,)``, each sample's token positions ``(g, L)`` (padding: position 0)
    and the same positions with padding at ``m`` (for inputs with a zero row appended). Shared by the
    expert's weights (and their LoRA factors), whose tokens are the same."""

    def __init__(self, sample: Tensor, n: int, heads: int) -> None:
        self.sample, self.n, self.heads, self.m = sample, n, heads, sample.numel()
        self._made: tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor] | None = None
        self._segments: list[tuple[int, int]] | None = None

    def segments(self) -> list[tuple[int, int]]:
        """Each sample's tokens, ``(start, end)``."""
        if self._segments is None:
            counts = torch.bincount(self.sample, minlength=self.n).tolist()
            ends = torch.tensor(counts).cumsum(0).tolist()
            self._segments = [(end - c, end) for c, end in zip(counts, ends)]
        return self._segments

    def made(self) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
        """``(groups, rows of samples with no token)``."""
        if self._made is None:
            dev = self.sample.device
            counts = torch.bincount(self.sample, minlength=self.n)
            start = counts.cumsum(0) - counts
            length = _padded(counts)
            order = torch.argsort(length, stable=True)
            lengths, sizes = (t.tolist() for t in torch.unique_consecutive(length[order], return_counts=True))
            heads = torch.arange(self.heads, device=dev)[:, None] * self.n
            groups, empty, at = [], torch.zeros(0, dtype=torch.long, device=dev), 0
            for size, ln in zip(sizes, lengths):
                ids = order[at : at + size]
                at += size
                if ln == 0:
                    empty = (heads + ids).reshape(-1)
                    continue
                pos = torch.arange(ln, device=dev)
                tok = start[ids, None] + pos
                real = pos < counts[ids, None]
                groups.append(((heads + ids).reshape(-1), tok.where(real, 0), tok.where(real, self.m)))
            self._made = (groups, empty)
        return self._made


class _Tokens:
    """A linear map applied to a varying number of tokens per sample (an expert's): inputs ``a`` ``(m, p)``
    of the ``m`` tokens routed to it, grouped by sample (:class:`_Groups`), and output gradients ``(heads,
    m, o)`` -- token ``t``'s in head ``h`` belongs to Jacobian row ``h n + sample[t]``. Row ``r`` of the
    weight is ``sum_{t in r} d_t a_t^T``. Tokens are kept unpadded; formed rows pad each sample only to
    its group's length on a GPU (:func:`_batched_rows`), not to the largest count (random routers send up
    to 4x the mean of a sample's tokens to one expert)."""

    def __init__(self, weight: Tensor, a: Tensor, groups: _Groups) -> None:
        self.weight, self.a, self.groups = weight, a, groups
        self.sample, self.n = groups.sample, groups.n
        self._padded_a: list[Tensor] | None = None

    def bind(self, d: Tensor) -> None:
        heads = self.heads = self.groups.heads
        self.d, self.k = d, heads * self.n
        # each (head, token) pair's Jacobian row
        self.row = (torch.arange(heads, device=d.device)[:, None] * self.n + self.sample[None]).reshape(-1)

    def ghost_cheaper(self, budget: Budget) -> bool:
        m, o, p = self.a.shape[0], self.d.shape[2], self.a.shape[1]
        return budget.positional(self.n, self.heads, o, p, max(1, -(-m // self.n)))

    def ghost(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(J J^T, J v)``: ``sum_{t in r, t' in s} (d_t . d_t') (a_t . a_t')``, summed into rows by index."""
        heads, m, o = self.d.shape
        dd = self.d.reshape(heads * m, o).double()
        aa = self.a.double()
        g_a = aa @ aa.T
        pair = (dd @ dd.T) * (g_a.repeat(heads, heads) if heads > 1 else g_a)
        gram = torch.zeros(self.k, heads * m, dtype=torch.float64, device=dd.device).index_add_(0, self.row, pair)
        gram = torch.zeros(self.k, self.k, dtype=torch.float64, device=dd.device).index_add_(1, self.row, gram)
        y = aa @ v.double().T  # (m, o): this weight's outputs
        per = (dd.view(heads, m, o) * y).sum(-1).reshape(-1)
        rhs = torch.zeros(self.k, dtype=torch.float64, device=dd.device).index_add_(0, self.row, per)
        return gram, rhs

    def rows(self, index: Tensor | slice, out: Tensor) -> None:
        """Write the rows of the weight's output slices ``index`` into ``out`` ``(k, c, p)``."""
        d = self.d[:, :, index]  # (heads, m, c)
        if not _batched_rows(d.device):
            for h in range(self.heads):
                for i, (s, e) in enumerate(self.groups.segments()):
                    if e > s:
                        torch.mm(d[h, s:e].T, self.a[s:e], out=out[h * self.n + i])
                    else:
                        out[h * self.n + i].zero_()  # (no token of this sample reaches the expert)
            return
        # one batched product per group of samples of one padded length (padding: zero inputs)
        groups, empty = self.groups.made()
        if self._padded_a is None:
            a = torch.cat([self.a, self.a.new_zeros(1, self.a.shape[1])])
            self._padded_a = [a[at] for _, _, at in groups]
        for (rows, tok, _), a in zip(groups, self._padded_a):
            prod = torch.matmul(d[:, tok].transpose(-1, -2), a)  # (heads, g, c, p)
            out.index_copy_(0, rows, prod.reshape(-1, *prod.shape[2:]))
        if empty.numel():
            out.index_fill_(0, empty, 0)  # (samples none of whose tokens reach the expert)

    def back(self, alpha: Tensor) -> Tensor:
        """``J^T alpha`` in the weight's shape: ``(sum_h alpha_{h n + sample[t]} d_{h,t})^T a``."""
        heads, m, o = self.d.shape
        scaled = self.d * alpha.to(self.d.dtype)[self.row].view(heads, m, 1)
        return (scaled.sum(0).T @ self.a).to(self.weight.dtype)

    def back_flops(self) -> int:
        return self.a.shape[0] * self.weight.numel()


class _PerExpert:
    """A parameter made of one :class:`_Tokens` map's weight per expert (``maps``: by expert; experts no token
    reaches have none), viewed as ``shape``; subclasses say where expert ``e``'s weight lies (:meth:`_of`)."""

    def __init__(self, maps: dict[int, _Tokens], shape: tuple[int, int, int]) -> None:
        self.maps, self.shape = maps, shape

    def _of(self, t: Tensor, e: int) -> Tensor:
        """Expert ``e``'s part of ``t`` (a tensor of ``shape``), a view."""
        raise NotImplementedError

    def ghost_cheaper(self, budget: Budget) -> bool:
        return bool(self.maps) and all(mp.ghost_cheaper(budget) for mp in self.maps.values())

    def ghost(self, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
        v = v.reshape(self.shape)
        gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
        rhs = torch.zeros(k, dtype=torch.float64, device=v.device)
        for e, mp in self.maps.items():  # (the experts' weights are disjoint coordinates: their Grams add)
            g, r = mp.ghost(self._of(v, e))
            gram += g
            rhs += r
        return gram, rhs

    def back(self, alpha: Tensor, like: Tensor) -> Tensor:
        out = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        for e, mp in self.maps.items():
            self._of(out, e).copy_(mp.back(alpha))
        return out.reshape(like.shape)

    def back_flops(self) -> int:
        return sum(mp.back_flops() for mp in self.maps.values())


class _Stacked(_PerExpert):
    """A parameter ``(E, o, p)`` whose expert ``e`` slice ``[e]`` is one map's weight: the fused expert weights,
    and a 3-D LoRA's ``A`` viewed as ``(E, r, p)``. Rows by output row of each expert (:meth:`Block.units`:
    a slice of rows stays small however large one expert is)."""

    def _of(self, t: Tensor, e: int) -> Tensor:
        return t[e]

    def support(self, device: torch.device) -> Tensor | None:
        o = self.shape[1]
        used = torch.tensor(sorted(self.maps), dtype=torch.long, device=device)
        return (used[:, None] * o + torch.arange(o, device=device)).reshape(-1)

    def rows(self, index: Tensor | slice, out: Tensor) -> Tensor:
        """Into ``out`` ``(k, len(index), p)``: the rows of the output-row slices ``index`` (of ``E o``)."""
        experts, o, _ = self.shape
        if isinstance(index, slice):
            index = torch.arange(*index.indices(experts * o), device=out.device)
        owner = torch.div(index, o, rounding_mode="floor")
        at = 0
        for e, size in zip(*torch.unique_consecutive(owner, return_counts=True)):
            e, size = int(e), int(size)
            if e in self.maps:
                self.maps[e].rows(index[at : at + size] - e * o, out[:, at : at + size])
            else:
                out[:, at : at + size].zero_()
            at += size
        return out


class _Interleaved(_PerExpert):
    """A 3-D LoRA's ``B`` ``(o, r E)``, viewed ``(o, r, E)``: expert ``e``'s ``(o, r)`` weight is ``[:, :, e]``."""

    def _of(self, t: Tensor, e: int) -> Tensor:
        return t[:, :, e]

    def support(self, device: torch.device) -> Tensor | None:
        return None

    def rows(self, index: Tensor | slice, out: Tensor) -> Tensor:
        """Into ``out`` ``(k, len(index), r E)``: the rows of output rows ``index``."""
        o, r, experts = self.shape
        full = out.view(out.shape[0], out.shape[1], r, experts)
        full.zero_()
        part = torch.empty(out.shape[0], out.shape[1], r, dtype=out.dtype, device=out.device)
        for e, mp in self.maps.items():
            mp.rows(index, part)
            full[:, :, :, e] = part
        return out


class _Single:
    """A 2-D parameter that is one linear map at every position (the router's weight and its LoRA factors)."""

    def __init__(self, mp: _Map) -> None:
        self.mp = mp

    def support(self, device: torch.device) -> Tensor | None:
        return None

    def ghost_cheaper(self, budget: Budget) -> bool:
        return self.mp.ghost_cheaper("weight", budget)

    def ghost(self, v: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.mp.ghost("weight", v)

    def rows(self, index: Tensor | slice, out: Tensor) -> Tensor:
        out.view(out.shape[0], -1).copy_(self.mp.rows("weight", index))
        return out

    def back(self, alpha: Tensor, like: Tensor) -> Tensor:
        return self.mp.back("weight", alpha).reshape(like.shape)

    def back_flops(self) -> int:
        return self.mp.back_flops("weight")


def _expert_parts(name: str, weight: Tensor, lora: _Lora | None, a: dict[int, Tensor], d: dict[int, Tensor],
                  groups: dict[int, _Groups], want: set[str]) -> dict[str, Any]:
    """The parts of one fused expert weight ``(E, o, p)`` (effective: ``W + s B A`` under LoRA) given each
    expert's inputs ``a[e]`` ``(m, p)`` and output gradients ``d[e]`` ``(heads, m, o)``."""
    experts, o, p = weight.shape
    parts: dict[str, Any] = {}

    def maps(w_of, a_of, d_of) -> dict[int, _Tokens]:
        out = {}
        for e in a:
            out[e] = _Tokens(w_of(e), a_of(e), groups[e])
            out[e].bind(d_of(e))
        return out

    if name in want:
        parts[name] = _Stacked(maps(lambda e: weight[e], lambda e: a[e], lambda e: d[e]), (experts, o, p))
    if lora is not None:
        name_a, name_b = lora.names()
        s = lora.scaling
        la = lora.a.detach().view(experts, -1, p)  # (E, r, p)
        lb = lora.b.detach().view(o, -1, experts)  # (o, r, E)
        r, dt = la.shape[1], la.dtype  # (in the adapter's dtype: peft keeps float32 adapters on a float16 model)
        if name_a in want:  # rows of A_e: output gradients s B_e^T d, inputs a
            parts[name_a] = _Stacked(maps(lambda e: la[e], lambda e: a[e].to(dt), lambda e: s * d[e].to(dt) @ lb[:, :, e]),
                                     (experts, r, p))
        if name_b in want:  # rows of B_e: output gradients d, inputs s A_e a
            parts[name_b] = _Interleaved(maps(lambda e: lb[:, :, e], lambda e: s * a[e].to(dt) @ la[e].T,
                                              lambda e: d[e].to(dt)), (o, r, experts))
    return parts


@register_block("transformers.models.*SparseMoeBlock")
class SparseMoEBlock(Block):
    param_names = ()  # (by module: :meth:`claims`)

    @classmethod
    def claims(cls, module: nn.Module) -> tuple[str, ...]:
        layout = _layout(module, plain=False)
        return () if layout is None else layout.names()

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        layout = _layout(module)
        if layout is None:
            return False
        w = layout.router_base._parameters.get("weight")
        experts = layout.experts
        gu, dn = experts._parameters.get("gate_up_proj"), experts._parameters.get("down_proj")
        if not (isinstance(w, nn.Parameter) and isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter)):
            return False
        if set(experts._parameters) != {"gate_up_proj", "down_proj"} or w.dim() != 2 or gu.dim() != 3 or dn.dim() != 3:
            return False
        e, h = w.shape
        i = dn.shape[2]
        return (h >= e and tuple(gu.shape) == (e, 2 * i, h) and tuple(dn.shape) == (e, h, i)
                and getattr(experts, "has_gate", False) is True and getattr(experts, "has_bias", True) is False
                and getattr(experts, "is_transposed", True) is False
                and getattr(experts, "is_concatenated", False) is True
                # (transformers before 5.25 has no such flag and no post-expert norm; a norm the flag does not
                # announce would fail the engine's check against autograd)
                and getattr(experts, "has_post_expert_norm", False) is False
                and callable(getattr(experts, "_apply_gate", None)) and _one_input(layout.router_base))

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "hidden_states")
        if x.dim() != 3 or not isinstance(output, Tensor) or output.shape != x.shape or torch.is_autocast_enabled():
            raise Decline
        if module.training and getattr(module, "jitter_noise", 0):
            raise Decline  # (the engine runs the model in eval mode; a block used otherwise declines)
        layout = _layout(module, plain=False)  # (accepted before the engine hooked it)
        if layout is None:
            raise Decline
        self.layout = layout
        # the router's mode in this call: the replays in bind (after the engine's eval-mode forward) use it too
        self.modes = [m.training for m in layout.router_base.modules()]
        n, length, h = x.shape
        self.x, self.in_dtype = x.detach(), x.dtype
        e = layout.router_base.weight.shape[0]
        t = n * length
        try:
            with torch.no_grad():
                routed = self._route(self.x.reshape(-1, h))
                if not (isinstance(routed, tuple) and len(routed) == 3 and all(isinstance(q, Tensor) for q in routed)):
                    raise Decline
                logits, weights, index = routed
                if (logits.shape != (t, e) or weights.dim() != 2 or weights.shape[0] != t
                        or index.shape != weights.shape or index.dtype not in (torch.int32, torch.int64)
                        or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= e))):
                    raise Decline  # (an index outside the experts: e.g. a "no expert" sentinel)
                # the replay of the router's post-processing on these logits reproduces its routing (that
                # the logits are the linear map of the input is the engine's check against autograd's)
                again = self._replay(logits)
                if (not torch.equal(again[2], index) or again[1].dtype != weights.dtype
                        or not torch.allclose(again[1], weights, rtol=1e-6, atol=0)):
                    raise Decline
        except Decline:
            raise
        except Exception:  # noqa: BLE001 - a router this replay cannot drive: the layer takes the fallback
            raise Decline from None
        self.logits, self.weights, self.index = logits, weights, index
        self.output, self.batch, self.saved = output, n, [x]

    def _route(self, x: Tensor) -> tuple:
        """The router's call on ``x``, with its LoRA delta under peft: through ``functional_call`` on the wrapped
        router, not by running peft's wrapper again (which swaps the parameter it adapts)."""
        base = self.layout.router_base
        lora = self.layout.router_lora
        if lora is None:
            return base(x)
        w = base.weight + lora.wrapper.get_delta_weight(lora.adapter).to(base.weight.dtype)
        return torch.func.functional_call(base, {"weight": w}, (x,))

    def _replay(self, z: Tensor) -> tuple:
        """The router's call on logits ``z`` ``(T, E)``: weight ``[I_E | 0]``, input ``[z | 0]``, in the
        mode of the layer's call (PhiMoE's router samples its experts in training mode)."""
        gate = self.layout.router_base
        e, h = gate.weight.shape
        eye = torch.eye(e, h, dtype=gate.weight.dtype, device=gate.weight.device)
        modules = list(gate.modules())
        before = [m.training for m in modules]
        try:
            for m, mode in zip(modules, self.modes):
                m.training = mode
            # (the input in the layer's dtype: a router may return its logits in float32)
            return torch.func.functional_call(gate, {"weight": eye}, (F.pad(z.to(self.in_dtype), (0, h - e)),))
        finally:
            for m, mode in zip(modules, before):
                m.training = mode

    # ---- the recomputation ----------------------------------------------------------------------

    def _effective(self, name: str) -> Tensor:
        """A fused expert weight as the layer uses it: plus its LoRA delta under peft."""
        w = self.layout.experts._parameters[name].detach()
        lora = self.layout.expert_lora.get(name)
        if lora is None:
            return w
        with torch.no_grad():
            return w + lora.wrapper.get_delta_weight(lora.adapter).to(w.dtype)

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        super().bind(deltas, n, heads)
        layout = self.layout
        experts = layout.experts
        want = {name for name, _ in self.parameters()}
        k, length, h = deltas.shape
        tokens = n * length
        x = self.x.reshape(tokens, h)
        # the output gradients by head and token: token t (sample t // L) of head h belongs to row h n + t // L
        d_tok = deltas.view(heads, tokens, h)
        w_gu, w_d = self._effective("gate_up_proj"), self._effective("down_proj")
        gu_names = {f"{layout.experts_path}gate_up_proj", *(layout.expert_lora["gate_up_proj"].names()
                                                            if "gate_up_proj" in layout.expert_lora else ())}
        router_names = {layout.router_weight, *(layout.router_lora.names() if layout.router_lora else ())}
        want_gu, want_router = bool(want & gu_names), bool(want & router_names)
        top = self.index.shape[1]
        d_weights = torch.zeros(heads, tokens, top, dtype=deltas.dtype, device=deltas.device) if want_router else None
        a_in, a_mid, d_pre, g_up, sample = {}, {}, {}, {}, {}
        for e in torch.unique(self.index).tolist():
            tok, choice = torch.nonzero(self.index == e, as_tuple=True)  # (ascending tokens: grouped by sample)
            sample[e] = torch.div(tok, length, rounding_mode="floor")
            a_in[e] = x[tok]  # (m, H)
            scale = self.weights[tok, choice].to(x.dtype)[None, :, None]  # w_{t,e}
            d_out = d_tok[:, tok]  # (heads, m, H): D_{r,t}
            back = d_out @ w_d[e]  # (heads, m, I): W_d[e]^T D_{r,t}
            with torch.no_grad():
                pre = a_in[e] @ w_gu[e].T  # (m, 2I)
            with torch.enable_grad():
                leaf = pre.requires_grad_(True)
                act = experts._apply_gate(leaf)  # (m, I)
                if want_gu:
                    g = back * scale
                    d_pre[e] = torch.stack([torch.autograd.grad(act, leaf, grad_outputs=g[j],
                                                                retain_graph=j + 1 < heads)[0] for j in range(heads)])
            a_mid[e] = act.detach()
            g_up[e] = d_out * scale
            if d_weights is not None:
                # the routing weight's gradient: D_{r,t} . y_{t,e} = (W_d[e]^T D_{r,t}) . g(W_gu[e] x_t)
                d_weights[:, tok, choice] = (back * a_mid[e]).sum(-1)
        self.parts: dict[str, Any] = {}
        ep = layout.experts_path
        groups = {e: _Groups(sample[e], n, heads) for e in sample}
        self.parts.update(_expert_parts(f"{ep}down_proj", w_d, layout.expert_lora.get("down_proj"), a_mid, g_up,
                                        groups, want))
        if want_gu:
            self.parts.update(_expert_parts(f"{ep}gate_up_proj", w_gu, layout.expert_lora.get("gate_up_proj"), a_in,
                                            d_pre, groups, want))
        if d_weights is not None:
            e_all = self.logits.shape[1]
            with torch.enable_grad():
                z = self.logits.repeat(heads, 1).requires_grad_(True)  # (heads T, E)
                scores = self._replay(z)[1]
                dz = torch.autograd.grad(scores, z, grad_outputs=d_weights.reshape(heads * tokens, top).to(scores.dtype),
                                         allow_unused=True)[0] if scores.requires_grad else None
            if dz is None:  # (routing weights that do not depend on the logits)
                dz = torch.zeros_like(z)
            dz = dz.view(k, length, e_all).to(x.dtype)
            self._router_parts(dz, n, heads, want)
        self.deltas = None
        self.x = self.logits = self.weights = self.index = None  # type: ignore[assignment]

    def _router_parts(self, dz: Tensor, n: int, heads: int, want: set[str]) -> None:
        """The router's weight: a linear map at every position with output gradients ``dz``; under LoRA its
        factors ``A`` (output gradients ``s dz B``) and ``B`` (inputs ``s A x``)."""
        layout = self.layout

        def single(weight: Tensor, a: Tensor, d: Tensor) -> _Single:
            mp = _Map(weight, None, a)
            mp.bind(d, n, heads)
            return _Single(mp)

        if layout.router_weight in want:
            self.parts[layout.router_weight] = single(layout.router_base.weight.detach(), self.x, dz)
        lora = layout.router_lora
        if lora is not None:
            name_a, name_b = lora.names()
            la, lb, s = lora.a.detach(), lora.b.detach(), lora.scaling
            x, dz = self.x.to(la.dtype), dz.to(la.dtype)
            if name_a in want:
                self.parts[name_a] = single(la, x, s * dz @ lb)
            if name_b in want:
                self.parts[name_b] = single(lb, s * x @ la.T, dz)

    # ---- the algebra: each parameter one part (see _Stacked, _Interleaved, _Single) ------------------

    def units(self, name: str) -> int | None:
        p = self.module.get_parameter(name)
        return p.shape[0] * p.shape[1] if p.dim() == 3 else None  # (fused experts: by output row of each expert)

    def support(self, name: str) -> Tensor | None:
        return self.parts[name].support(self._device)

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        return self.parts[name].ghost_cheaper(budget)

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.parts[name].ghost(v, self.k)

    def rows(self, name: str, index: Tensor | slice, scratch: Tensor | None = None) -> Tensor:
        part = self.parts[name]
        p = self.module.get_parameter(name)
        unit = self.units(name) or (p.shape[0] if p.dim() else 1)
        width = p.numel() // unit
        c = count(index, unit)
        if scratch is not None and scratch.numel() >= self.k * c * width and scratch.dtype == p.dtype:
            out = scratch[: self.k * c * width].view(self.k, c, width)
        else:
            out = torch.empty(self.k, c, width, dtype=p.dtype, device=p.device)
        return part.rows(index, out).view(self.k, -1)

    def back(self, name: str, alpha: Tensor) -> Tensor:
        p = self.module.get_parameter(name)
        return self.parts[name].back(alpha, p).to(p.dtype)

    def back_flops(self, name: str) -> int:
        return self.parts[name].back_flops()
