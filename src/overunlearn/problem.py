"""The unlearning problem: a model, its retain and forget data, and a task.

A :class:`Task` says how a model is trained and what MinNorm-OG constrains:

* ``per_sample_loss(outputs, targets)`` -- the training loss of each example (the
  engine takes its (weighted) mean);
* ``scores(outputs, targets)`` -- the scalar outputs whose parameter gradients span the
  subspace that MinNorm-OG keeps its updates orthogonal to (paper eqn (5)). For
  regression this is the raw output; for classification it is the maximum logit of
  every head (the "max-logit trick" of the paper's Appendix F, the argmax being
  treated as a constant); for a causal language model it is the log-probability of
  each example's scored tokens (:class:`CausalLMTask`).

Inputs are a tensor, a tuple or a dict of tensors (see :mod:`overunlearn.structure` for the call
convention). Model outputs are a tensor, a tuple of tensors (one per head), a dict or a Hugging
Face ``ModelOutput`` (a task reads ``"logits"`` unless told otherwise: ``output=``); targets mirror
the heads. Multi-head models are first class: a two-head classifier returns
``(class_logits, color_logits)`` and its targets are ``(class_labels, color_labels)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from overunlearn import structure
from overunlearn.errors import DataError
from overunlearn.structure import Inputs, OutputSelector

Outputs = Tensor | tuple[Tensor, ...]
Targets = Tensor | tuple[Tensor, ...]

#: Hugging Face's label for "not scored" (prompt and padding positions)
IGNORE_INDEX = -100


def as_heads(x: Outputs | Targets) -> tuple[Tensor, ...]:
    """Return a tuple of per-head tensors whether ``x`` is one tensor or a sequence."""
    if isinstance(x, Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"expected a tensor or a tuple of tensors (one per head), got {type(x).__name__}; a model "
                    "returning a dict or a ModelOutput needs a task that names the entry to read (output='logits')")


@dataclass(frozen=True)
class Categorical:
    """Categorical predictions of a batch, one row per scored position.

    ``logits`` ``(N, C)``; ``labels`` ``(N,)``; ``owner`` ``(N,)``: the example each row belongs to;
    ``n``: examples in the batch; ``per_example``: row ``i`` is example ``i`` (a classifier head), as
    opposed to one row per scored token (a language model).
    """

    logits: Tensor
    labels: Tensor
    owner: Tensor
    n: int
    per_example: bool = False

    def per_example_mean(self, values: Tensor) -> Tensor:
        """``(n,)`` mean of per-row ``values`` over each example's rows (0 for an example without rows)."""
        total = torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add(0, self.owner, values)
        count = torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add(
            0, self.owner, torch.ones_like(values))
        return total / count.clamp_min(1)

    def per_example_sum(self, values: Tensor) -> Tensor:
        return torch.zeros(self.n, dtype=values.dtype, device=values.device).index_add(0, self.owner, values)

    def scored(self) -> Tensor:
        """``(n,)`` bool: the examples with at least one row (a language-model example may have none)."""
        return torch.zeros(self.n, dtype=torch.bool, device=self.owner.device).index_fill(0, self.owner, True)


class Task:
    """How outputs and targets are compared; subclass for a new kind of model.

    Subclasses that are dataclasses may declare an ``output`` field (a key, a tuple position or a callable, see
    :func:`overunlearn.structure.select_output`): what the task reads from the model's raw output.
    """

    kind: str = "custom"
    #: whether the task's outputs are categorical distributions (:meth:`categorical` is defined);
    #: methods built on class probabilities (NPO, SCRUB, SalUn, KL-Unif) need this
    is_categorical: ClassVar[bool] = False

    def select(self, outputs: Any) -> Any:
        """The part of a model's raw output this task reads (``output`` field; ``"logits"`` of a dict)."""
        return structure.select_output(outputs, getattr(self, "output", None))

    def per_sample_loss(self, outputs: Any, targets: Targets) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def scores(self, outputs: Any, targets: Targets | None = None) -> Tensor:  # pragma: no cover
        """Scalar scores per example, shape ``(batch, n_scores)``."""
        raise NotImplementedError

    def strata(self, targets: Targets) -> Tensor | None:
        """Labels used to stratify MinNorm-OG's gradient subsample (``None``: uniform)."""
        return None

    def check(self, outputs: Any, targets: Targets) -> None:
        """Raise :class:`DataError` with a readable message if shapes do not match."""

    def categorical(self, outputs: Any, targets: Targets) -> list[Categorical]:
        """Per head, the categorical predictions at the scored positions (categorical tasks only)."""
        raise TypeError(f"a {self.kind} task has no class probabilities")

    def random_labels(self, outputs: Any, targets: Targets, generator: torch.Generator) -> Targets:
        """Targets with every scored label replaced by a uniformly random *other* class (SalUn)."""
        raise TypeError(f"a {self.kind} task has no class labels")


