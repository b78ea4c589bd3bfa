"""The protocol every benchmark follows, and a registry of benchmarks by name.

A benchmark instance is configured once (dataset, recipe, cache directory, device) and
then, for each seed, provides the unlearning problem (whose model is the cached original
model), the metrics of any model, and reference metrics of the original and ground-truth
models. Sweeps and reports only use this interface.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from torch import nn

from overunlearn.errors import BenchmarkDefinitionError
from overunlearn.problem import UnlearningProblem
from overunlearn.storage import atomic_write_json


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name, whether larger or smaller is better, and a human label."""

    name: str
    direction: Literal["min", "max"]
    label: str = ""


@runtime_checkable
class Benchmark(Protocol):
    name: str
    metrics: tuple[MetricSpec, ...]

    def problem(self, seed: int) -> UnlearningProblem:
        """The unlearning problem for ``seed`` (trains and caches the original model if needed)."""
        ...

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        """Task metrics of ``model`` (keys are the names in ``metrics``)."""
        ...

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        """Metrics of the reference models: ``{"original": {...}, "ground_truth": {...}}``."""
        ...


# Optional members a benchmark may define (read with getattr; a benchmark without them still runs in
# sweeps, and in ``bench``/``privacy`` once the user names methods and epochs):
#   default_epochs: int | tuple[int, ...]       the unlearning epochs T of ``overunlearn bench NAME``
#   method_points(epochs) -> {method: {hyperparameter: value}}
#                                               the methods run by default and their preset points
#   privacy_setup(seed) -> privacy.runner.PrivacySetup
#                                               what a privacy evaluation needs (data split, training)
#   privacy_defaults: {"n_models": int, "ground_truth": "extra" | "split", "epochs": int,
#                      "options": {constructor options of privacy runs, e.g. a lighter recipe}}


def method_points(bench: Any, epochs: int, methods: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The hyperparameter point of each method the benchmark runs at ``epochs`` (its ``method_points``),
    restricted to ``methods`` when given; a method the benchmark has no point for runs at its defaults."""
    fn = getattr(bench, "method_points", None)
    points: dict[str, dict[str, Any]] = {k: dict(v) for k, v in fn(epochs).items()} if callable(fn) else {}
    if methods is None:
        if not points:
            raise ValueError(f"benchmark {getattr(bench, 'name', type(bench).__name__)!r} names no default methods "
                             "(it has no method_points); name them with --methods")
        return points
    return {m: points.get(m, {}) for m in methods}


def default_epochs(bench: Any) -> tuple[int, ...]:
    """The benchmark's default unlearning epochs (``default_epochs``; else its preset's ``epochs``)."""
    value = getattr(bench, "default_epochs", None)
    if value is None:
        value = getattr(getattr(bench, "preset", None), "epochs", None)
    if value is None:
        raise ValueError(f"benchmark {getattr(bench, 'name', type(bench).__name__)!r} has no default epochs; "
                         "give --epochs")
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),)


_BENCHMARKS: dict[str, Callable[..., Benchmark]] = {}
#: the built-in benchmarks, each registered by its module of that name when first needed
_BUILTIN = ("poison", "erase", "collapse", "facts")


def retrain_seed(seed: int) -> int:
    """The seed of Retrain's fresh initialisation for benchmark seed ``seed``.

    Benchmarks build their original and ground-truth models under ``seed``; Retrain must start
    from an independent initialisation (as the authors' reference code does, which re-draws it from
    the running generator), not from the ground-truth model's own starting point.
    """
    return 1_000_003 + int(seed)


def cached_reference(path: Path | None, models_were_cached: bool,
                     compute: Callable[[], dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Reference metrics read from the JSON file ``path`` when the reference models came from the cache
    too; otherwise ``compute()``, written to ``path`` (freshly trained models get fresh metrics)."""
    if path is not None and path.is_file() and models_were_cached:
        return json.loads(path.read_text())
    ref = compute()
    if path is not None:
        atomic_write_json(path, ref)
    return ref


