"""Per-example signals of a model: the raw material of every privacy metric.

:func:`compute_signals` runs a model over a :class:`~overunlearn.problem.TensorData`
(or a :class:`~overunlearn.problem.Batch`, or ``(inputs, targets)``) in eval mode,
without gradients, in batches, on the model's device, and returns a :class:`Signals`
of NumPy ``float64`` arrays, one value per example. :func:`signals_from_outputs` is the
pure tensor function underneath (outputs and targets in, signals out).

Classification (one head of a :class:`~overunlearn.problem.ClassificationTask`;
``z`` the logits after the task's optional clamp, ``y`` the label, ``p = softmax(z)``):

=====================  ====================================================================
``loss``               cross-entropy of the chosen head, ``-log p_y``
``total_loss``         the task's training loss summed over all heads
``confidence``         ``p_y``
``entropy``            ``-sum_i p_i log p_i``
``modified_entropy``   Song & Mittal (2021): ``-(1-p_y) log p_y - sum_{i!=y} p_i log(1-p_i)``
``correct``            ``1.0`` if ``argmax z == y`` else ``0.0``
``scaled_confidence``  LiRA's logit-scaled confidence ``log(p_y / (1 - p_y))``
``margin``             KLoM's margin ``z_y - logsumexp_{i!=y} z_i``
=====================  ====================================================================

``scaled_confidence`` and ``margin`` are the same number for a softmax classifier
(``log p_y - log(1-p_y) = z_y - logsumexp_{i!=y} z_i``); both are computed from logits
with log-sum-exps, so they stay finite when ``p_y`` rounds to 1 in floating point.
``log(1 - p_i)`` inside the modified entropy is computed the same way.

Regression (a :class:`~overunlearn.problem.RegressionTask`, ``e = f(x) - y`` over the
chosen head's coordinates): ``loss`` is the mean squared error, ``margin`` is the signed
error ``mean(e)`` (exact for scalar outputs), and the probability-based signals
(``confidence``, ``entropy``, ``modified_entropy``, ``correct``, ``scaled_confidence``)
are NaN. U-LiRA and KLoM then use the signed error as their statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from overunlearn import structure
from overunlearn.problem import (
    Batch,
    CausalLMTask,
    ClassificationTask,
    RegressionTask,
    Task,
    TensorData,
    as_heads,
    batch_from_items,
)

SIGNAL_NAMES: tuple[str, ...] = (
    "loss", "total_loss", "confidence", "entropy", "modified_entropy", "correct", "scaled_confidence", "margin",
)
#: aliases accepted by :meth:`Signals.get` (SalUn's feature names)
ALIASES = {"correctness": "correct", "m_entropy": "modified_entropy", "prob": "confidence",
           "logit_confidence": "scaled_confidence", "lira": "scaled_confidence"}


@dataclass(frozen=True)
class Signals:
    """Per-example signals; every field has the same shape (``(n,)`` or ``(n_models, n)``)."""

    loss: np.ndarray
    total_loss: np.ndarray
    confidence: np.ndarray
    entropy: np.ndarray
    modified_entropy: np.ndarray
    correct: np.ndarray
    scaled_confidence: np.ndarray
    margin: np.ndarray

    def get(self, name: str) -> np.ndarray:
        """The array of signal ``name`` (SalUn's names ``correctness``, ``m_entropy`` are accepted)."""
        key = ALIASES.get(name, name)
        if key not in SIGNAL_NAMES:
            raise KeyError(f"unknown signal {name!r}; valid names: {', '.join(SIGNAL_NAMES + tuple(ALIASES))}")
        return getattr(self, key)

    def __len__(self) -> int:
        return int(self.loss.shape[-1])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def stack(items: Sequence[Signals]) -> Signals:
        """Stack the signals of several models into arrays of shape ``(n_models, n)``."""
        if not items:
            raise ValueError("cannot stack an empty list of Signals")
        return Signals(**{n: np.stack([getattr(s, n) for s in items]) for n in SIGNAL_NAMES})

    @staticmethod
    def concat(items: Sequence[Signals]) -> Signals:
        """Concatenate signals of consecutive batches along the example axis."""
        return Signals(**{n: np.concatenate([getattr(s, n) for s in items], axis=-1) for n in SIGNAL_NAMES})

    def select(self, rows: Sequence[int] | np.ndarray) -> Signals:
        """Keep some models (rows) of stacked signals."""
        idx = np.asarray(rows)
        return Signals(**{n: getattr(self, n)[idx] for n in SIGNAL_NAMES})


def _log1m_softmax(z: Tensor, chunk: int = 128) -> Tensor:
    """``log(1 - softmax(z)_i)`` for every class, as ``logsumexp_{j!=i} z_j - logsumexp_j z_j``."""
    b, c = z.shape
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    if c == 1:
        return torch.full_like(z, -torch.inf)
    out = []
    eye = torch.eye(c, dtype=torch.bool, device=z.device)
    for s in range(0, b, chunk):
        zz = z[s:s + chunk].unsqueeze(1).expand(-1, c, c)  # (b, i, j)
        zz = zz.masked_fill(eye, -torch.inf)
        out.append(torch.logsumexp(zz, dim=2))
    return torch.cat(out, dim=0) - lse


def _classification_signals(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    z = logits.double()
    y = y.long()
    n, c = z.shape
    rows = torch.arange(n, device=z.device)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    logp_y = logp[rows, y]
    log1m = _log1m_softmax(z)  # (n, c)
    log1m_y = log1m[rows, y]
    # modified entropy: -(1-p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    other = p * log1m
    other[rows, y] = 0.0
    mentr = -log1m_y.exp() * logp_y - other.sum(dim=1)
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)
    margin = logp_y - log1m_y  # = z_y - logsumexp_{i != y} z_i
    return {
        "loss": -logp_y,
        "confidence": p[rows, y],
        "entropy": ent,
        "modified_entropy": mentr,
        "correct": (z.argmax(dim=1) == y).double(),
        "scaled_confidence": margin,
        "margin": margin,
    }


def _regression_signals(out: Tensor, target: Tensor) -> dict[str, Tensor]:
    o = out.reshape(out.shape[0], -1).double()
    e = o - target.reshape(o.shape).double()
    nan = torch.full((o.shape[0],), float("nan"), dtype=torch.float64, device=o.device)
    return {"loss": (e ** 2).mean(dim=1), "confidence": nan, "entropy": nan, "modified_entropy": nan,
            "correct": nan, "scaled_confidence": nan, "margin": e.mean(dim=1)}


def _sequence_signals(task: Task, outputs, labels: Tensor) -> dict[str, Tensor]:
    """A language model's per-example signals: the mean over its scored tokens of each token's
    classification signal (``log(1 - p)`` taken elementwise, not through the ``C x C`` form, so that
    a vocabulary of any size fits), and ``correct`` = every scored token is the argmax (exact match)."""
    cat = task.categorical(outputs, labels)[0]
    z = cat.logits.double()
    y = cat.labels
    rows = torch.arange(z.shape[0], device=z.device)
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    log1m = torch.log1p(-p.clamp(max=1.0 - 1e-15))
    # the label's log(1 - p_y) from logits, logsumexp_{i != y} z_i - logsumexp z, exact where p_y rounds
    # to 1 (the margin would saturate at -log(1e-15) = 34.5 otherwise)
    others = z.index_put((rows, y), z.new_tensor(float("-inf")))
    logp_y, log1m_y = logp[rows, y], torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)
    other = p * log1m
    other[rows, y] = 0.0
    margin = logp_y - log1m_y
    per_row = {
        "loss": -logp_y,
        "confidence": p[rows, y],
        "entropy": -(p * logp).sum(dim=1),
        "modified_entropy": -log1m_y.exp() * logp_y - other.sum(dim=1),
        "scaled_confidence": margin,
        "margin": margin,
    }
    sig = {k: cat.per_example_mean(v) for k, v in per_row.items()}
    wrong = cat.per_example_sum((z.argmax(dim=1) != y).double())
    sig["correct"] = (wrong == 0).double()
    return sig


