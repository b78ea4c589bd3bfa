"""Sweeps: spec files to trials, an append-only journal, executors (local, Ray), selection and Pareto fronts.

>>> from overunlearn.sweep import load_spec, run_sweep
>>> spec = load_spec("configs/table1_poison.toml")      # doctest: +SKIP
>>> run_sweep(spec, "results/table1_poison.jsonl")      # doctest: +SKIP

See ``docs/sweeps.md`` for the spec format, budgets, resume semantics and executors.
"""

from overunlearn.sweep.executors import ProcessPoolExecutor, RayExecutor, SequentialExecutor, make_executor
from overunlearn.sweep.journal import JournalWriter, read_journal
from overunlearn.sweep.run import SweepAborted, SweepResult, run_sweep
from overunlearn.sweep.select import best_mean, central_range, paper_front, pareto_front, seed_stats
from overunlearn.sweep.spec import SpecError, SweepSpec, Trial, describe, load_spec, parse_spec

__all__ = [
    "JournalWriter",
    "ProcessPoolExecutor",
    "RayExecutor",
    "SequentialExecutor",
    "SpecError",
    "SweepAborted",
    "SweepResult",
    "SweepSpec",
    "Trial",
    "best_mean",
    "central_range",
    "describe",
    "load_spec",
    "make_executor",
    "paper_front",
    "parse_spec",
    "pareto_front",
    "read_journal",
    "run_sweep",
    "seed_stats",
]
