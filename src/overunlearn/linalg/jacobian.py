"""Jacobians of a model's scalar output scores with respect to its trainable parameters.

Two BatchNorm semantics (option ``mode``):

* ``"per_sample"`` (default): every row is the gradient of one example's score with
  the model in **eval** mode, so BatchNorm uses its running statistics and examples
  do not interact. This is the textbook per-example gradient of eqn (5), computed with
  ``torch.func.vmap(jacrev(...))`` in one vectorised pass. Running statistics are not
  updated.
* ``"batch_train"``: the reference code's semantics -- one batched forward of the
  subsample in **train** mode (BatchNorm normalises with the subsample's statistics,
  coupling the rows), then the gradient of each score. Computed with ``jacrev`` of the
  batched function; running statistics are not updated (the reference updates them
  once more; that side effect is not reproduced).

For models without BatchNorm or dropout the two coincide.

Rows are ordered head-major: all samples' scores of head 0, then of head 1, ...,
as the reference stacks them. The slow, obviously-correct reference
(:func:`output_jacobian_reference`) loops over per-score backward passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from overunlearn import structure

#: ``score_fn(outputs)`` or, when targets are given, ``score_fn(outputs, targets)`` -> ``(batch, heads)``
ScoreFn = Callable[..., Tensor]
Mode = Literal["per_sample", "batch_train"]


def call_scores(score_fn: ScoreFn, outputs: object, targets: object = None) -> Tensor:
    """``score_fn(outputs)``, or ``score_fn(outputs, targets)`` when there are targets."""
    return score_fn(outputs) if targets is None else score_fn(outputs, targets)


def _functional(model: nn.Module, params_and_rest: tuple[dict[str, Tensor], dict[str, Tensor]], inputs) -> object:
    args, kwargs = structure.call_args(inputs)
    return functional_call(model, params_and_rest, args, kwargs, strict=False)


def _unsqueeze(x):  # one example -> a batch of one
    return structure.map_tensors(lambda t: t.unsqueeze(0), x)


@contextmanager
def vmap_friendly(model: torch.nn.Module) -> Iterator[None]:
    """Hugging Face models with eager attention, and torch's vmap fallback warnings silenced.

    ``vmap`` over examples cannot trace the SDPA attention path's mask preparation (it branches on
    the data); eager attention computes the same function. torch's "performance drop ... batching
    rule" warnings are about its own internals, not the user's model.
    """
    saved = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in saved:
            saved[id(config)] = (config, config._attn_implementation_internal)
            config._attn_implementation_internal = "eager"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented")
            yield
    finally:
        for config, value in saved.values():
            config._attn_implementation_internal = value


def _per_sample_jacobian(model: nn.Module, params: dict[str, Tensor], rest: dict[str, Tensor], inputs,
                         score_fn: ScoreFn, targets) -> dict[str, Tensor]:
    """``name -> (n, heads, *shape)``: per-example Jacobians by ``vmap(jacrev)`` in eval mode."""

    def f_one(p: dict[str, Tensor], x, y) -> Tensor:
        out = _functional(model, (p, rest), _unsqueeze(x))
        return call_scores(score_fn, out, None if y is None else _unsqueeze(y))[0]

    with _mode(model, train=False), vmap_friendly(model):
        # (on a copy: a model that works in place on its input must not change the caller's tensor)
        try:
            return vmap(jacrev(f_one), in_dims=(None, 0, None if targets is None else 0))(
                params, structure.clone(inputs), targets)
        except RuntimeError as exc:
            if _MUTATES in str(exc):
                return _backward_loop(model, list(params), inputs, score_fn, targets, str(exc))
            if "vmap" not in str(exc):
                raise
        # the model branches on its inputs' values (e.g. Hugging Face's attention-mask preparation), which
        # vmap cannot trace: one jacrev per example instead (its vmap runs over output directions only)
        n = structure.batch_len(inputs)
        per = []
        try:
            for i in range(n):
                x = structure.clone(structure.index(inputs, slice(i, i + 1)))
                y = None if targets is None else structure.index(targets, slice(i, i + 1))
                per.append(jacrev(lambda p, x=x, y=y: call_scores(score_fn, _functional(model, (p, rest), x), y)[0])(params))
        except RuntimeError as exc:
            if _MUTATES not in str(exc):
                raise
            return _backward_loop(model, list(params), inputs, score_fn, targets, str(exc))
        return {k: torch.stack([j[k] for j in per]) for k in params}


#: torch.func's error for a model that swaps or mutates one of its tensors in place during its forward
#: (peft's ``ParamWrapper`` -- LoRA on a parameter, ``target_parameters`` -- swaps the parameter it adapts)
_MUTATES = "would mutate a captured Tensor"


def _backward_loop(model: nn.Module, names: list[str], inputs, score_fn: ScoreFn, targets,
                   why: str) -> dict[str, Tensor]:
    """``name -> (n, heads, *shape)`` by one eval-mode forward per example and one backward per score: the
    Jacobian of a model ``torch.func`` cannot trace (slow: ``n`` forwards and ``n * heads`` backwards)."""
    warnings.warn("torch.func cannot trace this model (" + why.split(".")[0].strip() + "); its per-example "
                  "Jacobian is taken with one backward pass per score instead (slow)", RuntimeWarning, stacklevel=4)
    named = dict(model.named_parameters())
    ps = [named[k] for k in names]
    rows: list[list[Tensor]] = []  # per example: per parameter (heads, *shape)
    with _mode(model, train=False):
        for i in range(structure.batch_len(inputs)):
            one = structure.clone(structure.index(inputs, slice(i, i + 1)))
            y = None if targets is None else structure.index(targets, slice(i, i + 1))
            s = call_scores(score_fn, structure.call_model(model, one), y)[0]
            per_head = []
            for h in range(s.shape[0]):
                g = torch.autograd.grad(s[h], ps, retain_graph=h + 1 < s.shape[0], allow_unused=True)
                per_head.append([torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, ps)])
            rows.append([torch.stack([hd[j] for hd in per_head]) for j in range(len(ps))])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(names)}


@contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def _split(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return params, rest


def _flatten(jac: dict[str, Tensor], names: list[str], rows: int) -> Tensor:
    return torch.cat([jac[n].reshape(rows, -1) for n in names], dim=1)


def _head_major(jac: dict[str, Tensor], names: list[str], n: int) -> Tensor:
    """Per-sample Jacobians ``name -> (n, heads, *shape)`` as one ``(heads * n, d)`` matrix, head-major.

    Each block is written once into the output (a transpose + ``cat`` would copy ``J`` twice).
    """
    first = jac[names[0]]
    heads = first.shape[1]
    d = sum(math.prod(jac[k].shape[2:]) for k in names)
    out = torch.empty(heads * n, d, dtype=first.dtype, device=first.device)
    offset = 0
    for k in names:
        m = math.prod(jac[k].shape[2:])
        out[:, offset : offset + m].view(heads, n, m).copy_(jac[k].reshape(n, heads, m).transpose(0, 1))
        offset += m
    return out


def output_jacobian(model: nn.Module, inputs, score_fn: ScoreFn, mode: Mode = "per_sample",
                    targets=None) -> Tensor:
    """``(n * heads, d)`` Jacobian of the scores of ``inputs`` w.r.t. the trainable parameters.

    ``inputs`` is a tensor, a tuple or a dict of tensors (:mod:`overunlearn.structure`);
    ``score_fn`` maps model outputs of a batch (and ``targets``, when given) to a ``(batch, heads)``
    tensor. The column order is that of ``[p for p in model.parameters() if p.requires_grad]``.
    """
    params, rest = _split(model)
    names = list(params)
    n = structure.batch_len(inputs)
    if mode == "per_sample":
        jac = _per_sample_jacobian(model, params, rest, inputs, score_fn, targets)
        return _head_major(jac, names, n)
    if mode == "batch_train":

        def f_all(p: dict[str, Tensor], r: dict[str, Tensor]) -> Tensor:
            out = _functional(model, (p, r), structure.clone(inputs))
            return call_scores(score_fn, out, targets).transpose(0, 1).reshape(-1)  # head-major

        # the buffers are passed as (non-differentiated) inputs so that BatchNorm may update
        # its running statistics in place -- on a throw-away clone
        with _mode(model, train=True):
            jac = jacrev(f_all, argnums=0)(params, rest)
        rows = next(iter(jac.values())).shape[0]
        return _flatten(jac, names, rows)
    raise ValueError(f"mode={mode!r} is not one of 'per_sample', 'batch_train'")


def output_jacobian_dense(model: nn.Module, inputs, score_fn: ScoreFn, wrt: list[Tensor], targets=None) -> Tensor:
    """``"per_sample"`` Jacobian with respect to the parameters ``wrt`` only (in that order);
    every other parameter is held fixed. Rows are head-major as in :func:`output_jacobian`."""
    ids = {id(p) for p in wrt}
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if id(p) in ids]
    order = {id(named[n]): n for n in names}
    names = [order[id(p)] for p in wrt]
    params = {n: named[n].detach() for n in names}
    rest = {n: p.detach() for n, p in named.items() if id(p) not in ids}
    rest.update({n: b.detach().clone() for n, b in model.named_buffers()})
    n = structure.batch_len(inputs)
    jac = _per_sample_jacobian(model, params, rest, inputs, score_fn, targets)
    return _head_major(jac, names, n)


def output_jacobian_reference(model: nn.Module, inputs, score_fn: ScoreFn,
                              mode: Mode = "per_sample", targets=None) -> Tensor:
    """The same Jacobian by one backward pass per score (slow; the test oracle).

    ``"batch_train"`` does exactly what the authors' code does: one batched forward in
    train mode, then ``score[i].backward()`` for every sample and head. ``"per_sample"``
    forwards every example alone in eval mode.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows: list[list[Tensor]] = []
    try:
        if mode == "batch_train":
            with _mode(model, train=True):
                scores = call_scores(score_fn, structure.call_model(model, structure.clone(inputs)), targets)
            for h in range(scores.shape[1]):
                for i in range(scores.shape[0]):
                    g = torch.autograd.grad(scores[i, h], params, retain_graph=True, allow_unused=True)
                    rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
        elif mode == "per_sample":
            per_head: list[list[list[Tensor]]] = []
            with _mode(model, train=False):
                for i in range(structure.batch_len(inputs)):
                    one = structure.clone(structure.index(inputs, slice(i, i + 1)))
                    y = None if targets is None else structure.index(targets, slice(i, i + 1))
                    s = call_scores(score_fn, structure.call_model(model, one), y)[0]
                    for h in range(s.shape[0]):
                        if len(per_head) <= h:
                            per_head.append([])
                        g = torch.autograd.grad(s[h], params, retain_graph=h + 1 < s.shape[0], allow_unused=True)
                        per_head[h].append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
            rows = [r for head in per_head for r in head]
        else:
            raise ValueError(f"mode={mode!r} is not one of 'per_sample', 'batch_train'")
    finally:
        model.load_state_dict(state)  # undo running-stat updates of the train-mode forward
    return torch.stack([torch.cat([g.reshape(-1) for g in r]) for r in rows])


