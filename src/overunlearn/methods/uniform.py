"""KL-to-uniform: push forget predictions towards the uniform distribution while descending on retain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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
from overunlearn.methods.registry import register_method

Direction = Literal["model_to_uniform", "uniform_to_model"]


@dataclass(frozen=True)
class KLUnifConfig(MethodConfig):
    """``kl_coef``: weight of the KL term (swept like ``ga_coef``); ``direction``:
    ``"model_to_uniform"`` is ``KL(pi_theta || U) = log K - H(pi_theta)``;
    ``"uniform_to_model"`` is ``KL(U || pi_theta)`` (what ``F.kl_div(log_softmax(z), 1/K)`` computes).
    The rebuttal that introduced this baseline does not say which; both are offered."""

    kl_coef: float = 0.1
    direction: Direction = "model_to_uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("kl_coef", self.kl_coef, 0.0)
        if self.direction not in ("model_to_uniform", "uniform_to_model"):
            raise ValueError(f"direction={self.direction!r} is not one of 'model_to_uniform', 'uniform_to_model'")


def kl_to_uniform(logits: torch.Tensor, direction: Direction) -> torch.Tensor:
    """Per-example KL between the softmax of ``logits`` and the uniform distribution."""
    logp = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    if direction == "model_to_uniform":
        return (logp.exp() * logp).sum(dim=1) + math.log(k)
    return -math.log(k) - logp.mean(dim=1)


@register_method("kl_unif")
class KLUnif(Method):
    """KL-Unif (from the paper's rebuttal): ``J(theta; B_r) + kl_coef * sum_heads mean_{x_f} KL(...)``.
    Classification and language models (the KL at every scored token, averaged per example)."""

    Config = KLUnifConfig
    uses_forget = True
    tasks = CATEGORICAL_TASKS

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        task = require_categorical(self, ctx)
        cats = task.categorical(ctx.forward(forget), forget.targets)
        kl = sum(mean_over_examples(c, kl_to_uniform(c.logits, self.config.direction), forget.weights) for c in cats)
        return ctx.batch_loss(retain) + self.config.kl_coef * kl
