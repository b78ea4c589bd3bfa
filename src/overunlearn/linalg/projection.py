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


# ---- the projection step without materialising the Jacobian of linear layers -----------------
#
# For an ``nn.Linear`` applied once to a ``(batch, in)`` input, the gradient of sample i's score
# with respect to its weight is the outer product ``delta_i a_i^T`` (``a_i``: the layer's input,
# ``delta_i``: the score's gradient with respect to the layer's output). Hence, for rows r, s of
# the Jacobian, ``<g_r, g_s> = (delta_r . delta_s)(a_r . a_s)`` (plus ``delta_r . delta_s`` for
# the bias): the Gram block of a linear layer costs O(k^2 (in + out)) instead of
# O(k^2 in out), ``J v`` is ``sum(delta_r * (W a_r + b))`` and ``J^T alpha`` is
# ``Delta^T diag(alpha) A`` -- the per-sample gradients are never formed. Every other trainable
# parameter (convolutions, normalisation affines, ...) goes through the materialised
# ``torch.func`` Jacobian as before. Valid only when samples do not interact, i.e. for the
# ``"per_sample"`` (eval-mode) semantics.


#: use the factored path only if linear layers hold at least this fraction of the parameters
_MIN_FACTORED_FRACTION = 0.25


def _linear_layers(model: torch.nn.Module, params: list[Tensor]) -> list[torch.nn.Linear] | None:
    """Linear modules whose trainable parameters can take the factored path (``None``: none can)."""
    ids = {id(p) for p in params}
    owner: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner[id(p)] = owner.get(id(p), 0) + 1
    if any(owner.get(id(p), 0) != 1 for p in params):  # shared parameters: keep it simple
        return None
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m.weight) in ids]
    covered = sum(q.numel() for m in layers for q in m.parameters(recurse=False) if q.requires_grad)
    if covered < _MIN_FACTORED_FRACTION * sum(p.numel() for p in params):
        # e.g. a ResNet, whose linear heads are a sliver of d: the extra hooked forward and
        # backward passes would cost more than the factored Gram saves
        return None
    return layers


def project_model_onto_span(model: torch.nn.Module, inputs: Tensor, score_fn, v: Tensor,
                            mode: str = "per_sample", rcond: float = 1e-12) -> Tensor:
    """``P_span(J^T) v`` for the Jacobian ``J`` of ``score_fn(model(inputs))`` w.r.t. the trainable
    parameters (flattened in ``model.parameters()`` order), the same result as
    ``project_onto_span(output_jacobian(model, inputs, score_fn, mode), v)``.

    In ``"per_sample"`` mode the blocks of ``nn.Linear`` layers are handled in factored form (see
    above), which on MLP-like layers is one to two orders of magnitude cheaper; anything the factored
    path does not cover falls back to the materialised Jacobian.
    """
    from overunlearn.linalg.jacobian import _mode, output_jacobian, output_jacobian_dense

    params = [p for p in model.parameters() if p.requires_grad]
    layers = _linear_layers(model, params) if mode == "per_sample" else None
    if layers is None:
        return project_onto_span(output_jacobian(model, inputs, score_fn, mode=mode), v, rcond)  # type: ignore[arg-type]

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
    if any(len(c) != 1 or c[0][0].dim() != 2 or not c[0][1].requires_grad for c in captured.values()):
        # a layer applied twice, to a sequence, or outside the graph: use the general path
        return project_onto_span(output_jacobian(model, inputs, score_fn, mode=mode), v, rcond)  # type: ignore[arg-type]
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
    factored = {id(m.weight) for m in layers} | {id(m.bias) for m in layers if m.bias is not None and m.bias.requires_grad}
    dense = [p for p in params if id(p) not in factored]

    k = n * heads
    gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=v.device)
    factors = []
    for m, ds in zip(layers, deltas, strict=True):
        a = captured[m][0][0].detach().double().repeat(heads, 1)  # (k, in), head-major like the rows
        d_ = torch.cat(ds).double()  # (k, out)
        if not (torch.isfinite(a).all() and torch.isfinite(d_).all()):
            raise FloatingPointError("the output Jacobian contains NaN or infinite values")
        dd = d_ @ d_.T
        o, c = offsets[id(m.weight)]
        w = v[o : o + c].view_as(m.weight).double()
        gram += dd * (a @ a.T)
        rhs += ((a @ w.T) * d_).sum(1)
        has_bias = m.bias is not None and m.bias.requires_grad
        if has_bias:
            ob, cb = offsets[id(m.bias)]
            gram += dd
            rhs += d_ @ v[ob : ob + cb].double()
        factors.append((m, a, d_, has_bias))
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
    for m, a, d_, has_bias in factors:
        o, c = offsets[id(m.weight)]
        out[o : o + c] = ((d_ * alpha.unsqueeze(1)).T @ a).reshape(-1).to(v.dtype)
        if has_bias:
            ob, cb = offsets[id(m.bias)]
            out[ob : ob + cb] = (d_.T @ alpha).to(v.dtype)
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
