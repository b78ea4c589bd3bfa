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

import torch
from torch import Tensor

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


# ---- the projection step without materialising the Jacobian of linear and small convolution layers --
#
# For an ``nn.Linear`` applied once to a ``(batch, in)`` input, the gradient of sample i's score
# with respect to its weight is the outer product ``delta_i a_i^T`` (``a_i``: the layer's input,
# ``delta_i``: the score's gradient with respect to the layer's output). Hence, for rows r, s of
# the Jacobian, ``<g_r, g_s> = (delta_r . delta_s)(a_r . a_s)`` (plus ``delta_r . delta_s`` for
# the bias): the Gram block of a linear layer costs O(k^2 (in + out)) instead of
# O(k^2 in out), ``J v`` is ``sum(delta_r * (W a_r + b))`` and ``J^T alpha`` is
# ``Delta^T diag(alpha) A`` -- the per-sample gradients are never formed.
#
# A 2-d convolution is a linear layer applied at T output positions to the unfolded input patches
# ``U_i`` (``(C_in k_h k_w, T)``), so sample i's weight gradient is ``Delta_i U_i^T`` and
# ``<g_r, g_s> = sum_{t,t'} (Delta_r^T Delta_s)[t,t'] (U_r^T U_s)[t,t']`` (the "ghost" Gram of
# per-sample gradient clipping). That costs O((k T)^2 (C_out + C_in k_h k_w)), which beats
# materialising the block (O(k^2 C_out C_in k_h k_w)) only where T is small: the late, low-resolution
# stages of a CNN, which hold most of its parameters (ResNet-18 on 32x32 inputs: layer4, 75%).
# Every other trainable parameter (early convolutions, normalisation affines, ...) goes through the
# materialised ``torch.func`` Jacobian as before. Valid only when samples do not interact, i.e. for
# the ``"per_sample"`` (eval-mode) semantics.


#: use the factored path only if the factored layers hold at least this fraction of the parameters
_MIN_FACTORED_FRACTION = 0.25

#: largest ``(k T)^2`` (entries of one convolution's ghost Gram, float64) the factored path forms
_MAX_GHOST_ENTRIES = 1 << 26


