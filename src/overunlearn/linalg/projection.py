"""Projection of a vector onto the row span of a ``k x d`` matrix (``k << d``).

Fast path (:func:`project_onto_span`): the ``k x k`` Gram matrix ``G = J J^T`` and
``b = J v`` are accumulated in float64 over column chunks of ``J`` (so no float64 copy
of ``J`` is ever held), then ``G a = b`` is solved by a symmetric eigendecomposition
that discards eigenvalues below ``rcond * max_eigenvalue`` (robust to duplicate or
linearly dependent rows), and ``P v = J^T a``. Cost: ``O(d k^2)`` flops, memory ``O(k^2)``
beyond ``J`` itself.

Reference (:func:`project_onto_span_qr`): reduced QR of ``J^T`` in float64, as the
authors' code does it, with a rank check the authors' code lacks (their QR assumes full row rank).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    buf = None
    for s in range(0, d, chunk):
        block = _as_double(jac[:, s : s + chunk], chunk, buf)
        buf = block if block.shape[1] == chunk else buf
        gram += block @ block.T
        rhs += block @ v[s : s + chunk].double()
    return gram, rhs


def _as_double(src: Tensor, chunk: int, buf: Tensor | None) -> Tensor:
    """``src`` (``k x w``) in float64, contiguous: a full-width block (``w = chunk``) is copied into the
    reused buffer ``buf`` (a fresh allocation per block costs page faults on a CPU, ~20% of a large
    Gram), a narrower last block into a fresh tensor (a strided view of the buffer would change the
    matrix product's rounding)."""
    if src.dtype == torch.float64 or src.shape[1] != chunk:
        return src.double()  # (a float64 block as it is; a column slice converts to a contiguous tensor)
    if buf is None:
        buf = torch.empty(src.shape[0], chunk, dtype=torch.float64, device=src.device)
    return buf.copy_(src)


def solve_gram(gram: Tensor, rhs: Tensor, rcond: float = 1e-12) -> Tensor:
    """Minimum-norm solution of ``G a = b`` for symmetric PSD ``G`` (pseudo-inverse); ``b`` is a vector
    ``(k,)`` or a matrix ``(k, m)`` of right-hand sides.

    A matrix ``b`` is solved with matrix products on row-major eigenvectors (the vectorised engine's
    arithmetic, which its committed results were computed with); a vector with matrix-vector products
    (the per-trial projection's). The two agree to float64 rounding, not bit for bit.
    """
    evals, evecs = torch.linalg.eigh(gram)
    top = evals.max().clamp_min(0.0)
    keep = evals > rcond * top
    if not bool(keep.any()):
        return torch.zeros_like(rhs)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    if rhs.dim() == 2:
        evecs = evecs.contiguous()
        return evecs @ (inv.unsqueeze(-1) * (evecs.T @ rhs))
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
    """Reference: ``Q Q^T v`` with ``Q`` from a float64 reduced QR of ``J^T``, as the paper's code computes it.

    That is the projection only when ``J`` has full row rank. Where it has not (duplicate samples, a
    language model's sample without scored tokens: a zero row), some of ``Q``'s columns are arbitrary
    directions outside the span; the span is ``Q range(R)``, so the coefficients ``Q^T v`` are then
    projected onto the left singular vectors of ``R`` (``k x k``) whose singular values exceed NumPy's
    rank tolerance, ``max(k, d) eps sigma_max``.
    """
    if jac.shape[0] == 0:
        return torch.zeros_like(v)
    q, r = torch.linalg.qr(jac.double().T, mode="reduced")
    w = q.T @ v.double()
    u, sv, _ = torch.linalg.svd(r)
    keep = sv > sv.max() * max(jac.shape) * torch.finfo(torch.float64).eps
    if not bool(keep.all()):  # rank-deficient: only R's range is the span
        w = u[:, keep] @ (u[:, keep].T @ w)
    return (q @ w).to(v.dtype)


# ---- the projection step from per-layer blocks instead of a vmapped Jacobian -----------------------
#
# In ``"per_sample"`` (eval-mode) semantics samples do not interact, so the Jacobian row of sample
# i's score is made of per-layer pieces that one hooked forward pass (each layer call's inputs) and
# one backward pass per head (each layer call's output gradient) determine. The per-layer algebra
# lives in ``linalg/blocks`` (one module per layer kind, registered by module type); this engine
# hooks the registered layers, collects the output gradients, checks the result against autograd
# once per model and input signature, and accumulates the float64 Gram parameter by parameter:
# in ghost form where a block says it is cheaper, else from formed rows in column slices of about
# ``_ROWS_BYTES`` (never the whole Jacobian). A parameter used by several layer calls (a module
# called twice, GPT-2's embedding tied to its output layer) sums the rows of every call. Trainable
# parameters that no block covers go through the ``torch.func`` Jacobian (``output_jacobian_dense``).
# Not for ``"batch_train"`` semantics, where train-mode BatchNorm couples the samples.

from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from overunlearn.linalg.blocks import Block, Budget, Decline, block_for  # noqa: E402
from overunlearn.linalg.blocks.base import count, param_of, registered_block  # noqa: E402
from overunlearn.linalg.blocks.conv import patches2d as _patches  # noqa: E402,F401  (the name tests use)
from overunlearn.linalg.blocks.positional import PositionalBlock  # noqa: E402

#: use the hooked path only if the blocks cover at least this fraction of the parameters, unless
#: they cover every parameter (then no vmapped Jacobian is needed at all)
_MIN_FACTORED_FRACTION = 0.25

#: largest ``(k T)^2`` (entries of one ghost Gram factor, float64) a ghost form may hold
_MAX_GHOST_ENTRIES = 1 << 23

#: bytes of formed rows kept for the back-projection ``J^T alpha`` (where recomputing it from the
#: layer's inputs and output gradients would cost more than ``_KEEP_FACTOR`` times the kept rows'
#: product), all parameters together
_KEEP_BYTES = 1 << 26
_KEEP_FACTOR = 4

#: bytes of one slice of formed rows (``k x columns``, the model's dtype): large enough for efficient
#: batched products; its float64 Gram is then taken in cache-sized blocks (``gram_and_rhs``)
_ROWS_BYTES = 1 << 25

#: parameters whose rows take at most this many bytes (biases, norms' affine parameters, small
#: weights) are formed at once and gathered side by side until ``_STAGE_BYTES``, so that their Gram,
#: ``J v`` and back-projection are a few larger products instead of a dozen small operations per
#: parameter (kernel launches on a GPU, interpreter overhead on a CPU)
_SMALL_BYTES = 1 << 20
_STAGE_BYTES = 1 << 22


def _conv_factored_cheaper(n: int, heads: int, c_out: int, patch: int, t: int) -> bool:
    """Whether the ghost Gram of a linear map applied at ``t`` positions (``n`` samples, ``heads`` scores
    each, ``patch`` inputs and ``c_out`` outputs per position) costs fewer flops than forming its rows."""
    k = n * heads
    if (k * t) ** 2 > _MAX_GHOST_ENTRIES:
        return False
    ghost = (k * t) ** 2 * c_out + (n * t) ** 2 * patch
    dense = k * k * c_out * patch + k * t * c_out * patch  # the block's Gram + forming the rows
    return ghost < dense


def _budget() -> Budget:
    # read at call time, so that tests may monkeypatch the rule and the limit
    return Budget(positional=lambda *a: _conv_factored_cheaper(*a), max_ghost_entries=_MAX_GHOST_ENTRIES)


def _owners(model: nn.Module, kinds: dict[nn.Module, type[Block]] | None = None) -> dict[int, list[nn.Module]]:
    """The modules holding each parameter (``id(p) -> modules``); a submodule's parameter that a hooked
    layer's block claims by a dotted name (``"out_proj.weight"``) is held by that layer instead."""
    out: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                out.setdefault(id(p), []).append(m)
    for m, cls in (kinds or {}).items():
        for _, sub, p in _claimed(m, cls):
            held = out.get(id(p), [])
            out[id(p)] = [m if h is sub else h for h in held]
    return out


def _claimed(m: nn.Module, cls: type[Block]) -> list[tuple[str, nn.Module, Tensor]]:
    """``(name, submodule, parameter)`` of the submodules' parameters the block of ``m`` computes."""
    out = []
    for name in cls.claims(m):
        if "." in name and (p := param_of(m, name)) is not None:
            out.append((name, m.get_submodule(name.rpartition(".")[0]), p))
    return out


def _plan(model: nn.Module, params: list[Tensor]) -> dict[nn.Module, type[Block]] | None:
    """The modules to hook and their blocks (``None``: the hooked path does not apply to this model)."""
    if any(isinstance(m, _BatchNorm) and m.running_mean is None for m in model.modules()):
        return None  # batch statistics even in eval mode: one batched pass couples the samples
    trainable = {id(p) for p in params}
    kinds: dict[nn.Module, type[Block]] = {}
    for m in model.modules():
        own = any(p is not None and id(p) in trainable for p in m._parameters.values())
        cls = block_for(m)
        if cls is not None and (own or any(id(p) in trainable for _, _, p in _claimed(m, cls))):
            kinds[m] = cls
    for m, cls in list(kinds.items()):
        for _, sub, _ in _claimed(m, cls):
            kinds.pop(sub, None)  # computed by m's block: never called as a module of its own
    owners = _owners(model, kinds)
    covered = [p for p in params if _statically_covered(p, owners, kinds)]
    if not covered:
        return None
    if len(covered) < len(params) and \
            sum(p.numel() for p in covered) < _MIN_FACTORED_FRACTION * sum(p.numel() for p in params):
        # the vmapped Jacobian runs anyway and little is covered: the extra hooked forward and
        # backward passes would cost more than they save
        return None
    return kinds


def _statically_covered(p: Tensor, owners: dict[int, list[nn.Module]], kinds: dict[nn.Module, type[Block]]) -> bool:
    ms = owners.get(id(p), [])
    return bool(ms) and all(m in kinds and any(param_of(m, nm) is p for nm in kinds[m].claims(m))
                            for m in ms)


def _factored_layers(model: nn.Module, inputs, params: list[Tensor],
                     heads: int) -> tuple[list[nn.Module], set[nn.Module]] | None:
    """The hooked layers and, among the convolutions and the linear layers applied at several
    positions, those that take the ghost Gram for ``batch_len(inputs)`` samples and ``heads`` scores
    each (from a no-grad forward of one sample; ``None``: the hooked path does not apply)."""
    from overunlearn.linalg.jacobian import _mode

    kinds = _plan(model, params)
    if kinds is None:
        return None
    shapes: dict[nn.Module, tuple[int, int, int]] = {}

    def hook(m, args, kwargs, out):  # noqa: ANN001
        try:
            blk = kinds[m](m, args, kwargs, out)
        except Exception as e:  # a declined call; a block's error: the projection itself reports it
            _blame(e, kinds[m])  # (running out of memory is raised again)
            return
        if isinstance(blk, PositionalBlock) or hasattr(blk, "out_positions"):
            w = m._parameters.get("weight")
            if w is None:
                return
            t = getattr(blk, "out_positions", None) or int(blk.a.shape[1])
            o, patch = (w.shape[0], w[0].numel()) if blk.layout == "op" else (w.shape[1], w.shape[0])
            if t > 1 or hasattr(blk, "out_positions"):
                shapes[m] = (o, patch, t)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in kinds]
    try:
        with _mode(model, train=False), torch.no_grad():
            structure.call_model(model, _first(inputs, None)[0])
    finally:
        for h in handles:
            h.remove()
    n = structure.batch_len(inputs)
    ghost = {m for m, (o, patch, t) in shapes.items() if _conv_factored_cheaper(n, heads, o, patch, t)}
    return list(kinds), ghost