def register_benchmark(name: str) -> Callable[[Callable[..., Benchmark]], Callable[..., Benchmark]]:
    """Register a benchmark factory (a class or a function of the constructor options) as ``name``.

    A name taken by another definition is an error (a plugin cannot silently replace a built-in
    benchmark); registering the same definition again -- a module reloaded, a notebook cell run twice --
    replaces it, as it does for methods."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_benchmark takes the benchmark's name, got {name!r}")

    def deco(factory: Callable[..., Benchmark]) -> Callable[..., Benchmark]:
        if not callable(factory):
            raise TypeError(f"register_benchmark({name!r}) decorates a class or a function, not {factory!r}")
        old = _BENCHMARKS.get(name)
        if old is None and name in _BUILTIN and not _definition(factory).startswith("overunlearn.benchmarks."):
            old = f"overunlearn.benchmarks.{name}"  # a built-in, registered when first needed
        if old is not None and _definition(old) != _definition(factory):
            raise ValueError(f"a benchmark named {name!r} is already registered ({_definition(old)}); register "
                             f"{_definition(factory)} under another name")
        _BENCHMARKS[name] = factory
        return factory

    return deco


def _definition(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def check_benchmark(bench: Any, name: str) -> Any:
    """``bench`` if it follows the :class:`Benchmark` protocol, else one :class:`BenchmarkDefinitionError` saying
    what is missing."""
    missing = [m for m in ("problem", "evaluate", "reference") if not callable(getattr(bench, m, None))]
    if missing:
        raise BenchmarkDefinitionError(f"benchmark {name!r} ({type(bench).__name__}) has no method(s) {', '.join(missing)}: a "
                         "benchmark defines problem(seed), evaluate(model, seed) and reference(seed)")
    metrics = getattr(bench, "metrics", None)
    if not isinstance(metrics, (tuple, list)) or not metrics:
        raise BenchmarkDefinitionError(f"benchmark {name!r}: metrics must be a non-empty tuple of MetricSpec, got {metrics!r}")
    for m in metrics:
        if not isinstance(getattr(m, "name", None), str) or getattr(m, "direction", None) not in ("min", "max"):
            raise BenchmarkDefinitionError(f"benchmark {name!r}: every entry of metrics must be a MetricSpec(name, direction='min' "
                             f"or 'max'), got {m!r}")
    return bench


def check_metrics(bench: Any, values: Any) -> dict[str, float]:
    """``evaluate()``'s result as ``{name: float}``, holding every metric the benchmark declares."""
    name = getattr(bench, "name", type(bench).__name__)
    if not isinstance(values, dict):
        raise BenchmarkDefinitionError(f"benchmark {name!r}: evaluate() must return a dict of metric values, got "
                         f"{type(values).__name__}")
    missing = [m.name for m in bench.metrics if m.name not in values]
    if missing:
        raise BenchmarkDefinitionError(f"benchmark {name!r}: evaluate() returned no {', '.join(map(repr, missing))} (it returned "
                         f"{sorted(values)}); it must return every metric the benchmark declares")
    try:
        return {k: float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise BenchmarkDefinitionError(f"benchmark {name!r}: evaluate() returned a value that is not a number ({exc})") from None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a benchmark's code with torch's CPU generator, NumPy's and Python's global generators seeded by
    ``seed``, and restore them afterwards (CUDA's generators are left alone): a benchmark that draws from them unseeded gets numbers that do not
    depend on what ran before it in the process (the worker count, the order of trials)."""
    import random

    import numpy as np
    import torch

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed CUDA's generators too)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def list_benchmarks() -> list[str]:
    _load_builtin()
    return sorted(_BENCHMARKS)


def get_benchmark(name: str, **options: Any) -> Benchmark:
    """Instantiate the benchmark registered as ``name`` with ``options``."""
    _load_builtin()
    if name not in _BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(_BENCHMARKS))}")
    with seeded(0):
        return check_benchmark(_BENCHMARKS[name](**options), name)


def _load_builtin() -> None:
    import importlib

    for mod in _BUILTIN:
        try:
            importlib.import_module(f"overunlearn.benchmarks.{mod}")
        except ModuleNotFoundError as exc:  # a benchmark module not written yet
            if exc.name != f"overunlearn.benchmarks.{mod}":
                raise
