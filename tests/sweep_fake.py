"""A tiny benchmark (and a method that diverges on purpose) for the sweep tests.

Imported by the tests and, through a spec's ``[benchmark].imports``, by worker processes
(spawned pools, Ray workers, the killed subprocess), so it lives in its own module.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from overunlearn import RegressionTask, TensorData, UnlearningProblem
from overunlearn.benchmarks import MetricSpec, register_benchmark
from overunlearn.methods import Method, register_method
from overunlearn.methods.registry import _REGISTRY

NAME = "sweep_fake"


class FakeBenchmark:
    """Regression on 8 retain + 4 forget points with a 1-6-1 tanh MLP; trains in milliseconds."""

    name = NAME

    def __init__(self, sleep: float = 0.0, n_metrics: int = 2, offset: float = 0.0) -> None:
        self.sleep = float(sleep)
        self.offset = float(offset)
        specs = (MetricSpec("retain_mse", "min", "retain MSE"), MetricSpec("forget_gap", "max", "forget gap"))
        self.metrics = specs[:n_metrics]

    def _data(self, seed: int):
        g = torch.Generator().manual_seed(1000 + seed)
        xr, xf = torch.randn(8, 2, generator=g), torch.randn(4, 2, generator=g)
        return xr, torch.sin(xr.sum(1, keepdim=True)), xf, torch.full((4, 1), 1.5)

    def problem(self, seed: int) -> UnlearningProblem:
        xr, yr, xf, yf = self._data(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        x, y = torch.cat([xr, xf]), torch.cat([yr, yf])
        for _ in range(30):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        return UnlearningProblem(model, TensorData(xr, yr), TensorData(xf, yf), RegressionTask(), batch_size=4)

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        if self.sleep:
            time.sleep(self.sleep)
        xr, yr, xf, yf = self._data(seed)
        model = model.cpu()
        with torch.no_grad():
            out = {"retain_mse": float(((model(xr) - yr) ** 2).mean()) + self.offset,
                   # negative values on purpose: the gap to the poisoned label, minus 1
                   "forget_gap": float(((model(xf) - yf) ** 2).mean()) - 1.0}
        return {m.name: out[m.name] for m in self.metrics}

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        orig = self.evaluate(self.problem(seed).model, seed)
        return {"original": orig, "ground_truth": {m.name: 0.5 for m in self.metrics}}


register_benchmark(NAME)(FakeBenchmark)


if "sweep_nan" not in _REGISTRY:

    @register_method("sweep_nan")
    class NaNAfterTwo(Method):
        """Descent whose loss becomes NaN at step 2 (to test failure recording)."""

        def loss(self, ctx, info, retain, forget):  # type: ignore[override]
            loss = ctx.batch_loss(retain)
            return loss * float("nan") if info.step >= 2 else loss
