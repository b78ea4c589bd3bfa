"""The unlearning problem: a model, its retain and forget data, and a task.

A :class:`Task` says how a model is trained and what MinNorm-OG constrains:

* ``per_sample_loss(outputs, targets)`` -- the training loss of each example (the
  engine takes its (weighted) mean);
* ``scores(outputs)`` -- the scalar outputs whose parameter gradients span the
  subspace that MinNorm-OG keeps its updates orthogonal to (paper eqn (5)). For
  regression this is the raw output; for classification it is the maximum logit of
  every head (the "max-logit trick" of the paper's Appendix F, the argmax being
  treated as a constant).

Model outputs are a tensor or a tuple of tensors (one per head); targets mirror
them. Multi-head models are first class: a two-head classifier returns
``(class_logits, color_logits)`` and its targets are ``(class_labels, color_labels)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from overunlearn.errors import DataError

Outputs = Tensor | tuple[Tensor, ...]
Targets = Tensor | tuple[Tensor, ...]


def as_heads(x: Outputs | Targets) -> tuple[Tensor, ...]:
    """Return a tuple of per-head tensors whether ``x`` is one tensor or a sequence."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"expected a tensor or a tuple of tensors, got {type(x).__name__}")


class Task:
    """How outputs and targets are compared; subclass for a new kind of model."""

    kind: str = "custom"

    def per_sample_loss(self, outputs: Outputs, targets: Targets) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def scores(self, outputs: Outputs) -> Tensor:  # pragma: no cover
        """Scalar scores per example, shape ``(batch, n_scores)``."""
        raise NotImplementedError

    def strata(self, targets: Targets) -> Tensor | None:
        """Labels used to stratify MinNorm-OG's gradient subsample (``None``: uniform)."""
        return None

    def check(self, outputs: Outputs, targets: Targets) -> None:
        """Raise :class:`DataError` with a readable message if shapes do not match."""