#: models (held weakly) whose hooked projection was checked against autograd: input signature ->
#: the reason a check failed (a key of ``_WHY``, or what a failing block raised: the vmapped Jacobian from then
#: on) or the set of *readings* that passed
#: (how every layer call was read: batch-major, sequence-first, a shared row, ...; see
#: :func:`_reading`). A memo of :func:`_verify`, so that the check runs once per model, input shape and
#: reading, not every step; a batch read differently (a last, smaller batch making ``L = n``; a
#: data-dependent branch) is checked again.
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str | set[tuple]]] = weakref.WeakKeyDictionary()

#: models (held weakly) -> input signature -> the layouts of their position-wise layers' calls
#: (:func:`_probe_layouts`), read once per model and input shape
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[int, list[tuple[bool | None, int | None]]]]] = weakref.WeakKeyDictionary()


def _signature(inputs, layers, params: list[Tensor]) -> tuple:
    leaves = structure.tensor_leaves(inputs)
    return (tuple((tuple(x.shape[1:]), x.dtype, str(x.device)) for x in leaves), tuple(id(m) for m in layers),
            tuple(id(p) for p in params))


def _first(inputs, targets):
    """The first example of ``inputs`` (a copy) and of ``targets``."""
    one = structure.clone(structure.index(inputs, slice(0, 1)))
    return one, None if targets is None else structure.index(targets, slice(0, 1))


class BlockFailedWarning(UserWarning):
    """A block raised an exception or returned a tensor of the wrong shape: the model takes the ``torch.func``
    Jacobian (the same projection, slower)."""


class _BlockFailed(Exception):
    """Block code raised ``error`` (or returned a tensor of the wrong shape): block class ``kind``, its layer
    ``module`` and the parameter ``name`` (where known). The engine treats it as a failed check."""

    def __init__(self, kind: type, module: nn.Module | None, name: str | None, error: BaseException) -> None:
        super().__init__(kind, module, name, error)
        self.kind, self.module, self.name, self.error = kind, module, name, error

    def reason(self, model: nn.Module) -> str:
        """The block, its layer (by its name in ``model``) and parameter, the error and where it was raised (not
        where the engine found a wrong shape)."""
        layer = next((f"layer {n!r}" if n else "the model" for n, m in model.named_modules() if m is self.module),
                     "its layer")
        if self.module is not None:
            layer += f" ({type(self.module).__name__})"
        frames = traceback.extract_tb(self.error.__traceback__)
        at = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" \
            if frames and frames[-1].filename != __file__ else ""
        return (f"block {self.kind.__qualname__} of {layer}" + (f", parameter {self.name!r}," if self.name else "")
                + f" raised {type(self.error).__name__}: {self.error}{at}")


