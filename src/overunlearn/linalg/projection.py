"""Projection of a vector onto the row span of a ``k x d`` matrix (``k << d``).

Fast path (:func:`project_onto_span`): the ``k x k`` Gram matrix ``G = J J^T`` and
``b = J v`` are accumulated in float64 over column chunks of ``J`` (so no float64 copy
of ``J`` is ever held), then ``G a = b`` is solved by a symmetric eigendecomposition
that discards eigenvalues below ``rcond * max_eigenvalue`` (robust to duplicate or
linearly dependent rows), and ``P v = J^T a``. Cost: ``O(d k^2)`` flops, memory ``O(k^2)``
beyond ``J`` itself.

Reference (:func:`project_onto_span_qr`): reduced QR of ``J^T`` in float64, as the
authors' code does it. It assumes ``J`` has full row rank.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from overunlearn import structure
from overunlearn.linalg.jacobian import call_scores

#: bytes of one float64 column block of ``J``: small enough to stay in cache, so the float32 ->
#: float64 conversion of a block is cheap and its buffer is reused (blocks of 2**20 columns made
#: the conversion and the back-projection memory-bound: 3-7x slower on a 100 x 410k Jacobian)
_BLOCK_BYTES = 1 << 22


#: on a GPU, kernel launches dominate small blocks; use blocks of about 256 MiB there
_GPU_BLOCK_BYTES = 1 << 28


def _chunk(k: int, chunk: int | None, device: torch.device | None = None) -> int:
    if chunk is not None:
        return chunk
    budget = _GPU_BLOCK_BYTES if device is not None and device.type == "cuda" else _BLOCK_BYTES
    return max(1024, budget // (8 * max(k, 1)))


def gram_and_rhs(jac: Tensor, v: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """``(J J^T, J v)`` in float64, accumulated over column chunks of ``J`` (about 4 MiB each by default)."""
    k, d = jac.shape
    chunk = _chunk(k, chunk, jac.device)
    gram = torch.zeros(k, k, dtype=torch.float64, device=jac.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=jac.device)
    for s in range(0, d, chunk):
        block = jac[:, s : s + chunk].double()
        gram += block @ block.T
        rhs += block @ v[s : s + chunk].double()
    return gram, rhs


def solve_gram(gram: Tensor, rhs: Tensor, rcond: float = 1e-12) -> Tensor:
    """Minimum-norm solution of ``G a = b`` for symmetric PSD ``G`` (pseudo-inverse)."""
    evals, evecs = torch.linalg.eigh(gram)
    top = evals.max().clamp_min(0.0)
    keep = evals > rcond * top
    if not bool(keep.any()):
        return torch.zeros_like(rhs)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return evecs @ (inv * (evecs.T @ rhs))


def project_onto_span(jac: Tensor, v: Tensor, rcond: float = 1e-12, chunk: int | None = None) -> Tensor:
    """``P_span(J^T) v``: the component of ``v`` (shape ``(d,)``) in the span of the rows of ``jac``."""
    if jac.dim() != 2 or v.dim() != 1 or jac.shape[1] != v.shape[0]:
        raise ValueError(f"expected jac (k, d) and v (d,), got {tuple(jac.shape)} and {tuple(v.shape)}")
    if jac.shape[0] == 0:
        return torch.zeros_like(v)
    if not torch.isfinite(jac).all():
        raise FloatingPointError("the output Jacobian contains NaN or infinite values")
    gram, rhs = gram_and_rhs(jac, v, chunk)
    alpha = solve_gram(gram, rhs, rcond)
    chunk = _chunk(jac.shape[0], chunk, jac.device)
    out = torch.empty_like(v)
    for s in range(0, v.shape[0], chunk):
        out[s : s + chunk] = (jac[:, s : s + chunk].double().T @ alpha).to(v.dtype)
    return out


def project_onto_span_qr(jac: Tensor, v: Tensor) -> Tensor:
    """Reference: ``Q Q^T v`` with ``Q`` from a float64 reduced QR of ``J^T``."""
    if jac.shape[0] == 0:
        return torch.zeros_like(v)
    q, _ = torch.linalg.qr(jac.double().T, mode="reduced")
    return (q @ (q.T @ v.double())).to(v.dtype)


# ---- the projection step from per-layer hooks instead of a vmapped Jacobian ------------------------
#
# In ``"per_sample"`` (eval-mode) semantics samples do not interact, so the Jacobian row of sample
# i's score is made of per-layer pieces that one hooked forward pass (each layer's input ``a_i``)
# and one backward pass per head (each layer's output gradient ``delta_i``) determine:
#
# * ``nn.Linear`` applied once to a ``(batch, in)`` input: the weight row is the outer product
#   ``delta_i a_i^T``, so ``<g_r, g_s> = (delta_r . delta_s)(a_r . a_s)`` (plus ``delta_r . delta_s``
#   for the bias): the Gram block costs O(k^2 (in + out)) instead of O(k^2 in out), ``J v`` is
#   ``sum(delta_r * (W a_r + b))`` and ``J^T alpha`` is ``Delta^T diag(alpha) A``; the per-sample
#   gradients are never formed ("factored");
# * ``nn.Conv2d``: a linear layer applied at T output positions to the unfolded input patches ``U_i``
#   (``(C_in k_h k_w, T)``), so the weight row is ``Delta_i U_i^T``. Where T is small (the late,
#   low-resolution stages of a CNN, which hold most of its parameters) the Gram block is
#   ``sum_{t,t'} (Delta_r^T Delta_s)[t,t'] (U_r^T U_s)[t,t']`` ("ghost" Gram, never formed
#   either); elsewhere the rows ``Delta_i U_i^T`` are formed with one batched product per head;
# * ``BatchNorm`` in eval mode (running statistics): the affine rows are
#   ``sum_spatial delta_i * xhat_i`` and ``sum_spatial delta_i``, formed directly.
#
# Trainable parameters of any other module go through the ``torch.func`` Jacobian
# (``output_jacobian_dense``), which alone costs a vmapped backward pass per sample and score; it is
# skipped when the hooks cover every parameter. Not for ``"batch_train"`` semantics, where train-mode
# BatchNorm couples the samples.


#: use the hooked path only if the factored layers hold at least this fraction of the parameters,
#: unless the hooks cover every parameter (then no vmapped Jacobian is needed at all)
_MIN_FACTORED_FRACTION = 0.25

#: largest ``(k T)^2`` (entries of one convolution's ghost Gram, float64) the factored path forms
_MAX_GHOST_ENTRIES = 1 << 26


def _plain_conv2d(m: torch.nn.Module) -> bool:
    """A Conv2d whose patches ``F.unfold`` reproduces: one group, zero padding given as numbers."""
    return (isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _eval_batchnorm(m: torch.nn.Module) -> bool:
    """A BatchNorm1d/2d that uses running statistics in eval mode (so samples do not interact)."""
    return (isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) and m.affine
            and m.running_mean is not None and m.running_var is not None)


def _conv_factored_cheaper(n: int, heads: int, c_out: int, patch: int, t: int) -> bool:
    """Whether the ghost Gram of a convolution (``n`` samples, ``heads`` scores each, ``t`` output
    positions, ``patch = C_in k_h k_w``) costs fewer flops than forming its Jacobian rows."""
    k = n * heads
    if (k * t) ** 2 > _MAX_GHOST_ENTRIES:
        return False
    ghost = (k * t) ** 2 * c_out + (n * t) ** 2 * patch
    dense = k * k * c_out * patch + k * t * c_out * patch  # the block's Gram + forming the rows
    return ghost < dense


def _stock(m: torch.nn.Module) -> bool:
    """The layer computes what its class says: PyTorch's own ``forward``, a plain ``weight``
    parameter (not parametrized, pruned or weight-normed) and no hooks of its own."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils import parametrize

    base = torch.nn.Linear if isinstance(m, torch.nn.Linear) else (
        torch.nn.Conv2d if isinstance(m, torch.nn.Conv2d) else _BatchNorm)
    return (type(m).forward is base.forward and not parametrize.is_parametrized(m)
            and isinstance(m._parameters.get("weight"), torch.nn.Parameter)
            and not m._forward_hooks and not m._forward_pre_hooks)