def sample_indices(n: int, k: int, generator: torch.Generator, strata: Tensor | None = None) -> Tensor:
    """Choose ``min(k, n)`` distinct indices out of ``n``, balanced across ``strata`` if given.

    Stratified choice: shuffle each stratum, visit the strata in a random order round-robin,
    and take the first ``k`` picks. Every stratum gets ``k // C`` or ``k // C + 1`` picks
    (fewer only if it is smaller), and exactly ``min(k, n)`` indices are returned even when
    there are more strata than ``k`` -- the reference code draws ``k // C`` per class and so
    draws nothing when ``C > k`` (the authors' reference code, `get_output_grads` in `common/unlearners/unlearners.py`).
    """
    k = min(k, n)
    if strata is None:
        return torch.randperm(n, generator=generator)[:k]
    strata = strata.detach().cpu().reshape(-1)
    if strata.shape[0] != n:
        raise ValueError(f"strata has {strata.shape[0]} entries for {n} samples")
    labels = strata.unique()
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    groups = []
    for c in labels:
        idx = (strata == c).nonzero().reshape(-1)
        groups.append(idx[torch.randperm(idx.numel(), generator=generator)].tolist())
    picks: list[int] = []
    depth = 0
    while len(picks) < k:
        for g in groups:
            if depth < len(g):
                picks.append(g[depth])
                if len(picks) == k:
                    break
        depth += 1
    return torch.tensor(picks, dtype=torch.long)
