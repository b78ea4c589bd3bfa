"""Unlearning inside Hugging Face's ``Trainer``: :class:`UnlearningTrainer`.

Any registered method runs as the Trainer's training step on a retain / forget pair of datasets
(``datasets.Dataset`` or torch ``Dataset``), with the usual ``TrainingArguments``: logging,
``max_steps`` / ``num_train_epochs``, evaluation (dict datasets), saving checkpoints, the learning rate
and its schedule. Resuming from a checkpoint is refused (the method's state is not saved).

Protocol (the same as :func:`overunlearn.unlearn`): the Trainer's epoch is one pass over the forget
set in batches of ``per_device_train_batch_size``; each forget batch is paired with the next batch of
a persistent, reshuffling retain iterator. A collated batch is a dict whose ``label_key`` entry
(``"labels"``) holds the targets and whose other entries are the model's keyword inputs, or the
``(inputs, targets[, weights])`` of a torch ``Dataset``.

What the Trainer owns: the optimizer (``args.optim``, ``learning_rate``, ``weight_decay``, the
scheduler) and gradient clipping (``max_grad_norm``; set 0 to reproduce :func:`unlearn` exactly);
the method's own ``lr`` / ``optimizer`` fields are not used. What the method owns: the loss, the
gradient hook (NGD's noise, SalUn's mask: after clipping, before the optimizer step), the
projection of MinNorm-OG, Retrain's re-initialisation.

Multi-process launches (``torchrun`` / ``accelerate launch``, DDP): every rank reads the same
forget and retain batches (the loaders are not sharded) and computes the same step through the
unwrapped model, so the parameters are the same on every rank and equal to a single-process run;
at the end of training rank 0's trainable parameters are broadcast to make that exact whatever the
kernels' determinism. The ranks replicate the work: there is no data-parallel speed-up.

Requires ``transformers`` (``pip install 'overunlearn[hf]'``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, default_collate

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("overunlearn.integrations.huggingface needs transformers: pip install 'overunlearn[hf]'") from exc

from overunlearn import structure
from overunlearn.batching import RetainCycle
from overunlearn.engine import check_data, check_drawn_labels, reinitialise_trainable
from overunlearn.errors import DataError, NonFiniteLossError
from overunlearn.methods import Method, create
from overunlearn.methods.context import StepInfo, UnlearningContext
from overunlearn.problem import Batch, ClassificationTask, Task, TensorData, UnlearningProblem, batch_from_items

__all__ = ["UnlearningTrainer"]


def _length(v: Any) -> int | None:
    """An example entry's length along its first dimension (``None``: a scalar, a string)."""
    if isinstance(v, torch.Tensor):
        return v.shape[0] if v.dim() else None
    if isinstance(v, (list, tuple)):
        return len(v)
    return None


def _items(b: Batch) -> tuple:
    """A batch as the Trainer's loop takes a torch ``Dataset``'s: ``(inputs, targets[, weights])``."""
    return (b.inputs, b.targets) if b.weights is None else (b.inputs, b.targets, b.weights)