@dataclass(frozen=True)
class RegressionTask(Task):
    """Mean-squared error on every output coordinate; the score is the raw output."""

    output: OutputSelector = None
    kind: str = field(default="regression", init=False)

    def check(self, outputs: Any, targets: Targets) -> None:
        outs, tgts = as_heads(self.select(outputs)), as_heads(targets)
        if len(outs) != len(tgts):
            raise DataError(f"model returned {len(outs)} outputs but targets have {len(tgts)} heads")
        for i, (o, t) in enumerate(zip(outs, tgts)):
            if o.shape[0] != t.shape[0] or o.reshape(o.shape[0], -1).shape != t.reshape(t.shape[0], -1).shape:
                raise DataError(
                    f"head {i}: model output shape {tuple(o.shape)} does not match target shape "
                    f"{tuple(t.shape)}; a regression target needs one value per output coordinate"
                )

    def per_sample_loss(self, outputs: Any, targets: Targets) -> Tensor:
        total = 0.0
        for o, t in zip(as_heads(self.select(outputs)), as_heads(targets)):
            o2 = o.reshape(o.shape[0], -1)
            total = total + ((o2 - t.reshape(o2.shape).to(o2.dtype)) ** 2).mean(dim=1)
        return total  # type: ignore[return-value]

    def scores(self, outputs: Any, targets: Targets | None = None) -> Tensor:
        return torch.cat([o.reshape(o.shape[0], -1) for o in as_heads(self.select(outputs))], dim=1)


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Cross-entropy summed over heads; the score of a head is its maximum logit.

    ``logit_clamp`` clamps logits to ``[-c, c]`` before the loss, as the reference
    code does with ``c = 30`` for its image tasks (the reference code's ``MAX_LOGIT_THRESHOLD``).
    ``None`` (the default) leaves logits untouched. :meth:`scores` (the outputs whose gradients
    MinNorm-OG keeps its update orthogonal to) always use the raw logits. ``output`` names what
    to read from a dict / ``ModelOutput`` (``"logits"`` by default) or is a callable.
    """

    logit_clamp: float | None = None
    output: OutputSelector = None
    kind: str = field(default="classification", init=False)
    is_categorical: ClassVar[bool] = True

    def logits(self, outputs: Any) -> tuple[Tensor, ...]:
        heads = as_heads(self.select(outputs))
        if self.logit_clamp is not None:
            heads = tuple(h.clamp(-self.logit_clamp, self.logit_clamp) for h in heads)
        return heads

    def check(self, outputs: Any, targets: Targets) -> None:
        outs, tgts = as_heads(self.select(outputs)), as_heads(targets)
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

    def per_sample_loss(self, outputs: Any, targets: Targets) -> Tensor:
        total = 0.0
        for o, t in zip(self.logits(outputs), as_heads(targets)):
            total = total + F.cross_entropy(o, t.long(), reduction="none")
        return total  # type: ignore[return-value]

    def scores(self, outputs: Any, targets: Targets | None = None) -> Tensor:
        # Raw logits, never clamped: the clamp only guards the loss. A clamped score has a zero
        # gradient once the logit saturates, which would silently drop that point's constraint from
        # MinNorm-OG's projection.
        return torch.stack([h.max(dim=1).values for h in as_heads(self.select(outputs))], dim=1)

    def strata(self, targets: Targets) -> Tensor | None:
        return as_heads(targets)[0]

    def categorical(self, outputs: Any, targets: Targets) -> list[Categorical]:
        out = []
        for h, y in zip(self.logits(outputs), as_heads(targets)):
            owner = torch.arange(h.shape[0], device=h.device)
            out.append(Categorical(h, y.long(), owner, h.shape[0], per_example=True))
        return out

    def random_labels(self, outputs: Any, targets: Targets, generator: torch.Generator) -> Targets:
        new = []
        for h, y in zip(self.logits(outputs), as_heads(targets)):
            c = h.shape[1]
            shift = torch.randint(1, c, y.shape, generator=generator).to(y.device) if c > 1 else 0
            new.append((y.long() + shift) % c)
        return new[0] if len(new) == 1 else tuple(new)


@dataclass(frozen=True)
class SequenceClassificationTask(ClassificationTask):
    """One label per sequence (e.g. a Hugging Face ``...ForSequenceClassification`` model): the
    :class:`ClassificationTask` reading ``outputs.logits``. Inputs are usually a dict with
    ``input_ids`` and ``attention_mask``; the model applies the mask itself."""


@dataclass(frozen=True)
class CausalLMTask(Task):
    """Next-token cross-entropy of a causal language model over the positions whose label is not -100.

    Hugging Face's convention: ``labels`` has the shape of ``input_ids`` and is aligned with it
    (``shift=True``: the logits at position ``t`` predict the label at ``t + 1``); prompt and
    padding positions carry -100 and are not scored. An example's loss is the mean over its scored
    tokens (``reduction="sum"``: their sum).

    MinNorm-OG's constraint scores (the outputs kept fixed to first order on retain samples):

    * ``scores_per="sequence"`` (default): one score per example, the log-likelihood of its scored
      tokens, ``sum_t log p(y_t | y_<t)`` -- one Jacobian row per sampled example, the cost of the
      classification case;
    * ``scores_per="token"``: one score per scored token, the first ``max_score_tokens`` of each example
      (examples with fewer get zero rows, which do not change the projection): a tighter
      constraint, ``max_score_tokens`` times the rows.
    """

    output: OutputSelector = None
    reduction: Literal["mean", "sum"] = "mean"
    scores_per: Literal["sequence", "token"] = "sequence"
    max_score_tokens: int = 8
    shift: bool = True
    kind: str = field(default="causal_lm", init=False)
    is_categorical: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={self.reduction!r} is not one of 'mean', 'sum'")
        if self.scores_per not in ("sequence", "token"):
            raise ValueError(f"scores_per={self.scores_per!r} is not one of 'sequence', 'token'")
        if isinstance(self.max_score_tokens, bool) or not isinstance(self.max_score_tokens, numbers.Integral) \
                or self.max_score_tokens < 1:
            raise ValueError(f"max_score_tokens={self.max_score_tokens!r} must be a positive integer")

    def aligned(self, outputs: Any, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits (B, T', V), labels (B, T'))`` with position ``t``'s logits predicting label ``t``."""
        logits = self.select(outputs)
        if self.shift:
            return logits[:, :-1], labels[:, 1:]
        return logits, labels

    def check(self, outputs: Any, targets: Targets) -> None:
        logits = self.select(outputs)
        if isinstance(logits, (tuple, list)):
            raise DataError(f"a causal language model's logits must be (batch, positions, vocabulary), got a "
                            f"{type(logits).__name__} of {len(logits)} outputs (a model called with return_dict=False?): "
                            "name the logits' position, CausalLMTask(output=0), or pass a callable")
        if not isinstance(logits, Tensor) or logits.dim() != 3:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise DataError(f"a causal language model's logits must be (batch, positions, vocabulary), got {shape}")
        if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape != logits.shape[:2]:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise DataError(f"labels must be a (batch, positions) tensor matching the logits {tuple(logits.shape[:2])}"
                            f", got {shape}")
        if targets.dtype.is_floating_point:
            raise DataError(f"labels must be integer token ids (-100 for unscored positions), got {targets.dtype}")
        _, labels = self.aligned(outputs, targets)
        scored = labels != IGNORE_INDEX
        vocab = logits.shape[2]
        bad = scored & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise DataError(f"label {int(labels[bad][0])} is outside the vocabulary [0, {vocab}) (and not -100)")

    def scored_positions(self, labels: Tensor) -> Tensor:
        """``labels``' scored positions as a bool mask, aligned as the logits are (``shift``)."""
        return (labels[:, 1:] if self.shift else labels) != IGNORE_INDEX

    def _token_logprobs(self, outputs: Any, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits, labels = self.aligned(outputs, targets)
        mask = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
        tok = logp.gather(-1, labels.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
        # (where, not a product: an unscored position's -inf log-probability must not become NaN)
        return torch.where(mask, tok, torch.zeros_like(tok)), mask

    def per_sample_loss(self, outputs: Any, targets: Targets) -> Tensor:
        tok, mask = self._token_logprobs(outputs, targets)  # type: ignore[arg-type]
        total = -tok.sum(1)
        if self.reduction == "sum":
            return total
        return total / mask.sum(1).clamp_min(1)

    def scores(self, outputs: Any, targets: Targets | None = None) -> Tensor:
        if targets is None:
            raise ValueError("CausalLMTask scores need the labels (the log-probability of each scored token)")
        tok, mask = self._token_logprobs(outputs, targets)  # type: ignore[arg-type]
        if self.scores_per == "sequence":
            return tok.sum(1, keepdim=True)
        # the first max_score_tokens scored positions of every example, zero where there are fewer
        k = self.max_score_tokens
        rank = mask.long().cumsum(1) - 1  # 0-based rank of each scored position in its example
        keep = mask & (rank < k)
        out = tok.new_zeros(tok.shape[0], k)
        rows = torch.arange(tok.shape[0], device=tok.device).unsqueeze(1).expand_as(rank)
        return out.index_put((rows[keep], rank[keep]), tok[keep])

    def categorical(self, outputs: Any, targets: Targets) -> list[Categorical]:
        logits, labels = self.aligned(outputs, targets)  # type: ignore[arg-type]
        mask = labels != IGNORE_INDEX
        owner = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
        rows = logits[mask]
        if rows.dtype in (torch.float16, torch.bfloat16):  # (as for the loss: softmaxes and KLs in float32)
            rows = rows.float()
        return [Categorical(rows, labels[mask].long(), owner, labels.shape[0])]

    def random_labels(self, outputs: Any, targets: Targets, generator: torch.Generator) -> Targets:
        labels: Tensor = targets  # type: ignore[assignment]
        vocab = self.select(outputs).shape[-1]
        shift = torch.randint(1, max(vocab, 2), labels.shape, generator=generator).to(labels.device)
        relabelled = (labels.long() + shift) % vocab
        return torch.where(labels == IGNORE_INDEX, labels.long(), relabelled)


def _check_finite(name: str, x: Any) -> None:
    bad = structure.non_finite_leaf(x)
    if bad is not None:
        where = name if bad == "inputs" else f"{name}{bad}"
        rows = [int(i) for leaf in structure.tensor_leaves(x) if leaf.is_floating_point() and leaf.dim()
                for i in (~torch.isfinite(leaf)).reshape(leaf.shape[0], -1).any(1).nonzero()[:3, 0]]
        at = f" (example {', '.join(map(str, sorted(set(rows))[:3]))}{', ...' if len(set(rows)) > 3 else ''})" if rows else ""
        raise DataError(f"{where} contains NaN or infinite values{at}")


def _check_weights(weights: Any, n: int, where: str = "") -> None:
    """Per-example weights: a finite, non-negative floating-point tensor of shape ``(n,)`` -- the same rule for
    :class:`TensorData` and for each batch a ``Dataset`` yields (``where`` names that batch's source)."""
    if not isinstance(weights, Tensor) or weights.shape != (n,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise DataError(f"{where}weights must be a tensor of shape ({n},), got {shape}")
    if not weights.dtype.is_floating_point:
        raise DataError(f"{where}weights must be floating point, got {weights.dtype}")
    if not torch.isfinite(weights).all():
        raise DataError(f"{where}weights contain NaN or infinite values")
    if (weights < 0).any():
        raise DataError(f"{where}weights must be >= 0 (a negative weight turns descent into ascent on that example)")


def _check_targets_type(targets: Any) -> None:
    """Targets are a tensor, or a tuple / list of tensors (one per head); name anything else and the fix."""
    if isinstance(targets, Tensor):
        return
    if isinstance(targets, (tuple, list)) and targets and all(isinstance(t, Tensor) for t in targets):
        return
    if targets is None:
        raise DataError("targets are missing (None): pass the labels as a tensor with one row per example "
                        "(class indices; for a language model the token labels, -100 where not scored)")
    if isinstance(targets, (tuple, list)):
        if not targets:
            raise DataError("targets is an empty sequence: pass a tensor with one row per example, or a tuple of "
                            "such tensors (one per head)")
        raise DataError(f"targets is a {type(targets).__name__} of {type(targets[0]).__name__}: pass a tensor "
                        "(torch.tensor(labels)), or a tuple of tensors with one per head")
    raise DataError(f"targets must be a torch.Tensor (or a tuple of tensors, one per head), got "
                    f"{type(targets).__module__}.{type(targets).__name__}; convert it with torch.as_tensor(...)")


@dataclass
class TensorData:
    """In-memory data: inputs, targets (a tensor or tuple of tensors) and optional weights.

    ``inputs`` may be a tensor, a tuple or a dict of tensors (e.g. ``{"input_ids": ...,
    "attention_mask": ...}``), all with one row per example. Batching tensors by index is much
    faster than a ``DataLoader`` over a ``TensorDataset``; use this for everything that fits in memory.
    """

    inputs: Inputs
    targets: Targets
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (DataLoader, Dataset)):
            raise DataError(f"inputs must be tensors, got a {type(self.inputs).__name__}; pass a Dataset as "
                            "retain= / forget= directly instead of wrapping it in TensorData")
        self.inputs = structure.normalise(self.inputs)
        if isinstance(self.inputs, Tensor) and self.inputs.dim() == 0:
            raise DataError("inputs must have a leading example dimension, got a 0-d tensor")
        if not structure.tensor_leaves(self.inputs):
            raise DataError(f"inputs must be a torch.Tensor or a tuple / dict of tensors, got "
                            f"{structure.describe(self.inputs)}")
        n = structure.batch_len(self.inputs)
        _check_targets_type(self.targets)
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        for i, t in enumerate(as_heads(self.targets)):
            head = "targets" if isinstance(self.targets, Tensor) else f"targets[{i}] (head {i})"
            if not isinstance(t, Tensor) or t.dim() == 0:
                raise DataError(f"{head} must be a tensor with one row per example")
            if t.shape[0] != n:
                raise DataError(f"{head} has {t.shape[0]} rows but inputs have {n}")
        if self.weights is not None:
            _check_weights(self.weights, n)
        _check_finite("inputs", self.inputs)
        for i, t in enumerate(as_heads(self.targets)):
            _check_finite("targets" if isinstance(self.targets, Tensor) else f"targets[{i}]", t)

    def __len__(self) -> int:
        return structure.batch_len(self.inputs)

    def take(self, index: Tensor) -> Batch:
        tg = self.targets
        targets: Targets = tg[index] if isinstance(tg, Tensor) else tuple(t[index] for t in tg)
        return Batch(structure.index(self.inputs, index), targets,
                     None if self.weights is None else self.weights[index])

    def subset(self, index: Tensor | Sequence[int] | Sequence[bool]) -> TensorData:
        """The examples at ``index``: integer positions, or a boolean mask with one entry per example
        (``data.subset(is_forget)``, ``data.subset(~is_forget)``), as ``x[index]`` selects."""
        idx = torch.as_tensor(index)
        n = len(self)
        if idx.numel() == 0:
            idx = idx.to(torch.long)  # ([] and range(0) read as float32: no example)
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise DataError(f"subset: a boolean mask needs one entry per example ({n}), got shape "
                                f"{tuple(idx.shape)}")
            idx = idx.nonzero().reshape(-1)
        elif idx.is_floating_point() or idx.is_complex() or idx.dim() > 1:
            raise DataError(f"subset: index must be integer positions or a boolean mask of {n} entries, got "
                            f"{idx.dtype} of shape {tuple(idx.shape)}")
        idx = idx.to(torch.long).reshape(-1)
        if idx.numel() and not bool(((idx >= -n) & (idx < n)).all()):
            raise DataError(f"subset: positions must lie in [-{n}, {n}) for {n} examples, got "
                            f"{int(idx.min())}..{int(idx.max())}")
        b = self.take(idx)
        return TensorData(b.inputs, b.targets, b.weights)


@dataclass
class Batch:
    """One batch: inputs (a tensor, tuple or dict of tensors), targets and optional per-example weights."""

    inputs: Inputs
    targets: Targets
    weights: Tensor | None = None

    def __len__(self) -> int:
        return structure.batch_len(self.inputs)

    def to(self, device: torch.device | str) -> Batch:
        tg = self.targets
        targets: Targets = tg.to(device) if isinstance(tg, Tensor) else tuple(t.to(device) for t in tg)
        return Batch(structure.to_device(self.inputs, device), targets,
                     None if self.weights is None else self.weights.to(device))

    def select(self, index: Tensor) -> Batch:
        tg = self.targets
        targets: Targets = tg[index] if isinstance(tg, Tensor) else tuple(t[index] for t in tg)
        return Batch(structure.index(self.inputs, index), targets,
                     None if self.weights is None else self.weights[index])


_ITEMS = ("a dataset must yield (inputs, targets) or (inputs, targets, weights), where inputs may be a tensor, a "
          "tuple or a dict of tensors, or dicts whose 'labels' entry holds the targets and whose other entries are "
          "the model's inputs (as Hugging Face datasets do)")


def _split_labels(item: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A Hugging Face-style example or batch ``{..., "labels": y}`` as ``(inputs, y)``; lists become tensors."""
    if "labels" not in item:
        raise DataError(f"a dict example needs a 'labels' entry with its targets (it has {sorted(item)}); "
                        + _ITEMS[0].lower() + _ITEMS[1:])

    def tensor(key: str, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str)):
            raise DataError(f"the examples' entry {key!r} holds text, which the model cannot take: remove it "
                            f"(a datasets.Dataset: .remove_columns({key!r})), or use the UnlearningTrainer, which "
                            "drops the entries the model's forward does not take")
        return torch.as_tensor(v) if isinstance(v, (list, tuple)) or isinstance(v, numbers.Number) else v

    d = {k: tensor(k, v) for k, v in item.items()}
    return d, d.pop("labels")


def collate_examples(items: list[Any]) -> Any:
    """The default collate function of a ``Dataset``'s examples: torch's ``default_collate``, after turning
    Hugging Face-style dict examples into ``(inputs, labels)`` pairs of tensors (so that a list of token ids
    is one tensor, not a list of per-position batches); examples of different lengths name ``PadCollate``."""
    from torch.utils.data import default_collate

    if items and isinstance(items[0], Mapping):
        items = [_split_labels(it) for it in items]
    try:
        return default_collate(items)
    except RuntimeError as exc:
        if "equal size" not in str(exc) and "same size" not in str(exc):
            raise
        raise DataError(f"the examples have different lengths ({exc}); pass UnlearningProblem(..., "
                        "collate=PadCollate()) to pad them (inputs with 0, labels with -100)") from None


def batch_from_items(items: Any) -> Batch:
    """Turn a collated ``DataLoader`` item ``(x, y)`` or ``(x, y, w)``, or a dict with a ``"labels"`` entry
    (the targets; the other entries are the inputs), into a :class:`Batch`."""
    if isinstance(items, Batch):
        batch = items
    else:
        if isinstance(items, Mapping):
            items = _split_labels(items)
        if not isinstance(items, (tuple, list)) or len(items) not in (2, 3):
            raise DataError(_ITEMS)
        x, y = structure.normalise(items[0]), items[1]
        y = tuple(y) if isinstance(y, list) else y
        batch = Batch(x, y, items[2] if len(items) == 3 else None)
    if batch.weights is not None:  # (checked as drawn: a Dataset's weights are not seen ahead)
        _check_weights(batch.weights, len(batch), "a batch's ")
    return batch


def first_examples(data: Data, k: int, collate: Any = None) -> Batch:
    """The first ``min(k, len(data))`` examples of a :class:`TensorData` or a map-style ``Dataset`` as one
    batch (a ``Dataset``'s through ``collate``, default :func:`collate_examples`)."""
    k = min(k, len(data))  # type: ignore[arg-type]
    if isinstance(data, TensorData):
        return data.take(torch.arange(k))
    return batch_from_items((collate or collate_examples)([data[i] for i in range(k)]))  # type: ignore[index]


def _pad_stack(values: list[Tensor], pad: float, side: str, where: str) -> Tensor:
    if all(v.shape == values[0].shape for v in values):
        return torch.stack(values)
    if any(v.dim() != values[0].dim() or v.dim() == 0 or v.shape[1:] != values[0].shape[1:] for v in values):
        raise DataError(f"{where}: examples differ in shape other than their length "
                        f"({sorted({tuple(v.shape) for v in values})}); only the first dimension is padded")
    length = max(v.shape[0] for v in values)
    out = values[0].new_full((len(values), length, *values[0].shape[1:]), pad)
    for i, v in enumerate(values):
        if side == "right":
            out[i, : v.shape[0]] = v
        else:
            out[i, length - v.shape[0]:] = v
    return out


@dataclass(frozen=True)
class PadCollate:
    """A collate function that pads variable-length examples to the longest in the batch.

    For a Dataset yielding ``(inputs, target[, weight])`` with ``inputs`` a dict of 1-d token tensors, or
    Hugging Face-style dicts whose ``"labels"`` entry is the target (lists of token ids are made tensors):
    each input key is padded with ``pad[key]`` (``pad_default`` for keys not named), and a target
    that is a sequence (causal-LM labels) with ``target_pad`` (-100: not scored). ``side="left"``
    pads on the left. Pass it as ``UnlearningProblem(collate=PadCollate())``.
    """

    pad: Mapping[str, float] = field(default_factory=lambda: {"input_ids": 0, "attention_mask": 0})
    pad_default: float = 0
    target_pad: float = IGNORE_INDEX
    side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise ValueError(f"side={self.side!r} is not one of 'right', 'left'")

    def __call__(self, items: list[Any]) -> Batch:
        if not items:
            raise DataError("cannot collate an empty batch")
        if isinstance(items[0], Mapping):
            items = [_split_labels(it) for it in items]
        first = items[0]
        if not isinstance(first, (tuple, list)) or len(first) not in (2, 3):
            raise DataError(_ITEMS)

        def stack(values: list[Any], pad: float, where: str) -> Any:
            v0 = values[0]
            if isinstance(v0, Tensor):
                return _pad_stack(values, pad, self.side, where)
            if isinstance(v0, Mapping):
                return {k: stack([v[k] for v in values], self.pad.get(k, self.pad_default), f"{where}[{k!r}]")
                        for k in v0}
            if isinstance(v0, (tuple, list)):
                return tuple(stack([v[i] for v in values], pad, f"{where}[{i}]") for i in range(len(v0)))
            return torch.as_tensor(values)

        inputs = stack([it[0] for it in items], self.pad_default, "inputs")
        targets = stack([it[1] for it in items], self.target_pad, "targets")
        weights = torch.as_tensor([float(it[2]) for it in items]) if len(first) == 3 else None
        return Batch(inputs, targets, weights)


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
        init_fn: optional ``init_fn(module)`` called on every module of the working copy (like
            ``nn.Module.apply``) for a Retrain re-initialisation of parameters that no
            ``reset_parameters`` covers (e.g. a custom module's weights); without it, such trainable
            parameters make Retrain stop with an error instead of keeping trained values.
        collate: optional collate function for ``Dataset`` retain / forget sets (e.g.
            :class:`PadCollate` for variable-length token sequences); default: torch's
            ``default_collate``.
    """

    model: nn.Module
    retain: Data
    forget: Data
    task: Task
    batch_size: int = 256
    make_model: Any = None
    init_fn: Any = None
    collate: Any = None

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
            if isinstance(data, Mapping):
                keys = ", ".join(repr(k) for k in list(data)[:4]) + (", ..." if len(data) > 4 else "")
                raise DataError(
                    f"{name} is a dict ({keys}), e.g. a tokenizer's batch: wrap it as TensorData(inputs, targets), with "
                    "the model's inputs as a dict (input_ids, attention_mask, ...) and the labels as targets")
            if isinstance(data, (DataLoader, IterableDataset)) or not (hasattr(data, "__len__")
                                                                        and hasattr(data, "__getitem__")):
                raise DataError(
                    f"{name} must be a TensorData or a map-style torch Dataset (with __len__ and "
                    f"__getitem__), got {type(data).__name__}; pass the DataLoader's .dataset, or "
                    "TensorData(inputs, targets) for data in memory")
        meta = [n for n, p in self.model.named_parameters() if p.is_meta]
        if meta:
            raise DataError(f"the model's parameters are on the meta device, without values ("
                            f"{', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): load its "
                            "weights first (e.g. model.to_empty(device='cpu') and load_state_dict, or from_pretrained "
                            "without low_cpu_mem_usage / device_map='meta')")
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
