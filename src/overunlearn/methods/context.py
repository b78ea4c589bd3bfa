"""The vocabulary a method speaks: where the loop is (:class:`StepInfo`) and what it may look at
(:class:`UnlearningContext`). The engine creates both; methods only read them (and the model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from overunlearn import structure
from overunlearn.problem import Batch, Outputs, UnlearningProblem


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: global step, epoch, step within the epoch (all 0-based)."""

    step: int
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    planned_epochs: int | None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with gradients switched off (a teacher / reference policy)."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


#: how a frozen reference model (SCRUB's teacher, NPO's reference policy) runs
ReferenceMode = Literal["train", "eval"]


def set_reference_mode(model: nn.Module, mode: ReferenceMode) -> nn.Module:
    """Put a frozen reference model in ``mode`` and return it.

    ``"eval"``: every module in eval mode. ``"train"``: as the paper's reference code runs its
    teachers -- normalisation layers with running statistics (BatchNorm, InstanceNorm) use the batch's
    statistics -- but every other module, dropout included, in eval mode: a reference policy is a fixed
    function, and a dropout mask drawn per call would make ``log pi_ref`` random (the image models of
    the paper have no dropout, so this is the reference code's behaviour there).
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"reference mode {mode!r} is not one of 'train', 'eval'")
    model.eval()
    if mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
                m.train()
    return model


def sampling_seed(seed: int) -> int:
    """The seed of a run's CPU generator for sampling decisions (:attr:`UnlearningContext.generator`)."""
    return seed


def noise_seed(seed: int) -> int:
    """The seed of a run's generator for noise (:attr:`UnlearningContext.device_generator`)."""
    return seed + 1


class UnlearningContext:
    """The state a method sees: the working model, the problem, device, randomness, optimizer."""

    def __init__(self, problem: UnlearningProblem, model: nn.Module, device: torch.device, seed: int,
                 planned_epochs: int | None, steps_per_epoch: int) -> None:
        self.problem = problem
        self.model = model
        self.device = device
        self.seed = seed
        self.planned_epochs = planned_epochs
        self.steps_per_epoch = steps_per_epoch
        #: CPU generator for sampling decisions (subsets, batch order)
        self.generator = torch.Generator().manual_seed(sampling_seed(seed))
        #: generator on the model's device for noise
        self.device_generator = torch.Generator(device=device).manual_seed(noise_seed(seed))
        self.optimizer: torch.optim.Optimizer | None = None
        self._original: nn.Module | None = None
        self._checked = False
        #: each head's number of classes, from the engine's first-batch check (categorical tasks)
        self.label_bounds: tuple[int, ...] | None = None

    # -- models -------------------------------------------------------------------
    def original(self) -> nn.Module:
        """A frozen copy of the model as it was before unlearning (made on first use)."""
        if self._original is None:
            self._original = frozen_copy(self.model)
        return self._original

    def trainable(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def require_planned_epochs(self, method: str) -> int:
        if self.planned_epochs is None:
            raise ValueError(
                f"method {method!r} schedules by the number of epochs: give the budget an 'epochs' value "
                "(it may be combined with 'seconds' or 'steps' as a cut-off)"
            )
        return self.planned_epochs

    # -- losses -------------------------------------------------------------------
    def forward(self, batch: Batch, model: nn.Module | None = None) -> Outputs:
        """The raw output of ``model`` (the working model by default) on a batch (call convention of
        :func:`overunlearn.structure.call_model`)."""
        if batch is None:
            raise TypeError("no batch to forward: a method receives forget batches only when its class sets "
                            "uses_forget = True (forget is None otherwise)")
        return structure.call_model(model or self.model, batch.inputs)

    def data_loss(self, outputs: Outputs, batch: Batch) -> Tensor:
        """The task loss of a batch: ``mean(loss_i * w_i)`` (``w_i = 1`` without weights)."""
        task = self.problem.task
        if not self._checked:
            task.check(outputs, batch.targets)
            self._checked = True
        per = task.per_sample_loss(outputs, batch.targets)
        if batch.weights is not None:
            per = per * batch.weights.to(per.dtype)
        return per.mean()

    def batch_loss(self, batch: Batch) -> Tensor:
        """The task loss of a batch (:meth:`data_loss` of :meth:`forward`)."""
        return self.data_loss(self.forward(batch), batch)