def _candidates(model: torch.nn.Module, params: list[Tensor]) -> list[torch.nn.Module] | None:
    """Linear, plain Conv2d and eval-mode BatchNorm modules holding trainable parameters (``None``:
    the hooked path does not apply to this model)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    ids = {id(p) for p in params}
    owner: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is None:
            return None  # batch statistics even in eval mode: one batched pass couples the samples
        for p in m.parameters(recurse=False):
            owner[id(p)] = owner.get(id(p), 0) + 1
    if any(owner.get(id(p), 0) != 1 for p in params):  # shared parameters: keep it simple
        return None
    layers = [m for m in model.modules()
              if (isinstance(m, torch.nn.Linear) or _plain_conv2d(m) or _eval_batchnorm(m)) and _stock(m)
              and any(id(q) in ids for q in m.parameters(recurse=False))]
    return layers or None


#: models (held weakly) whose hooked projection was checked against autograd, by input signature;
#: a memo of :func:`_verify`, so that the check runs once per model and input shape, not every step
_VERIFIED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


def _signature(inputs, layers: list[torch.nn.Module], params: list[Tensor]) -> tuple:
    leaves = structure.tensor_leaves(inputs)
    return (tuple((tuple(x.shape[1:]), x.dtype, str(x.device)) for x in leaves), tuple(id(m) for m in layers),
            tuple(id(p) for p in params))


def _first(inputs, targets):
    """The first example of ``inputs`` (a copy) and of ``targets``."""
    one = structure.clone(structure.index(inputs, slice(0, 1)))
    return one, None if targets is None else structure.index(targets, slice(0, 1))


def _output_positions(model: torch.nn.Module, inputs, convs: list[torch.nn.Module]) -> dict[torch.nn.Module, int]:
    """Output positions (``H' W'``) of each convolution, from a no-grad forward of one sample."""
    from overunlearn.linalg.jacobian import _mode

    sizes: dict[torch.nn.Module, int] = {}

    def hook(m, args, out):  # noqa: ANN001
        sizes[m] = int(out.shape[-1] * out.shape[-2]) if out.dim() == 4 else -1

    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        with _mode(model, train=False), torch.no_grad():
            structure.call_model(model, _first(inputs, None)[0])
    finally:
        for h in handles:
            h.remove()
    return sizes


def _ghost_set(convs: list[torch.nn.Module], sizes: dict[torch.nn.Module, int], n: int,
               heads: int) -> set[torch.nn.Module]:
    """The convolutions (with ``sizes[m]`` output positions) whose ghost Gram is the cheaper way."""
    out = set()
    for m in convs:
        t = sizes.get(m, -1)
        patch = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        if t > 0 and _conv_factored_cheaper(n, heads, m.weight.shape[0], patch, t):
            out.add(m)
    return out


def _patches(a: Tensor, m: torch.nn.Conv2d) -> Tensor:
    """``F.unfold(a, ...)`` for the convolution ``m``: ``(n, C_in k_h k_w, T)``, from strided views and
    one copy (``F.unfold`` launches one CUDA kernel per sample)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
    if ph or pw:
        a = torch.nn.functional.pad(a, (pw, pw, ph, ph))
    p = a.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)  # (n, C, H', W', eh, ew)
    if dh > 1 or dw > 1:
        p = p[..., ::dh, ::dw]
    n, c, ho, wo = p.shape[:4]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)


