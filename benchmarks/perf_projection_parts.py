#!/usr/bin/env python
"""Where one fast MinNorm-OG projection step spends its time, part by part, on one case of
``perf_projection.py`` (default (c), the two-head ResNet-18), next to a GD step.

The whole step is the current fast path (``minnorm_projection_step``: per-layer hooks, see
``linalg/projection.py``); the parts are those of the materialised route it replaces for CNNs,
for comparison: the ``torch.func`` per-sample Jacobian (``output_jacobian``), the float64 Gram
and right-hand side (``gram_and_rhs``), the eigen-solve (``solve_gram``) and the back-projection
``J^T alpha``; the Jacobian also with ``torch.backends.cudnn.benchmark`` on, and the GD step both
ways; and the phases of the fast step (hooked forward, backward per head, Gram, back-projection)
from a profile. ``--profile`` adds a ``torch.profiler`` table of one fast step, whose phases are named
``overunlearn::*``. Medians of ``--repeats`` synchronised calls after two warm-ups. ``--ops`` only
counts, for one fast step and one GD step after warm-ups, the operators dispatched from Python
(top-level ``aten::`` calls) and, on CUDA, the kernels launched: the host-side cost that bounds small
steps on a GPU.

    python benchmarks/perf_projection_parts.py --device cuda --case c --repeats 5 --profile
    python benchmarks/perf_projection_parts.py --device cpu --case b --ops
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_projection as pp  # noqa: E402

from overunlearn.linalg.jacobian import output_jacobian, sample_indices  # noqa: E402
from overunlearn.linalg.projection import _chunk, gram_and_rhs, solve_gram  # noqa: E402


def median_time(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(pp.timed(fn, device, repeats, 2))


def phases(case: pp.Case, device: torch.device) -> None:
    """The fast step's phases (``overunlearn::*`` ranges) from a profile of one call after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from overunlearn.linalg import projection as lp

    step = pp.projection(case, "fast")
    step()
    pp.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        pp.sync(device)
    print(f"  (route of the fast step: {lp.last_route}; its phases under the profiler, CPU time:)")
    for e in prof.key_averages():
        if e.key.startswith("overunlearn::"):
            print(f"    {e.key:44s} {e.cpu_time_total / 1e3:9.2f} ms")


def op_counts(fn, device: torch.device) -> tuple[int, int | None]:
    """(top-level ``aten::`` operators, CUDA kernel launches or ``None``) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()
    pp.sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        pp.sync(device)
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    kernels = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return len(top), (kernels if device.type == "cuda" else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--case", default="c", choices=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-resnet-batch", type=int, default=32)
    ap.add_argument("--cpu-resnet-k", type=int, default=10)
    ap.add_argument("--cpu-gpt2-tokens", type=int, default=64)
    ap.add_argument("--cpu-gpt2-k", type=int, default=4)
    ap.add_argument("--cpu-vit-image", type=int, default=112)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also profile one fast step (torch.profiler): its "
                    "phases and top operators")
    ap.add_argument("--ops", action="store_true", help="only count the operators (and CUDA kernels) of one fast "
                    "step and one GD step")
    ap.add_argument("--moe-rows", default="auto", choices=["auto", "batched", "loop"],
                    help="how mixture-of-experts blocks form an expert's rows (auto: batched on a GPU, a loop of "
                    "products per sample on a CPU); with --ops, counts what the other device's form dispatches")
    args = ap.parse_args()
    if args.moe_rows != "auto":
        from overunlearn.linalg.blocks import moe

        moe._batched_rows = lambda device: args.moe_rows == "batched"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    case = pp.build_case(args.case, device, args)
    model, batch, task = case.model, case.batch, case.task
    gen = torch.Generator().manual_seed(0)
    idx = sample_indices(len(batch), case.n_pert, gen, task.strata(batch.targets))
    sub = batch.select(idx)
    x, y = sub.inputs, (sub.targets if case.with_targets else None)
    params = [p for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    rows: list[tuple[str, float]] = []

    def add(label: str, fn) -> None:
        rows.append((label, median_time(fn, device, args.repeats)))
        print(f"{label:48s} {rows[-1][1] * 1e3:9.2f} ms", flush=True)

    print(f"# case ({args.case}) {case.label}, d={case.d:,}, k={case.n_pert} samples, device {device}")
    if args.ops:
        for label, fn in (("GD step", pp.gd_step(case)), ("projection, fast", pp.projection(case, "fast"))):
            ops, kernels = op_counts(fn, device)
            print(f"{label:24s} {ops:6d} top-level operators" + (f", {kernels} CUDA kernel launches" if kernels is not None else ""))
        return 0
    add("GD step (fwd+bwd+AdamW)", pp.gd_step(case))
    add("projection, fast (whole step)", pp.projection(case, "fast"))
    phases(case, device)
    add("  per-sample Jacobian (torch.func)", lambda: output_jacobian(model, x, task.scores, targets=y))
    jac = output_jacobian(model, x, task.scores, targets=y)
    add("  Gram + rhs, float64 blocks", lambda: gram_and_rhs(jac, theta))
    gram, rhs = gram_and_rhs(jac, theta)
    add("  eigen-solve", lambda: solve_gram(gram, rhs))
    alpha = solve_gram(gram, rhs)

    def back() -> None:
        chunk = _chunk(jac.shape[0], None, jac.device)
        out = torch.empty_like(theta)
        for s in range(0, theta.shape[0], chunk):
            out[s : s + chunk] = (jac[:, s : s + chunk].double().T @ alpha).to(theta.dtype)

    add("  back-projection J^T alpha, float64 blocks", back)
    add("  Gram, one float32 product (for scale)", lambda: jac @ jac.T)

    def gram32() -> torch.Tensor:  # an alternative not used: float32 products of 4096 columns, summed in float64
        g = torch.zeros(jac.shape[0], jac.shape[0], dtype=torch.float64, device=jac.device)
        for s in range(0, jac.shape[1], 4096):
            b = jac[:, s : s + 4096]
            g += (b @ b.T).double()
        return g

    if jac.dtype == torch.float32:
        add("  Gram, float32 blocks summed in float64 (not used)", gram32)
        dev = float((gram32() - gram).abs().max() / gram.diagonal().max())
        print(f"    (its largest deviation from the float64 Gram: {dev:.1e} of the largest diagonal entry)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = pp.projection(case, "fast")
        step()
        pp.sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            pp.sync(device)
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=40)
        print("\n".join(line[:200] for line in table.splitlines()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        add("GD step, cudnn.benchmark", pp.gd_step(case))
        add("per-sample Jacobian, cudnn.benchmark", lambda: output_jacobian(model, x, task.scores, targets=y))
        add("projection, fast, cudnn.benchmark", pp.projection(case, "fast"))
        torch.backends.cudnn.benchmark = False
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
