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

Each expert's map (:class:`_Tokens`) keeps only the tokens routed to it, grouped by sample, with no
padding; it takes the ghost form or formed rows by the engine's flop rule, as a linear layer's. Its rows
are formed in slices of output rows (:meth:`Block.units`), so a slice stays small however large one
expert is; experts that no token of the batch reaches have zero rows and are skipped
(:meth:`Block.support`). The router is a linear map at every position (``attention._Map``).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from overunlearn.linalg.blocks.attention import _Map
from overunlearn.linalg.blocks.base import Block, Budget, Decline, count, first_input, register_block

_EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


def _router(module: nn.Module) -> nn.Module | None:
    """The MoE layer's router: its submodule ``gate`` (Mixtral, Qwen) or ``router`` (PhiMoE)."""
    found = [m for name in ("gate", "router") if (m := module._modules.get(name)) is not None]
    return found[0] if len(found) == 1 else None


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


class _Tokens:
    """A linear map applied to a varying number of tokens per sample (an expert's): inputs ``a`` ``(m, p)``
    of the ``m`` tokens routed to it, grouped by sample (``sample``: each token's sample, ascending), and
    output gradients ``(heads, m, o)`` -- token ``t``'s in head ``h`` belongs to Jacobian row
    ``h n + sample[t]``. Row ``r`` of the weight is ``sum_{t in r} d_t a_t^T``: no padding to the largest
    count (random routers send up to 4x the mean of a sample's tokens to one expert)."""

    def __init__(self, weight: Tensor, a: Tensor, sample: Tensor, n: int) -> None:
        self.weight, self.a, self.n = weight, a, n
        counts = torch.bincount(sample, minlength=n).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        self.segments = [(end - c, end) for c, end in zip(counts, ends)]
        self.sample = sample

    def bind(self, d: Tensor, heads: int) -> None:
        self.d, self.heads, self.k = d, heads, heads * self.n
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
        d = self.d[:, :, index]
        for h in range(self.heads):
            for i, (s, e) in enumerate(self.segments):
                if e > s:
                    torch.mm(d[h, s:e].T, self.a[s:e], out=out[h * self.n + i])
                else:
                    out[h * self.n + i].zero_()  # (no token of this sample reaches the expert)

    def back(self, alpha: Tensor) -> Tensor:
        """``J^T alpha`` in the weight's shape: ``(sum_h alpha_{h n + sample[t]} d_{h,t})^T a``."""
        heads, m, o = self.d.shape
        scaled = self.d * alpha.to(self.d.dtype)[self.row].view(heads, m, 1)
        return (scaled.sum(0).T @ self.a).to(self.weight.dtype)

    def back_flops(self) -> int:
        return self.a.shape[0] * self.weight.numel()


