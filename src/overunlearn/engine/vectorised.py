"""Many unlearning runs of small MLP regressors at once, as one vectorised ensemble.

:func:`overunlearn.engine.unlearn` runs one method on one problem; a hyperparameter sweep of the
Data Poisoning benchmark runs thousands of such trials, each a few hundred thousand flops per step,
where Python and per-op overhead dominate. This module runs a *batch* of trials together: the
parameters of all members are stacked along a leading dimension (``W_l: (E, fan_in, fan_out)``),
forward and backward passes are batched matrix products with a hand-written backward pass, and one
fused AdamW steps every member (AdamW is elementwise, so this is the per-member update).

The runner knows no method by name: a method that can run here describes its full-batch step as a
:class:`~overunlearn.methods.vectorised.VectorisedForm` (``method.vectorised(epochs, seed)``), and
every member follows exactly that step -- the step of :func:`~overunlearn.engine.unlearn` for its
method, since a form's schedules are the functions the method's hooks call. A member's step is the
weighted mean-squared error ``a mean_r (f - y)^2 + b mean_f (f - y)^2`` (``a``, ``b``: the form's
retain and forget weights) plus the form's terms:

========================  ======================================================================
form                      per-member step
========================  ======================================================================
``fresh_start``           start from the problem's re-initialised model (as the engine does)
``noise_sigma``           ``sigma * N(0, I)`` added to the gradient; on CPU drawn from the same
                          generator stream as the engine (the form's seed, parameters in module
                          order); on CUDA the engine draws on the device, so the streams differ
``ridge``                 gradient ``+ 2 c_t theta`` (loss ``+ c_t ||theta||^2``)
``l1``                    gradient ``+ c_t sign(theta)`` (loss ``+ c_t ||theta||_1``)
``projection``            the orthogonal-gradient min-norm projection (factored Gram of the
                          per-sample output gradients, float64 solve by
                          :func:`overunlearn.linalg.projection.solve_gram`) before (or after) the
                          descent step, on the epochs the schedule says
========================  ======================================================================

Scope (checked by :func:`batchable`, which says why a run does not qualify): the method has a
vectorised form, the model is an :class:`~overunlearn.models.mlp.MLP` with SiLU activations and one
output, the task is :class:`~overunlearn.problem.RegressionTask` with unweighted data, every epoch is
one full-batch step (``batch_size >= len(retain)`` and ``>= len(forget)``), the budget is a number
of epochs, and the optimizer is AdamW.

What differs from running the trials one by one, and why it does not matter for results: the
order of floating-point sums (batched products, fused AdamW), so parameters agree to float32
rounding, amplified by chaotic dynamics only over long runs (``tests/test_ensemble_unlearn.py``
holds every method to the engine). A failing member (non-finite loss or Jacobian) is recorded as
failed at the step where the engine would raise, and the others go on. Time is measured for the
whole batch; a member's ``seconds`` is its share, so use per-trial runs for runtime comparisons.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from overunlearn.engine.loop import Budget, UnlearnRecord, reinitialise_trainable, resolve_device
from overunlearn.linalg.jacobian import sample_indices
from overunlearn.linalg.projection import solve_gram
from overunlearn.methods.base import Method
from overunlearn.methods.vectorised import VectorisedForm
from overunlearn.models.mlp import MLP
from overunlearn.problem import RegressionTask, TensorData, UnlearningProblem
from overunlearn.training.adamw import FusedAdamW


@dataclass
class BatchedRun:
    """One run of a batch: ``method`` on ``problem`` for ``budget.epochs`` epochs with ``seed``."""

    problem: UnlearningProblem
    method: Method
    budget: Budget
    seed: int = 0
    key: Any = None


@dataclass
class BatchedOutcome:
    """The result of one run: the unlearned model (``None`` if it failed) and its record.

    Attributes:
        key: the run's key.
        model: the unlearned model, or ``None`` if the run failed.
        record: what the run did (for a failed run: up to the failing step).
        error: ``"ErrorType: message"`` of a failed run.
        error_type: the exception's type name of a failed run.
        error_step: the step at which it failed, when known.
        batch_size: the number of runs computed together with this one (1: alone).
        batch_seconds: the wall-clock time of that whole computation.
        vectorised: whether the run went through the vectorised runner (else through
            :func:`~overunlearn.engine.unlearn`).
        traceback: the formatted traceback of an exception a per-trial run raised.
    """

    key: Any
    model: torch.nn.Module | None
    record: UnlearnRecord
    error: str | None = None
    error_type: str | None = None
    error_step: int | None = None
    batch_size: int = 1
    batch_seconds: float = 0.0
    vectorised: bool = True
    traceback: str | None = None


#: what a method's step is made of: a subclass overriding any of these after the class that declared the
#: vectorised form has another step than that form describes
_STEP_MEMBERS = ("Config", "setup", "before_step", "loss", "on_gradients", "after_step", "teardown", "reinitialise")


def _form_is_current(method: Method) -> str | None:
    """``None`` if the class that declares ``vectorised`` also defines (or inherits) every part of the step;
    else why not (a subclass of a built-in method that changes its hooks but not its vectorised form)."""
    mro = type(method).__mro__
    owner = next(c for c in mro if "vectorised" in vars(c))
    later = [name for name in _STEP_MEMBERS
             if not issubclass(owner, next((c for c in mro if name in vars(c)), owner))]
    if later:
        return (f"method {method.name!r} ({type(method).__name__}) redefines {', '.join(later)} after its "
                f"vectorised form (declared by {owner.__name__}); it runs per trial")
    return None


def batchable(problem: UnlearningProblem, method: Method, budget: Budget) -> str | None:
    """``None`` if the run can be vectorised, else the reason it cannot (for logs and fallbacks)."""
    if method.vectorised(budget.epochs or 0, 0) is None:
        return method.why_not_vectorised()
    stale = _form_is_current(method)
    if stale:
        return stale
    if method.config.optimizer != "adamw":
        return "only AdamW is vectorised"
    if budget.epochs is None or budget.seconds is not None or budget.steps is not None:
        return "only pure epoch budgets are vectorised (wall-clock budgets time each run alone)"
    model = problem.model
    if not isinstance(model, MLP) or model.activation != "silu" or model.widths[-1] != 1:
        return "the model is not a SiLU MLP with one output"
    if any(not p.requires_grad for p in model.parameters()):
        return "the model has frozen parameters"
    if not isinstance(problem.task, RegressionTask):
        return "the task is not a regression"
    for data in (problem.retain, problem.forget):
        if not isinstance(data, TensorData) or data.weights is not None:
            return "the data are not unweighted tensors"
        if problem.batch_size < len(data):
            return "an epoch is more than one (full-batch) step"
    if len(problem.retain) == 0 or len(problem.forget) == 0:
        return "the retain or the forget set is empty"
    return None


# ---- per-member state ---------------------------------------------------------------------------------
@dataclass
class _Member:
    run: BatchedRun
    epochs: int
    form: VectorisedForm
    noise_gen: torch.Generator | None = None
    sample_gen: torch.Generator | None = None  # draws the projection's sampled rows
    data_gen: torch.Generator | None = None  # replays the engine's batch shuffles (subsampled projections)
    retain_perm: Tensor | None = None
    projections: int = 0
    # bookkeeping
    losses: list[float] = field(default_factory=list)
    failed: tuple[str, str, int] | None = None
    done: bool = False

    def projects(self, t: int, after: bool) -> bool:
        """Whether the member projects at epoch ``t``, after (or before) the descent step."""
        proj = self.form.projection
        return proj is not None and proj.after_step == after and proj.projects(t)


def _member(run: BatchedRun) -> _Member:
    epochs = int(run.budget.epochs)  # type: ignore[arg-type]
    form = run.method.vectorised(epochs, run.seed)
    assert form is not None  # checked by batchable
    m = _Member(run, epochs, form)
    if form.noise_sigma:
        m.noise_gen = torch.Generator().manual_seed(form.noise_seed)  # type: ignore[arg-type]
    if form.projection is not None:
        m.sample_gen = torch.Generator().manual_seed(form.projection.sampler_seed)
        if form.projection.samples_subset(len(run.problem.retain)):
            # the engine's batch shuffles, from its data generator (seeded with the run's seed)
            m.data_gen = torch.Generator().manual_seed(run.seed)
    return m


# ---- per-member kernels ----------------------------------------------------------------------------------
# A member's numbers must not depend on which other members share its batch (or how many). Batched
# kernels do not guarantee that: a batched matrix product takes another code path for one matrix than
# for several (MKL gemm vs gemm_batch), and an elementwise kernel over the stacked tensor handles the
# elements at its very end (the last member's) or at a thread's split point in a scalar loop whose
# exp (SiLU) or fused multiply-add (AdamW) rounds differently from the vectorised body; and a BLAS
# product's rounding depends on its operands' memory alignment. So every matrix product (on aligned
# operands), SiLU, row sum and Gram solve below runs once per member, on that member's slice as a
# tensor of its own, and AdamW steps each member's slices as separate tensors of one fused call: the
# same kernel calls on the same shapes and alignments as a run alone. Exact elementwise arithmetic (+, *, where)
# stays batched: IEEE rounding of one operation does not depend on the code path.


#: byte alignment of every operand handed to a BLAS product (the CPU allocator's alignment): MKL's
#: products round differently depending on where an operand starts (a (55, 21) x (21, 1) product differs
#: in the 7th digit between 16-byte offsets), and a member's slice of a stacked tensor starts wherever its
#: position puts it
_ALIGN = 64


def _aligned(t: Tensor) -> Tensor:
    """``t``, or a copy of it (same strides) at an aligned address when ``t`` does not start at one."""
    return t if t.device.type != "cpu" or t.data_ptr() % _ALIGN == 0 else t.clone()


def _mm(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``a[i] @ b[i] (+ bias[i])`` for every member ``i``: one matrix product per member, on operands and
    into a result that start at aligned addresses, as they do in a run alone."""
    if out is None:
        out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):
        ai, bi = _aligned(a[i]), _aligned(b[i])
        r = torch.mm(ai, bi) if bias is None else torch.addmm(_aligned(bias[i]), ai, bi)
        out[i].copy_(r)
    return out