def _blame(err: Exception, blk: Block | type, name: str | None = None, module: nn.Module | None = None) -> _BlockFailed:
    """``err``, raised by block ``blk`` (an instance, or a class with its layer ``module``) on parameter ``name``,
    as a :class:`_BlockFailed` (itself if it is one). Running out of memory is not the block's error: raised
    again."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        raise err
    if isinstance(err, _BlockFailed):
        return err
    if not isinstance(blk, type):
        blk, module = type(blk), getattr(blk, "module", None)
    return _BlockFailed(blk, module, name, err)


def _wrong_shape(blk: Block, name: str, what: str, got: object, expected: tuple) -> _BlockFailed:
    shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
    return _blame(ValueError(f"{what} returned {shape}, expected {expected}"), blk, name)


#: models (held weakly) -> the block classes a ``BlockFailedWarning`` was issued for
_BLOCK_WARNED: weakref.WeakKeyDictionary[nn.Module, set[type]] = weakref.WeakKeyDictionary()


def _warn_block(model: nn.Module, kind: type, reason: str) -> None:
    """Warn once per model and block class that the block failed (the warning points at the caller of
    :func:`project_model_onto_span`)."""
    seen = _BLOCK_WARNED.setdefault(model, set())
    if kind in seen:
        return
    seen.add(kind)
    warnings.warn(f"{reason}. The fast projection takes the torch.func Jacobian for this model instead (the same "
                  "projection, slower). A block must not raise (raise Decline to leave a layer call to the "
                  "fallback) and must return tensors of the documented shapes (docs/architecture.md)",
                  BlockFailedWarning, stacklevel=6)


class _Uses:
    """Which block calls compute each covered parameter: ``id(p) -> [(block, name)]``. What the blocks
    raise or return in a wrong shape reaches the engine as :class:`_BlockFailed`."""

    def __init__(self) -> None:
        self.of: dict[int, list[tuple[Block, str]]] = {}

    def exact_back(self, p: Tensor) -> bool:
        """Whether every block using ``p`` sums its back-projection in float64 on request (``back(..., exact=True)``)."""
        return all("exact" in inspect.signature(type(blk).back).parameters for blk, _ in self.of[id(p)])

    def back(self, p: Tensor, alpha: Tensor, exact: bool = False) -> Tensor:
        out = None
        for blk, name in self.of[id(p)]:
            try:
                g = blk.back(name, alpha, exact=True) if exact else blk.back(name, alpha)
            except Exception as e:
                raise _blame(e, blk, name) from e
            if not isinstance(g, Tensor) or g.numel() != p.numel():
                raise _wrong_shape(blk, name, "back()", g, tuple(p.shape))
            g = g.reshape(p.shape)
            out = g if out is None else out + g
        assert out is not None
        return out

    def done(self, p: Tensor) -> None:
        for blk, _ in self.of[id(p)]:
            try:
                blk.done()
            except Exception as e:
                raise _blame(e, blk) from e


def _verify(model: nn.Module, inputs, score_fn, scores: Tensor, uses: _Uses, covered: list[Tensor],
            targets=None, seen: dict[str, Tensor] | None = None) -> bool:
    """Whether the blocks describe this model's per-sample Jacobian, checked once per model:

    * samples do not interact: the first sample's scores alone equal its scores in the batch
      (a layer using batch statistics, or any other mixing across the batch, fails);
    * for a random combination ``c`` of the rows, the blocks' ``J^T c`` equals autograd's gradient
      of ``sum_r c_r score_r`` with respect to the covered parameters (a parameter also used outside
      its layers, a layer applied to rows that are not per-sample, or a block that does not compute
      what its layer does, fails).

    Run on the graph of the hooked forward (which it keeps). Where it passes, ``seen`` (if given) gets
    ``c`` and the blocks' ``J^T c`` (``jtc``), against which the engine then checks the Gram and ``J v``
    the blocks form (:func:`_gram_agrees`).
    """
    from overunlearn.linalg.jacobian import _mode

    tol = 1e-4 if scores.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    n, heads = scores.shape
    if n > 1:
        one, y = _first(inputs, targets)
        with _mode(model, train=False), torch.no_grad():
            alone = call_scores(score_fn, structure.call_model(model, one), y)
        if alone.shape != scores[:1].shape or not torch.allclose(
                alone, scores[:1].detach(), rtol=tol * 10, atol=tol * float(scores.detach().abs().max())):
            if seen is not None:
                # the same sample twice: unequal scores mean a forward that draws random numbers in eval mode
                with _mode(model, train=False), torch.no_grad():
                    again = call_scores(score_fn, structure.call_model(model, one), y)
                if again.shape == alone.shape and not torch.allclose(again, alone, rtol=tol * 10, atol=tol * float(
                        alone.abs().max())):
                    seen["nondeterministic"] = alone
            return False
    g = torch.Generator().manual_seed(12345)
    c = torch.randn(n * heads, generator=g, dtype=torch.float64).to(scores.device)
    auto = torch.autograd.grad((scores * c.view(heads, n).T.to(scores.dtype)).sum(), covered, retain_graph=True,
                               allow_unused=True)
    ref = _flat(auto, covered)
    pieces = []
    for q in covered:
        pieces.append(uses.back(q, c).reshape(-1).double())
        uses.done(q)  # (one layer's recomputable tensors, e.g. unfolded patches, held at a time)
    got = torch.cat(pieces)
    if seen is not None:
        seen.update(c=c, jtc=got)
    err = float((got - ref).norm()) / max(float(ref.norm()), 1e-30)
    if err <= tol:
        return True
    if err > 1e-3:
        return False
    # a small mismatch: the model may compute in a lower precision than its parameters (Llama's
    # RMSNorm upcasts to float32 and back, so a float64 Llama has float32 gradients). Autograd's
    # own rounding shows in its linearity: g(c1) + g(c2) - g(c1 + c2); accept a mismatch of that order
    c2 = torch.randn(n * heads, generator=g, dtype=torch.float64).to(scores.device)

    def grad_of(w: Tensor) -> Tensor:
        out = torch.autograd.grad((scores * w.view(heads, n).T.to(scores.dtype)).sum(), covered, retain_graph=True,
                                  allow_unused=True)
        return _flat(out, covered)

    noise = float((ref + grad_of(c2) - grad_of(c + c2)).norm()) / max(float(ref.norm()), 1e-30)
    return err <= max(tol, 100 * noise)


def _gram_agrees(gram: Tensor, rhs: Tensor, c: Tensor, q_back: float, v_back: float, scale: float,
                 dtype: torch.dtype) -> bool:
    """Whether the Gram and ``J v`` the blocks formed (rows or ghost form) agree with their ``J^T c`` that
    :func:`_verify` checked against autograd: ``c^T G c = |J^T c|^2`` and ``c . J v = v . J^T c``
    (``scale``: ``|v| |J^T c|``). A block whose rows disagree with its back-projection fails here. Rows
    and back-projection round independently in the model's ``dtype``: the tolerance is 1e-6 in float64,
    else the larger of 1e-4 and 10 ulps of ``dtype`` (float16: ~1e-2), the least precise of the scores' and
    the covered parameters' dtypes."""
    tol = 1e-6 if dtype == torch.float64 else max(1e-4, 10 * torch.finfo(dtype).eps)
    q_gram = float(c @ gram @ c)
    return abs(q_gram - q_back) <= tol * max(q_back, 1e-30) and abs(float(c @ rhs) - v_back) <= tol * max(scale, 1e-30)


def _flat(grads, like: list[Tensor]) -> Tensor:
    return torch.cat([(a if a is not None else torch.zeros_like(q)).reshape(-1).double() for a, q in zip(grads, like)])


@dataclass
class Route:
    """How the last call of :func:`project_model_onto_span` computed its projection (for tests,
    benchmarks and debugging): ``"hooked"`` (blocks, plus the ``torch.func`` Jacobian for the
    ``dense`` parameters) or ``"materialised"`` (the whole vmapped Jacobian), with the number of
    parameters that took the ghost form and formed rows, and why the blocks were not used."""

    path: str = ""
    ghost: int = 0
    rows: int = 0
    dense: int = 0
    reason: str = ""


#: the route of the last projection in this process
last_route = Route()


def _route(path: str, reason: str = "", **counts: int) -> None:
    global last_route
    last_route = Route(path=path, reason=reason, **counts)


def _under_autocast(m: nn.Module, args: tuple, out: Any) -> bool:
    """Whether a layer call ran under autocast for its device (read from its output, a first tensor among
    its outputs -- ``nn.MultiheadAttention`` returns a tuple -- or inputs, else its parameters)."""
    first = out if isinstance(out, Tensor) else next(
        (t for t in (*(out if isinstance(out, (tuple, list)) else ()), *args) if isinstance(t, Tensor)), None)
    if first is None:
        first = next(m.parameters(), None)
    return first is not None and torch.is_autocast_enabled(first.device.type)