def _factored_layers(model: torch.nn.Module, inputs, params: list[Tensor],
                     heads: int) -> tuple[list[torch.nn.Module], set[torch.nn.Module]] | None:
    """The hooked layers and, among them, the convolutions that take the ghost Gram (``None``: use
    the vmapped Jacobian for everything)."""
    layers = _candidates(model, params)
    if layers is None:
        return None
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    ghost = _ghost_set(convs, _output_positions(model, inputs, convs) if convs else {}, structure.batch_len(inputs),
                       heads)
    hooked = {id(q) for m in layers for q in m.parameters(recurse=False)}
    if any(id(p) not in hooked for p in params):
        factored = sum(q.numel() for m in layers if isinstance(m, torch.nn.Linear) or m in ghost
                       for q in m.parameters(recurse=False) if q.requires_grad)
        if factored < _MIN_FACTORED_FRACTION * sum(p.numel() for p in params):
            # the vmapped Jacobian runs anyway and little is factored: the extra hooked forward and
            # backward passes would cost more than they save
            return None
    return layers, ghost


def _score_heads(model: torch.nn.Module, inputs, score_fn, targets=None) -> int:
    from overunlearn.linalg.jacobian import _mode

    one, y = _first(inputs, targets)
    with _mode(model, train=False), torch.no_grad():
        return int(call_scores(score_fn, structure.call_model(model, one), y).shape[1])