def _silu(z: Tensor) -> Tensor:
    """SiLU of every member's slice, one kernel call per member."""
    out = torch.empty_like(z)
    for i in range(z.shape[0]):
        torch.ops.aten.silu.out(z[i], out=out[i])
    return out


def _silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    """The gradient through SiLU of every member's slice, one kernel call per member."""
    out = torch.empty_like(z)
    for i in range(z.shape[0]):
        torch.ops.aten.silu_backward.grad_input(grad[i], z[i], grad_input=out[i])
    return out


def _row_sum(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``x[i].sum(0, keepdim=True)`` for every member (the sum over the rows), one reduction per member."""
    if out is None:
        out = torch.empty(x.shape[0], 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    for i in range(x.shape[0]):
        torch.sum(x[i], dim=0, keepdim=True, out=out[i])
    return out


def _solve_gram(gram: Tensor, rhs: Tensor, rcond: float) -> Tensor:
    """``alpha_i = G_i^+ b_i`` for every member ``i`` (``(E, k, 1)``): the engine's own solve, once per member."""
    return torch.stack([solve_gram(gram[i], _aligned(rhs[i].unsqueeze(-1)), rcond) for i in range(gram.shape[0])])


# ---- the stacked ensemble -----------------------------------------------------------------------------
class _Stack:
    """Stacked parameters ``W_l: (E, in, out)``, ``b_l: (E, 1, out)``, data and one AdamW."""

    def __init__(self, members: list[_Member], start: list[MLP], device: torch.device) -> None:
        self.members = members
        self.device = device
        widths = start[0].widths
        self.widths = widths
        n_r = max(len(m.run.problem.retain) for m in members)
        n_f = max(len(m.run.problem.forget) for m in members)
        e, d_in = len(members), widths[0]
        n = n_r + n_f
        self.n_r = n_r
        self.x = torch.zeros(e, n, d_in, device=device)
        self.y = torch.zeros(e, n, 1, device=device)
        self.w = torch.zeros(e, n, 1, device=device)  # loss weights, with sign
        self.r_count = torch.zeros(e, dtype=torch.long)
        for i, m in enumerate(members):
            r, f = m.run.problem.retain, m.run.problem.forget
            nr, nf = len(r), len(f)
            self.r_count[i] = nr
            self.x[i, :nr] = r.inputs.reshape(nr, d_in).to(device, torch.float32)
            self.y[i, :nr] = r.targets.reshape(nr, 1).to(device, torch.float32)
            self.w[i, :nr] = m.form.retain_weight / nr
            if nf:
                self.x[i, n_r:n_r + nf] = f.inputs.reshape(nf, d_in).to(device, torch.float32)
                self.y[i, n_r:n_r + nf] = f.targets.reshape(nf, 1).to(device, torch.float32)
                self.w[i, n_r:n_r + nf] = m.form.forget_weight / nf
        self.params: list[Tensor] = []
        for li in range(len(widths) - 1):
            lins = [s.linears()[li] for s in start]
            # the start models may sit on different devices (a Retrain member is re-initialised on the CPU)
            self.params.append(torch.stack([lin.weight.detach().T.to(device) for lin in lins]).contiguous())
            self.params.append(torch.stack([lin.bias.detach().reshape(1, -1).to(device) for lin in lins]).contiguous())
        for p in self.params:
            p.grad = torch.zeros_like(p)
        # members with a penalty term: the terms are computed on these rows only
        self.ridge_rows = [i for i, m in enumerate(members) if m.form.ridge is not None]
        self.l1_rows = [i for i, m in enumerate(members) if m.form.l1 is not None]
        self.has_noise = any(m.noise_gen is not None for m in members)

    def col(self, values: Sequence[float]) -> Tensor:
        """Per-member scalars as an ``(E, 1, 1)`` tensor that broadcasts over a stacked parameter."""
        return torch.tensor(values, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)

    def forward(self, x: Tensor, params: list[Tensor]) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Outputs ``(E, n, 1)`` and, per layer, its input and pre-activation."""
        acts: list[tuple[Tensor, Tensor]] = []
        a = x
        n_layers = len(params) // 2
        for li in range(n_layers):
            W, b = params[2 * li], params[2 * li + 1]
            if W.shape[1] == 1:
                z = torch.addcmul(b, a, W)  # fan_in 1: an outer product
            else:
                z = _mm(a, W, bias=b)
            acts.append((a, z))
            if li == n_layers - 1:
                return z, acts
            a = _silu(z)
        raise AssertionError("unreachable")

    def backward(self, dz: Tensor, acts: list[tuple[Tensor, Tensor]], params: list[Tensor],
                 grads: list[Tensor] | None) -> list[Tensor]:
        """Back-propagate ``dz = d(sum)/d(output)``; fill ``grads`` (if given) and return every layer's
        output gradient ``delta_l`` (``(E, n, out_l)``, last layer first)."""
        deltas: list[Tensor] = []
        for li in range(len(acts) - 1, -1, -1):
            a, _ = acts[li]
            W = params[2 * li]
            deltas.append(dz)
            if grads is not None:
                gW, gb = grads[2 * li], grads[2 * li + 1]
                if W.shape[1] == 1:
                    _row_sum(a * dz, out=gW)
                else:
                    _mm(a.transpose(1, 2), dz, out=gW)
                _row_sum(dz, out=gb)
            if li:
                da = dz * W.transpose(1, 2) if W.shape[2] == 1 else _mm(dz, W.transpose(1, 2))
                dz = _silu_backward(da, acts[li - 1][1])
        return deltas

    def state_dict_of(self, i: int) -> dict[str, Tensor]:
        sd: dict[str, Tensor] = {}
        for li in range(len(self.params) // 2):
            sd[f"{2 * li}.weight"] = self.params[2 * li][i].T.detach().to("cpu").clone().contiguous()
            sd[f"{2 * li}.bias"] = self.params[2 * li + 1][i].reshape(-1).detach().to("cpu").clone()
        return sd


def _project(stack: _Stack, idx: list[int], coefs: list[float], rcond: float = 1e-12) -> list[int]:
    """``theta <- (1 - c) theta + c P_span(J^T) theta`` for members ``idx`` (coefficients ``coefs``);
    returns the members whose Jacobian was not finite (left unchanged)."""
    by_k: dict[int, tuple[list[int], list[float], list[Tensor]]] = {}
    for i, c in zip(idx, coefs, strict=True):
        m = stack.members[i]
        proj = m.form.projection
        assert proj is not None
        nr = int(stack.r_count[i])
        if not proj.samples_subset(nr):  # every retain point: the order does not matter
            x = stack.x[i, :nr]
        else:  # the engine's subsample, from the same generator stream
            assert m.sample_gen is not None
            assert m.retain_perm is not None
            pick = m.retain_perm[sample_indices(nr, proj.sample_size, m.sample_gen)]
            x = stack.x[i, pick.to(stack.x.device)]
        group = by_k.setdefault(int(x.shape[0]), ([], [], []))
        group[0].append(i)
        group[1].append(c)
        group[2].append(x)
    bad: list[int] = []
    for sub_idx, sub_coefs, xs in by_k.values():
        bad += _project_same_size(stack, sub_idx, sub_coefs, torch.stack(xs), rcond)
    return bad


def _project_same_size(stack: _Stack, idx: list[int], coefs: list[float], x: Tensor, rcond: float) -> list[int]:
    dev = stack.device
    ii = torch.tensor(idx, device=dev)
    params = [p.index_select(0, ii) for p in stack.params]
    k = x.shape[1]
    out, acts = stack.forward(x, params)
    deltas = stack.backward(torch.ones_like(out), acts, params, None)[::-1]  # first layer first
    e = len(idx)
    gram = torch.zeros(e, k, k, dtype=torch.float64, device=dev)
    rhs = torch.zeros(e, k, dtype=torch.float64, device=dev)
    for li, ((a, _), d) in enumerate(zip(acts, deltas, strict=True)):
        a64, d64 = a.double(), d.double()
        gram += (_mm(a64, a64.transpose(1, 2)) + 1.0) * _mm(d64, d64.transpose(1, 2))
        # J_i . theta = sum_l delta_i^l . (a_i^l W_l + b_l), in float64 like the Gram: the solve is
        # ill-conditioned, and float32 pre-activations would perturb it visibly
        z64 = _mm(a64, params[2 * li].double(), bias=params[2 * li + 1].double())
        rhs += (d64 * z64).sum(-1)
    finite = torch.isfinite(gram).all(dim=(1, 2)) & torch.isfinite(rhs).all(dim=1)
    bad = [idx[j] for j in range(e) if not bool(finite[j])]
    if bad:
        keep = [j for j in range(e) if bool(finite[j])]
        if not keep:
            return bad
        gram, rhs = gram[keep], rhs[keep]
        acts = [(a[keep], z[keep]) for a, z in acts]
        deltas = [d[keep] for d in deltas]
        idx = [idx[j] for j in keep]
        coefs = [coefs[j] for j in keep]
        ii = torch.tensor(idx, device=dev)
        params = [p.index_select(0, ii) for p in stack.params]
    alpha = _solve_gram(gram, rhs, rcond)  # (e, k, 1)
    c = stack.col(coefs)
    for li, ((a, _), d) in enumerate(zip(acts, deltas, strict=True)):
        W, b = params[2 * li], params[2 * li + 1]
        ad = d.double() * alpha  # (e, k, out)
        pw = _mm(a.double().transpose(1, 2), ad).to(W.dtype)  # (e, in, out)
        pb = _row_sum(ad).to(b.dtype)  # (e, 1, out)
        W.mul_(1.0 - c).add_(c * pw)
        b.mul_(1.0 - c).add_(c * pb)
        stack.params[2 * li].index_copy_(0, ii, W)
        stack.params[2 * li + 1].index_copy_(0, ii, b)
    return bad


def _fail(members: list[_Member], i: int, error_type: str, message: str, step: int) -> None:
    """Mark member ``i`` failed at ``step``: it takes no further part (its slice is ignored from now on;
    members share no parameters, so whatever it holds cannot reach the others)."""
    members[i].failed = (error_type, message, step)
    members[i].done = True


def _projections(stack: _Stack, members: list[_Member], live: list[int], t: int, after: bool) -> None:
    """The projections of epoch ``t`` for the live members that project before (or after) the step."""
    idx = [i for i in live if not members[i].done and members[i].projects(t, after)]
    if not idx:
        return
    coefs = [members[i].form.projection.coefficient(members[i].projections) for i in idx]  # type: ignore[union-attr]
    bad = _project(stack, idx, coefs)
    for i in idx:
        if i in bad:
            _fail(members, i, "NonFiniteLossError",
                  f"NonFiniteLossError: {members[i].run.method.name}: the output Jacobian contains NaN or infinite values at step "
                  f"{t} (epoch {t}), i.e. the model's outputs diverged; lower the learning rate", t)
        else:
            members[i].projections += 1


def _row_slice(rows: list[int]) -> slice | None:
    """``rows`` as a slice when they are consecutive (members of one method usually are), so that
    their parameters and gradients are views rather than copies; ``None`` otherwise."""
    return slice(rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else None


def _adamw(params: list[Tensor], lr: float, weight_decay: float) -> FusedAdamW:
    """The engine's AdamW (same defaults and update; PyTorch's fused kernel, called directly), stepping every
    member's slice of every stacked parameter as a tensor of its own (see the per-member kernels above)."""
    views = [p[i] for p in params for i in range(p.shape[0])]
    grads = [p.grad[i] for p in params for i in range(p.shape[0])]  # type: ignore[index]
    return FusedAdamW(views, grads, lr, weight_decay)


