"""Train many small MLPs at once as one vectorised ensemble.

Every member is an :class:`~overunlearn.models.mlp.MLP` of the same architecture, trained
full-batch on its own data with the mean-squared error and AdamW. Instead of looping over
``E`` models, the parameters of all members are stacked into tensors with a leading
ensemble dimension (``W_l: (E, fan_in, fan_out)``, ``b_l: (E, 1, fan_out)``), the forward and
backward passes are batched matrix products (``torch.baddbmm`` / ``torch.bmm``) with a
hand-written backward pass, and **one** ``torch.optim.AdamW`` steps all stacked tensors.

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

On CPU the ensemble is split into ``workers`` shards that run in Python threads with one
intra-op thread each. PyTorch releases the GIL inside its kernels, so this uses several
cores without OpenMP barriers -- which matters on a shared machine, where a busy core makes
every OpenMP parallel region wait (we measured 4-10x slowdowns of 2-thread OpenMP under load).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from overunlearn.models.mlp import MLP


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


def _silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    """``grad * d silu(z) / dz`` in one fused kernel (``sigmoid(z) (1 + z (1 - sigmoid(z)))``)."""
    return torch.ops.aten.silu_backward(grad, z)


class _Shard:
    """Stacked parameters, data and one AdamW for a group of members."""

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
        n_max = max(int(m.x.shape[0]) for m in self.members)
        e = len(self.members)
        d_in, d_out = self.widths[0], self.widths[-1]
        self.x = torch.zeros(e, n_max, d_in, device=device)
        self.y = torch.zeros(e, n_max, d_out, device=device)
        self.w = torch.zeros(e, n_max, 1, device=device)
        for i, m in enumerate(self.members):
            n = int(m.x.shape[0])
            self.x[i, :n] = m.x.reshape(n, d_in).to(device, torch.float32)
            self.y[i, :n] = m.y.reshape(n, d_out).to(device, torch.float32)
            # MSE per member: mean over its n points and d_out coordinates
            self.w[i, :n] = 1.0 / (n * d_out)
        self.params: list[Tensor] = []
        for li in range(len(self.widths) - 1):
            lins = [m.model.linears()[li] for m in self.members]
            self.params.append(torch.stack([lin.weight.detach().T for lin in lins]).to(device).contiguous())
            self.params.append(torch.stack([lin.bias.detach().reshape(1, -1) for lin in lins]).to(device).contiguous())
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.optimizer = self._make_optimizer(self.params)
        self.step_count = 0

    def _make_optimizer(self, params: list[Tensor]) -> torch.optim.Optimizer:
        kw = dict(lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps)
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError):  # pragma: no cover - fused unsupported on this device
            return torch.optim.AdamW(params, foreach=True, **kw)

    # ---- the step -----------------------------------------------------------------
    def forward(self) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Outputs ``(E, n, out)`` and, per layer, its input and pre-activation."""
        acts: list[tuple[Tensor, Tensor]] = []
        a = self.x
        n_layers = len(self.widths) - 1
        for li in range(n_layers):
            W, b = self.params[2 * li], self.params[2 * li + 1]
            # fan_in 1: an outer product, cheaper than a K=1 bmm
            z = torch.addcmul(b, a, W) if W.shape[1] == 1 else torch.baddbmm(b, a, W)
            acts.append((a, z))
            if li == n_layers - 1:
                return z, acts
            a = F.silu(z)
        raise AssertionError("unreachable")

    def loss_and_grads(self) -> None:
        """Write the gradient of ``sum_e sum_i w_ei (f_e(x_ei) - y_ei)^2`` into every ``.grad``."""
        out, acts = self.forward()
        dz = (2.0 * self.w) * (out - self.y)  # d loss / d out
        for li in range(len(acts) - 1, -1, -1):
            a, _ = acts[li]
            W, b = self.params[2 * li], self.params[2 * li + 1]
            gW, gb = W.grad, b.grad
            assert gW is not None and gb is not None
            if W.shape[1] == 1:
                torch.sum(a * dz, dim=1, keepdim=True, out=gW)
            else:
                torch.bmm(a.transpose(1, 2), dz, out=gW)
            torch.sum(dz, dim=1, keepdim=True, out=gb)
            if li:
                # fan_out 1: a broadcast product instead of a K=1 bmm
                da = dz * W.transpose(1, 2) if W.shape[2] == 1 else torch.bmm(dz, W.transpose(1, 2))
                dz = _silu_backward(da, acts[li - 1][1])

    def step(self) -> None:
        self.loss_and_grads()
        self.optimizer.step()
        self.step_count += 1

    @torch.no_grad()
    def losses(self) -> Tensor:
        out, _ = self.forward()
        return (self.w * (out - self.y) ** 2).sum(dim=(1, 2))

    # ---- members ------------------------------------------------------------------
    def state_dict_of(self, i: int) -> dict[str, Tensor]:
        sd: dict[str, Tensor] = {}
        for li, lin_idx in enumerate(range(0, 2 * (len(self.widths) - 1), 2)):
            name = str(2 * li)  # nn.Sequential positions: Linear at 0, 2, 4, ...
            sd[f"{name}.weight"] = self.params[lin_idx][i].T.detach().to("cpu").clone().contiguous()
            sd[f"{name}.bias"] = self.params[lin_idx + 1][i].reshape(-1).detach().to("cpu").clone()
        return sd

    def remove(self, done: list[int]) -> None:
        """Take members ``done`` out of the stacked tensors and the AdamW state."""
        keep = [i for i in range(len(self.members)) if i not in set(done)]
        if not keep:
            self.members = []
            return
        idx = torch.tensor(keep, device=self.x.device)
        old_state = self.optimizer.state
        new_params = []
        new_state = {}
        for p in self.params:
            q = p.detach()[idx].clone()
            q.grad = torch.zeros_like(q)
            st = old_state.get(p, {})
            new_state[q] = {k: (v[idx].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0]
                                and k != "step" else (v.clone() if torch.is_tensor(v) else v))
                            for k, v in st.items()}
            new_params.append(q)
        self.params = new_params
        self.optimizer = self._make_optimizer(self.params)
        for q, st in new_state.items():
            if st:
                self.optimizer.state[q] = st
        self.x, self.y, self.w = self.x[idx].contiguous(), self.y[idx].contiguous(), self.w[idx].contiguous()
        self.members = [self.members[i] for i in keep]


