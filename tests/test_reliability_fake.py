"""Helpers (no tests) for the reliability tests: a method and a benchmark that fail on demand.

They live in a module of their own so that spawned worker processes can import them through a
spec's ``[benchmark].imports`` (``test_reliability_fake``). Failures are switched on by environment
variables, which worker processes inherit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import sweep_fake  # noqa: F401  (registers the fake benchmark)
from sweep_fake import FakeBenchmark

from overunlearn.benchmarks import register_benchmark
from overunlearn.methods import Method, register_method
from overunlearn.methods.registry import _REGISTRY

#: set to "1": rel_flaky raises a RuntimeError; rel_killer kills its worker process (never the main process)
FLAKY = "OVERUNLEARN_TEST_FLAKY"
KILL = "OVERUNLEARN_TEST_KILL"
#: set to "1": the rel_flaky_ref benchmark's reference measurement raises
REF_FAILS = "OVERUNLEARN_TEST_REF_FAILS"

if "rel_flaky" not in _REGISTRY:

    @register_method("rel_flaky")
    class Flaky(Method):
        """Descent that raises an ordinary RuntimeError while ``$OVERUNLEARN_TEST_FLAKY`` is ``1``."""

        def loss(self, ctx, info, retain, forget):  # type: ignore[override]
            if os.environ.get(FLAKY) == "1":
                raise RuntimeError("flaky: a transient failure")
            return ctx.batch_loss(retain)

    @register_method("rel_killer")
    class Killer(Method):
        """Descent that SIGKILLs its own worker process while ``$OVERUNLEARN_TEST_KILL`` is ``1``."""

        def loss(self, ctx, info, retain, forget):  # type: ignore[override]
            if os.environ.get(KILL) == "1" and mp.current_process().name != "MainProcess":
                os.kill(os.getpid(), signal.SIGKILL)
            return ctx.batch_loss(retain)


class FlakyReference(FakeBenchmark):
    """The fake benchmark, whose reference measurement fails while ``$OVERUNLEARN_TEST_REF_FAILS`` is ``1``."""

    name = "rel_flaky_ref"

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        if os.environ.get(REF_FAILS) == "1":
            raise RuntimeError("reference: a transient failure")
        return super().reference(seed)


register_benchmark("rel_flaky_ref")(FlakyReference)


_SILU_PROBLEMS: dict = {}


class SiluRegression:
    """A 1-24-24-1 SiLU MLP fitting sin x from 12 points plus 3 poisoned ones, one full batch per step:
    small enough for tests, and batchable (``overunlearn.ensemble_unlearn.batchable``)."""

    name = "rel_silu"

    def __init__(self, hidden: int = 24) -> None:
        from overunlearn.benchmarks import MetricSpec

        self.hidden = int(hidden)
        self.metrics = (MetricSpec("sup_error", "min", "sup-norm error vs sin x"),)

    def _data(self, seed: int):
        import torch

        g = torch.Generator().manual_seed(500 + seed)
        xr = torch.rand(12, 1, generator=g) * 6 - 3
        xf = torch.rand(3, 1, generator=g) * 6 - 3
        return xr, torch.sin(xr), xf, torch.full((3, 1), 1.5)

    def problem(self, seed: int):
        """The problem of ``seed``; built once per process (deterministic, and nothing modifies it)."""
        key = (self.hidden, int(seed))
        if key not in _SILU_PROBLEMS:
            _SILU_PROBLEMS[key] = self._build(seed)
        return _SILU_PROBLEMS[key]

    def _build(self, seed: int):
        import torch

        from overunlearn import RegressionTask, TensorData, UnlearningProblem
        from overunlearn.models.mlp import MLP

        xr, yr, xf, yf = self._data(seed)
        model = MLP(1, (self.hidden, self.hidden), 1, "silu", generator=torch.Generator().manual_seed(seed))
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        x, y = torch.cat([xr, xf]), torch.cat([yr, yf])
        for _ in range(40):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        return UnlearningProblem(model, TensorData(xr, yr), TensorData(xf, yf), RegressionTask(), batch_size=15,
                                 make_model=lambda: MLP(1, (self.hidden, self.hidden), 1, "silu",
                                                        generator=torch.Generator().manual_seed(99)))

    def evaluate(self, model, seed: int) -> dict[str, float]:
        import torch

        x = torch.linspace(-3, 3, 200).reshape(-1, 1)
        with torch.no_grad():
            return {"sup_error": float((model.cpu()(x) - torch.sin(x)).abs().max())}

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        return {"original": self.evaluate(self.problem(seed).model, seed)}


register_benchmark("rel_silu")(SiluRegression)
