#!/usr/bin/env python
"""Ensemble training of the Data Poisoning models: worker backends and lockstep group sizes side by side.

Trains the benchmark's 20 models at a reduced step count -- 10 "original" members (55 points,
``S`` steps) and 10 "ground-truth" members (50 points, ``S / 2`` steps), the 1-300-300-1 SiLU
MLP, full-batch AdamW -- with :func:`overunlearn.training.train_ensemble` on ``--workers``
workers, once per setting per round, rounds interleaved (in alternating order) so that the
machine's noise hits every setting alike. A setting is a worker backend (``processes``, the default, or ``threads`` of
this process) and a group size; ``--loop-step`` adds the trainer's previous step (the same
operations written as a Python loop over the layers, rebuilding views every step, rather than the
precomputed list of calls) in worker processes with groups of 5, its previous default. It prints
member-steps per second (median and best over rounds, wall clock including the start of worker
processes), each setting's ratio to the default (processes, ``DEFAULT_CPU_GROUP``), the ratio to
a plain per-model ``nn.Module`` + ``torch.optim.AdamW`` loop on one thread, and what the medians
imply for the full recipe (10 x 100k + 10 x 50k = 1.5M member-steps).

Nothing is downloaded; models are fresh initialisations. On a shared machine read the ratios.

Usage::

    python benchmarks/perf_training.py                      # S = 2000, 3 rounds, 2 workers
    python benchmarks/perf_training.py --steps 6000 --rounds 2 --groups 1,2,3 --backends processes --loop-step
    python benchmarks/perf_training.py --breakdown          # where one group-step's time goes
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

FULL_RECIPE_MEMBER_STEPS = 10 * 100_000 + 10 * 50_000


def _members(steps: int):
    from overunlearn.models.mlp import MLP
    from overunlearn.training import Member

    out = []
    for s in range(10):
        g = torch.Generator().manual_seed(s)
        x = (torch.rand(55, 1, generator=g) * 2 - 1) * 5 * math.pi
        y = torch.sin(x)
        out.append(Member(MLP(1, (300, 300), 1, generator=torch.Generator().manual_seed(s)), x, y, steps))
        out.append(Member(MLP(1, (300, 300), 1, generator=torch.Generator().manual_seed(100 + s)),
                          x[:50], y[:50], steps // 2))
    return out


def _per_model_rate(steps: int) -> float:
    """Member-steps/s of the obvious loop: one model, autograd, torch.optim.AdamW, one thread."""
    from overunlearn.training.ensemble import train_single_reference

    m = _members(steps)[0]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_single_reference(m.model, m.x, m.y, 20)
        t = time.perf_counter()
        train_single_reference(m.model, m.x, m.y, steps)
        return steps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(prev)


def _breakdown(reps: int = 300) -> None:
    """Time one lockstep group-step of five 300-300 members and its parts, on one thread."""
    from overunlearn.models.mlp import MLP
    from overunlearn.training import Member
    from overunlearn.training.ensemble import _Shard

    def timed(fn) -> float:
        for _ in range(20):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    def shard(width: int) -> _Shard:
        g = torch.Generator().manual_seed(0)
        members = [Member(MLP(1, (width, width), 1, generator=g), torch.rand(55, 1, generator=g),
                          torch.rand(55, 1, generator=g), 10**9) for _ in range(5)]
        return _Shard(members, 1e-3, 0.01, torch.device("cpu"))

    big, small = shard(300), shard(4)
    a, W, z, b = big._h[0], big.params[2], big._z[1], big.params[3]
    dz, gW, da = big._dz[1], big.grads[2], big._dz[0]

    def products() -> None:
        torch.baddbmm(b, a, W, out=z)
        torch.bmm(a.transpose(1, 2), dz, out=gW)
        torch.bmm(dz, W.transpose(1, 2), out=da)

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = {300: timed(big.step), 4: timed(small.step)}
            prod = timed(products)
            adamw = timed(big.optimizer.step)
            sig = timed(lambda: torch.sigmoid(z, out=big._s[1]))
    finally:
        torch.set_num_threads(prev)
    gflops = 3 * 2 * 55 * 300 * 300 * 5 / prod / 1e6
    print("one group-step of 5 members (1-300-300-1, 55 points), one thread, ms:")
    print(f"  whole step {out[300]:.2f} | three 55x300x300 products per member {prod:.2f} ({gflops:.0f} GFLOP/s) | "
          f"AdamW {adamw:.2f} | one sigmoid {sig:.2f} | a 1-4-4-1 step (dispatch) {out[4]:.2f} | "
          f"rest {out[300] - prod - adamw - 2 * sig - out[4]:.2f}")


def _loop_shard_class():
    """The trainer's previous step, for comparison: the same operations as a Python loop over the
    layers, with the views and shape tests rebuilt at every step."""
    from overunlearn.training.ensemble import _Shard

    class LoopShard(_Shard):
        def _loop_step(self) -> None:
            a = self.x
            n_layers = len(self.widths) - 1
            e, n = self.x.shape[0], self.x.shape[1]
            for li in range(n_layers):
                W, b, z = self.params[2 * li], self.params[2 * li + 1], self._z[li]
                if W.shape[1] == 1:
                    torch.addcmul(b, a, W, out=z)
                elif W.shape[2] == 1:
                    torch.baddbmm(b, W.view(e, 1, -1), a.transpose(1, 2), out=z.view(e, 1, n))
                else:
                    torch.baddbmm(b, a, W, out=z)
                if li == n_layers - 1:
                    break
                torch.sigmoid(z, out=self._s[li])
                a = torch.mul(z, self._s[li], out=self._h[li])
            dz = torch.sub(self._z[-1], self.y, out=self._dz[-1]).mul_(self.w2)
            for li in range(n_layers - 1, -1, -1):
                a = self.x if li == 0 else self._h[li - 1]
                W = self.params[2 * li]
                gW, gb = self.grads[2 * li], self.grads[2 * li + 1]
                if W.shape[2] == 1:
                    torch.bmm(dz.transpose(1, 2), a, out=gW.view(gW.shape[0], 1, -1))
                else:
                    torch.bmm(a.transpose(1, 2), dz, out=gW)
                torch.sum(dz, dim=1, keepdim=True, out=gb)
                if li:
                    da = self._dz[li - 1]
                    if W.shape[2] == 1:
                        torch.mul(dz, W.transpose(1, 2), out=da)
                    else:
                        torch.bmm(dz, W.transpose(1, 2), out=da)
                    h_ = self._h[li - 1]
                    h_.lerp_(self._one.expand_as(h_), self._s[li - 1])
                    dz = da.mul_(h_)
            self.optimizer.step()

        def run(self, steps: int) -> None:
            for _ in range(steps):
                self._loop_step()
            self.step_count += steps

    return LoopShard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="S: steps of the original-sized members")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every setting")
    ap.add_argument("--workers", type=int, default=2, help="workers (one torch thread each)")
    ap.add_argument("--groups", default="1,2,3,5", help="comma-separated group sizes to compare")
    ap.add_argument("--backends", default="processes,threads", help="comma-separated: processes, threads")
    ap.add_argument("--loop-step", action="store_true",
                    help="also time the previous step (a loop over the layers) with groups of 5, in processes")
    ap.add_argument("--breakdown", action="store_true", help="only time one group-step and its parts")
    args = ap.parse_args()
    if args.breakdown:
        _breakdown()
        return
    if args.steps < 2 or args.rounds < 1:
        ap.error("--steps must be >= 2 and --rounds >= 1")
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if any(b not in ("processes", "threads") for b in backends) or not groups or not backends or min(groups) < 1:
        ap.error("--backends takes processes and/or threads; --groups one or more sizes >= 1")

    from overunlearn.training import ensemble
    from overunlearn.training.ensemble import DEFAULT_CPU_GROUP, train_ensemble

    default = ("processes", DEFAULT_CPU_GROUP)
    settings = [(b, g) for b in backends for g in groups]
    if default not in settings:
        settings.append(default)
    if args.loop_step:
        settings.append(("loop-step", 5))
    plan_shard, loop_shard = ensemble._Shard, _loop_shard_class()

    total = 10 * args.steps + 10 * (args.steps // 2)
    print(f"20 members (10 x {args.steps} + 10 x {args.steps // 2} steps = {total:,} member-steps), "
          f"{args.workers} worker(s), {args.rounds} round(s), torch {torch.__version__}")
    rates: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    for b in backends:  # warm-up
        train_ensemble(_members(4), workers=args.workers, processes=b == "processes")
    for r in range(args.rounds):
        for b, g in (settings if r % 2 == 0 else settings[::-1]):  # alternate the order: drift hits all alike
            ensemble._Shard = loop_shard if b == "loop-step" else plan_shard  # forked workers inherit it
            try:
                t = time.perf_counter()
                train_ensemble(_members(args.steps), workers=args.workers, group_size=g, processes=b != "threads")
                rates[(b, g)].append(total / (time.perf_counter() - t))
            finally:
                ensemble._Shard = plan_shard
    loop = _per_model_rate(min(args.steps, 300))
    base = statistics.median(rates[default])
    head = f"vs {default[0]},{default[1]}"
    print(f"{'backend':>9s} {'group':>5s} {'median/s':>9s} {'best/s':>8s} {head:>13s} "
          f"{'vs per-model loop':>18s} {'full recipe (median)':>21s}")
    for b, g in settings:
        med = statistics.median(rates[(b, g)])
        print(f"{b:>9s} {g:5d} {med:9.0f} {max(rates[(b, g)]):8.0f} {med / base:12.2f}x {med / loop:17.1f}x "
              f"{FULL_RECIPE_MEMBER_STEPS / med / 60:17.1f} min")
    print(f"per-model nn.Module + AdamW loop, one thread: {loop:.0f} member-steps/s")


if __name__ == "__main__":
    main()
