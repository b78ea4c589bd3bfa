"""Descent on the retain set: Retrain, GD, NGD, Ridge, L1-Sparse (the paper, Appendix F.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from overunlearn.methods.base import Method, MethodConfig, check_range
from overunlearn.methods.context import noise_seed
from overunlearn.methods.registry import register_method
from overunlearn.methods.vectorised import VectorisedForm


@register_method("retrain")
class Retrain(Method):
    """Retrain from a fresh initialisation on the retain set with the same step budget.

    ``min_theta J(theta; B_r)`` starting from random parameters (``problem.make_model`` or
    every module's ``reset_parameters``), for exactly as many steps as every other method --
    which is why it is weak in the paper's short budgets.
    """

    reinitialise = True

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain)

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm(fresh_start=self.reinitialise)


@register_method("gd")
class GD(Method):
    """Gradient descent on the retain loss, ``J(theta; B_r)`` (Neel et al., 2021)."""

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain)

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm()


@dataclass(frozen=True)
class NGDConfig(MethodConfig):
    """``noise_sig``: standard deviation ``sigma`` of the Gaussian noise added to every gradient entry."""

    noise_sig: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("noise_sig", self.noise_sig, 0.0)


@register_method("ngd")
class NGD(Method):
    """Noisy gradient descent (Chourasia & Shah, 2023): ``g <- grad J(theta; B_r) + sigma * xi``, ``xi ~ N(0, I)``."""

    Config = NGDConfig

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain)

    def on_gradients(self, ctx, info):  # type: ignore[override]
        sig = self.config.noise_sig
        if sig == 0:
            return
        for p in ctx.trainable():
            if p.grad is not None:
                noise = torch.randn(p.shape, generator=ctx.device_generator, device=p.device, dtype=p.dtype)
                p.grad.add_(noise, alpha=sig)

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        # the noise stream of the context's device generator (on a CPU, the same numbers)
        return VectorisedForm(noise_sigma=self.config.noise_sig, noise_seed=noise_seed(seed))


@dataclass(frozen=True)
class RidgeConfig(MethodConfig):
    """``reg_coef``: initial penalty ``lambda_reg``; ``reg_coef_decay``: factor ``gamma_reg`` applied after every step."""

    reg_coef: float = 0.1
    reg_coef_decay: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0)
        check_range("reg_coef_decay", self.reg_coef_decay, 0.0, 1.0)


def squared_norm(params: list[Tensor]) -> Tensor:
    return sum((p * p).sum() for p in params)  # type: ignore[return-value]


@register_method("ridge")
class Ridge(Method):
    """Descent on ``J(theta; B_r) + lambda_t ||theta||_2^2`` with ``lambda_t = lambda_reg * gamma_reg^t`` per step.

    The authors' own comparison point (approaching the ridgeless limit), not a published method.
    """

    Config = RidgeConfig

    def coefficient(self, step: int) -> float:
        """``lambda_t = lambda_reg * gamma_reg^t`` at (0-based) step ``t``."""
        return self.config.reg_coef * self.config.reg_coef_decay**step

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain) + self.coefficient(info.step) * squared_norm(ctx.trainable())

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm(ridge=self.coefficient if self.config.reg_coef else None)


@dataclass(frozen=True)
class L1Config(MethodConfig):
    """``reg_coef``: the base L1 weight ``lambda_reg``."""

    reg_coef: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0)


@register_method("l1_sparse")
class L1Sparse(Method):
    """L1-sparse unlearning (Jia et al., 2023): ``J(theta; B_r) + gamma_s ||theta||_1``.

    The schedule follows the reference code: the first step uses ``lambda_reg``; every later step
    uses ``(2 - 2 t / T) lambda_reg`` where ``t`` is the (0-based) epoch of the previous step -- i.e.
    ``2 lambda_reg`` through epoch 0, falling linearly to ``2 lambda_reg / T`` in the last epoch.
    """

    Config = L1Config
    needs_planned_epochs = True

    def coefficient(self, step: int, prev_epoch: int, planned_epochs: int) -> float:
        """The L1 weight of step ``step``, whose previous step ran in epoch ``prev_epoch``, of a run of
        ``planned_epochs`` epochs."""
        if step == 0:
            return self.config.reg_coef
        return (2.0 - 2.0 * prev_epoch / planned_epochs) * self.config.reg_coef

    def setup(self, ctx):  # type: ignore[override]
        self.prev_epoch = 0

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        coef = self.coefficient(info.step, self.prev_epoch, ctx.require_planned_epochs(self.name))
        return ctx.batch_loss(retain) + coef * sum(p.abs().sum() for p in ctx.trainable())

    def after_step(self, ctx, info, retain):  # type: ignore[override]
        self.prev_epoch = info.epoch

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        if not self.config.reg_coef:
            return VectorisedForm()

        def coefficient(t: int) -> float:  # one step per epoch: step t - 1 ran in epoch t - 1
            return self.coefficient(t, t - 1, epochs)

        return VectorisedForm(l1=coefficient)
