#!/usr/bin/env python
"""The Data Poisoning benchmark's unlearning phase: stack sizes side by side.

Runs every method at T = 10, 100, 1000 on seeds 1-10 (240 trials, 88,800 member-steps) from
trained models -- ``--cache`` holds them, trained on the first use with ``--recipe`` -- once per
stack size per round, rounds interleaved in alternating order so that the machine's noise hits
every setting alike, and prints the unlearning wall clock (median and best), member-steps per
second and each size's ratio to the default :data:`overunlearn.benchmarks.poison.UNLEARN_CPU_GROUP`.
A stack size is how many trials of one method and T a CPU worker steps together as one
vectorised ensemble; workers take these tasks one after the other, largest first.

The cost of a step does not depend on how well the model was trained, so the default recipe is
``smoke`` (a few hundred training steps); the full recipe's models give the same picture.
Nothing is downloaded. On a shared machine read the ratios.

Usage::

    python benchmarks/perf_unlearning.py                          # sizes 2,5,10; 2 rounds
    python benchmarks/perf_unlearning.py --groups 1,2,3,5 --rounds 3 --cache /tmp/poison-cache
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="2,5,10", help="comma-separated stack sizes to compare")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every size")
    ap.add_argument("--recipe", default="smoke", help="training recipe of the models (smoke | quick | full)")
    ap.add_argument("--cache", default=None, help="model cache directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=0, help="CPU workers (0 = all cores)")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    if not groups or min(groups) < 1 or args.rounds < 1:
        ap.error("--groups must list sizes >= 1 and --rounds must be >= 1")

    from overunlearn.benchmarks.poison import UNLEARN_CPU_GROUP, run_poison

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        run_poison(recipe=args.recipe, cache_dir=cache, threads=args.threads or None, progress=False,
                   epochs=(10,), methods=("gd",), seeds=tuple(range(1, 11)))  # trains the models once
        walls: dict[int, list[float]] = {g: [] for g in groups}
        steps = 0
        for r in range(args.rounds):
            for g in groups if r % 2 == 0 else groups[::-1]:
                run = run_poison(recipe=args.recipe, cache_dir=cache, threads=args.threads or None, progress=False,
                                 reuse_trials=False, unlearn_group=g)
                walls[g].append(run.timings["unlearn_s"])
                steps = sum(t.steps for t in run.trials)
                print(f"round {r + 1}: stacks of {g:>2}: {run.timings['unlearn_s']:6.1f} s", flush=True)
    base = statistics.median(walls[UNLEARN_CPU_GROUP]) if UNLEARN_CPU_GROUP in walls else None
    print(f"\nunlearning phase, {steps} member-steps (median / best of {args.rounds} rounds):")
    for g in groups:
        med = statistics.median(walls[g])
        ratio = f"  x{base / med:.2f} vs stacks of {UNLEARN_CPU_GROUP}" if base else ""
        print(f"  stacks of {g:>2}: {med:6.1f} s / {min(walls[g]):6.1f} s  {steps / med:7.0f} member-steps/s{ratio}")


if __name__ == "__main__":
    main()