def _run_group(members: list[_Member], device: torch.device, lr: float, weight_decay: float,
               progress: Callable[[int], None] | None) -> dict[int, dict[str, Tensor]]:
    """Run one group of members sharing (lr, weight_decay); return the final state dicts by position."""
    start: list[MLP] = []
    for m in members:
        model = m.run.problem.model
        if m.form.fresh_start:  # the engine's re-initialisation, on a CPU copy
            model = reinitialise_trainable(m.run.problem, copy.deepcopy(model).cpu(), m.run.seed)
        start.append(model)
    stack = _Stack(members, start, device)
    opt = _adamw(stack.params, lr, weight_decay)
    finals: dict[int, dict[str, Tensor]] = {}
    horizon = max(m.epochs for m in members)
    for t in range(horizon):
        for i, m in enumerate(members):
            if not m.done and m.epochs <= t:
                finals[i] = stack.state_dict_of(i)
                m.done = True
                stack.w[i].zero_()
        live = [i for i, m in enumerate(members) if not m.done]
        if not live:
            break
        for i in live:
            m = members[i]
            if m.data_gen is not None:  # the engine shuffles the forget set, then the retain set, every epoch
                torch.randperm(len(m.run.problem.forget), generator=m.data_gen)
                m.retain_perm = torch.randperm(len(m.run.problem.retain), generator=m.data_gen)

        _projections(stack, members, live, t, after=False)
        out, acts = stack.forward(stack.x, stack.params)
        resid = out - stack.y
        # rows a member ignores (weight 0) count 0 even where their residual overflows
        wr = stack.w * resid
        data_loss = torch.where(stack.w != 0, wr * resid, torch.zeros_like(wr)).sum(dim=(1, 2))  # (E,)
        reg = torch.zeros_like(data_loss)
        penalties = []  # (rows, per-row coefficients, "ridge" | "l1")
        for kind, rows in (("ridge", stack.ridge_rows), ("l1", stack.l1_rows)):
            if not rows:
                continue
            coef = stack.col([members[i].form.ridge(t) if kind == "ridge" else members[i].form.l1(t)  # type: ignore[misc]
                              for i in rows])
            penalties.append((rows, coef, kind))
            idx = torch.tensor(rows, device=stack.device)
            sl = _row_slice(rows)
            qs = [p[sl] if sl is not None else p.index_select(0, idx) for p in stack.params]
            if kind == "ridge":  # sum of squares, without a squared copy of the parameters
                total = sum(torch.linalg.vector_norm(q, dim=(1, 2)).square() for q in qs)
            else:
                total = sum(q.abs().sum(dim=(1, 2)) for q in qs)
            reg.index_add_(0, idx, coef.reshape(-1) * total)
        values = (data_loss + reg).tolist()
        for i in live:
            m = members[i]
            if m.done:
                continue
            v = values[i]
            if not math.isfinite(v):
                _fail(members, i, "NonFiniteLossError",
                      f"NonFiniteLossError: {m.run.method.name}: the loss became {v} at step {t} (epoch {t}); "
                      "lower the learning rate or the ascent coefficient", t)
            else:
                m.losses.append(v)
        stack.backward(2.0 * wr, acts, stack.params, [p.grad for p in stack.params])  # type: ignore[misc]
        for rows, coef, kind in penalties:
            # d/dq of c |q|^2 is 2 c q; of c |q|_1, c sign(q); member by member (see the per-member kernels)
            for i, c in zip(rows, coef.reshape(-1).tolist(), strict=True):
                for p in stack.params:
                    g = p.grad[i]  # type: ignore[index]
                    if kind == "ridge":
                        g.add_(p[i], alpha=2.0 * c)
                    else:
                        g.add_(torch.sign(p[i]), alpha=c)
        if stack.has_noise:
            for i in live:
                m = members[i]
                if m.noise_gen is not None and not m.done:
                    for j, p in enumerate(stack.params):  # the engine's order: weight (out, in), then bias
                        g = p.grad[i]  # type: ignore[index]
                        if j % 2 == 0:
                            noise = torch.randn(g.shape[1], g.shape[0], generator=m.noise_gen).T
                        else:
                            noise = torch.randn(g.shape[1], generator=m.noise_gen).reshape(g.shape)
                        g.add_(noise.to(g.device), alpha=m.form.noise_sigma)
        opt.step()
        _projections(stack, members, live, t, after=True)
        if progress is not None:
            progress(len(live))
    for i, m in enumerate(members):
        if not m.done:
            finals[i] = stack.state_dict_of(i)
            m.done = True
    return finals


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, one intra-op thread while the block runs: how a matrix product splits its sums over
    threads changes its rounding (a float64 Gram of MinNorm-OG differs between 1 and 2 threads), so the
    numbers of a run must not depend on the thread count of the process that happens to run it.
    Parallelism comes from worker processes (``sweep --jobs``, ``bench poison --threads``)."""
    if device.type != "cpu":
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def unlearn_batched(runs: Sequence[BatchedRun], device: str | torch.device = "cpu",
                    progress: Callable[[int], None] | None = None) -> list[BatchedOutcome]:
    """Run every run of ``runs`` (each must pass :func:`batchable`) and return their outcomes in order.

    Runs with the same learning rate, weight decay, architecture and number of epochs share one
    stacked ensemble; groups run one after another on ``device`` (on a CPU with one intra-op thread).
    A run's numbers do not depend on the other runs, their number, its position or the process's thread
    count: they are those of the same run alone (see the per-member kernels).

    Args:
        runs: the runs; the problems' models are not modified.
        device: where to compute.
        progress: called after every step with the number of member-steps taken.

    Raises:
        ValueError: a run is not batchable (the message says why).
    """
    dev = resolve_device(device)
    for r in runs:
        why = batchable(r.problem, r.method, r.budget)
        if why is not None:
            raise ValueError(f"run {r.key!r} ({r.method.name}) cannot be batched: {why}")
    # one stack per (lr, weight decay, architecture, T): a finished member would keep costing its
    # share of every batched product until the longest member is done
    groups: dict[tuple[float, float, tuple[int, ...], int], list[int]] = {}
    for j, r in enumerate(runs):
        cfg = r.method.config
        key = (cfg.lr, cfg.weight_decay, tuple(r.problem.model.widths), int(r.budget.epochs))  # type: ignore[arg-type]
        groups.setdefault(key, []).append(j)
    outcomes: list[BatchedOutcome | None] = [None] * len(runs)
    for (lr, wd, _widths, _epochs), pos in groups.items():
        members = [_member(runs[j]) for j in pos]
        t0 = time.perf_counter()
        with torch.no_grad(), _one_thread(dev):
            finals = _run_group(members, dev, lr, wd, progress)
        seconds = time.perf_counter() - t0
        for local, j in enumerate(pos):
            m = members[local]
            run = runs[j]
            rec = UnlearnRecord(method=run.method.name, config=run.method.config.to_dict(), steps_per_epoch=1,
                                device=str(dev))
            rec.epoch_losses = list(m.losses)
            rec.seconds = seconds / len(pos)
            if m.failed is not None:
                etype, msg, step = m.failed
                rec.steps = rec.epochs_completed = step
                outcomes[j] = BatchedOutcome(run.key, None, rec, msg, etype, step, len(pos), seconds)
                continue
            model = MLP(run.problem.model.widths[0], run.problem.model.widths[1:-1], 1, "silu")
            model.load_state_dict(finals[local])
            rec.steps = rec.epochs_completed = m.epochs
            rec.stopped_by = "epochs"
            outcomes[j] = BatchedOutcome(run.key, model.to(dev), rec, batch_size=len(pos), batch_seconds=seconds)
    return [o for o in outcomes if o is not None]


__all__ = ["BatchedOutcome", "BatchedRun", "batchable", "unlearn_batched"]