def _plain_conv2d(m: torch.nn.Module) -> bool:
    """A Conv2d whose patches ``F.unfold`` reproduces: one group, zero padding given as numbers."""
    return (isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _conv_factored_cheaper(n: int, heads: int, c_out: int, patch: int, t: int) -> bool:
    """Whether the ghost Gram of a convolution (``n`` samples, ``heads`` scores each, ``t`` output
    positions, ``patch = C_in k_h k_w``) costs fewer flops than materialising its Jacobian block."""
    k = n * heads
    if (k * t) ** 2 > _MAX_GHOST_ENTRIES:
        return False
    ghost = (k * t) ** 2 * c_out + (n * t) ** 2 * patch
    dense = k * k * c_out * patch + k * t * c_out * patch  # the block's Gram + forming the per-sample gradients
    return ghost < dense


def _candidates(model: torch.nn.Module, params: list[Tensor]) -> list[torch.nn.Module] | None:
    """Linear and plain Conv2d modules whose trainable weights may take the factored path."""
    ids = {id(p) for p in params}
    owner: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner[id(p)] = owner.get(id(p), 0) + 1
    if any(owner.get(id(p), 0) != 1 for p in params):  # shared parameters: keep it simple
        return None
    layers = [m for m in model.modules()
              if (isinstance(m, torch.nn.Linear) or _plain_conv2d(m)) and id(m.weight) in ids]
    return layers or None


def _output_positions(model: torch.nn.Module, inputs: Tensor, convs: list[torch.nn.Module]) -> dict[torch.nn.Module, int]:
    """Output positions (``H' W'``) of each convolution, from a no-grad forward of one sample."""
    from overunlearn.linalg.jacobian import _mode

    sizes: dict[torch.nn.Module, int] = {}

    def hook(m, args, out):  # noqa: ANN001
        sizes[m] = int(out.shape[-1] * out.shape[-2]) if out.dim() == 4 else -1

    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        with _mode(model, train=False), torch.no_grad():
            model(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def _factored_layers(model: torch.nn.Module, inputs: Tensor, params: list[Tensor],
                     heads: int) -> list[torch.nn.Module] | None:
    """The layers the factored path handles (``None``: none, or too small a share of the parameters)."""
    layers = _candidates(model, params)
    if layers is None:
        return None
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    if convs:
        n = inputs.shape[0]
        sizes = _output_positions(model, inputs, convs)
        keep = set()
        for m in convs:
            t = sizes.get(m, -1)
            patch = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
            if t > 0 and _conv_factored_cheaper(n, heads, m.weight.shape[0], patch, t):
                keep.add(m)
        layers = [m for m in layers if not isinstance(m, torch.nn.Conv2d) or m in keep]
    covered = sum(q.numel() for m in layers for q in m.parameters(recurse=False) if q.requires_grad)
    if not layers or covered < _MIN_FACTORED_FRACTION * sum(p.numel() for p in params):
        # e.g. a ResNet on large images, whose linear heads are a sliver of d and whose convolutions
        # are all cheaper materialised: the extra hooked forward and backward passes would cost more
        # than the factored Gram saves
        return None
    return layers


def _score_heads(model: torch.nn.Module, inputs: Tensor, score_fn) -> int:
    from overunlearn.linalg.jacobian import _mode

    with _mode(model, train=False), torch.no_grad():
        return int(score_fn(model(inputs[:1])).shape[1])


class _Block:
    """One factored layer: its Gram block, ``J v`` part and back-projection, all in float64."""

    def __init__(self, m: torch.nn.Module, a: Tensor, deltas: list[Tensor], heads: int) -> None:
        self.m = m
        self.has_bias = m.bias is not None and m.bias.requires_grad
        n = a.shape[0]
        self.n, self.heads = n, heads
        self.idx = torch.arange(n * heads, device=a.device) % n  # row r = h n + i is sample i
        if isinstance(m, torch.nn.Conv2d):
            u = torch.nn.functional.unfold(a.detach().double(), m.kernel_size, dilation=m.dilation,
                                           padding=m.padding, stride=m.stride)  # (n, patch, T)
            d = torch.cat(deltas).double()  # (k, C_out, H', W'), head-major
            self.u, self.d = u, d.reshape(d.shape[0], d.shape[1], -1)  # (k, C_out, T)
            if self.u.shape[2] != self.d.shape[2]:
                raise _Decline
            self.d_sum = self.d.sum(2)  # (k, C_out): the bias gradients
        else:
            self.a = a.detach().double()  # (n, in)
            self.d = torch.cat(deltas).double()  # (k, out)
            self.d_sum = self.d
        if not (torch.isfinite(a).all() and torch.isfinite(self.d).all()):
            raise FloatingPointError("the output Jacobian contains NaN or infinite values")

    def gram_and_rhs(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        """This block's ``J J^T`` and ``J v`` for the weight part ``w`` (and bias part ``b``) of ``v``."""
        if isinstance(self.m, torch.nn.Conv2d):
            k, c_out, t = self.d.shape
            dt = self.d.transpose(1, 2).reshape(k * t, c_out)
            ut = self.u.transpose(1, 2).reshape(self.n * t, -1)
            dd = (dt @ dt.T).view(k, t, k, t)
            uu = (ut @ ut.T).view(self.n, t, self.n, t)[self.idx][:, :, self.idx]
            gram = (dd * uu).sum(dim=(1, 3))
            wu = torch.einsum("oc,nct->not", w.reshape(c_out, -1).double(), self.u)  # (n, C_out, T)
            rhs = (self.d * wu[self.idx]).sum(dim=(1, 2))
        else:
            a = self.a[self.idx]
            dd = self.d @ self.d.T
            gram = dd * (a @ a.T)
            rhs = ((a @ w.reshape(self.m.weight.shape).double().T) * self.d).sum(1)
        if b is not None:
            gram = gram + self.d_sum @ self.d_sum.T
            rhs = rhs + self.d_sum @ b.double()
        return gram, rhs

    def back(self, alpha: Tensor) -> tuple[Tensor, Tensor | None]:
        """``J^T alpha`` for this block: the weight part (flattened like the weight) and the bias part."""
        if isinstance(self.m, torch.nn.Conv2d):
            scaled = self.d * alpha[:, None, None]  # (k, C_out, T)
            per_sample = scaled.view(self.heads, self.n, *scaled.shape[1:]).sum(0)  # (n, C_out, T)
            gw = torch.einsum("not,nct->oc", per_sample, self.u).reshape(-1)
        else:
            gw = ((self.d * alpha.unsqueeze(1)).T @ self.a[self.idx]).reshape(-1)
        gb = (self.d_sum.T @ alpha) if self.has_bias else None
        return gw, gb


class _Decline(Exception):
    """The factored path does not apply after all; use the materialised Jacobian."""


def project_model_onto_span(model: torch.nn.Module, inputs: Tensor, score_fn, v: Tensor,
                            mode: str = "per_sample", rcond: float = 1e-12) -> Tensor:
    """``P_span(J^T) v`` for the Jacobian ``J`` of ``score_fn(model(inputs))`` w.r.t. the trainable
    parameters (flattened in ``model.parameters()`` order), the same result as
    ``project_onto_span(output_jacobian(model, inputs, score_fn, mode), v)``.

    In ``"per_sample"`` mode the blocks of ``nn.Linear`` layers, and of ``nn.Conv2d`` layers with
    few output positions, are handled in factored form (see above), which on such layers is one to
    two orders of magnitude cheaper; anything the factored path does not cover falls back to the
    materialised Jacobian.
    """
    from overunlearn.linalg.jacobian import _mode, output_jacobian, output_jacobian_dense

    def materialised() -> Tensor:
        return project_onto_span(output_jacobian(model, inputs, score_fn, mode=mode), v, rcond)  # type: ignore[arg-type]

    params = [p for p in model.parameters() if p.requires_grad]
    if mode != "per_sample" or _candidates(model, params) is None:
        return materialised()
    layers = _factored_layers(model, inputs, params, _score_heads(model, inputs, score_fn))
    if layers is None:
        return materialised()

    captured: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in layers}
    grads: dict[torch.nn.Module, Tensor] = {}

    def hook(m, args, out):  # noqa: ANN001
        captured[m].append((args[0], out))
        if out.requires_grad:
            # a tensor hook sees the gradient w.r.t. the layer's output even if a following
            # in-place op (ReLU(inplace=True)) overwrites it
            out.register_hook(lambda g, m=m: grads.__setitem__(m, g.detach()))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with _mode(model, train=False), torch.enable_grad():
            scores = score_fn(model(inputs))  # (n, heads)
    finally:
        for h in handles:
            h.remove()
    want = {m: (4 if isinstance(m, torch.nn.Conv2d) else 2) for m in layers}
    if any(len(c) != 1 or c[0][0].dim() != want[m] or not c[0][1].requires_grad for m, c in captured.items()):
        # a layer applied twice, to a sequence, or outside the graph: use the general path
        return materialised()
    n, heads = scores.shape
    weights = [m.weight for m in layers]
    deltas: list[list[Tensor]] = [[] for _ in layers]
    for h in range(heads):
        grads.clear()
        torch.autograd.grad(scores[:, h].sum(), weights, retain_graph=h + 1 < heads, allow_unused=True)
        for i, m in enumerate(layers):
            out_m = captured[m][0][1]
            deltas[i].append(grads.get(m, torch.zeros(out_m.shape, dtype=out_m.dtype, device=out_m.device)))

    # offsets of every parameter in the flat vector
    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = (off, p.numel())
        off += p.numel()
    try:
        blocks = [_Block(m, captured[m][0][0], ds, heads) for m, ds in zip(layers, deltas, strict=True)]
    except _Decline:
        return materialised()
    captured.clear()  # the blocks hold what they need; free the rest of the forward
    factored = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None and m.bias.requires_grad}
    dense = [p for p in params if id(p) not in factored]

    k = n * heads
    gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=v.device)
    for blk in blocks:
        o, c = offsets[id(blk.m.weight)]
        vb = None
        if blk.has_bias:
            ob, cb = offsets[id(blk.m.bias)]
            vb = v[ob : ob + cb]
        g, r = blk.gram_and_rhs(v[o : o + c], vb)
        gram += g
        rhs += r
    jd = None
    if dense:
        jd = output_jacobian_dense(model, inputs, score_fn, dense)  # (k, d_dense), same row order
        v_dense = torch.cat([v[offsets[id(p)][0] : offsets[id(p)][0] + p.numel()] for p in dense])
        if not torch.isfinite(jd).all():
            raise FloatingPointError("the output Jacobian contains NaN or infinite values")
        g2, r2 = gram_and_rhs(jd, v_dense)
        gram += g2
        rhs += r2
    alpha = solve_gram(gram, rhs, rcond)

    out = torch.empty_like(v)
    for blk in blocks:
        gw, gb = blk.back(alpha)
        o, c = offsets[id(blk.m.weight)]
        out[o : o + c] = gw.to(v.dtype)
        if gb is not None:
            ob, cb = offsets[id(blk.m.bias)]
            out[ob : ob + cb] = gb.to(v.dtype)
    if jd is not None:
        back = torch.empty(jd.shape[1], dtype=v.dtype, device=v.device)
        chunk = _chunk(k, None, jd.device)
        for s in range(0, jd.shape[1], chunk):
            back[s : s + chunk] = (jd[:, s : s + chunk].double().T @ alpha).to(v.dtype)
        pos = 0
        for p in dense:
            o, c = offsets[id(p)]
            out[o : o + c] = back[pos : pos + c]
            pos += c
    return out
