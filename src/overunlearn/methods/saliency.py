"""SalUn (Fan et al., 2024): random-label unlearning restricted to salient weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from overunlearn.batching import forget_epoch
from overunlearn.methods.base import CATEGORICAL_TASKS, Method, MethodConfig, check_range, require_categorical
from overunlearn.methods.registry import register_method
from overunlearn.problem import Batch


@dataclass(frozen=True)
class SalUnConfig(MethodConfig):
    """``ga_coef``: weight of the random-label forget loss; ``sparsity``: fraction of weights frozen
    (the paper and reference freeze the half whose forget-gradient magnitude is below the median)."""

    ga_coef: float = 0.1
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("ga_coef", self.ga_coef, 0.0)
        check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)


def saliency_mask(mags: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Which entries of the flat saliencies ``mags`` stay trainable: ``mags >= threshold``, with the threshold
    the median for ``sparsity = 0.5`` (the reference's rule) and else the ``(k + 1)``-th smallest value, ``k =
    round(sparsity * n)``. Entries tied at the threshold are kept only up to the count the rule keeps without
    ties, chosen at random by ``generator``: many equal saliencies -- exact zeros, as fresh LoRA adapters'
    ``A`` factors or embedding rows the forget set never reaches have -- would otherwise keep every entry."""
    n = mags.numel()
    k = int(round(sparsity * n))
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=mags.device)
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=mags.device)
    if sparsity == 0.5:  # exactly the median rule of the reference (torch's median: the lower middle value)
        threshold, wanted = mags.median(), n - (n - 1) // 2
    else:
        threshold, wanted = mags.kthvalue(k + 1).values, n - k
    keep = mags >= threshold
    surplus = int(keep.sum()) - wanted
    if surplus > 0:  # ties at the threshold: drop a random `surplus` of them
        tied = (mags == threshold).nonzero().squeeze(1)
        drop = tied[torch.randperm(len(tied), generator=generator)[:surplus].to(tied.device)]
        keep[drop] = False
    return keep


@register_method("salun")
class SalUn(Method):
    """SalUn. Before the loop (timed, not counted in epochs) the gradient ``g = sum_batches grad J(theta*; B_f)``
    over all forget batches gives a saliency mask ``|g| >= quantile(|g|, sparsity)`` (the median by default;
    ties at the threshold are broken at random, :func:`saliency_mask`).
    Each step minimises ``J(theta; B_r) + ga_coef * J(theta; B_f')`` where ``B_f'`` relabels every head with a
    uniformly random *incorrect* class (for a language model: every scored token replaced by a random
    other token), and gradients outside the mask are zeroed. The mask is applied to
    ``.grad`` directly, so nothing is attached to the model (AdamW's decoupled weight decay still touches
    frozen entries, as in the reference). The saliency pass runs in train mode, as the reference does,
    but leaves no trace: BatchNorm running statistics are restored afterwards."""

    Config = SalUnConfig
    uses_forget = True
    tasks = CATEGORICAL_TASKS

    def setup(self, ctx):  # type: ignore[override]
        require_categorical(self, ctx)
        params = ctx.trainable()
        grads = [torch.zeros_like(p) for p in params]
        gen = torch.Generator().manual_seed(ctx.seed)
        buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
        for fb in forget_epoch(ctx.problem.forget, ctx.problem.batch_size, gen, ctx.problem.collate):
            fb = fb.to(ctx.device)
            loss = ctx.batch_loss(fb)
            for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        mags = torch.cat([g.abs().reshape(-1) for g in grads])
        keep = saliency_mask(mags, self.config.sparsity, torch.Generator().manual_seed(ctx.seed))
        self.masks = [m.view_as(g).to(g.dtype) for m, g in zip(keep.split([g.numel() for g in grads]), grads)]

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        task = require_categorical(self, ctx)
        out_f = ctx.forward(forget)
        relabelled = Batch(forget.inputs, task.random_labels(out_f, forget.targets, ctx.generator), forget.weights)
        return ctx.batch_loss(retain) + self.config.ga_coef * ctx.data_loss(out_f, relabelled)

    def on_gradients(self, ctx, info):  # type: ignore[override]
        for p, m in zip(ctx.trainable(), self.masks):
            if p.grad is not None:
                p.grad.mul_(m)

    def teardown(self, ctx):  # type: ignore[override]
        self.masks = []