@register_block("transformers.models.*SparseMoeBlock")
class SparseMoEBlock(Block):
    param_names = ("gate.weight", "router.weight", *_EXPERT_PARAMS)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        gate, experts = _router(module), module._modules.get("experts")
        if gate is None or experts is None or not all(_plain(m) for m in (module, gate, experts)):
            return False
        w = gate._parameters.get("weight")
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
                and getattr(experts, "has_post_expert_norm", True) is False
                and callable(getattr(experts, "_apply_gate", None)) and _one_input(gate))

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        super().__init__(module, args, kwargs, output)
        x = first_input(args, kwargs, "hidden_states")
        if x.dim() != 3 or not isinstance(output, Tensor) or output.shape != x.shape or torch.is_autocast_enabled():
            raise Decline
        if module.training and getattr(module, "jitter_noise", 0):
            raise Decline  # (the engine runs the model in eval mode; a block used otherwise declines)
        gate = _router(module)
        assert gate is not None
        self.gate_name = "gate.weight" if gate is module._modules.get("gate") else "router.weight"
        # the router's mode in this call: the replays in bind (after the engine's eval-mode forward) use it too
        self.modes = [m.training for m in gate.modules()]
        n, length, h = x.shape
        self.x, self.in_dtype = x.detach(), x.dtype
        e = gate.weight.shape[0]
        t = n * length
        try:
            with torch.no_grad():
                routed = gate(self.x.reshape(-1, h))
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

    def _replay(self, z: Tensor) -> tuple:
        """The router's call on logits ``z`` ``(T, E)``: weight ``[I_E | 0]``, input ``[z | 0]``, in the
        mode of the layer's call (PhiMoE's router samples its experts in training mode)."""
        gate = _router(self.module)
        assert gate is not None
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

    def bind(self, deltas: Tensor, n: int, heads: int) -> None:
        super().bind(deltas, n, heads)
        experts: nn.Module = self.module.experts  # type: ignore[assignment]
        names = {name for name, _ in self.parameters()}
        k, length, h = deltas.shape
        tokens = n * length
        x = self.x.reshape(tokens, h)
        # the output gradients by head and token: token t (sample t // L) of head h belongs to row h n + t // L
        d_tok = deltas.view(heads, tokens, h)
        w_gu, w_d = experts.gate_up_proj.detach(), experts.down_proj.detach()
        want_router = self.gate_name in names
        top = self.index.shape[1]
        d_weights = torch.zeros(heads, tokens, top, dtype=deltas.dtype, device=deltas.device) if want_router else None
        self.down: dict[int, _Tokens] = {}
        self.gate_up: dict[int, _Tokens] = {}
        for e in torch.unique(self.index).tolist():
            tok, choice = torch.nonzero(self.index == e, as_tuple=True)  # (ascending tokens: grouped by sample)
            sample = torch.div(tok, length, rounding_mode="floor")
            a_in = x[tok]  # (m, H)
            scale = self.weights[tok, choice].to(x.dtype)[None, :, None]  # w_{t,e}
            d_out = d_tok[:, tok]  # (heads, m, H): D_{r,t}
            back = d_out @ w_d[e]  # (heads, m, I): W_d[e]^T D_{r,t}
            with torch.no_grad():
                pre = a_in @ w_gu[e].T  # (m, 2I)
            with torch.enable_grad():
                leaf = pre.requires_grad_(True)
                act = experts._apply_gate(leaf)  # (m, I)
                d_pre = None
                if "experts.gate_up_proj" in names:
                    g = back * scale
                    d_pre = torch.stack([torch.autograd.grad(act, leaf, grad_outputs=g[j], retain_graph=j + 1 < heads)[0]
                                         for j in range(heads)])
            a_mid = act.detach()
            if "experts.down_proj" in names:
                self.down[e] = _Tokens(w_d[e], a_mid, sample, n)
                self.down[e].bind(d_out * scale, heads)
            if d_pre is not None:
                self.gate_up[e] = _Tokens(w_gu[e], a_in, sample, n)
                self.gate_up[e].bind(d_pre, heads)
            if d_weights is not None:
                # the routing weight's gradient: D_{r,t} . y_{t,e} = (W_d[e]^T D_{r,t}) . g(W_gu[e] x_t)
                d_weights[:, tok, choice] = (back * a_mid).sum(-1)
        self.router: _Map | None = None
        if d_weights is not None:
            e_all = self.logits.shape[1]
            with torch.enable_grad():
                z = self.logits.repeat(heads, 1).requires_grad_(True)  # (heads T, E)
                scores = self._replay(z)[1]
                dz = torch.autograd.grad(scores, z, grad_outputs=d_weights.reshape(heads * tokens, top).to(scores.dtype),
                                         allow_unused=True)[0] if scores.requires_grad else None
            if dz is None:  # (routing weights that do not depend on the logits)
                dz = torch.zeros_like(z)
            gate_w = self.module.get_parameter(self.gate_name).detach()
            self.router = _Map(gate_w, None, self.x)
            self.router.bind(dz.view(k, length, e_all).to(x.dtype), n, heads)
        self.deltas = None
        self.x = self.logits = self.weights = self.index = None  # type: ignore[assignment]

    # ---- the algebra: the router as one map, each expert parameter as one map per expert ----------

    def _maps(self, name: str) -> dict[int, _Tokens]:
        return self.gate_up if name == "experts.gate_up_proj" else self.down

    def units(self, name: str) -> int | None:
        if name == self.gate_name:
            return None
        p = self.module.get_parameter(name)
        return p.shape[0] * p.shape[1]  # (rows by output row of each expert: slices of a few MiB)

    def support(self, name: str) -> Tensor | None:
        if name == self.gate_name:
            return None
        o = self.module.get_parameter(name).shape[1]
        used = torch.tensor(sorted(self._maps(name)), dtype=torch.long, device=self._device)
        return (used[:, None] * o + torch.arange(o, device=self._device)).reshape(-1)

    def ghost_cheaper(self, name: str, budget: Budget) -> bool:
        if name == self.gate_name:
            return self.router is not None and self.router.ghost_cheaper("weight", budget)
        maps = self._maps(name)
        return bool(maps) and all(mp.ghost_cheaper(budget) for mp in maps.values())

    def ghost(self, name: str, v: Tensor) -> tuple[Tensor, Tensor]:
        if name == self.gate_name:
            assert self.router is not None
            return self.router.ghost("weight", v)
        gram = torch.zeros(self.k, self.k, dtype=torch.float64, device=self._device)
        rhs = torch.zeros(self.k, dtype=torch.float64, device=self._device)
        for e, mp in self._maps(name).items():
            g, r = mp.ghost(v[e])
            gram += g
            rhs += r
        return gram, rhs

    def rows(self, name: str, index: Tensor | slice, scratch: Tensor | None = None) -> Tensor:
        if name == self.gate_name:
            assert self.router is not None
            return self.router.rows("weight", index, scratch=scratch)
        p = self.module.get_parameter(name)
        experts, o, width = p.shape
        c = count(index, experts * o)
        if scratch is not None and scratch.numel() >= self.k * c * width and scratch.dtype == p.dtype:
            out = scratch[: self.k * c * width].view(self.k, c, width)
        else:
            out = torch.empty(self.k, c, width, dtype=p.dtype, device=p.device)
        maps = self._maps(name)
        # the slices of ``index`` by expert: (expert, its local rows, where they go in ``out``)
        if isinstance(index, slice):
            index = torch.arange(*index.indices(experts * o), device=out.device)
        owner = torch.div(index, o, rounding_mode="floor")
        parts, at = [], 0
        for e, size in zip(*torch.unique_consecutive(owner, return_counts=True)):
            e, size = int(e), int(size)
            parts.append((e, index[at : at + size] - e * o, at))
            at += size
        for e, local, at in parts:
            size = count(local, o)
            if e in maps:
                maps[e].rows(local, out[:, at : at + size])
            else:
                out[:, at : at + size].zero_()
        return out.view(self.k, -1)

    def back(self, name: str, alpha: Tensor) -> Tensor:
        p = self.module.get_parameter(name)
        if name == self.gate_name:
            assert self.router is not None
            return self.router.back("weight", alpha)
        out = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
        for e, mp in self._maps(name).items():
            out[e] = mp.back(alpha)
        return out

    def back_flops(self, name: str) -> int:
        if name == self.gate_name:
            return 0 if self.router is None else self.router.back_flops("weight")
        return sum(mp.back_flops() for mp in self._maps(name).values())
