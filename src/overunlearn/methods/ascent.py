"""Methods that ascend the forget loss: GA, NGP (NegGrad+), NPO (the paper, Appendix F.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from overunlearn.methods.base import (
    CATEGORICAL_TASKS,
    Method,
    MethodConfig,
    check_range,
    example_mean,
    require_categorical,
)
from overunlearn.methods.context import ReferenceMode, set_reference_mode
from overunlearn.methods.registry import register_method
from overunlearn.methods.vectorised import VectorisedForm


@register_method("ga")
class GA(Method):
    """Gradient ascent on the forget loss (Graves et al., 2021): minimise ``-J(theta; B_f)``. No retain term."""

    uses_forget = True

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return -ctx.batch_loss(forget)

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm(retain_weight=0.0, forget_weight=-1.0)


@dataclass(frozen=True)
class NGPConfig(MethodConfig):
    """``ga_coef``: the ascent weight ``lambda_GA``."""

    ga_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ga_coef", self.ga_coef, 0.0)


@register_method("ngp")
class NGP(Method):
    """NegGrad+ (Kurmanji et al., 2023): minimise ``J(theta; B_r) - lambda_GA J(theta; B_f)``."""

    Config = NGPConfig
    uses_forget = True

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain) - self.config.ga_coef * ctx.batch_loss(forget)

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm(retain_weight=1.0, forget_weight=-self.config.ga_coef)


@dataclass(frozen=True)
class NPOConfig(MethodConfig):
    """``reg_coef``: the inverse temperature ``beta`` of NPO; ``reference_mode``: how the frozen reference
    policy runs (:func:`~overunlearn.methods.context.set_reference_mode`: ``"train"``, the paper's reference
    code, gives its BatchNorm batch statistics; dropout is off either way, so ``pi_ref`` is a fixed function)."""

    reg_coef: float = 0.1
    reference_mode: ReferenceMode = "train"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0, low_open=True)
        if self.reference_mode not in ("train", "eval"):
            raise ValueError(f"reference_mode={self.reference_mode!r} is not one of 'train', 'eval'")


@register_method("npo")
class NPO(Method):
    """Negative Preference Optimization (Zhang et al., 2024), forget-only; classification and language models.

    ``L = sum_heads (2 / beta) mean_{x_f} log(1 + (pi_theta(y_f|x_f) / pi_ref(y_f|x_f))^beta)``
    with ``pi_ref`` the frozen original model and ``beta = reg_coef``; computed stably as
    ``(2 / beta) softplus(beta (log pi_theta - log pi_ref))``. For a language model ``pi(y_f|x_f)``
    is the probability of the example's whole scored answer (the product over its tokens), as in
    the NPO paper.
    """

    Config = NPOConfig
    uses_forget = True
    tasks = CATEGORICAL_TASKS

    def setup(self, ctx):  # type: ignore[override]
        require_categorical(self, ctx)
        self.reference = set_reference_mode(ctx.original(), self.config.reference_mode)

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        task = require_categorical(self, ctx)
        beta = self.config.reg_coef
        cats = task.categorical(ctx.forward(forget), forget.targets)
        with torch.no_grad():
            refs = task.categorical(ctx.forward(forget, self.reference), forget.targets)
        total = 0.0
        for cat, ref in zip(cats, refs):
            y = cat.labels.unsqueeze(1)
            lp = torch.log_softmax(cat.logits, dim=1).gather(1, y).squeeze(1)
            lr_ = torch.log_softmax(ref.logits, dim=1).gather(1, y).squeeze(1)
            ratio = lp - lr_ if cat.per_example else cat.per_example_sum(lp - lr_)  # (n,): one per example
            total = total + example_mean(cat, (2.0 / beta) * F.softplus(beta * ratio), forget.weights)
        return total  # type: ignore[return-value]
