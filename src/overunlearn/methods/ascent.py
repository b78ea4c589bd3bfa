"""Methods that ascend the forget loss: GA, NGP (NegGrad+), NPO (the paper, Appendix F.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from overunlearn.methods.base import Method, MethodConfig, check_range, head_log_probs, require_classifier
from overunlearn.methods.registry import register_method
from overunlearn.problem import as_heads


@register_method("ga")
class GA(Method):
    """Gradient ascent on the forget loss (Graves et al., 2021): minimise ``-J(theta; B_f)``. No retain term."""

    uses_forget = True

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return -ctx.batch_loss(forget)


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


@dataclass(frozen=True)
class NPOConfig(MethodConfig):
    """``reg_coef``: the inverse temperature ``beta`` of NPO."""

    reg_coef: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0, low_open=True)


@register_method("npo")
class NPO(Method):
    """Negative Preference Optimization (Zhang et al., 2024), forget-only, classification only.

    ``L = sum_heads (2 / beta) mean_{x_f} log(1 + (pi_theta(y_f|x_f) / pi_ref(y_f|x_f))^beta)``
    with ``pi_ref`` the frozen original model and ``beta = reg_coef``; computed stably as
    ``(2 / beta) softplus(beta (log pi_theta - log pi_ref))``.
    """

    Config = NPOConfig
    uses_forget = True
    tasks = frozenset({"classification"})

    def setup(self, ctx):  # type: ignore[override]
        require_classifier(self, ctx)
        ctx.original()

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        task = require_classifier(self, ctx)
        beta = self.config.reg_coef
        logp = head_log_probs(task, ctx.forward(forget))
        with torch.no_grad():
            logp_ref = head_log_probs(task, ctx.original()(forget.inputs))
        total = 0.0
        for lp, lr_, y in zip(logp, logp_ref, as_heads(forget.targets)):
            y = y.long().unsqueeze(1)
            ratio = lp.gather(1, y).squeeze(1) - lr_.gather(1, y).squeeze(1)
            total = total + (2.0 / beta) * F.softplus(beta * ratio).mean()
        return total  # type: ignore[return-value]