class _MethodHooks(TrainerCallback):
    """Calls the method's set-up, gradient hook, after-step hook and teardown at the Trainer's events."""

    def __init__(self, trainer: UnlearningTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trainer._begin()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
        t = self.trainer
        if t._info is not None:
            t.method.on_gradients(t.ctx, t._info)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        t = self.trainer
        if t._info is not None and t._retain is not None:
            t.method.after_step(t.ctx, t._info, t._retain)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.trainer._end()


class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is an unlearning method's step.

    Args:
        model: the trained model (unlearned in place, as the Trainer trains in place).
        args: ``TrainingArguments``; ``gradient_accumulation_steps`` must be 1.
        method: a method instance or a registered name (``"minnorm_og"``, ``"npo"``, ...).
        method_kwargs: hyperparameters when ``method`` is a name.
        retain_dataset: the accessible retain data.
        forget_dataset: the forget set (the Trainer's training set: an epoch is one pass over it).
        task: how outputs are scored (:class:`~overunlearn.problem.CausalLMTask`,
            :class:`~overunlearn.problem.SequenceClassificationTask`, ...).
        label_key: the collated dict's entry holding the targets.
        seed: seeds batch order and the method's random choices (default ``args.seed``).
        make_model, init_fn: as in :class:`~overunlearn.problem.UnlearningProblem` (Retrain).
        **kwargs: passed to ``Trainer`` (``data_collator``, ``eval_dataset``, ``callbacks``, ...).
    """

    def __init__(self, model: torch.nn.Module, args: Any, *, method: Method | str, retain_dataset: Any,
                 forget_dataset: Any, task: Task, method_kwargs: Mapping[str, Any] | None = None,
                 label_key: str = "labels", seed: int | None = None, make_model: Callable[[], torch.nn.Module] | None = None,
                 init_fn: Callable[[torch.nn.Module], None] | None = None, **kwargs: Any) -> None:
        owned = sorted(set(method_kwargs or {}) & {"lr", "optimizer", "weight_decay"})
        if owned and isinstance(method, str):
            warnings.warn(f"method_kwargs {', '.join(owned)}: the Trainer owns the optimizer, so the method's own "
                          f"{', '.join(owned)} {'is' if len(owned) == 1 else 'are'} not used; set TrainingArguments(learning_rate=..., optim=..., "
                          "weight_decay=...) instead", UserWarning, stacklevel=2)
        if isinstance(method, str):
            method = create(method, **dict(method_kwargs or {}))
        elif method_kwargs:
            raise ValueError("method_kwargs apply to a method given by name; pass the hyperparameters to create()")
        if not isinstance(method, Method):
            raise TypeError(f"method must be a Method or a registered name, got {type(method).__name__}")
        if args.gradient_accumulation_steps != 1:
            raise ValueError("UnlearningTrainer steps once per forget batch: set gradient_accumulation_steps=1 "
                             "(use a larger per_device_train_batch_size instead)")
        eval_dataset = kwargs.get("eval_dataset")
        if (eval_dataset is not None and not isinstance(eval_dataset, TensorData) and len(eval_dataset)
                and not isinstance(eval_dataset[0], Mapping)):
            raise DataError("eval_dataset: evaluation through the Trainer needs dict items (inputs and a "
                            f"{label_key!r} entry), got {type(eval_dataset[0]).__name__} items")
        if isinstance(eval_dataset, TensorData):
            raise DataError("eval_dataset: evaluation through the Trainer needs a dataset of dict items (inputs "
                            f"and a {label_key!r} entry), got TensorData")
        self._dict_collate: Callable[[list[Any]], Any] | None = None
        super().__init__(model=model, args=args, train_dataset=forget_dataset, **kwargs)
        self.label_names = [label_key]
        self.method = method
        self.label_key = label_key
        self.unlearning_seed = args.seed if seed is None else seed
        self.problem = UnlearningProblem(model, retain_dataset, forget_dataset, task,
                                         batch_size=args.per_device_train_batch_size, make_model=make_model,
                                         init_fn=init_fn, collate=self._collate)
        self.ctx: UnlearningContext | None = None
        self._info: StepInfo | None = None
        self._retain: Batch | None = None
        # first, so that the method's after-step work (MinNorm-OG's projection) precedes logging,
        # evaluation and checkpoints, and the final broadcast precedes the user's on_train_end
        self.callback_handler.callbacks.insert(0, _MethodHooks(self))

    # ---- data ---------------------------------------------------------------------------------
    def _raw_collate(self, items: list[Any]) -> Any:
        """Dict items through the Trainer's collator (a dict, as the Trainer's loop expects) -- after
        dropping the entries the model's ``forward`` does not take (a tokenized dataset's raw ``text``), as
        the Trainer does when ``remove_unused_columns`` is on -- other items (``(inputs, targets[,
        weights])``) through torch's ``default_collate``."""
        if items and isinstance(items[0], Mapping):
            if self._dict_collate is None:
                self._dict_collate = self._collator_for(items[0])
            try:
                out = self._dict_collate(items)
            except (RuntimeError, ValueError) as exc:
                lengths = {n for it in items for v in it.values() if (n := _length(v)) is not None}
                if len(lengths) > 1:
                    raise DataError("the examples have different lengths and the data collator does not pad them: pass "
                                    "data_collator=PadCollate() (overunlearn.problem), or a transformers collator that "
                                    "pads labels with -100 (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))"
                                    ) from exc
                raise
            return _items(out) if isinstance(out, Batch) else dict(out)
        return default_collate(items)

    def _collator_for(self, example: Mapping[str, Any]) -> Callable[[list[Any]], Any]:
        """The data collator, behind the Trainer's removal of the entries ``forward`` does not name -- unless
        ``forward`` names none of the example's inputs (a ``forward(**batch)`` wrapper), where removing them
        would leave nothing (the plain Trainer would refuse such a dataset)."""
        self._set_signature_columns_if_needed()
        named = set(self._signature_columns or ()) - {"label", "label_ids", self.label_key}
        if not (set(example) - {self.label_key}) & named:
            return self.data_collator
        return self._get_collator_with_removed_columns(self.data_collator, "unlearning")

    def _to_batch(self, raw: Any) -> Batch:
        """A collated batch as a :class:`Batch`: a dict's ``label_key`` entry is the target, the rest the inputs."""
        if isinstance(raw, Batch):
            return raw
        if isinstance(raw, Mapping):
            d = dict(raw)
            if self.label_key not in d:
                raise DataError(f"the collated batch has no {self.label_key!r} entry (it has {sorted(d)}); give the "
                                "datasets a labels column or name it with label_key=")
            targets = d.pop(self.label_key)
            return Batch(structure.normalise(d), targets)
        return batch_from_items(raw)

    def _collate(self, items: list[Any]) -> Batch:
        return self._to_batch(self._raw_collate(items))

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        """Run the unlearning (``Trainer.train``). Resuming is refused: the retain stream, the method's
        state (schedules, SalUn's mask, the reference model of NPO and SCRUB) and Retrain's
        re-initialisation are not checkpointed, so a resumed run would not be the run it continues."""
        if resume_from_checkpoint:
            raise ValueError("UnlearningTrainer cannot resume from a checkpoint (the method's state and the retain "
                             "stream are not saved); start the unlearning again from the original model")
        return super().train(**kwargs)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(data, str):
            data = self.eval_dataset[data]
        return DataLoader(data, batch_size=self.args.per_device_eval_batch_size, collate_fn=self._raw_collate)

    def get_train_dataloader(self) -> DataLoader:
        # not prepared by accelerate: every rank reads the same forget batches in the same order
        gen = torch.Generator().manual_seed(self.unlearning_seed)
        data = self.train_dataset
        if isinstance(data, TensorData):
            # in-memory forget data: batches taken by index (as unlearn() does), handed to the Trainer's loop
            # as (inputs, targets[, weights]) like a torch Dataset's
            def take(index: list[int]) -> tuple:
                return _items(data.take(torch.tensor(index, dtype=torch.long)))

            return DataLoader(range(len(data)), batch_size=self.args.per_device_train_batch_size, collate_fn=take,
                              sampler=RandomSampler(range(len(data)), generator=gen))
        return DataLoader(data, batch_size=self.args.per_device_train_batch_size,
                          collate_fn=self._raw_collate, sampler=RandomSampler(data, generator=gen))

    # ---- the method's life cycle ----------------------------------------------------------------
    def _begin(self) -> None:
        model, dev = self.model, self.args.device
        steps_per_epoch = math.ceil(len(self.train_dataset) / self.args.per_device_train_batch_size)
        planned = math.ceil(self.args.max_steps / steps_per_epoch) if self.args.max_steps > 0 else \
            math.ceil(self.args.num_train_epochs)
        bounds = check_data(self.problem, model, dev)
        self.ctx = UnlearningContext(self.problem, model, dev, self.unlearning_seed, planned, steps_per_epoch)
        self.ctx.label_bounds = bounds
        if self.method.needs_planned_epochs:
            self.ctx.require_planned_epochs(self.method.name)
        if getattr(self.method, "reinitialise", False):
            reinitialise_trainable(self.problem, model, self.unlearning_seed)
        # in train mode, as unlearn() sets a method up (on_train_begin runs before the Trainer's own
        # model.train(): a model from from_pretrained is still in eval mode here)
        model.train()
        self.method.setup(self.ctx)
        self._retain_iter = RetainCycle(self.problem.retain, self.problem.batch_size,
                                        torch.Generator().manual_seed(self.unlearning_seed + 1), self._collate)

    def _end(self) -> None:
        if self.ctx is not None:
            self.method.teardown(self.ctx)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.requires_grad:
                        torch.distributed.broadcast(p.data, src=0)

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """One unlearning step on the forget batch ``inputs`` and the next retain batch (the loss's
        backward pass included; the Trainer then clips, steps the optimizer and the scheduler)."""
        assert self.ctx is not None, "the Trainer did not call on_train_begin"
        ctx, method = self.ctx, self.method
        self.model.train()
        step = self.state.global_step
        spe = ctx.steps_per_epoch
        info = StepInfo(step, step // spe, step % spe, spe, ctx.planned_epochs)
        forget = self._to_batch(inputs).to(ctx.device)
        retain = next(self._retain_iter).to(ctx.device)
        self._info, self._retain = info, retain
        drawn = [(name, b) for name, b, data in (("retain", retain, self.problem.retain),
                                                 ("forget", forget, self.problem.forget))
                 if not isinstance(data, TensorData)]  # (in-memory labels were checked whole before the run)
        if drawn and self.problem.task.is_categorical:
            check_drawn_labels(drawn, step, ctx.label_bounds, not isinstance(self.problem.task, ClassificationTask))
        method.before_step(ctx, info, retain)
        loss = method.loss(ctx, info, retain, forget if method.uses_forget else None)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(f"{method.name}: the loss became {float(loss)} at step {step}; lower the learning "
                                     "rate or the ascent coefficient", step=step, method=method.name)
        # the forward ran through the unwrapped model, so a DDP wrapper does not all-reduce gradients every
        # rank already shares; the accelerator still applies its loss scaling (fp16)
        self.accelerator.backward(loss)
        return loss.detach()

    def compute_loss(self, model: torch.nn.Module, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The task's loss on a batch (evaluation): the weighted mean of the per-example losses."""
        batch = self._to_batch(inputs).to(self.args.device)
        out = structure.call_model(model, batch.inputs)
        per = self.problem.task.per_sample_loss(out, batch.targets)
        if batch.weights is not None:
            per = per * batch.weights.to(per.dtype)
        loss = per.mean()
        return (loss, out) if return_outputs else loss