def _balanced_shards(members: Sequence[Member], n_shards: int) -> list[list[Member]]:
    """Split members into ``n_shards`` groups of near-equal total work (sum of steps)."""
    n_shards = max(1, min(n_shards, len(members)))
    order = sorted(members, key=lambda m: -m.steps)
    groups: list[list[Member]] = [[] for _ in range(n_shards)]
    load = [0] * n_shards
    for m in order:
        j = min(range(n_shards), key=lambda k: (load[k], len(groups[k])))
        groups[j].append(m)
        load[j] += m.steps
    return [g for g in groups if g]


def train_ensemble(members: Sequence[Member], *, lr: float = 1e-3, weight_decay: float = 0.01,
                   device: str | torch.device = "cpu", workers: int = 1,
                   progress: Callable[[int], None] | None = None,
                   on_done: Callable[[MemberResult], None] | None = None,
                   report_every: int = 200) -> list[MemberResult]:
    """Train ``members`` (full-batch MSE, AdamW) and return their final state dicts.

    Args:
        members: models with their data and step counts (the models are not modified).
        lr, weight_decay: AdamW settings (betas and eps are PyTorch's defaults).
        device: where to train; on CUDA one shard is used whatever ``workers`` says.
        workers: number of CPU shards trained concurrently in threads (one intra-op thread each).
        progress: called with the number of member-steps done since the last call.
        on_done: called (from a worker thread, under a lock) as soon as a member finishes,
            e.g. to write it to a cache.
        report_every: how often (in steps) ``progress`` is called.

    Returns:
        One :class:`MemberResult` per member, in the order given.
    """
    dev = torch.device(device)
    members = list(members)
    if not members:
        return []
    for m in members:
        if m.steps < 0:
            raise ValueError(f"steps must be >= 0, got {m.steps}")
    n_shards = 1 if dev.type != "cpu" else max(1, int(workers))
    shards_members = _balanced_shards(members, n_shards)
    results: dict[int, MemberResult] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def finish(shard: _Shard, positions: list[int], losses: Tensor) -> None:
        for i in positions:
            mem = shard.members[i]
            res = MemberResult(mem.key, shard.state_dict_of(i), float(losses[i]), mem.steps)
            with lock:
                results[id(mem)] = res
                if on_done is not None:
                    on_done(res)

    def run(group: list[Member], single_thread: bool) -> None:
        try:
            if single_thread:
                torch.set_num_threads(1)
            with torch.no_grad():
                shard = _Shard(group, lr, weight_decay, dev)
                pending = 0
                while shard.members:
                    done = [i for i, m in enumerate(shard.members) if m.steps <= shard.step_count]
                    if done:
                        finish(shard, done, shard.losses())
                        shard.remove(done)
                        continue
                    target = min(m.steps for m in shard.members)
                    e = len(shard.members)
                    while shard.step_count < target:
                        shard.step()
                        pending += e
                        if progress is not None and shard.step_count % report_every == 0:
                            with lock:
                                progress(pending)
                            pending = 0
                if progress is not None and pending:
                    with lock:
                        progress(pending)
        except BaseException as exc:  # pragma: no cover - re-raised in the caller
            errors.append(exc)

    if len(shards_members) == 1:
        run(shards_members[0], single_thread=False)
    else:
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            threads = [threading.Thread(target=run, args=(g, True), daemon=True) for g in shards_members]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.set_num_threads(prev)
    if errors:
        raise errors[0]
    return [results[id(m)] for m in members]


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