def _hook_target(out: Tensor) -> Tensor | None:
    """The tensor to hook for ``out``'s gradient before later in-place ops: ``out`` itself, or the
    base of a view that covers the whole base (``None``: another kind of view)."""
    base = out._base
    if base is None:
        return out
    if (base.numel() == out.numel() and out.is_contiguous() and base.is_contiguous()
            and out.storage_offset() == base.storage_offset()):
        return base
    return None


def _main_input(args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor | None, Callable[[Tensor], tuple[tuple, dict]]]:
    """A call's main input (the first positional argument, else the keyword ``input``,
    ``hidden_states`` or ``x``) and a function giving ``(args, kwargs)`` with it replaced."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    for name in ("input", "hidden_states", "x"):
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name], lambda t, name=name: (args, {**kwargs, name: t})
    return None, lambda t: (args, kwargs)


def _reading(x: Tensor | None, out: Any, n: int, probed: bool | None, rows: int | None = None) -> str:
    """How the engine reads one call of a position-wise layer with ``n`` samples: ``"b"`` batch-major
    (as any other layer's call; the block then checks its batch), ``"s"`` sequence-first -- the
    samples along dimension 1 of the input and the output, not along dimension 0 -- handed to the
    block as batch-major views; at ``L = n`` the shapes read both ways and the forward of one
    sample decides (``probed``, :func:`_probe_layouts`): ``"b?"``, ``"s?"``, or ``"x"`` (no answer, or
    an answer the shapes contradict: the call is declined, its parameters take the fallback).
    ``(1, n, ...)`` reads as a row shared by all samples (``"b"``; for a sequence-first call on one
    token that is wrong, and the check against autograd catches it). ``"f"``: a call on the samples'
    positions flattened into one dimension, ``(n L, ...)`` (OPT's feed-forward layers), where the forward
    of one sample called it on ``rows = L > 1`` rows: handed to the block as ``(n, L, ...)`` views
    (sample-major, as ``reshape(-1, E)`` of a batch-major tensor gives; a position-major flattening fails
    the check)."""
    if (n > 1 and rows is not None and rows > 1 and isinstance(x, Tensor) and isinstance(out, Tensor)
            and x.dim() >= 2 and out.dim() >= 2 and x.shape[0] == out.shape[0] == n * rows):
        return "f"
    if (n <= 1 or not isinstance(x, Tensor) or not isinstance(out, Tensor) or x.dim() < 2 or out.dim() < 3
            or tuple(x.shape[:2]) != tuple(out.shape[:2]) or x.shape[1] != n or x.shape[0] == 1):
        return "b"
    if x.shape[0] != n:
        return "x" if probed is False else "s"
    return {True: "s?", False: "b?", None: "x"}[probed]


def _probe_layouts(model: nn.Module, inputs,
                   kinds: dict[nn.Module, type[Block]]) -> dict[int, list[tuple[bool | None, int | None]]]:
    """For every call of a position-wise layer (by the layer's index in ``kinds``), read from a forward
    of the first sample alone: whether it takes its input sequence-first -- its sample dimension is the
    one of size 1 (``None`` where both or neither are) -- and how many rows its input has (``None``: not
    a tensor of 2 or more dimensions). Gradients stay on, so that modules with a no-grad fast path
    (``nn.TransformerEncoderLayer``) call their layers as in the hooked forward."""
    from overunlearn.linalg.jacobian import _mode

    index = {m: i for i, m in enumerate(kinds) if kinds[m].positionwise}
    seen: dict[int, list[tuple[bool | None, int | None]]] = {i: [] for i in index.values()}
    if not index:
        return seen

    def hook(m, args, kwargs, out):  # noqa: ANN001
        x, _ = _main_input(args, kwargs)
        layout = None
        if isinstance(x, Tensor) and isinstance(out, Tensor) and x.dim() >= 2 and out.dim() >= 3:
            if x.shape[0] == 1 and x.shape[1] != 1:
                layout = False
            elif x.shape[1] == 1 and x.shape[0] != 1:
                layout = True
        seen[index[m]].append((layout, int(x.shape[0]) if isinstance(x, Tensor) and x.dim() >= 2 else None))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in index]
    try:
        with _mode(model, train=False), torch.enable_grad():
            structure.call_model(model, _first(inputs, None)[0])
    except Exception:  # noqa: BLE001 - a model that cannot run one sample: the shapes decide
        return {i: [] for i in index.values()}
    finally:
        for h in handles:
            h.remove()
    return seen


def _non_finite() -> FloatingPointError:
    return FloatingPointError("the output Jacobian contains NaN or infinite values")


def project_model_onto_span(model: nn.Module, inputs, score_fn, v: Tensor,
                            mode: str = "per_sample", rcond: float = 1e-12, targets=None) -> Tensor:
    """``P_span(J^T) v`` for the Jacobian ``J`` of ``score_fn(model(inputs)[, targets])`` w.r.t. the
    trainable parameters (flattened in ``model.parameters()`` order), the same result as
    ``project_onto_span(output_jacobian(model, inputs, score_fn, mode, targets), v)``. ``inputs`` is a
    tensor, a tuple or a dict of tensors (:mod:`overunlearn.structure`).

    In ``"per_sample"`` mode the layers with a registered block (``linalg/blocks``: linear layers on
    any leading dimensions, GPT-2's ``Conv1D``, convolutions, embeddings, LayerNorm, RMSNorm,
    eval-mode BatchNorm, ...) are handled from forward and backward hooks (see above); anything else
    falls back to the vmapped ``torch.func`` Jacobian. So does the whole model once a block fails the
    check against autograd, raises an exception (``Decline`` aside) or returns a tensor of the wrong
    shape; the last two with a :class:`BlockFailedWarning` naming the block, its layer and the error.
    """
    _check_adapted(model)
    out = _project(model, inputs, score_fn, v, mode, rcond, targets)
    assert out is not None
    return out


def _check_adapted(model: nn.Module) -> None:
    """A parameter that peft's ``ParamWrapper`` adapts with LoRA must be frozen: the wrapper swaps it in and out
    at every forward, after which autograd no longer reaches it (and ``torch.func`` cannot trace the swap)."""
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper" and callable(getattr(m, "get_param", None)):
            p = m.get_param()
            if isinstance(p, Tensor) and p.requires_grad:
                name = next((n for n, q in model.named_parameters() if q is p), m.parameter_name)
                raise ValueError(f"parameter {name!r} is adapted by a peft LoRA ParamWrapper and is trainable too; "
                                 "freeze it (p.requires_grad_(False); peft's get_peft_model does) -- LoRA trains the "
                                 "adapter's A and B, and the projection cannot follow the wrapper's parameter swap")


def _project(model: nn.Module, inputs, score_fn, v: Tensor, mode: str, rcond: float, targets,
             explain: dict[str, Any] | None = None) -> Tensor | None:
    """:func:`project_model_onto_span`; with ``explain`` (a dict), nothing is computed past the choice of
    route (no Jacobian, no Gram): the dict gets ``path``, ``reason``, ``rows`` (``None`` if not known),
    ``forms`` (``id(p) ->`` ``"ghost"``, ``"rows"``, ``"gathered"`` or ``"torch.func"``) and ``why``
    (``id(p) ->`` why that parameter takes the ``torch.func`` Jacobian), and ``None`` is returned."""
    out = _project_once(model, inputs, score_fn, v, mode, rcond, targets, explain)
    if out is _RETRY:  # (once: the first attempt, and all it held, is gone)
        out = _project_once(model, inputs, score_fn, v, mode, rcond, targets, explain)
    assert out is not _RETRY
    return out  # type: ignore[return-value]


#: what one attempt returns when the check rejected flattened calls (read no more): try again
_RETRY = object()


def _project_once(model: nn.Module, inputs, score_fn, v: Tensor, mode: str, rcond: float, targets,
                  explain: dict[str, Any] | None) -> Tensor | None | object:
    from torch.profiler import record_function  # phases named in profiles; free when no profiler runs

    from overunlearn.linalg.jacobian import _mode, output_jacobian, output_jacobian_dense

    def materialised(reason: str, why_of: dict[int, str] | None = None) -> Tensor | None:
        _route("materialised", reason)
        why = _WHY.get(reason, reason)
        if explain is not None:
            explain.update(path="materialised", reason=why, rows=None, forms={id(p): "torch.func" for p in params},
                           why={id(p): (why_of or {}).get(id(p), why) for p in params})
            return None
        if model not in _WARNED and model not in _SIZED:
            # once per model: the rows (samples x scores) from one forward pass, to size the Jacobian
            _SIZED.add(model)
            with _mode(model, train=False), torch.no_grad():
                rows = int(call_scores(score_fn, structure.call_model(model, inputs), targets).numel())
            _warn_fallback(model, params, rows, why, depth=1)
        return project_onto_span(output_jacobian(model, inputs, score_fn, mode=mode, targets=targets),  # type: ignore[arg-type]
                                 v, rcond)

    params = [p for p in model.parameters() if p.requires_grad]
    kinds = _plan(model, params) if mode == "per_sample" else None
    if kinds is None:
        if mode != "per_sample":
            return materialised("mode")
        batch_stats = any(isinstance(m, _BatchNorm) and m.running_mean is None for m in model.modules())
        return materialised("batch statistics" if batch_stats else "no blocks")
    memo = _VERIFIED.setdefault(model, {})
    signature = _signature(inputs, kinds, params)
    verified = memo.get(signature)
    if isinstance(verified, str):  # (a failed check: its reason, as it was when it failed)
        return materialised("check failed earlier" if verified == "check failed" else verified)

    def broken(failure: _BlockFailed) -> Tensor | None:
        # block code raised, or returned a wrong shape: as a failed check, the vmapped Jacobian from now on
        memo[signature] = reason = failure.reason(model)
        _warn_block(model, failure.kind, reason)
        return materialised(reason)

    probed = _LAYOUTS.setdefault(model, {})
    if signature not in probed:
        probed[signature] = _probe_layouts(model, inputs, kinds)
    layouts = probed[signature]
    position = {m: i for i, m in enumerate(kinds)}

    calls: dict[nn.Module, list[Block | None]] = {m: [] for m in kinds}
    blocks: list[Block] = []
    grads: dict[int, Tensor] = {}
    versions: dict[int, tuple[list[int], int]] = {}
    hookable: dict[int, bool] = {}

    n_in = structure.batch_len(inputs)
    readings: dict[nn.Module, list[str]] = {m: [] for m in kinds}

    autocast: list[bool] = []
    failures: list[_BlockFailed] = []  # (a block raising in the hook must not stop the model's forward)

    def hook(m, args, kwargs, out):  # noqa: ANN001
        cls = kinds[m]
        replace = None  # what the model gets instead of the call's output (None: the output itself)
        if _under_autocast(m, args, out):
            # mixed precision (accelerate's / the Trainer's bf16 or fp16): the layer computed in another
            # dtype than its parameters'; the blocks read layers in their own dtypes
            autocast.append(True)
            calls[m].append(None)
            return None
        if (n_in > 1 and args and isinstance(args[0], Tensor) and args[0].dim() > 0 and args[0].shape[0] == 1
                and isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == 1):
            # a call on one row shared by every sample (GPT-2's and BERT's position embeddings): its
            # output is broadcast over the batch, so its per-sample gradients are those of the
            # broadcast copy; hand the model that copy (equal values) and treat the call as per sample
            args = (args[0].expand(n_in, *args[0].shape[1:]), *args[1:])
            out = replace = out.expand(n_in, *out.shape[1:])
            code = "e"
        elif cls.positionwise:
            x, put = _main_input(args, kwargs)
            seen = layouts.get(position[m], [])
            j = len(calls[m])
            code = _reading(x, out, n_in, *(seen[j] if j < len(seen) else (None, None)))
            if code in ("s", "s?"):
                # a sequence-first call (L, n, ...) of a layer acting per position: the block sees
                # batch-major views, and the model gets the view of the block's output back (equal values)
                args, kwargs = put(x.transpose(0, 1))  # type: ignore[union-attr]
                out = out.transpose(0, 1)
            elif code == "f":
                # a call on the positions of all samples flattened, (n L, ...): the same, with (n, L, ...) views
                try:
                    args, kwargs = put(x.view(n_in, -1, *x.shape[1:]))  # type: ignore[union-attr]
                    out = out.view(n_in, -1, *out.shape[1:])
                except RuntimeError:  # (not viewable so)
                    code = "x"
        else:
            code = "b"
        readings[m].append(code)
        if code == "x":
            calls[m].append(None)
            return None
        try:
            blk = cls(m, args, kwargs, out)
            if blk.output is not None and not isinstance(blk.output, Tensor):
                raise TypeError(f"its output is a {type(blk.output).__name__}, not a tensor")
            saved = [t._version for t in blk.saved] if blk.output is not None else []
        except Decline:
            calls[m].append(None)
            return replace
        except Exception as e:
            failures.append(_blame(e, cls, module=m))
            calls[m].append(None)
            return replace
        if blk.output is None or not blk.output.requires_grad:
            calls[m].append(None)  # outside the graph
            return replace
        slot = len(blocks)
        blocks.append(blk)
        calls[m].append(blk)
        versions[slot] = (saved, blk.output._version)
        # for an output that a later in-place op (ReLU(inplace=True)) overwrites: a tensor hook sees
        # the gradient w.r.t. the value before that op. On a view (a linear layer on a sequence
        # returns its matrix product reshaped), the hook goes on the base tensor: a view's hook is
        # lost when the view is modified in place
        target = _hook_target(blk.output)
        if target is not None:
            shape = blk.output.shape
            target.register_hook(lambda g, s=slot, shape=shape: grads.__setitem__(s, g.detach().reshape(shape)))
        hookable[slot] = target is not None
        if blk.module_output is not None:
            return blk.module_output
        if code in ("s", "s?"):
            return blk.output.transpose(0, 1)
        if code == "f":
            return blk.output.view(-1, *blk.output.shape[2:])
        return replace

    # (a copy: the model may work in place on its input)
    x = structure.clone(structure.detach(inputs))
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in kinds]
    failed = False
    try:
        with _mode(model, train=False), torch.enable_grad(), record_function("overunlearn::hooked_forward"):
            scores = call_scores(score_fn, structure.call_model(model, x), targets)
    except Exception:
        if not any("e" in r for r in readings.values()):
            raise
        failed = True
    finally:
        for h in handles:
            h.remove()
    if failed:
        # the model did not take a broadcast copy of a shared row: remember, and use the vmapped path
        memo[signature] = "a shared-row call could not be expanded"
        return materialised(memo[signature])
    if failures:
        return broken(failures[0])
    if autocast:
        return materialised("autocast")
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("the model's outputs, and so its output Jacobian, contain NaN or infinite values")
    n, heads = scores.shape
    if n != structure.batch_len(inputs) or not scores.requires_grad:
        return materialised("scores")

    # a block call is usable if it saw one row per sample and nothing changed its inputs afterwards
    slot_of = {id(b): s for s, b in enumerate(blocks)}
    for cs in calls.values():
        for j, blk in enumerate(cs):
            if blk is None:
                continue
            s = slot_of[id(blk)]
            changed = blk.output._version != versions[s][1]
            if blk.batch != n or [t._version for t in blk.saved] != versions[s][0] or (changed and not hookable[s]):
                cs[j] = None
    owners = _owners(model, kinds)
    uses = _Uses()
    covered: list[Tensor] = []
    for p in params:
        ms = owners.get(id(p), [])
        if not ms or any(m not in kinds or not calls[m] or any(b is None for b in calls[m]) for m in ms):
            continue
        names = [next(nm for nm in kinds[m].claims(m) if param_of(m, nm) is p) for m in ms
                 if any(param_of(m, nm) is p for nm in kinds[m].claims(m))]
        if len(names) != len(ms):
            continue
        us = [(b, nm) for m, nm in zip(ms, names) for b in calls[m]]
        try:
            unequal = len({b.units(nm) for b, nm in us}) > 1  # type: ignore[union-attr]
        except Exception as e:
            return broken(_blame(e, *us[0]))  # type: ignore[arg-type]
        if unequal:
            continue  # (blocks that slice its rows differently: the fallback takes it)
        uses.of[id(p)] = us  # type: ignore[assignment]
        covered.append(p)
    dense = [p for p in params if id(p) not in uses.of]
    if not covered or (dense and sum(p.numel() for p in covered)
                       < _MIN_FACTORED_FRACTION * sum(p.numel() for p in params)):
        return materialised("too little covered", {id(p): _why_uncovered(p, owners, kinds, calls) for p in dense})
    needed = list({id(b): b for p in covered for b, _ in uses.of[id(p)]}.values())

    # what each backward pass is asked for: the layers' outputs (autograd then computes no weight
    # gradient at all), or, for an output changed in place after the call, something below it
    wanted: dict[int, Tensor] = {}
    for blk in needed:
        s = slot_of[id(blk)]
        if blk.output._version == versions[s][1]:
            wanted[id(blk.output)] = blk.output
        else:
            below = next((t for t in blk.saved if t.requires_grad), None)
            below = below if below is not None else next(q for _, q in blk.parameters())
            wanted[id(below)] = below
    per_head: dict[int, list[Tensor]] = {slot_of[id(b)]: [] for b in needed}
    order = list(wanted)
    # how this batch's calls were read (and which were usable): checked once per reading
    reading = tuple((position[m], tuple(r if b is not None else r + "-" for r, b in zip(readings[m], calls[m])))
                    for m in kinds if calls[m])
    check = not isinstance(verified, set) or reading not in verified
    for h in range(heads):
        grads.clear()
        with record_function("overunlearn::head_backward"):
            # the last backward frees the forward's saved tensors as it goes, unless the check needs them
            got = torch.autograd.grad(scores[:, h].sum(), list(wanted.values()), retain_graph=check or h + 1 < heads,
                                      allow_unused=True)
        returned = dict(zip(order, got))
        for blk in needed:
            s = slot_of[id(blk)]
            out_m = blk.output
            # an unchanged output: the gradient autograd returned for it; else the tensor hook's
            g = returned.get(id(out_m)) if out_m._version == versions[s][1] else grads.get(s)
            per_head[s].append(g if g is not None else torch.zeros(out_m.shape, dtype=out_m.dtype, device=out_m.device))
    try:
        with record_function("overunlearn::blocks"):
            for blk in needed:
                ds = per_head.pop(slot_of[id(blk)])
                d = ds[0] if heads == 1 else torch.stack(ds).reshape(n * heads, *ds[0].shape[1:])
                blk.bind(d, n, heads)
    except (Decline, ValueError):
        return materialised("a block declined")
    except Exception as e:
        return broken(_blame(e, blk))
    checked: dict[str, Tensor] = {}
    # the least precise of the scores' and the covered parameters' dtypes (a float16 language model's
    # scores are float32): what the Gram check's tolerance follows
    score_dtype = max([scores.dtype, *{p.dtype for p in covered}], key=lambda t: torch.finfo(t).eps)
    if check:
        try:
            with record_function("overunlearn::verify"):
                ok = _verify(model, inputs, score_fn, scores, uses, covered, targets, checked)
        except _BlockFailed as e:  # (the model's own errors are not caught)
            return broken(e)
        if not ok and any("f" in codes for _, codes in reading):
            # the flattened calls may be position-major: read them no more (their parameters then take
            # the fallback) and try again, rather than giving the whole model to the vmapped Jacobian
            probed[signature] = {i: [(layout, None) for layout, _ in seen] for i, seen in layouts.items()}
            return _RETRY
        if not ok:
            memo[signature] = "nondeterministic" if "nondeterministic" in checked else "check failed"
            return materialised(memo[signature])
    # (a passed check is remembered only after the Gram check below, which explain does not reach)
    remember = check
    k = n * heads
    budget = _budget()
    if explain is not None:
        try:
            forms = {id(p): _form(p, uses.of[id(p)], budget, k) for p in covered}
        except _BlockFailed as e:
            return broken(e)
        forms.update({id(p): "torch.func" for p in dense})
        explain.update(path="hooked", reason="", rows=k, forms=forms,
                       why={id(p): _why_uncovered(p, owners, kinds, calls) for p in dense})
        return None
    # the blocks hold what they need; free the graph of the hooked forward
    del scores, wanted
    grads.clear()
    try:
        for blk in blocks:
            blk.output, blk.saved = None, []
            blk.done()
    except Exception as e:
        return broken(_blame(e, blk))

    offsets, off = {}, 0
    for p in params:
        offsets[id(p)] = (off, p.numel())
        off += p.numel()

    def part(p: Tensor) -> Tensor:
        o, c = offsets[id(p)]
        return v[o : o + c].view(p.shape)

    probe = None
    if "jtc" in checked:
        # (scalars only: the check of the Gram below needs no d-sized vector)
        jtc = checked.pop("jtc")
        v_back = float(sum(float(part(p).reshape(-1).double() @ piece)
                           for p, piece in zip(covered, jtc.split([p.numel() for p in covered]))))
        probe = (checked.pop("c"), float(jtc @ jtc), v_back, float(jtc.norm()) * float(v.norm()))
        del jtc
    gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    rhs = torch.zeros(k, dtype=torch.float64, device=v.device)
    n_ghost = 0
    kept: dict[int, list[tuple[slice | Tensor, Tensor]]] = {}
    kept_bytes = 0
    stage = _Stage(gram, rhs)
    scratches: dict[torch.dtype, Tensor] = {}
    try:
        with record_function("overunlearn::gram"):
            for p in covered:
                us = uses.of[id(p)]
                size = k * p.numel() * p.element_size()
                form = _form(p, us, budget, k)
                if form == "ghost":
                    g, r = us[0][0].ghost(us[0][1], part(p))
                    if g.shape != (k, k) or r.shape != (k,):
                        raise ValueError(f"ghost() returned shapes {tuple(g.shape)} and {tuple(r.shape)}, expected "
                                         f"({k}, {k}) and ({k},)")
                    gram += g
                    rhs += r
                    n_ghost += 1
                elif form == "gathered":
                    rows = _summed_rows(us, slice(0, _units(p, us)), k, p.numel())
                    stage.add(p, rows, part(p).reshape(-1))
                else:
                    keep = (sum(blk.back_flops(name) for blk, name in us) > _KEEP_FACTOR * k * p.numel()
                            and kept_bytes + size <= _KEEP_BYTES)
                    slices = _rows_gram(p, us, part(p), gram, rhs, keep, scratches)
                    if slices is not None:
                        kept[id(p)] = slices
                        kept_bytes += size
                for blk, _ in us:
                    blk.done()
            stage.flush()
    except Exception as e:  # (what a block raised, or an operation on what it returned)
        return broken(_blame(e, *us[0]))
    if probe is not None and not _gram_agrees(gram, rhs, *probe, dtype=score_dtype):
        memo[signature] = "check failed"
        return materialised("check failed")
    if remember:
        memo[signature] = (verified if isinstance(verified, set) else set()) | {reading}
    _route("hooked", ghost=n_ghost, rows=len(covered) - n_ghost, dense=len(dense))
    jd = None
    if dense:
        reasons = dict.fromkeys(_why_uncovered(p, owners, kinds, calls) for p in dense)
        _warn_fallback(model, dense, k, "; ".join(reasons))
        jd = output_jacobian_dense(model, inputs, score_fn, dense, targets)  # (k, d_dense), same row order
        if not torch.isfinite(jd).all():
            raise _non_finite()
        g2, r2 = gram_and_rhs(jd, torch.cat([part(p).reshape(-1) for p in dense]))
        gram += g2
        rhs += r2
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise _non_finite()
    alpha = solve_gram(gram, rhs, rcond)
    exact = _cancels(gram, rhs, alpha)

    out = torch.empty_like(v)
    with record_function("overunlearn::back_projection"):
        staged = stage.back(alpha)
        try:
            for p in covered:
                o, c = offsets[id(p)]
                if id(p) in staged:
                    out[o : o + c] = staged.pop(id(p))
                elif id(p) in kept:
                    out[o : o + c] = _back_from_rows(p, kept.pop(id(p)), alpha, _units(p, uses.of[id(p)])).to(v.dtype)
                elif exact and p.dtype != torch.float64 and not uses.exact_back(p):
                    out[o : o + c] = _back_exact(p, uses.of[id(p)], alpha).to(v.dtype)
                    uses.done(p)
                elif exact and p.dtype != torch.float64:
                    out[o : o + c] = uses.back(p, alpha, exact=True).reshape(-1).to(v.dtype)
                    uses.done(p)
                else:
                    out[o : o + c] = uses.back(p, alpha).reshape(-1).to(v.dtype)
                    uses.done(p)
        except _BlockFailed as e:
            return broken(e)
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


def _form(p: Tensor, us: list[tuple[Block, str]], budget: Budget, k: int) -> str:
    """How the engine accumulates covered parameter ``p``'s Gram block: ``"ghost"`` (factored, one
    use), ``"gathered"`` (small rows, gathered with other small parameters' into one product) or
    ``"rows"`` (formed rows in slices)."""
    try:
        if len(us) == 1 and us[0][0].ghost_cheaper(us[0][1], budget):
            return "ghost"
        if k * p.numel() * p.element_size() <= _SMALL_BYTES and all(blk.support(name) is None for blk, name in us):
            return "gathered"
    except Exception as e:
        raise _blame(e, *us[0]) from e
    return "rows"


#: why a whole projection takes the vmapped Jacobian, by the engine's short reason
_WHY = {
    "mode": "the Jacobian mode is not per_sample (one batched train-mode pass couples the samples)",
    "no blocks": "the blocks cover less than a quarter of the model's parameters (the hooked passes would cost "
                 "more than they save)",
    "batch statistics": "a BatchNorm uses batch statistics in eval mode (no running statistics), which couples "
                        "the samples",
    "check failed": "the blocks' result did not match autograd's on this model (a parameter used outside its "
                    "layers, samples mixed by a layer, or a block that does not compute what its layer does)",
    "a shared-row call could not be expanded": "a layer called on one row shared by all samples could not be "
                                               "given a per-sample copy",
    "scores": "the scores do not have one row per sample, or do not depend on the parameters",
    "too little covered": "the usable layer calls cover less than a quarter of the model's parameters",
    "a block declined": "a block could not read its layer's output gradients",
    "nondeterministic": "the model's outputs differ between two identical forward passes in eval mode (its forward "
                        "draws random numbers, e.g. noise, or dropout called with training=True); the blocks need a "
                        "deterministic forward",
    "autocast": "the model runs under autocast (mixed precision, e.g. the Trainer's bf16=True / fp16=True), so its "
                "layers compute in a lower precision than their parameters, which the blocks do not follow",
}
_WHY["check failed earlier"] = _WHY["check failed"]


def _why_uncovered(p: Tensor, owners: dict[int, list[nn.Module]], kinds: dict[nn.Module, type[Block]],
                   calls: dict[nn.Module, list[Block | None]]) -> str:
    """Why covered-path parameter ``p`` is not covered by a block (so takes the ``torch.func`` Jacobian)."""
    for m in owners.get(id(p), []):
        name = type(m).__name__
        if m not in kinds:
            if registered_block(m) is None:
                return f"{name} has no block"
            return f"{name}'s block does not accept this module (its own forward, hooks of its own, or a parametrized weight)"
        if not calls[m]:
            return f"{name} was not called during the forward pass"
        if any(b is None for b in calls[m]):
            return (f"a call of {name} could not be used by its block (not one row per sample, its input changed "
                    "in place, or a form of call the block declines)")
        if not any(param_of(m, nm) is p for nm in kinds[m].claims(m)):
            return f"{name}'s block does not compute this parameter"
    return "it is held by several modules, not all of them covered"


class JacobianFallbackWarning(UserWarning):
    """The fast projection forms a large ``torch.func`` Jacobian for parameters no block covers."""


#: warn when the ``torch.func`` Jacobian the fast projection forms is at least this large
_WARN_BYTES = 1 << 30

#: models (held weakly) already warned about, and those whose whole Jacobian was sized
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_SIZED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_fallback(model: nn.Module, dense: list[Tensor], rows: int, why: str, depth: int = 0) -> None:
    """Warn once per model when the ``torch.func`` Jacobian of ``dense`` (``rows`` rows) is large; ``depth``:
    the frames between the caller and ``_project_once`` (the warning points at the caller of
    :func:`project_model_onto_span`)."""
    entries = sum(p.numel() for p in dense)
    size = rows * sum(p.numel() * p.element_size() for p in dense)
    if size < _WARN_BYTES or model in _WARNED:
        return
    _WARNED.add(model)
    warnings.warn(
        f"the fast projection forms the torch.func Jacobian of {len(dense)} parameter tensor(s) ({entries:,} "
        f"entries x {rows} rows, "
        f"{size / 2**30:.1f} GiB) because {why}. overunlearn.linalg.explain_projection (or MinNormOG.explain) "
        "lists the parameters and why; a block for your own layer (register_block, docs/architecture.md) or "
        "fewer samples per projection (grad_sample_size) makes it smaller", JacobianFallbackWarning,
        stacklevel=5 + depth)


class _Stage:
    """Rows of small parameters gathered side by side (``k x columns``): one Gram product and one
    ``J v`` per ``_STAGE_BYTES``, added to ``gram`` and ``rhs``; the gathered rows (float64) are kept
    for one back-projection product, up to ``_KEEP_BYTES`` in all (the parameters beyond that are
    back-projected by their blocks: :meth:`back` leaves them out)."""

    def __init__(self, gram: Tensor, rhs: Tensor) -> None:
        self.gram, self.rhs = gram, rhs
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.bytes = 0
        self.done: list[tuple[Tensor, list[Tensor]]] = []
        self.kept = 0

    def add(self, p: Tensor, rows: Tensor, vp: Tensor) -> None:
        self.pending.append((p, rows, vp))
        self.bytes += rows.numel() * rows.element_size()
        if self.bytes >= _STAGE_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ps, rows, vs = zip(*self.pending)
        widths = [r.shape[1] for r in rows]
        block = torch.empty(self.gram.shape[0], sum(widths), dtype=torch.float64, device=self.gram.device)
        for piece, r in zip(block.split(widths, 1), rows):
            piece.copy_(r)  # (converted once, into place)
        vcat = torch.cat(vs).double()
        self.gram += block @ block.T
        self.rhs += block @ vcat
        size = block.numel() * block.element_size()
        if self.kept + size <= _KEEP_BYTES:
            self.done.append((block, list(ps)))
            self.kept += size
        self.pending, self.bytes = [], 0

    def back(self, alpha: Tensor) -> dict[int, Tensor]:
        """``J_p^T alpha`` of every staged parameter, flattened, in its dtype (``id(p) ->``)."""
        out: dict[int, Tensor] = {}
        for block, ps in self.done:
            flat = block.T @ alpha
            for p, piece in zip(ps, flat.split([q.numel() for q in ps])):
                out[id(p)] = piece.to(p.dtype)
        self.done = []
        return out


#: above this cancellation factor of ``J^T alpha`` (see :func:`_cancels`) the back-projection is taken from
#: rows in float64 instead of the blocks' own, in the parameters' dtype: at 1000, float32's rounding
#: (1.2e-7 relative) could reach 1e-4 of the result
_CANCEL = 1000.0


def _cancels(gram: Tensor, rhs: Tensor, alpha: Tensor) -> bool:
    """Whether ``J^T alpha`` cancels: ``sum_i |alpha_i| |J_i| / |J^T alpha|`` above :data:`_CANCEL`.

    ``alpha = G^+ J v`` is large along eigenvectors of ``G`` with small eigenvalues (an ill-conditioned or
    nearly rank-deficient Jacobian: smooth low-dimensional inputs, as Data Poisoning's MLP has), and its
    combination of rows then cancels to a vector far smaller than its terms. Summed in float32, as a
    block's back-projection sums them, the result keeps float32's rounding of the terms, so the step's
    first-order change of the retained outputs, ``J (v - P v)``, grew from float32's floor to ~1e-3 of
    ``|v|`` on such a model. ``|J_i| = sqrt(G_ii)`` and ``|J^T alpha|^2 = alpha . J v``: nothing to compute.
    """
    norm2 = float(alpha @ rhs)
    if not norm2 > 0.0:
        return False
    terms = float((alpha.abs() * gram.diagonal().clamp_min(0).sqrt()).sum())
    return terms > _CANCEL * math.sqrt(norm2)


def _back_exact(p: Tensor, us: list[tuple[Block, str]], alpha: Tensor) -> Tensor:
    """``J_p^T alpha`` (flattened) from ``p``'s rows formed again slice by slice (as for its Gram) and taken in
    float64: the back-projection consistent with the float64 Gram when the coefficients cancel."""
    k = alpha.shape[0]
    first, inner, _, pieces = _row_slices(p, us, k)
    out = torch.zeros(first, inner, dtype=p.dtype, device=p.device)  # (rows outside the support: zero)
    for ix in pieces:
        rows = _summed_rows(us, ix, k, count(ix, first) * inner)
        out[ix] = _rows_back(rows, alpha, p.dtype).view(-1, inner)
    return out.reshape(-1)


def _rows_back(rows: Tensor, alpha: Tensor, dtype: torch.dtype) -> Tensor:
    """``rows^T alpha`` in float64 (cache-sized blocks of columns), returned in ``dtype``."""
    flat = torch.empty(rows.shape[1], dtype=dtype, device=rows.device)
    chunk = _chunk(rows.shape[0], None, rows.device)
    buf = None
    for s in range(0, rows.shape[1], chunk):
        block = _as_double(rows[:, s : s + chunk], chunk, buf)
        buf = block if block.shape[1] == chunk else buf
        flat[s : s + chunk] = (block.T @ alpha).to(dtype)
    return flat


def _back_from_rows(p: Tensor, slices: list[tuple[slice | Tensor, Tensor]], alpha: Tensor, first: int) -> Tensor:
    """``J_p^T alpha`` from kept rows (float64 in cache-sized blocks), flattened."""
    make = torch.zeros if any(isinstance(ix, Tensor) for ix, _ in slices) else torch.empty  # (gaps: zero rows)
    out = make(first, p.numel() // max(first, 1), dtype=p.dtype, device=p.device)
    for ix, rows in slices:
        out[ix] = _rows_back(rows, alpha, p.dtype).view(-1, out.shape[1])
    return out.reshape(-1)


def _units(p: Tensor, us: list[tuple[Block, str]]) -> int:
    """Into how many slices the blocks' ``rows`` divide ``p`` (``Block.units``; by default its first
    dimension); the blocks sharing a parameter agree on it (else the parameter is not covered)."""
    given = {blk.units(name) for blk, name in us}
    unit = given.pop()  # (one value: parameters whose blocks disagree are left to the fallback)
    return unit if unit is not None else (p.shape[0] if p.dim() else 1)


@functools.cache
def _takes_scratch(cls: type) -> bool:
    """Whether ``cls.rows`` takes the ``scratch`` keyword (:meth:`Block.rows`)."""
    return "scratch" in inspect.signature(cls.rows).parameters


def _rows_gram(p: Tensor, us: list[tuple[Block, str]], vp: Tensor, gram: Tensor, rhs: Tensor,
               keep: bool = False, scratches: dict | None = None) -> list[tuple[slice | Tensor, Tensor]] | None:
    """Add parameter ``p``'s Gram block and ``J_p v`` from its formed rows (summed over its calls),
    in slices of its first dimension of about ``_ROWS_BYTES`` bytes each; with ``keep``, return the
    slices (for the back-projection). ``scratches``: reusable row buffers by dtype (filled here)."""
    k = gram.shape[0]
    first, inner, widest, pieces = _row_slices(p, us, k)
    v2 = vp.reshape(first, inner)
    slices: list[tuple[slice | Tensor, Tensor]] = []
    # one use whose rows are not kept may form them in the reused scratch buffer
    scratch = None
    if scratches is not None and not keep and len(us) == 1 and _takes_scratch(type(us[0][0])):
        scratch = scratches.get(p.dtype)
        if scratch is None or scratch.numel() < widest * k * inner:
            scratch = scratches[p.dtype] = torch.empty(max(_ROWS_BYTES // p.element_size(), widest * k * inner),
                                                       dtype=p.dtype, device=p.device)
    for ix in pieces:
        rows = _summed_rows(us, ix, k, count(ix, first) * inner, scratch)
        g, r = gram_and_rhs(rows, v2[ix].reshape(-1))
        gram += g
        rhs += r
        if keep:
            slices.append((ix, rows))
    return slices if keep else None


def _row_slices(p: Tensor, us: list[tuple[Block, str]], k: int) -> tuple[int, int, int, list[slice | Tensor]]:
    """How ``p``'s rows are formed: its units ``first`` (``Block.units``), the entries per unit ``inner``, the
    most units in one slice, and the slices of units, each of about ``_ROWS_BYTES`` of rows -- only the units
    the blocks' ``support`` names when every block names some. A slice where every unit is wanted is a
    ``slice`` (the blocks then work on views, not gathered copies)."""
    first = _units(p, us)
    inner = max(1, p.numel() // max(first, 1))
    supports = [blk.support(name) for blk, name in us]
    index = None if any(s is None for s in supports) else torch.unique(torch.cat([s for s in supports if s is not None]))
    total = first if index is None else index.numel()
    per = max(1, _ROWS_BYTES // (p.element_size() * k * inner))
    pieces = [slice(s, min(s + per, total)) if index is None else index[s : s + per] for s in range(0, total, per)]
    return first, inner, min(per, total), pieces


def _summed_rows(us: list[tuple[Block, str]], ix: Tensor | slice, k: int, width: int,
                 scratch: Tensor | None = None) -> Tensor:
    """The rows of a parameter's slices ``ix``, summed over its uses ``us``; each use's must be ``(k, width)``."""
    rows = None
    for blk, name in us:
        try:
            r = blk.rows(name, ix, scratch=scratch) if scratch is not None else blk.rows(name, ix)
        except Exception as e:
            raise _blame(e, blk, name) from e
        if not isinstance(r, Tensor) or r.shape != (k, width):
            raise _wrong_shape(blk, name, "rows()", r, (k, width))
        rows = r if rows is None else rows + r
    assert rows is not None
    return rows
