"""Sweeps: spec files to trials, an append-only journal, executors (local, Ray), selection and Pareto fronts."""
