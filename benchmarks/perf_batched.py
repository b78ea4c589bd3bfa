#!/usr/bin/env python
"""Vectorised ensemble unlearning (engine/vectorised.py) against one-at-a-time engine runs.

On the Data Poisoning MLP (1-300-300-1, SiLU, 50 retain + 5 forget points, full-batch steps) the
script runs the same ``E`` trials of each method twice in one process -- through
:func:`overunlearn.engine.unlearn` one after another, and as one :func:`unlearn_batched` call -- and
prints member-steps per second of both and their ratio, plus the largest parameter difference
between the two results (rounding-level agreement; see tests/test_ensemble_unlearn.py).

The models are fresh random initialisations of the benchmark MLP (nothing is trained or
downloaded). Timings are wall clock on one torch thread; on a shared machine read the ratios.

Usage::

    python benchmarks/perf_batched.py                 # E = 32 members, T = 50 steps, one thread
    python benchmarks/perf_batched.py --members 64 --epochs 100 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=32, help="trials per method (ensemble size E)")
    ap.add_argument("--epochs", type=int, default=50, help="T: full-batch steps per trial")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both paths")
    ap.add_argument("--methods", default="gd,ngd,ridge,minnorm_og", help="comma-separated methods")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from overunlearn.engine import BatchedRun, Budget, unlearn, unlearn_batched
    from overunlearn.methods import create
    from overunlearn.models.mlp import poison_mlp
    from overunlearn.problem import RegressionTask, TensorData, UnlearningProblem

    hyper = {"gd": {}, "ngd": {"noise_sig": 0.1}, "ridge": {"reg_coef": 0.1, "reg_coef_decay": 0.9},
             "ga": {}, "ngp": {"ga_coef": 0.01}, "l1_sparse": {"reg_coef": 0.1}, "retrain": {},
             "minnorm_og": {"reg_coef": 1.0, "reg_coef_decay": 0.9, "proj_pd": 10}}

    def problem(seed: int) -> UnlearningProblem:
        g = torch.Generator().manual_seed(seed)
        xr = torch.rand(50, 1, generator=g) * 10 * torch.pi - 5 * torch.pi
        xf = torch.rand(5, 1, generator=g) * 10 * torch.pi - 5 * torch.pi
        return UnlearningProblem(poison_mlp(seed), TensorData(xr, torch.sin(xr)),
                                 TensorData(xf, torch.full_like(xf, 1.5)), RegressionTask(), batch_size=55)

    problems = [problem(s) for s in range(args.members)]
    print(f"E = {args.members} members, T = {args.epochs} steps, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'method':12s} {'engine steps/s':>15s} {'batched steps/s':>16s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        runs = [BatchedRun(p, create(name, lr=1e-3, **hyper.get(name, {})), Budget(epochs=args.epochs), seed=i)
                for i, p in enumerate(problems)]
        unlearn_batched(runs[:2])  # warm-up (first optimizer, kernels)
        t0 = time.perf_counter()
        outs = unlearn_batched(runs)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        solo = [unlearn(r.problem, r.method, r.budget, seed=r.seed, device="cpu").model for r in runs]
        t_engine = time.perf_counter() - t0
        diff = max(float((p - q).detach().abs().max()) for o, s in zip(outs, solo, strict=True)
                   for p, q in zip(o.model.parameters(), s.parameters(), strict=True))  # type: ignore[union-attr]
        steps = args.members * args.epochs
        print(f"{name:12s} {steps / t_engine:15.0f} {steps / t_batched:16.0f} {t_engine / t_batched:8.2f}x "
              f"{diff:11.1e}")


if __name__ == "__main__":
    main()
