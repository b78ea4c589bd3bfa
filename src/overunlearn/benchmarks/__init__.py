"""Benchmarks: each builds data, original and ground-truth models (cached) and evaluates a model."""

from overunlearn.benchmarks.base import Benchmark, MetricSpec, get_benchmark, list_benchmarks, register_benchmark

__all__ = ["Benchmark", "MetricSpec", "get_benchmark", "list_benchmarks", "register_benchmark"]