@dataclass(frozen=True)
class RegressionTask(Task):
    """Mean-squared error on every output coordinate; the score is the raw output."""

    kind: str = field(default="regression", init=False)

    def check(self, outputs: Outputs, targets: Targets) -> None:
        outs, tgts = as_heads(outputs), as_heads(targets)
        if len(outs) != len(tgts):
            raise DataError(f"model returned {len(outs)} outputs but targets have {len(tgts)} heads")
        for i, (o, t) in enumerate(zip(outs, tgts)):
            if o.shape[0] != t.shape[0] or o.reshape(o.shape[0], -1).shape != t.reshape(t.shape[0], -1).shape:
                raise DataError(
                    f"head {i}: model output shape {tuple(o.shape)} does not match target shape "
                    f"{tuple(t.shape)}; a regression target needs one value per output coordinate"
                )

    def per_sample_loss(self, outputs: Outputs, targets: Targets) -> Tensor:
        total = 0.0
        for o, t in zip(as_heads(outputs), as_heads(targets)):
            o2 = o.reshape(o.shape[0], -1)
            total = total + ((o2 - t.reshape(o2.shape).to(o2.dtype)) ** 2).mean(dim=1)
        return total  # type: ignore[return-value]

    def scores(self, outputs: Outputs) -> Tensor:
        return torch.cat([o.reshape(o.shape[0], -1) for o in as_heads(outputs)], dim=1)


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Cross-entropy summed over heads; the score of a head is its maximum logit.

    ``logit_clamp`` clamps logits to ``[-c, c]`` before the loss, as the reference
    code does with ``c = 30`` for its image tasks (the reference code's ``MAX_LOGIT_THRESHOLD``).
    ``None`` (the default) leaves logits untouched. :meth:`scores` (the outputs whose gradients
    MinNorm-OG keeps its update orthogonal to) always use the raw logits.
    """

    logit_clamp: float | None = None
    kind: str = field(default="classification", init=False)

    def logits(self, outputs: Outputs) -> tuple[Tensor, ...]:
        heads = as_heads(outputs)
        if self.logit_clamp is not None:
            heads = tuple(h.clamp(-self.logit_clamp, self.logit_clamp) for h in heads)
        return heads

    def check(self, outputs: Outputs, targets: Targets) -> None:
        outs, tgts = as_heads(outputs), as_heads(targets)
        if len(outs) != len(tgts):
            raise DataError(f"model returned {len(outs)} heads but targets have {len(tgts)}")
        for i, (o, t) in enumerate(zip(outs, tgts)):
            if o.dim() != 2:
                raise DataError(f"head {i}: classifier logits must be (batch, classes), got {tuple(o.shape)}")
            if t.dim() != 1 or t.shape[0] != o.shape[0]:
                raise DataError(
                    f"head {i}: targets must be a (batch,) tensor of class indices matching logits "
                    f"{tuple(o.shape)}, got {tuple(t.shape)}"
                )
            if t.dtype.is_floating_point:
                raise DataError(f"head {i}: class targets must be integers, got {t.dtype}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= o.shape[1]):
                raise DataError(f"head {i}: class index out of range [0, {o.shape[1]})")

    def per_sample_loss(self, outputs: Outputs, targets: Targets) -> Tensor:
        total = 0.0
        for o, t in zip(self.logits(outputs), as_heads(targets)):
            total = total + F.cross_entropy(o, t.long(), reduction="none")
        return total  # type: ignore[return-value]

    def scores(self, outputs: Outputs) -> Tensor:
        # Raw logits, never clamped: the clamp only guards the loss. A clamped score has a zero
        # gradient once the logit saturates, which would silently drop that point's constraint from
        # MinNorm-OG's projection.
        return torch.stack([h.max(dim=1).values for h in as_heads(outputs)], dim=1)

    def strata(self, targets: Targets) -> Tensor | None:
        return as_heads(targets)[0]


@dataclass
class TensorData:
    """In-memory data: inputs, targets (a tensor or tuple of tensors) and optional weights.

    Batching tensors by index is much faster than a ``DataLoader`` over a
    ``TensorDataset``; use this for everything that fits in memory.
    """

    inputs: Tensor
    targets: Targets
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor):
            raise DataError(f"inputs must be a torch.Tensor, got {type(self.inputs).__name__}")
        if self.inputs.dim() == 0:
            raise DataError("inputs must have a leading example dimension, got a 0-d tensor")
        n = self.inputs.shape[0]
        for i, t in enumerate(as_heads(self.targets)):
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise DataError(f"targets[{i}] must be a tensor with one row per example")
            if t.shape[0] != n:
                raise DataError(f"targets[{i}] has {t.shape[0]} rows but inputs have {n}")
        if self.weights is not None:
            if not isinstance(self.weights, Tensor) or self.weights.shape != (n,):
                shape = tuple(self.weights.shape) if isinstance(self.weights, Tensor) else type(self.weights).__name__
                raise DataError(f"weights must be a tensor of shape ({n},), got {shape}")
            if not self.weights.dtype.is_floating_point:
                raise DataError(f"weights must be floating point, got {self.weights.dtype}")
            if not torch.isfinite(self.weights).all():
                raise DataError("weights contain NaN or infinite values")
            if (self.weights < 0).any():
                raise DataError("weights must be >= 0 (a negative weight turns descent into ascent on that example)")
        for name, t in [("inputs", self.inputs), *[(f"targets[{i}]", t) for i, t in enumerate(as_heads(self.targets))]]:
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise DataError(f"{name} contains NaN or infinite values")

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def take(self, index: Tensor) -> Batch:
        tg = self.targets
        targets: Targets = tg[index] if isinstance(tg, Tensor) else tuple(t[index] for t in tg)
        return Batch(self.inputs[index], targets, None if self.weights is None else self.weights[index])

    def subset(self, index: Tensor | Sequence[int]) -> TensorData:
        idx = torch.as_tensor(index, dtype=torch.long)
        b = self.take(idx)
        return TensorData(b.inputs, b.targets, b.weights)


@dataclass
class Batch:
    """One batch: inputs, targets and optional per-example weights."""

    inputs: Tensor
    targets: Targets
    weights: Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        tg = self.targets
        targets: Targets = tg.to(device) if isinstance(tg, Tensor) else tuple(t.to(device) for t in tg)
        return Batch(self.inputs.to(device), targets, None if self.weights is None else self.weights.to(device))

    def select(self, index: Tensor) -> Batch:
        tg = self.targets
        targets: Targets = tg[index] if isinstance(tg, Tensor) else tuple(t[index] for t in tg)
        return Batch(self.inputs[index], targets, None if self.weights is None else self.weights[index])


def batch_from_items(items: Any) -> Batch:
    """Turn a collated ``DataLoader`` item ``(x, y)`` or ``(x, y, w)`` into a :class:`Batch`."""
    if isinstance(items, Batch):
        return items
    if not isinstance(items, (tuple, list)) or len(items) not in (2, 3):
        raise DataError("a dataset must yield (inputs, targets) or (inputs, targets, weights)")
    x, y = items[0], items[1]
    y = tuple(y) if isinstance(y, list) else y
    return Batch(x, y, items[2] if len(items) == 3 else None)


Data = TensorData | Dataset


@dataclass
class UnlearningProblem:
    """Everything an unlearning method may look at.

    Attributes:
        model: the trained model ``theta*`` (never modified by the engine).
        retain: the accessible retain data ``D_r'`` (a :class:`TensorData` or a torch ``Dataset``).
        forget: the forget set ``D_f``.
        task: how outputs are scored and compared (:class:`RegressionTask`, :class:`ClassificationTask`).
        batch_size: size of retain and forget batches.
        make_model: optional zero-argument factory for a freshly initialised model (used by
            ``Retrain``); by default the model's own ``reset_parameters`` are called on a copy.
    """

    model: nn.Module
    retain: Data
    forget: Data
    task: Task
    batch_size: int = 256
    make_model: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if isinstance(self.task, type) and issubclass(self.task, Task):
            raise TypeError(f"task must be a Task instance: write {self.task.__name__}(), not {self.task.__name__}")
        if not isinstance(self.task, Task):
            raise TypeError(f"task must be a Task (RegressionTask(), ClassificationTask(), ...), "
                            f"got {type(self.task).__name__}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, numbers.Integral):
            raise TypeError(f"batch_size must be an integer, got {self.batch_size!r}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        for name in ("retain", "forget"):
            data = getattr(self, name)
            if isinstance(data, TensorData):
                continue
            if isinstance(data, (DataLoader, IterableDataset)) or not (hasattr(data, "__len__")
                                                                        and hasattr(data, "__getitem__")):
                raise DataError(
                    f"{name} must be a TensorData or a map-style torch Dataset (with __len__ and "
                    f"__getitem__), got {type(data).__name__}; pass the DataLoader's .dataset, or "
                    "TensorData(inputs, targets) for data in memory")
        bad = [n for n, p in self.model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise DataError(f"the model's parameters contain NaN or infinite values before unlearning ({shown})")
        if len(self.forget) == 0:  # type: ignore[arg-type]
            raise DataError("the forget set is empty: there is nothing to unlearn")
        if len(self.retain) == 0:  # type: ignore[arg-type]
            raise DataError("the retain set is empty: every method needs at least one retain example")
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters")