def _infer_task(outputs, targets) -> Task:
    tg = as_heads(targets)[0]
    return RegressionTask() if tg.dtype.is_floating_point else ClassificationTask()


def signals_from_outputs(outputs, targets, task: Task | None = None, head: int = 0) -> Signals:
    """Signals from model outputs and targets (tensors, or tuples of per-head tensors).

    Args:
        outputs: the model's outputs for a batch.
        targets: the matching targets.
        task: how outputs are compared; inferred from the target dtype when ``None``
            (integer targets: classification, floating targets: regression).
        head: which head of a multi-head model the per-head signals use (``total_loss``
            always sums the task loss over every head).
    """
    task = task if task is not None else _infer_task(outputs, targets)
    if isinstance(task, CausalLMTask):
        with torch.no_grad():
            sig = _sequence_signals(task, outputs, targets)  # type: ignore[arg-type]
            sig["total_loss"] = task.per_sample_loss(outputs, targets).double()
        return Signals(**{k: v.detach().cpu().numpy().astype(np.float64) for k, v in sig.items()})
    outs, tgts = as_heads(task.select(outputs)), as_heads(targets)
    if not 0 <= head < len(outs):
        raise ValueError(f"head={head} is out of range: the model has {len(outs)} head(s)")
    with torch.no_grad():
        if isinstance(task, ClassificationTask):
            logits = task.logits(outputs)[head]
            sig = _classification_signals(logits, tgts[head])
        elif isinstance(task, RegressionTask):
            sig = _regression_signals(outs[head], tgts[head])
        else:
            raise TypeError(f"signals are defined for classification and regression tasks, not {task.kind!r}")
        sig["total_loss"] = task.per_sample_loss(outputs, targets).double()
    return Signals(**{k: v.detach().cpu().numpy().astype(np.float64) for k, v in sig.items()})


