"""Small shared fixtures: tiny models and problems that run in milliseconds on one CPU thread."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from overunlearn import ClassificationTask, RegressionTask, TensorData, UnlearningProblem
from overunlearn.linalg.blocks import RowsBlock
from overunlearn.methods import Method, MethodConfig

# Property tests draw new examples on every local run (exploration: a failure prints the example to add as
# a fixed case); under CI (the environment variable CI set, as `CI=true bash .ci/run`) they draw the same
# examples every time, so that a submission's CI result does not depend on the luck of the draw.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


class TwoHeadMLP(nn.Module):
    """A tanh MLP with two classification heads (tanh: no exactly-zero gradients)."""

    def __init__(self, d_in: int = 4, hidden: int = 8, classes: tuple[int, int] = (5, 3)) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, classes[0])
        self.head_b = nn.Linear(hidden, classes[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head_a(h), self.head_b(h)


def regression_problem(n_retain: int = 8, n_forget: int = 4, d: int = 3, hidden: int = 6, batch_size: int = 64,
                       seed: int = 0) -> UnlearningProblem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    xr, xf = torch.randn(n_retain, d, generator=g), torch.randn(n_forget, d, generator=g)
    yr, yf = torch.randn(n_retain, 1, generator=g), torch.randn(n_forget, 1, generator=g)
    return UnlearningProblem(model, TensorData(xr, yr), TensorData(xf, yf), RegressionTask(), batch_size=batch_size)


def classification_problem(n_retain: int = 12, n_forget: int = 6, d: int = 4, batch_size: int = 64, seed: int = 0,
                           classes: tuple[int, int] = (5, 3)) -> UnlearningProblem:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TwoHeadMLP(d, 8, classes)

    def data(n: int) -> TensorData:
        x = torch.randn(n, d, generator=g)
        return TensorData(x, (torch.randint(0, classes[0], (n,), generator=g),
                              torch.randint(0, classes[1], (n,), generator=g)))

    return UnlearningProblem(model, data(n_retain), data(n_forget), ClassificationTask(), batch_size=batch_size)


def params_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reg_problem() -> UnlearningProblem:
    return regression_problem()


@pytest.fixture
def cls_problem() -> UnlearningProblem:
    return classification_problem()


class Gain(nn.Module):
    """A user layer with no projection block: a per-feature gain on tanh of the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return self.gain * torch.tanh(x)


class GainRows(RowsBlock):
    """A right projection block for :class:`Gain`: a sample's gain row is ``d * tanh(x)``."""

    param_names = ("gain",)

    def __init__(self, module, args, kwargs, output):  # noqa: ANN001
        super().__init__(module, args, kwargs, output)
        self.x = args[0].detach()
        self.output, self.batch, self.saved = output, args[0].shape[0], [args[0]]

    def all_rows(self, name):  # noqa: ANN001, ANN201
        return self.deltas * self.per_row(torch.tanh(self.x))


@pytest.fixture
def block_registry():
    """Registrations of projection blocks made by a test are undone after it."""
    from overunlearn.linalg.blocks import base

    saved = (dict(base._REGISTRY), dict(base._LAZY), dict(base._PATTERNS))
    yield
    for store, old in zip((base._REGISTRY, base._LAZY, base._PATTERNS), saved):
        store.clear()
        store.update(old)
    base._RESOLVED.clear()


def tiny_method(name: str, loss, **members) -> type[Method]:  # noqa: ANN001
    """An unregistered method class without hyperparameters of its own, whose step's loss is
    ``loss(ctx, info, retain, forget)``; ``members`` add or override class members (``vectorised``, ...)."""

    @dataclasses.dataclass(frozen=True)
    class Config(MethodConfig):
        pass

    def step_loss(self, ctx, info, retain, forget):  # noqa: ANN001, ANN202
        return loss(ctx, info, retain, forget)

    return type(name, (Method,), {"name": name, "Config": Config, "loss": step_loss, **members})


class LinearThen(nn.Module):
    """One ``nn.Linear(i, o)`` and the forward ``fn(linear, x)``: a tiny model whose forward a test writes inline."""

    def __init__(self, i: int, o: int, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.lin, self.fn = nn.Linear(i, o), fn

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        return self.fn(self.lin, x)
