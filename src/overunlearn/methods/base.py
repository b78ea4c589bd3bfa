"""What every unlearning method is made of.

A method is small: a frozen hyperparameter dataclass (:class:`MethodConfig`
subclass, validated on construction) and a class whose hooks the engine calls.
The engine owns the loop, the optimizer, budgets and timing:

``setup`` (once, timed) -> per step: ``before_step`` -> ``loss`` -> backward ->
``on_gradients`` -> optimizer step -> ``after_step`` -> ... -> ``teardown``.

A method whose full-batch step is a weighted data loss plus standard terms (penalties, gradient
noise, projections) may also describe it as data (:meth:`Method.vectorised`), so that many trials
of it run as one vectorised ensemble.

Schedules (decaying coefficients, step counters) live on the method instance,
never in its config; a method never mutates its config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from overunlearn.methods.context import StepInfo, UnlearningContext
from overunlearn.methods.vectorised import VectorisedForm
from overunlearn.problem import Batch, Categorical, Task


def check_type(name: str, value: Any, kind: type) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``kind`` (``float``: any finite real number;
    ``int``: an integer; ``bool``: ``True`` / ``False``). Booleans are not numbers here."""
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be True or False")
        return
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}={value!r} must be an integer, got {type(value).__name__}")
        return
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}")
        if math.isinf(float(value)):  # NaN is left to check_range, which names the allowed range
            raise ValueError(f"{name}={value!r} must be finite")


def check_range(name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming the field and its allowed range if ``value`` is outside it."""
    bad = isinstance(value, float) and math.isnan(value)
    if low is not None:
        bad |= value <= low if low_open else value < low
    if high is not None:
        bad |= value >= high if high_open else value > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}={value!r} is out of range: it must lie in {interval}")


@dataclass(frozen=True)
class MethodConfig:
    """Hyperparameters shared by every method.

    Attributes:
        lr: optimizer learning rate (``eta`` in the paper).
        weight_decay: AdamW's decoupled weight decay. The default 0.01 is PyTorch's
            default, which the reference code uses implicitly for every method
            (its reference code builds ``torch.optim.AdamW(model.parameters(), lr)``); set 0 to switch it off.
        optimizer: ``"adamw"`` (the paper's choice), ``"sgd"`` (plain, no momentum) or
            ``"sgd_momentum"`` (SGD with momentum 0.9, the default optimizer of several baselines'
            own code).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: Literal["adamw", "sgd", "sgd_momentum"] = "adamw"

    def __post_init__(self) -> None:
        # types first (from the annotations of every subclass), so that a string or a bool never
        # reaches a range comparison; subclasses call this before their own range checks
        for f in dataclasses.fields(self):
            kind = _field_kinds(type(self)).get(f.name)
            if kind is not None:
                check_type(f.name, getattr(self, f.name), kind)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        if self.optimizer not in ("adamw", "sgd", "sgd_momentum"):
            raise ValueError(f"optimizer={self.optimizer!r} is not one of 'adamw', 'sgd', 'sgd_momentum'")

    def replace(self, **changes: Any) -> MethodConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _field_kinds(cls: type) -> dict[str, type]:
    """``{field: float | int | bool}`` for a config class's fields annotated with those types."""
    try:
        hints: dict[str, Any] = typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved (e.g. a TYPE_CHECKING-only name)
        hints = {}
    plain = {"float": float, "int": int, "bool": bool}
    kinds = {}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, plain.get(f.type) if isinstance(f.type, str) else f.type)
        if kind in (float, int, bool):
            kinds[f.name] = kind
    return kinds


class Method:
    """Base class of unlearning methods. Subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: task kinds this method applies to
    tasks: ClassVar[frozenset[str]] = frozenset({"regression", "classification", "causal_lm", "custom"})
    #: whether ``loss`` looks at forget batches
    uses_forget: ClassVar[bool] = False
    #: whether the method needs the planned number of epochs (``T``) for its schedule
    needs_planned_epochs: ClassVar[bool] = False
    #: whether the run starts from freshly initialised trainable parameters (Retrain)
    reinitialise: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = self.Config(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ---- hooks -------------------------------------------------------------------
    def setup(self, ctx: UnlearningContext) -> None:
        """Called once before the loop, inside the timed region (teacher copies, masks...)."""

    def before_step(self, ctx: UnlearningContext, info: StepInfo, retain: Batch) -> None:
        """Called before the loss of a step is computed (MinNorm-OG projects here)."""

    def loss(self, ctx: UnlearningContext, info: StepInfo, retain: Batch, forget: Batch | None) -> Tensor:
        """The scalar objective the optimizer minimises at this step."""
        raise NotImplementedError

    def on_gradients(self, ctx: UnlearningContext, info: StepInfo) -> None:
        """Called after backward, before the optimizer step (noise, gradient masks)."""

    def after_step(self, ctx: UnlearningContext, info: StepInfo, retain: Batch) -> None:
        """Called after the optimizer step."""

    def teardown(self, ctx: UnlearningContext) -> None:
        """Called once after the loop, also on errors: remove anything attached to the model."""

    # ---- vectorised form ----------------------------------------------------------
    def vectorised(self, epochs: int, seed: int) -> VectorisedForm | None:
        """The method's full-batch step as data, for a run of ``epochs`` epochs with ``seed``, so
        that a vectorised runner (:mod:`overunlearn.engine.vectorised`) can run many trials of it at
        once; ``None`` (the default): the method has no vectorised form and runs trial by trial.

        A form must describe exactly what the hooks do in a run whose every epoch is one step; its
        schedules should be the functions the hooks themselves call.
        """
        return None

    def why_not_vectorised(self) -> str:
        """Why :meth:`vectorised` gives ``None`` (for logs and fallbacks)."""
        return f"method {self.name!r} has no vectorised form"


# ---- helpers shared by several methods ------------------------------------------

#: the task kinds of methods built on class probabilities
CATEGORICAL_TASKS = frozenset({"classification", "causal_lm"})


def require_categorical(method: Method, ctx: UnlearningContext) -> Task:
    """The problem's task, which must have class probabilities (classification or a language model)."""
    task = ctx.problem.task
    if not task.is_categorical:
        raise TypeError(f"method {method.name!r} compares class probabilities, so it applies to classification and "
                        f"language-model tasks only, not to a {task.kind} task")
    return task


def mean_over_examples(cat: Categorical, per_row: Tensor, weights: Tensor | None = None) -> Tensor:
    """Batch mean of a per-row quantity: over rows when there is one row per example (a classifier
    head), else over the examples that have rows of each one's mean over its rows (a language model's
    scored tokens). See :func:`example_mean` for ``weights`` and a batch without rows."""
    return example_mean(cat, per_row if cat.per_example else cat.per_example_mean(per_row), weights)


def example_mean(cat: Categorical, values: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean of per-example ``values`` ``(n,)`` over the examples that have rows in ``cat``, each times its
    weight where the batch has ``weights`` (as in the data loss, ``mean(loss_i * w_i)``). A batch none of
    whose examples has a scored token contributes 0 (connected to the graph), as it does to the data loss."""
    if weights is not None:
        values = values * weights.to(device=values.device, dtype=values.dtype)
    if not cat.per_example:
        values = values[cat.scored()]
    return values.mean() if values.numel() else values.sum()