def _as_batch(data) -> Batch:
    if isinstance(data, Batch):
        return data
    if isinstance(data, TensorData):
        return Batch(data.inputs, data.targets, data.weights)
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        return Batch(data[0], data[1], data[2] if len(data) == 3 else None)
    raise TypeError("data must be a TensorData, a Batch or an (inputs, targets) pair")


def _batches(data, batch_size: int):
    """Consecutive batches of a TensorData / Batch / pair, or of a torch ``Dataset`` through a DataLoader."""
    if isinstance(data, Dataset) and not isinstance(data, TensorData):
        for items in DataLoader(data, batch_size=batch_size, shuffle=False):
            yield batch_from_items(items)
        return
    batch = _as_batch(data)
    n = len(batch)
    for s in range(0, n, batch_size):
        yield batch.select(torch.arange(s, min(n, s + batch_size)))


def compute_signals(model: nn.Module, data, task: Task | None = None, *, head: int = 0, batch_size: int = 1024,
                    device: str | torch.device | None = None) -> Signals:
    """Per-example signals of ``model`` on ``data``, batched, without gradients, in eval mode.

    ``data`` is a :class:`TensorData`, a :class:`Batch`, an ``(inputs, targets)`` pair or a
    torch ``Dataset`` yielding ``(x, y)`` / ``(x, y, w)`` (read in order through a DataLoader).

    The model is moved to ``device`` if one is given (otherwise it stays where it is and
    the data is sent to it); its train/eval mode is restored afterwards.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is not None:
        model = model.to(device)
    dev = structure.model_device(model)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for b in _batches(data, batch_size):
                b = b.to(dev)
                parts.append(signals_from_outputs(structure.call_model(model, b.inputs), b.targets, task, head))
    finally:
        model.train(was_training)
    if not parts:
        empty = np.zeros(0)
        return Signals(**{k: empty for k in SIGNAL_NAMES})
    return Signals.concat(parts)


def compute_signals_many(models: Sequence[nn.Module], data, task: Task | None = None, **kw) -> Signals:
    """Signals of several models on the same data, stacked to shape ``(n_models, n)``."""
    return Signals.stack([compute_signals(m, data, task, **kw) for m in models])
