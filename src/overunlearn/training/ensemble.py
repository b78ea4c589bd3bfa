"""Train many small MLPs at once as one vectorised ensemble.

Every member is a SiLU :class:`~overunlearn.models.mlp.MLP` (members of one lockstep group share an
architecture), trained
full-batch on its own data with the mean-squared error and AdamW. Instead of looping over
``E`` models, the parameters of all members are stacked into tensors with a leading
ensemble dimension (``W_l: (E, fan_in, fan_out)``, ``b_l: (E, 1, fan_out)``), the forward and
backward passes are batched matrix products (``torch.baddbmm`` / ``torch.bmm``) with a
hand-written backward pass, and **one** AdamW steps all of them: the stacked tensors are views
into a single flat buffer (and so are their gradients), so the optimizer is one call of PyTorch's
fused AdamW kernel per step (:class:`overunlearn.training.adamw.FusedAdamW`).

Why this equals independent training (checked in ``tests/test_poison.py``):

* the ensemble loss is ``sum_e sum_i w_ei (f_e(x_ei) - y_ei)^2`` with ``w_ei = 1 / n_e`` on
  member ``e``'s own points and ``0`` on padding, so the gradient with respect to member
  ``e``'s slice is exactly the gradient of member ``e``'s own MSE (members share no
  parameters, and padding contributes ``0 * finite = 0``);
* AdamW is elementwise (per-entry moments; the step counter and bias corrections are the
  same for every member since all start together), so one AdamW over the stacked tensors
  performs the per-member AdamW updates.

The results agree with a per-model ``nn.Module`` + ``AdamW`` loop up to floating-point
summation order.

Members may train for different numbers of steps (the Data Poisoning benchmark trains the
100k-step original models and the 50k-step ground-truth models together); a member that is
done is taken out of the stacked tensors, together with its AdamW state.

On CPU the ensemble is split into ``workers`` shards with one intra-op thread each, run in
worker processes (default) or in threads of the calling process. Either way there are no OpenMP
barriers between cores -- which matters on a shared machine, where a busy core makes every OpenMP
parallel region wait (we measured 4-10x slowdowns of 2-thread OpenMP under load) -- and
processes also keep the shards' Python dispatch from contending for one GIL (3-9% faster than
threads on the 2-core development machine, ``benchmarks/perf_training.py``). Each worker steps its
members in lockstep groups of at most ``group_size`` (default :data:`DEFAULT_CPU_GROUP`), one group
after the other; members with the same architecture and number of points share a group, so short
datasets are not padded. Small groups keep a group's working set (parameters, gradients, AdamW
moments: 1.5 MB per 300-300 member) closer to the core while the other worker runs beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from overunlearn.models.mlp import MLP
from overunlearn.training.adamw import FusedAdamW
from overunlearn.workers import Channel, can_start_processes, run_in_processes, run_in_threads


@dataclass
class Member:
    """One model to train: its initial model, data ``x: (n, in)``, ``y: (n, out)`` and step count."""

    model: MLP
    x: Tensor
    y: Tensor
    steps: int
    key: object = None


@dataclass
class MemberResult:
    key: object
    state_dict: dict[str, Tensor]
    final_loss: float
    steps: int


class _Shard:
    """A group of members trained in lockstep: stacked parameters, data, buffers and one AdamW.

    All parameters live in **one** flat float32 buffer, laid out layer-major
    (``[W_0 | b_0 | W_1 | b_1 | ...]``, each block ``(E, ...)`` contiguous), and so do their
    gradients; ``params`` / ``grads`` are views. One fused AdamW then updates the whole group in
    a single kernel call, and the forward and backward passes write into preallocated buffers.

    Two details of the step matter for speed on CPU (``benchmarks/perf_training.py``): products
    with a width-1 side (the output layer, the scalar input) are written as row-vector (``M = 1``)
    products, which MKL runs 7-11x faster than its ``N = 1`` batched path; and SiLU keeps its
    sigmoid ``s`` from the forward pass, so the backward is ``s + h (1 - s)`` with ``h = z s``
    (two cheap elementwise passes: a ``lerp`` and a product) instead of a second pass of exponentials.
    """

    def __init__(self, members: Sequence[Member], lr: float, weight_decay: float, device: torch.device,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.members = list(members)
        first = self.members[0].model
        self.widths = first.widths
        self.activation = first.activation
        if self.activation != "silu":
            raise ValueError("the ensemble trainer implements SiLU MLPs only")
        for m in self.members:
            if m.model.widths != self.widths or m.model.activation != self.activation:
                raise ValueError("every ensemble member must have the same architecture")
        self.device = device
        n_max = max(int(m.x.shape[0]) for m in self.members)
        e = len(self.members)
        d_in, d_out = self.widths[0], self.widths[-1]
        self.x = torch.zeros(e, n_max, d_in, device=device)
        self.y = torch.zeros(e, n_max, d_out, device=device)
        self.w2 = torch.zeros(e, n_max, 1, device=device)
        for i, m in enumerate(self.members):
            n = int(m.x.shape[0])
            self.x[i, :n] = m.x.reshape(n, d_in).to(device, torch.float32)
            self.y[i, :n] = m.y.reshape(n, d_out).to(device, torch.float32)
            # twice the MSE weight of member i's points (mean over its n points and d_out coordinates);
            # d loss / d out = w2 * (out - y)
            self.w2[i, :n] = 2.0 / (n * d_out)
        self._shapes: list[tuple[int, int]] = []
        for li in range(len(self.widths) - 1):
            self._shapes += [(self.widths[li], self.widths[li + 1]), (1, self.widths[li + 1])]
        blocks = []
        for li in range(len(self.widths) - 1):
            lins = [m.model.linears()[li] for m in self.members]
            blocks.append(torch.stack([lin.weight.detach().T.to(torch.float32) for lin in lins]).reshape(-1))
            blocks.append(torch.stack([lin.bias.detach().to(torch.float32) for lin in lins]).reshape(-1))
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self._set_flat(torch.cat(blocks).to(device))
        self.step_count = 0

    def _views(self, flat: Tensor) -> list[Tensor]:
        e = len(self.members)
        out, o = [], 0
        for r, c in self._shapes:
            out.append(flat[o:o + e * r * c].view(e, r, c))
            o += e * r * c
        return out

    def _set_flat(self, flat: Tensor) -> None:
        self.flat = flat.contiguous()
        self.flat.grad = torch.zeros_like(self.flat)
        self.params = self._views(self.flat)
        self.grads = self._views(self.flat.grad)
        self.optimizer = FusedAdamW([self.flat], [self.flat.grad], self.lr, self.weight_decay, self.betas, self.eps)
        e, n = self.x.shape[0], self.x.shape[1]
        # z[l]: pre-activation of layer l; s[l]: sigmoid(z[l]); h[l] = z[l] s[l] (its SiLU);
        # dz[l]: d loss / d z[l]
        self._z = [torch.empty(e, n, w, device=self.device) for w in self.widths[1:]]
        self._s = [torch.empty(e, n, w, device=self.device) for w in self.widths[1:-1]]
        self._h = [torch.empty(e, n, w, device=self.device) for w in self.widths[1:-1]]
        self._dz = [torch.empty(e, n, w, device=self.device) for w in self.widths[1:]]
        self._one = torch.ones(1, 1, 1, device=self.device)
        self._build_plan()

    # ---- the step -----------------------------------------------------------------
    def _build_plan(self) -> None:
        """Precompute the step as a flat list of zero-argument calls on fixed buffers and views.

        A group-step of five 300-300 members is about 25 tensor operations; written as a loop over
        layers, the Python around them (shape tests, views, indexing) cost more than the calls
        themselves (``benchmarks/perf_training.py --breakdown``). Every operand is a preallocated
        buffer or a view into one, so the calls can be bound once (``functools.partial``) and the
        step is one pass over the list; the operations and their order are those of the loop.
        """
        e, n = self.x.shape[0], self.x.shape[1]
        n_layers = len(self.widths) - 1
        fwd: list[Callable[[], Any]] = []
        a = self.x
        for li in range(n_layers):
            W, b, z = self.params[2 * li], self.params[2 * li + 1], self._z[li]
            if W.shape[1] == 1:  # fan_in 1: an outer product, cheaper than a K=1 bmm
                fwd.append(partial(torch.addcmul, b, a, W, out=z))
            elif W.shape[2] == 1:
                # fan_out 1: z^T = W^T a^T as a row-vector product ((E, n, 1) and (E, 1, n) share memory)
                fwd.append(partial(torch.baddbmm, b, W.view(e, 1, -1), a.transpose(1, 2), out=z.view(e, 1, n)))
            else:
                fwd.append(partial(torch.baddbmm, b, a, W, out=z))
            if li < n_layers - 1:
                fwd.append(partial(torch.sigmoid, z, out=self._s[li]))
                fwd.append(partial(torch.mul, z, self._s[li], out=self._h[li]))
                a = self._h[li]
        bwd: list[Callable[[], Any]] = []
        dz = self._dz[-1]
        bwd.append(partial(torch.sub, self._z[-1], self.y, out=dz))
        bwd.append(partial(dz.mul_, self.w2))
        for li in range(n_layers - 1, -1, -1):
            a = self.x if li == 0 else self._h[li - 1]
            W = self.params[2 * li]
            gW, gb = self.grads[2 * li], self.grads[2 * li + 1]
            if W.shape[2] == 1:
                # fan_out 1: gW^T = dz^T a, a row-vector product ((E, in, 1) and (E, 1, in) share memory)
                bwd.append(partial(torch.bmm, dz.transpose(1, 2), a, out=gW.view(gW.shape[0], 1, -1)))
            else:
                bwd.append(partial(torch.bmm, a.transpose(1, 2), dz, out=gW))
            bwd.append(partial(torch.sum, dz, dim=1, keepdim=True, out=gb))
            if li:
                da = self._dz[li - 1]
                if W.shape[2] == 1:  # fan_out 1: a broadcast product instead of a K=1 bmm
                    bwd.append(partial(torch.mul, dz, W.transpose(1, 2), out=da))
                else:
                    bwd.append(partial(torch.bmm, dz, W.transpose(1, 2), out=da))
                # silu'(z) = s + h (1 - s) = lerp(h, 1, s), computed in h's buffer (h is no longer
                # needed: the weight gradient above was its last use), then applied to da in place
                h_ = self._h[li - 1]
                bwd.append(partial(h_.lerp_, self._one.expand_as(h_), self._s[li - 1]))
                bwd.append(partial(da.mul_, h_))
                dz = da
        self._forward_plan = fwd
        self._grad_plan = fwd + bwd
        self._step_plan = self._grad_plan + [self.optimizer.step]

    def forward(self) -> Tensor:
        """Outputs ``(E, n, out)``; fills the pre-activation / activation buffers."""
        for op in self._forward_plan:
            op()
        return self._z[-1]

    def loss_and_grads(self) -> None:
        """Write the gradient of ``sum_e sum_i w_ei (f_e(x_ei) - y_ei)^2`` into the flat ``.grad``."""
        for op in self._grad_plan:
            op()

    def step(self) -> None:
        for op in self._step_plan:
            op()
        self.step_count += 1

    def run(self, steps: int) -> None:
        """Take ``steps`` steps."""
        plan = self._step_plan
        for _ in range(steps):
            for op in plan:
                op()
        self.step_count += steps

    @torch.no_grad()
    def losses(self) -> Tensor:
        out = self.forward()
        return (0.5 * self.w2 * (out - self.y) ** 2).sum(dim=(1, 2))

    # ---- members ------------------------------------------------------------------
    def state_dict_of(self, i: int) -> dict[str, Tensor]:
        sd: dict[str, Tensor] = {}
        for li in range(len(self.widths) - 1):
            name = str(2 * li)  # nn.Sequential positions: Linear at 0, 2, 4, ...
            sd[f"{name}.weight"] = self.params[2 * li][i].T.detach().to("cpu").clone().contiguous()
            sd[f"{name}.bias"] = self.params[2 * li + 1][i].reshape(-1).detach().to("cpu").clone()
        return sd

    def _gather(self, flat: Tensor, idx: Tensor) -> Tensor:
        return torch.cat([v[idx].reshape(-1) for v in self._views(flat)])

    def remove(self, done: list[int]) -> None:
        """Take members ``done`` out of the stacked tensors and the AdamW state."""
        gone = set(done)
        keep = [i for i in range(len(self.members)) if i not in gone]
        if not keep:
            self.members = []
            return
        idx = torch.tensor(keep, device=self.x.device)
        old = self.optimizer
        moments = ([self._gather(old.exp_avg[0], idx)], [self._gather(old.exp_avg_sq[0], idx)], old.step_t)
        flat = self._gather(self.flat.detach(), idx)
        self.members = [self.members[i] for i in keep]
        self.x, self.y, self.w2 = self.x[idx].contiguous(), self.y[idx].contiguous(), self.w2[idx].contiguous()
        self._set_flat(flat)
        self.optimizer.load(*moments)


def _balanced_shards(items: list[int], work: list[int], n_shards: int) -> list[list[int]]:
    """Split ``items`` (member indices, ``work[i]`` steps each) into ``n_shards`` lists of near-equal
    total work."""
    n_shards = max(1, min(n_shards, len(items)))
    order = sorted(items, key=lambda i: -work[i])
    groups: list[list[int]] = [[] for _ in range(n_shards)]
    load = [0] * n_shards
    for i in order:
        j = min(range(n_shards), key=lambda k: (load[k], len(groups[k])))
        groups[j].append(i)
        load[j] += work[i]
    return [sorted(g) for g in groups if g]


#: members stepped in lockstep by one CPU worker. Since the step is a precomputed list of calls
#: (:meth:`_Shard._build_plan`) a group-step's fixed Python cost is small, and on the 2-core
#: development machine, 2 workers, groups of 2 and 3 train fastest and tie (2,844 and 2,859
#: member-steps/s; groups of 1: 2,541, of 5: 2,633; the previous loop-written step with groups of 5:
#: 2,342, so 1.21x): ``benchmarks/perf_training.py --steps 4000 --rounds 2 --groups 1,2,3,5
#: --backends processes --loop-step``, the 20 poisoning models, 2026-11-28.
DEFAULT_CPU_GROUP = 2


def _groups(members: Sequence[Member], size: int) -> list[list[int]]:
    """Split one worker's members into lockstep groups of at most ``size`` members (as indices).

    Members with the same architecture and number of points (and then similar step counts) are
    grouped together, so that no group pads short datasets; a run of ``k`` such members becomes
    ``ceil(k / size)`` groups of near-equal size.
    """
    runs: dict[tuple[tuple[int, ...], int], list[int]] = {}
    order = sorted(range(len(members)), key=lambda i: (-int(members[i].x.shape[0]), -members[i].steps))
    for i in order:
        m = members[i]
        runs.setdefault((tuple(m.model.widths), int(m.x.shape[0])), []).append(i)
    out: list[list[int]] = []
    for run in runs.values():
        k = len(run)
        n_groups = -(-k // size)
        bounds = [round(j * k / n_groups) for j in range(n_groups + 1)]
        out += [run[bounds[j]:bounds[j + 1]] for j in range(n_groups)]
    return out


def _train_groups(members: Sequence[Member], lr: float, weight_decay: float, device: torch.device,
                  group_size: int, report_every: int, progress: Callable[[int], None] | None,
                  finish: Callable[[int, Tensor | float, dict[str, Tensor]], None]) -> None:
    """Train ``members`` group after group; ``finish(i, final_loss, state_dict)`` for ``members[i]``."""
    with torch.no_grad():
        for group in _groups(members, group_size):
            shard = _Shard([members[i] for i in group], lr, weight_decay, device)
            positions = list(group)  # kept in step with shard.members
            pending = 0
            while shard.members:
                done = [j for j, m in enumerate(shard.members) if m.steps <= shard.step_count]
                if done:
                    losses = shard.losses()
                    for j in done:
                        finish(positions[j], float(losses[j]), shard.state_dict_of(j))
                    shard.remove(done)
                    positions = [q for j, q in enumerate(positions) if j not in set(done)]
                    continue
                target = min(m.steps for m in shard.members)
                e = len(shard.members)
                while shard.step_count < target:
                    k = min(target - shard.step_count, report_every - shard.step_count % report_every)
                    shard.run(k)
                    pending += e * k
                    if progress is not None and shard.step_count % report_every == 0:
                        progress(pending)
                        pending = 0
            if progress is not None and pending:
                progress(pending)


def _process_worker(members: list[Member], lr: float, weight_decay: float, group_size: int, report_every: int,
                    with_progress: bool, chan: Channel) -> None:  # pragma: no cover - child
    """Body of one training process. Messages: ``"progress"`` (member-steps) and ``"done"``
    (position in ``members``, final loss, state dict as numpy arrays: they pickle by value)."""

    def progress(n: int) -> None:
        if with_progress:
            chan.send("progress", n)
        elif not chan.parent_alive():
            import os

            os._exit(1)

    _train_groups(members, lr, weight_decay, torch.device("cpu"), group_size, report_every, progress,
                  lambda i, loss, sd: chan.send("done", (i, loss, {k: v.numpy() for k, v in sd.items()})))


def _check_members(members: Sequence[Member]) -> None:
    """Clear errors for what the trainer cannot do, before any worker starts."""
    for m in members:
        if m.steps < 0:
            raise ValueError(f"steps must be >= 0, got {m.steps} (member {m.key!r})")
        if m.model.activation != "silu":
            raise ValueError(f"the ensemble trainer implements SiLU MLPs only; member {m.key!r} uses "
                             f"{m.model.activation!r}")
        d_in, d_out = m.model.widths[0], m.model.widths[-1]
        n = int(m.x.shape[0]) if m.x.dim() else -1
        if m.x.dim() == 0 or m.x.numel() != n * d_in or m.y.numel() != n * d_out:
            raise ValueError(f"member {m.key!r}: x {tuple(m.x.shape)} and y {tuple(m.y.shape)} do not fit "
                             f"a model with {d_in} input(s) and {d_out} output(s) on the same points")


def train_ensemble(members: Sequence[Member], *, lr: float = 1e-3, weight_decay: float = 0.01,
                   device: str | torch.device = "cpu", workers: int = 1,
                   progress: Callable[[int], None] | None = None,
                   on_done: Callable[[MemberResult], None] | None = None,
                   report_every: int = 200, group_size: int | None = None,
                   processes: bool | None = None) -> list[MemberResult]:
    """Train ``members`` (full-batch MSE, AdamW) and return their final state dicts.

    Args:
        members: models with their data and step counts (the models are not modified).
        lr, weight_decay: AdamW settings (betas and eps are PyTorch's defaults).
        device: where to train; on CUDA one shard is used whatever ``workers`` says.
        workers: number of CPU shards trained concurrently, one intra-op thread each.
        progress: called with the number of member-steps done since the last call.
        on_done: called (in the calling process, one call at a time) as soon as a member
            finishes, e.g. to write it to a cache.
        report_every: how often (in steps) ``progress`` is called.
        group_size: most members stepped in lockstep. A CPU worker trains its members in
            groups of at most this many (members with the same architecture and number of
            points together), one group after the other: small groups keep a group's
            parameters, AdamW state and activations in cache. ``None``: ``DEFAULT_CPU_GROUP``
            on CPU, all members in one group on other devices.
        processes: run the CPU shards in worker processes rather than in threads of this
            process. ``None`` (default): processes on Linux (started with ``fork``) whenever
            there is more than one shard and this process may start children (it is not itself
            a daemonic worker); threads elsewhere (``True`` there uses ``spawn``, which needs
            the usual ``if __name__ == "__main__":`` guard in the calling script). Both give
            identical results (every shard runs on one thread either way); processes are
            faster because the shards' Python dispatch does not contend for one GIL
            (``benchmarks/perf_training.py``).

    Raises:
        ValueError: a member the trainer cannot train (checked before anything starts).
        Exception: the first error of a shard, once the other shards have finished (their
            members are handed to ``on_done`` first, so nothing finished is lost). With
            processes, a worker that dies without an error report raises ``RuntimeError``.

    Returns:
        One :class:`MemberResult` per member, in the order given.
    """
    dev = torch.device(device)
    members = list(members)
    if not members:
        return []
    _check_members(members)
    if group_size is not None and int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if int(report_every) < 1:
        raise ValueError(f"report_every must be >= 1, got {report_every}")
    n_shards = 1 if dev.type != "cpu" else max(1, int(workers))
    gsize = int(group_size) if group_size is not None else (DEFAULT_CPU_GROUP if dev.type == "cpu" else len(members))
    shards = _balanced_shards(list(range(len(members))), [m.steps for m in members], n_shards)
    results: dict[int, MemberResult] = {}
    lock = threading.Lock()

    def finish(i: int, loss: Tensor | float, state_dict: dict[str, Tensor]) -> None:
        m = members[i]
        res = MemberResult(m.key, state_dict, float(loss), m.steps)
        with lock:
            results[i] = res
            if on_done is not None:
                on_done(res)

    def report(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    def run_shard(idx: list[int]) -> None:
        _train_groups([members[i] for i in idx], lr, weight_decay, dev, gsize, report_every,
                      report if progress is not None else None,
                      lambda j, loss, sd: finish(idx[j], loss, sd))

    if len(shards) == 1:
        run_shard(shards[0])
    elif processes if processes is not None else can_start_processes():
        _run_in_processes(members, shards, lr, weight_decay, gsize, report_every,
                          report if progress is not None else None, finish)
    else:
        run_in_threads(run_shard, shards)
    missing = [i for i in range(len(members)) if i not in results]
    if missing:  # pragma: no cover - every path above raises first
        raise RuntimeError(f"training returned no result for members {missing}")
    return [results[i] for i in range(len(members))]


def _run_in_processes(members: list[Member], shards: list[list[int]], lr: float, weight_decay: float,
                      group_size: int, report_every: int, report: Callable[[int], None] | None,
                      finish: Callable[[int, Tensor | float, dict[str, Tensor]], None]) -> None:
    """One process per shard (``overunlearn.workers``); results and progress come back by pipe."""

    def target(idx: list[int], chan: Channel) -> None:  # pragma: no cover - child
        _process_worker([members[i] for i in idx], lr, weight_decay, group_size, report_every, report is not None,
                        chan)

    def on_message(w: int, kind: str, payload: Any) -> None:
        if kind == "progress":
            if report is not None:
                report(int(payload))
        elif kind == "done":
            j, loss, arrays = payload
            finish(shards[w][j], loss, {k: torch.from_numpy(v) for k, v in arrays.items()})

    run_in_processes(target, shards, on_message, name="train", label="training",
                     fallback_hint="train_ensemble(..., processes=False) trains in threads instead")


def train_single_reference(model: MLP, x: Tensor, y: Tensor, steps: int, lr: float = 1e-3,
                           weight_decay: float = 0.01) -> MLP:
    """The slow, obviously-correct reference: one ``nn.Module``, autograd, ``torch.optim.AdamW``.

    Used by the tests to check :func:`train_ensemble`; returns the trained model (a copy).
    """
    import copy

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
    return m


def measure_throughput(n_models: int = 20, n_points: int = 55, steps: int = 50, workers: int = 1,
                       hidden: Sequence[int] = (300, 300)) -> dict[str, float]:
    """Member-steps per second of :func:`train_ensemble` on random data (wall and CPU time)."""
    g = torch.Generator().manual_seed(0)
    mem = [Member(MLP(1, hidden, 1, generator=g), torch.rand(n_points, 1, generator=g),
                  torch.rand(n_points, 1, generator=g), steps) for _ in range(n_models)]
    t0, c0 = time.perf_counter(), time.process_time()
    train_ensemble(mem, workers=workers)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    total = n_models * steps
    return {"member_steps_per_s": total / wall, "member_steps_per_cpu_s": total / max(cpu, 1e-9),
            "wall_s": wall, "cpu_s": cpu}


__all__ = ["Member", "MemberResult", "train_ensemble", "train_single_reference", "measure_throughput"]
