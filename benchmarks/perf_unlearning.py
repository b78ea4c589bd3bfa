#!/usr/bin/env python
"""The Data Poisoning benchmark's unlearning phase: vectorised batch sizes side by side.

Runs every method at T = 10, 100, 1000 on seeds 1-10 (240 trials, 88,800 member-steps) from
trained models -- ``--cache`` holds them, trained on the first use with ``--recipe`` -- through the
sweep runner exactly as ``overunlearn bench poison`` does, once per ``[engine].batch`` size per round
(each time into a fresh journal), rounds interleaved in alternating order so that the machine's
noise hits every setting alike, and prints the unlearning wall clock (median and best), member-steps
per second and each size's ratio to ``bench poison``'s default
(:data:`overunlearn.cli.bench_poison.BATCH_CPU`). A batch is how many compatible trials one worker
steps together as one vectorised ensemble.

The cost of a step does not depend on how well the model was trained, so the default recipe is
``smoke`` (a few hundred training steps); the full recipe's models give the same picture.
Nothing is downloaded. On a shared machine read the ratios.

Usage::

    python benchmarks/perf_unlearning.py                          # sizes 2,5,10; 2 rounds
    python benchmarks/perf_unlearning.py --groups 1,2,3,5 --rounds 3 --cache /tmp/poison-cache
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="2,5,10", help="comma-separated batch sizes to compare")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every size")
    ap.add_argument("--recipe", default="smoke", help="training recipe of the models (smoke | quick | full)")
    ap.add_argument("--cache", default=None, help="model cache directory (default: a temporary one)")
    ap.add_argument("--jobs", type=int, default=0, help="worker processes (0 = all cores)")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    if not groups or min(groups) < 1 or args.rounds < 1:
        ap.error("--groups must list sizes >= 1 and --rounds must be >= 1")

    import torch

    from overunlearn.benchmarks.poison import POISON_METHODS, PoisonBenchmark
    from overunlearn.cli.bench_poison import BATCH_CPU, poison_spec
    from overunlearn.cli.bench_sweep import run_bench

    jobs = args.jobs or torch.get_num_threads()
    seeds, epochs = list(range(1, 11)), [10, 100, 1000]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OVERUNLEARN_CACHE"] = args.cache or tmp  # the sweep's workers find the models here
        PoisonBenchmark(args.recipe, workers=jobs).prepare(seeds)  # trains the models once
        walls: dict[int, list[float]] = {g: [] for g in groups}
        steps = len(seeds) * sum(epochs) * len(POISON_METHODS)
        for r in range(args.rounds):
            for g in groups if r % 2 == 0 else groups[::-1]:
                raw = poison_spec(args.recipe, seeds, epochs, list(POISON_METHODS), "cpu", g if g > 1 else 0)
                t0 = time.perf_counter()
                run_bench(raw, Path(tmp) / f"round{r}_batch{g}", jobs=jobs, threads=1, device="cpu")
                walls[g].append(time.perf_counter() - t0)
                print(f"round {r + 1}: batches of {g:>2}: {walls[g][-1]:6.1f} s", flush=True)
    base = statistics.median(walls[BATCH_CPU]) if BATCH_CPU in walls else None
    print(f"\nunlearning phase, {steps} member-steps (median / best of {args.rounds} rounds):")
    for g in groups:
        med = statistics.median(walls[g])
        ratio = f"  x{base / med:.2f} vs batches of {BATCH_CPU}" if base else ""
        print(f"  batches of {g:>2}: {med:6.1f} s / {min(walls[g]):6.1f} s  {steps / med:7.0f} member-steps/s{ratio}")


if __name__ == "__main__":
    main()
