"""SCRUB (Kurmanji et al., 2023): alternate min steps (distil on retain) and max steps (diverge on forget)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from overunlearn.methods.base import (
    CATEGORICAL_TASKS,
    Method,
    MethodConfig,
    check_range,
    mean_over_examples,
    require_categorical,
)
from overunlearn.methods.context import ReferenceMode, set_reference_mode
from overunlearn.methods.registry import register_method
from overunlearn.problem import Targets, Task


@dataclass(frozen=True)
class ScrubConfig(MethodConfig):
    """``reg_coef``: KL weight on retain (min) steps; ``ga_coef``: KL weight on forget (max) steps;
    ``num_gd_epochs``: final epochs that are min epochs only; ``teacher_mode``: how the frozen teacher
    runs (:func:`~overunlearn.methods.context.set_reference_mode`: ``"train"`` reproduces the paper's
    reference code, whose teacher's BatchNorm uses batch statistics; dropout is off either way)."""

    reg_coef: float = 0.1
    ga_coef: float = 0.01
    num_gd_epochs: int = 0
    teacher_mode: ReferenceMode = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0)
        check_range("ga_coef", self.ga_coef, 0.0)
        check_range("num_gd_epochs", self.num_gd_epochs, 0)
        if self.teacher_mode not in ("train", "eval"):
            raise ValueError(f"teacher_mode={self.teacher_mode!r} is not one of 'train', 'eval'")


def kl_teacher_student(task: Task, student, teacher, targets: Targets, weights: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``sum_heads KL(pi_teacher || pi_student)`` at the scored positions, averaged over the batch
    (for a language model: each example's mean over its scored tokens, then the batch mean), each
    example's KL times its weight where the batch has ``weights``."""
    total = 0.0
    for s, t in zip(task.categorical(student, targets), task.categorical(teacher, targets)):
        log_s = F.log_softmax(s.logits, dim=1)
        if s.per_example:  # (the reference code's form: F.kl_div against the teacher's probabilities)
            per_row = F.kl_div(log_s, F.softmax(t.logits, dim=1), reduction="none").sum(1)
        else:
            per_row = F.kl_div(log_s, F.log_softmax(t.logits, dim=1), reduction="none", log_target=True).sum(1)
        total = total + mean_over_examples(s, per_row, weights)
    return total  # type: ignore[return-value]


@register_method("scrub")
class Scrub(Method):
    """SCRUB. Epoch ``t`` is a *min* epoch if ``t`` is even or ``t >= T - num_gd_epochs``:
    ``J(theta; B_r) + reg_coef * KL(pi_orig(x_r) || pi_theta(x_r))``; otherwise a *max* epoch:
    ``-ga_coef * KL(pi_orig(x_f) || pi_theta(x_f))``. Classification and language models (a
    token-level KL over the scored positions)."""

    Config = ScrubConfig
    uses_forget = True
    needs_planned_epochs = True
    tasks = CATEGORICAL_TASKS

    def setup(self, ctx):  # type: ignore[override]
        require_categorical(self, ctx)
        self.teacher = set_reference_mode(ctx.original(), self.config.teacher_mode)

    def is_min_epoch(self, epoch: int, planned: int) -> bool:
        return epoch % 2 == 0 or epoch >= planned - self.config.num_gd_epochs

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        task = require_categorical(self, ctx)
        if self.is_min_epoch(info.epoch, ctx.require_planned_epochs(self.name)):
            out = ctx.forward(retain)
            with torch.no_grad():
                t_out = ctx.forward(retain, self.teacher)
            return ctx.data_loss(out, retain) + self.config.reg_coef * kl_teacher_student(
                task, out, t_out, retain.targets, retain.weights)
        with torch.no_grad():
            t_out = ctx.forward(forget, self.teacher)
        return -self.config.ga_coef * kl_teacher_student(task, ctx.forward(forget), t_out, forget.targets,
                                                         forget.weights)