class _Decline(Exception):
    """The hooked path does not apply after all; use the vmapped Jacobian."""


class _Block:
    """One hooked layer's share of the projection: its Gram block and ``J v`` part (float64), and
    its part of ``J^T alpha``. Factored blocks never form their Jacobian rows; the others form
    them (``self.rows``: ``(k, d_layer)``, the layer's parameters in ``parameters()`` order)."""

    def __init__(self, m: torch.nn.Module, a: Tensor, deltas: list[Tensor], heads: int, ghost: bool,
                 params: list[Tensor]) -> None:
        self.m, self.heads, self.n = m, heads, a.shape[0]
        self.params = [q for q in m.parameters(recurse=False) if any(q is p for p in params)]
        self.idx = torch.arange(self.n * heads, device=a.device) % self.n  # row r = h n + i is sample i
        d = torch.cat(deltas)  # (k, out, ...), head-major (non-finite values surface in the Gram)
        self.kind = "linear" if isinstance(m, torch.nn.Linear) else ("ghost" if ghost else "rows")
        self.rows: Tensor | None = None
        w_train = m.weight.requires_grad
        b_train = m.bias is not None and m.bias.requires_grad
        if isinstance(m, torch.nn.Linear):
            self.a, self.d = a.detach().double(), d.double()
            self.d_sum = self.d
        elif isinstance(m, torch.nn.Conv2d):
            u = _patches(a.detach(), m)  # (n, patch, T)
            d = d.reshape(d.shape[0], d.shape[1], -1)  # (k, C_out, T)
            if u.shape[2] != d.shape[2]:
                raise _Decline
            if ghost:
                self.u, self.d = u.double(), d.double()
                self.d_sum = self.d.sum(2)
            else:
                k, c_out = d.shape[0], d.shape[1]
                width = (c_out * u.shape[1] if w_train else 0) + (c_out if b_train else 0)
                self.rows = torch.empty(k, width, dtype=d.dtype, device=d.device)
                if w_train:  # per head: (n, C_out, T) @ (n, T, patch) -> the rows of its n samples
                    ut = u.transpose(1, 2)
                    for h, dh in enumerate(d.view(heads, self.n, c_out, -1)):
                        dst = self.rows[h * self.n:(h + 1) * self.n, :c_out * u.shape[1]]
                        if dst.is_contiguous():
                            torch.bmm(dh, ut, out=dst.view(self.n, c_out, u.shape[1]))
                        else:
                            dst.copy_(torch.bmm(dh, ut).reshape(self.n, -1))
                if b_train:
                    self.rows[:, width - c_out:] = d.sum(2)
        else:  # BatchNorm in eval mode: y = gamma xhat + beta with the running statistics
            shape = (1, -1) + (1,) * (a.dim() - 2)
            xhat = (a.detach() - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
            dims = tuple(range(2, a.dim()))
            parts = []
            if w_train:
                parts.append((d * xhat[self.idx]).sum(dim=dims) if dims else d * xhat[self.idx])
            if b_train:
                parts.append(d.sum(dim=dims) if dims else d)
            self.rows = torch.cat(parts, dim=1)
            self.kind = "rows"
        self.has_bias = b_train and self.kind != "rows"
        self.has_weight = w_train

    def gram_and_rhs(self, v_parts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """This block's ``J J^T`` and ``J v`` for its parameters' parts ``v_parts`` of ``v``."""
        if self.rows is not None:
            return gram_and_rhs(self.rows, torch.cat([q.reshape(-1) for q in v_parts]))
        w = v_parts[0] if self.has_weight else None
        b = v_parts[-1] if self.has_bias else None
        k = self.d.shape[0]
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.d.device)
        rhs = torch.zeros(k, dtype=torch.float64, device=self.d.device)
        if w is not None and self.kind == "ghost":
            _, c_out, t = self.d.shape
            dt = self.d.transpose(1, 2).reshape(k * t, c_out)
            ut = self.u.transpose(1, 2).reshape(self.n * t, -1)
            dd = (dt @ dt.T).view(k, t, k, t)
            uu = (ut @ ut.T).view(self.n, t, self.n, t)[self.idx][:, :, self.idx]
            gram += (dd * uu).sum(dim=(1, 3))
            wu = torch.einsum("oc,nct->not", w.reshape(c_out, -1).double(), self.u)  # (n, C_out, T)
            rhs += (self.d * wu[self.idx]).sum(dim=(1, 2))
        elif w is not None:
            a = self.a[self.idx]
            gram += (self.d @ self.d.T) * (a @ a.T)
            rhs += ((a @ w.reshape(self.m.weight.shape).double().T) * self.d).sum(1)
        if b is not None:
            gram += self.d_sum @ self.d_sum.T
            rhs += self.d_sum @ b.double()
        return gram, rhs

    def back(self, alpha: Tensor, dtype: torch.dtype) -> Tensor:
        """This block's part of ``J^T alpha``: its parameters, flattened and concatenated."""
        if self.rows is not None:
            k = self.rows.shape[0]
            out = torch.empty(self.rows.shape[1], dtype=dtype, device=self.rows.device)
            chunk = _chunk(k, None, self.rows.device)
            for s in range(0, out.shape[0], chunk):
                out[s : s + chunk] = (self.rows[:, s : s + chunk].double().T @ alpha).to(dtype)
            return out
        parts = []
        if self.has_weight:
            if self.kind == "ghost":
                scaled = self.d * alpha[:, None, None]  # (k, C_out, T)
                per_sample = scaled.view(self.heads, self.n, *scaled.shape[1:]).sum(0)  # (n, C_out, T)
                parts.append(torch.einsum("not,nct->oc", per_sample, self.u).reshape(-1))
            else:
                parts.append(((self.d * alpha.unsqueeze(1)).T @ self.a[self.idx]).reshape(-1))
        if self.has_bias:
            parts.append(self.d_sum.T @ alpha)
        return torch.cat(parts).to(dtype)


def _verify(model: torch.nn.Module, inputs, score_fn, scores: Tensor, blocks: list[_Block],
            params: list[Tensor], targets=None) -> bool:
    """Whether the hooked blocks describe this model's per-sample Jacobian, checked once per model:

    * samples do not interact: the first sample's scores alone equal its scores in the batch
      (a layer using batch statistics, or any other mixing across the batch, fails);
    * for a random combination ``c`` of the rows, the blocks' ``J^T c`` equals autograd's gradient
      of ``sum_r c_r score_r`` with respect to the hooked parameters (a parameter also used outside
      its layer, a layer applied to rows that are not per-sample, or a layer that does not compute
      what its class says, fails).

    Run on the graph of the hooked forward (which it frees).
    """
    from overunlearn.linalg.jacobian import _mode

    tol = 1e-4 if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("the model's outputs, and so its output Jacobian, contain NaN or infinite values")
    n, heads = scores.shape
    if n > 1:
        one, y = _first(inputs, targets)
        with _mode(model, train=False), torch.no_grad():
            alone = call_scores(score_fn, structure.call_model(model, one), y)
        if not torch.allclose(alone, scores[:1].detach(), rtol=tol * 10, atol=tol * float(scores.detach().abs().max())):
            return False
    g = torch.Generator().manual_seed(12345)
    c = torch.randn(n * heads, generator=g, dtype=torch.float64).to(scores.device)
    wrt = [q for blk in blocks for q in blk.params]
    auto = torch.autograd.grad((scores * c.view(heads, n).T.to(scores.dtype)).sum(), wrt, allow_unused=True)
    ref = torch.cat([(a if a is not None else torch.zeros_like(q)).reshape(-1).double() for a, q in zip(auto, wrt)])
    got = torch.cat([blk.back(c, torch.float64) for blk in blocks])
    return bool((got - ref).norm() <= tol * max(float(ref.norm()), 1e-30))


def project_model_onto_span(model: torch.nn.Module, inputs, score_fn, v: Tensor,
                            mode: str = "per_sample", rcond: float = 1e-12, targets=None) -> Tensor:
    """``P_span(J^T) v`` for the Jacobian ``J`` of ``score_fn(model(inputs)[, targets])`` w.r.t. the
    trainable parameters (flattened in ``model.parameters()`` order), the same result as
    ``project_onto_span(output_jacobian(model, inputs, score_fn, mode, targets), v)``. ``inputs`` is a
    tensor, a tuple or a dict of tensors (:mod:`overunlearn.structure`).

    In ``"per_sample"`` mode linear, convolution and eval-mode BatchNorm layers are handled from
    forward and backward hooks (see above): linear layers and convolutions with few output positions
    in factored form, the others by forming their rows directly; anything else falls back to the
    vmapped ``torch.func`` Jacobian.
    """
    from overunlearn.linalg.jacobian import _mode, output_jacobian, output_jacobian_dense

    def materialised() -> Tensor:
        return project_onto_span(output_jacobian(model, inputs, score_fn, mode=mode, targets=targets),  # type: ignore[arg-type]
                                 v, rcond)

    from torch.profiler import record_function  # phases named in profiles; free when no profiler runs

    params = [p for p in model.parameters() if p.requires_grad]
    if mode != "per_sample" or _candidates(model, params) is None:
        return materialised()
    layers = _candidates(model, params)
    assert layers is not None
    hooked_ids = {id(q) for m in layers for q in m.parameters(recurse=False)}
    ghost: set[torch.nn.Module] | None = None  # None: chosen from the hooked forward's output shapes
    if any(id(p) not in hooked_ids for p in params):
        # the vmapped Jacobian runs too: first check that enough is factored to be worth the hooks
        with record_function("overunlearn::choose_layers"):
            picked = _factored_layers(model, inputs, params, _score_heads(model, inputs, score_fn, targets))
        if picked is None:
            return materialised()
        layers, ghost = picked

    captured: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
    grads: dict[torch.nn.Module, Tensor] = {}

    def hook(m, args, out):  # noqa: ANN001
        captured[m].append((args[0] if args else None, out))  # (None: called with a keyword input)
        if out.requires_grad:
            # a tensor hook sees the gradient w.r.t. the layer's output even if a following
            # in-place op (ReLU(inplace=True)) overwrites it
            out.register_hook(lambda g, m=m: grads.__setitem__(m, g.detach()))

    # the backward passes only need each layer's output gradient: asked for the input's gradient,
    # autograd skips every weight gradient (most of a convolution's backward)
    memo = _VERIFIED.setdefault(model, {})
    signature = _signature(inputs, layers, params)
    if memo.get(signature) is False:
        return materialised()
    x = inputs.detach().requires_grad_(True) if isinstance(inputs, Tensor) and inputs.is_floating_point() \
        else structure.detach(inputs)
    x_grad = isinstance(x, Tensor) and x.requires_grad
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with _mode(model, train=False), torch.enable_grad(), record_function("overunlearn::hooked_forward"):
            # (a clone: the model may work in place on its input, which a leaf tensor forbids)
            scores = call_scores(score_fn, structure.call_model(model, x.clone() if x_grad else x), targets)
    finally:
        for h in handles:
            h.remove()

    def fits(m: torch.nn.Module, c: list[tuple[Tensor, Tensor]]) -> bool:
        # applied once, inside the graph, to one row per sample (not to a shared constant)
        if (len(c) != 1 or c[0][0] is None or not c[0][1].requires_grad or c[0][0].dim() == 0
                or c[0][0].shape[0] != structure.batch_len(inputs)):
            return False
        dim = c[0][0].dim()
        if isinstance(m, torch.nn.Linear):
            return dim == 2
        if isinstance(m, torch.nn.Conv2d):
            return dim == 4
        return dim in (2, 3, 4)

    if not all(fits(m, c) for m, c in captured.items()):
        # a layer applied twice, to a sequence, or outside the graph: use the general path
        return materialised()
    n, heads = scores.shape
    if ghost is None:
        convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
        ghost = _ghost_set(convs, {m: int(captured[m][0][1].shape[-2] * captured[m][0][1].shape[-1]) for m in convs},
                           n, heads)
    trainable = {id(p) for p in params}
    wrt = [q for m in layers for q in m.parameters(recurse=False) if id(q) in trainable]
    deltas: list[list[Tensor]] = [[] for _ in layers]
    for h in range(heads):
        grads.clear()
        with record_function("overunlearn::head_backward"):
            if x_grad:
                torch.autograd.grad(scores[:, h].sum(), [x], retain_graph=True, allow_unused=True)
            if not x_grad or len(grads) < len(layers):
                # some layer's output does not lead back to the input (or the input is not a float
                # tensor): the parameters' gradients reach every layer
                grads.clear()
                torch.autograd.grad(scores[:, h].sum(), wrt, retain_graph=True, allow_unused=True)
        for i, m in enumerate(layers):
            out_m = captured[m][0][1]
            deltas[i].append(grads.get(m, torch.zeros(out_m.shape, dtype=out_m.dtype, device=out_m.device)))

    # offsets of every parameter in the flat vector
    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = (off, p.numel())
        off += p.numel()
    try:
        with record_function("overunlearn::blocks"):
            blocks = [_Block(m, captured[m][0][0], ds, heads, m in ghost, params)
                      for m, ds in zip(layers, deltas, strict=True)]
    except _Decline:
        return materialised()
    if signature not in memo:
        with record_function("overunlearn::verify"):
            memo[signature] = _verify(model, inputs, score_fn, scores, blocks, params, targets)
        if not memo[signature]:
            return materialised()
    captured.clear()  # the blocks hold what they need; free the rest of the forward
    del deltas, scores
    covered = {id(q) for blk in blocks for q in blk.params}
    dense = [p for p in params if id(p) not in covered]

    def part(p: Tensor) -> Tensor:
        o, c = offsets[id(p)]
        return v[o : o + c]

    k = n * heads
    gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=v.device)
    with record_function("overunlearn::gram"):
        for blk in blocks:
            g, r = blk.gram_and_rhs([part(q) for q in blk.params])
            gram += g
            rhs += r
    jd = None
    if dense:
        jd = output_jacobian_dense(model, inputs, score_fn, dense, targets)  # (k, d_dense), same row order
        if not torch.isfinite(jd).all():
            raise FloatingPointError("the output Jacobian contains NaN or infinite values")
        g2, r2 = gram_and_rhs(jd, torch.cat([part(p) for p in dense]))
        gram += g2
        rhs += r2
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise FloatingPointError("the output Jacobian contains NaN or infinite values")
    alpha = solve_gram(gram, rhs, rcond)

    out = torch.empty_like(v)

    def scatter(ps: list[Tensor], flat: Tensor) -> None:
        pos = 0
        for p in ps:
            o, c = offsets[id(p)]
            out[o : o + c] = flat[pos : pos + c]
            pos += c

    with record_function("overunlearn::back_projection"):
        for blk in blocks:
            scatter(blk.params, blk.back(alpha, v.dtype))
    if jd is not None:
        back = torch.empty(jd.shape[1], dtype=v.dtype, device=v.device)
        chunk = _chunk(k, None, jd.device)
        for s in range(0, jd.shape[1], chunk):
            back[s : s + chunk] = (jd[:, s : s + chunk].double().T @ alpha).to(v.dtype)
        scatter(dense, back)
    return out
