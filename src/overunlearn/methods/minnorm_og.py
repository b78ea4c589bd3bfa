"""MinNorm-OG (Block, Mokhtari & Shakkottai, NeurIPS 2025, Algorithm 1).

Descent on retain batches interleaved with proximal shrinkage steps restricted to the
orthogonal complement of the sampled output gradients:

``theta <- theta - c_k * P_{G^perp}(theta)``,  ``G = span{grad_theta f(theta, x_i)}_{i <= n_pert}``,

the closed form of ``argmin_{Delta perp G} ||theta + Delta||^2 + lambda_k ||Delta||^2``
(Appendix E) with ``c_k = 1 / (1 + lambda_k) = reg_coef * reg_coef_decay**k`` for the k-th
projection (0-based). A projection happens at every step of epoch ``t`` iff
``t < T - num_gd_epochs`` and ``t % proj_pd == 0`` (the paper, Table 4 and
Appendix F.1.10, as the authors' reference code implements them).

Deliberate choices where the authors' reference code (``common/unlearners/unlearners.py``,
``MinNormOGUnlearner``) differs from the paper or is quirky, each an option:

* ``order="project_then_descend"`` (default, Algorithm 1): project, then compute the descent
  gradient at the projected point. ``"descend_then_project"`` is Appendix F's order. The
  reference code's hybrid (loss forward before the projection) is not reproduced.
* ``jacobian="per_sample"`` (default): per-example gradients with BatchNorm in eval mode;
  ``"batch_train"``: the reference's one batched train-mode forward.
* ``implementation="fast"``: per-layer Gram blocks from one hooked forward and backward
  (``linalg/blocks``; layers without a block through the ``torch.func`` Jacobian) and a float64
  Gram solve; ``"reference"``: per-score backward loop + float64 QR, as the authors do it.
* The gradient subsample is always exactly ``min(grad_sample_size, batch)`` points of the
  current retain batch, stratified by class for classifiers.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from overunlearn.errors import NonFiniteLossError
from overunlearn.initialisation import init_draw, init_mean
from overunlearn.linalg.coverage import ProjectionReport, explain_projection
from overunlearn.linalg.jacobian import output_jacobian_reference, sample_indices
from overunlearn.linalg.projection import project_model_onto_span, project_onto_span_qr
from overunlearn.methods.base import Method, MethodConfig, check_range
from overunlearn.methods.context import sampling_seed
from overunlearn.methods.registry import register_method
from overunlearn.methods.vectorised import ProjectionSchedule, VectorisedForm
from overunlearn.problem import Batch, UnlearningProblem, first_examples


@dataclass(frozen=True)
class MinNormOGConfig(MethodConfig):
    """Hyperparameters of MinNorm-OG (paper Table 4).

    Attributes:
        reg_coef: ``lambda_reg``, the first projection's strength ``c_0`` (``0 <= reg_coef <= 1``).
        reg_coef_decay: ``gamma_reg``, multiplicative decay of the strength per projection.
        num_gd_epochs: ``T_GD``, final epochs with descent only.
        proj_pd: ``T_Proj``, project in every ``proj_pd``-th epoch.
        grad_sample_size: ``n_pert``, retain points whose output gradients span ``G``.
        order: ``"project_then_descend"`` or ``"descend_then_project"``.
        jacobian: ``"per_sample"`` or ``"batch_train"`` (BatchNorm semantics, see module doc).
        implementation: ``"fast"`` (per-layer blocks + Gram solve) or ``"reference"`` (backward loop + QR).
        anchor: what the shrinkage pulls towards: ``"zero"`` (the paper: the minimum-norm solution),
            ``"init_mean"`` (the mean of the model's initial distribution, :func:`overunlearn.initialisation.init_mean`:
            1 for a norm's gain, 0 for zero-mean random weights) or ``"init"`` (a fresh initialisation,
            Retrain's starting point for the run's seed, :func:`overunlearn.initialisation.init_draw`). The
            last two need what Retrain needs to re-initialise the model.
    """

    reg_coef: float = 0.1
    reg_coef_decay: float = 0.9
    num_gd_epochs: int = 0
    proj_pd: int = 1
    grad_sample_size: int = 50
    order: Literal["project_then_descend", "descend_then_project"] = "project_then_descend"
    jacobian: Literal["per_sample", "batch_train"] = "per_sample"
    implementation: Literal["fast", "reference"] = "fast"
    anchor: Literal["zero", "init_mean", "init"] = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("reg_coef", self.reg_coef, 0.0, 1.0)
        check_range("reg_coef_decay", self.reg_coef_decay, 0.0, 1.0)
        check_range("num_gd_epochs", self.num_gd_epochs, 0)
        check_range("proj_pd", self.proj_pd, 1)
        check_range("grad_sample_size", self.grad_sample_size, 1)
        choices = {
            "order": ("project_then_descend", "descend_then_project"),
            "jacobian": ("per_sample", "batch_train"),
            "implementation": ("fast", "reference"),
            "anchor": ("zero", "init_mean", "init"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")


def takes_targets(score_fn) -> bool:
    """Whether ``score_fn`` takes the targets too (``scores(outputs, targets)``; a task written for
    ``scores(outputs)`` alone keeps working)."""
    try:
        params = inspect.signature(score_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def minnorm_projection_step(model: torch.nn.Module, batch: Batch, score_fn, strata, coef: float,
                            n_pert: int, generator: torch.Generator, jacobian: str = "per_sample",
                            implementation: str = "fast", with_targets: bool = False,
                            anchor: list[torch.Tensor] | None = None) -> float:
    """One step ``theta <- theta - coef * P_{G^perp}(theta - a)`` in place on ``model``'s trainable parameters,
    with the anchor ``a`` (one tensor per trainable parameter; ``None``: zero, the paper's step).

    ``score_fn(outputs)`` gives the scores; with ``with_targets``, ``score_fn(outputs, targets)``
    (a language model's token log-probabilities need the labels). Returns the fraction of the
    trainable parameters' norm the step removed, ``||theta_new - theta|| / ||theta||``.
    """
    idx = sample_indices(len(batch), n_pert, generator, strata)
    sub = batch.select(idx)
    x, y = sub.inputs, (sub.targets if with_targets else None)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        a = None if anchor is None else torch.cat([t.reshape(-1) for t in anchor])
        v = theta if a is None else theta - a
    if implementation == "fast":
        # per-layer blocks where they apply, the rest through the torch.func Jacobian (linalg/projection.py)
        in_span = project_model_onto_span(model, x, score_fn, v, mode=jacobian, targets=y)
    else:
        jac = output_jacobian_reference(model, x, score_fn, mode=jacobian, targets=y)  # type: ignore[arg-type]
        if not torch.isfinite(jac).all():
            raise FloatingPointError("the output Jacobian contains NaN or infinite values")
        in_span = project_onto_span_qr(jac, v)
        del jac
    # theta - coef * (v - P v) = (1 - coef) theta + coef * (a + P v), v = theta - a
    with torch.no_grad():
        if a is not None:
            in_span = in_span + a
        # one multi-tensor operation each (elementwise as p.mul_(1 - coef).add_(x, alpha=coef) per parameter)
        pieces = [x.view_as(p) for x, p in zip(in_span.split([p.numel() for p in params]), params)]
        if all(p.dtype in (torch.float32, torch.float64) for p in params):
            torch._foreach_mul_(params, 1.0 - coef)
        else:  # (on CPU the multi-tensor op rounds the scalar to a half-precision dtype first)
            for p in params:
                p.mul_(1.0 - coef)
        torch._foreach_add_(params, pieces, alpha=coef)
        norm = float(theta.norm())
        return coef * float((theta - in_span).norm()) / norm if norm > 0 else 0.0  # (theta - (a + P v) = v - P v)


@register_method("minnorm_og")
class MinNormOG(Method):
    """MinNorm-OG: descent on ``J(theta; B_r)`` plus orthogonal-gradient min-norm projections."""

    Config = MinNormOGConfig

    #: warn when one projection removes more than this fraction of the trainable parameters' norm
    LARGE_SHRINK = 0.2

    def setup(self, ctx):  # type: ignore[override]
        if self.config.num_gd_epochs > 0:
            ctx.require_planned_epochs(self.name)
        self.projections = 0
        self.warned = False
        self.anchor = None  # "zero": the paper's step
        if self.config.anchor == "init_mean":
            self.anchor = init_mean(ctx.problem, ctx.model)
        elif self.config.anchor == "init":
            self.anchor = init_draw(ctx.problem, ctx.model, ctx.seed)

    def explain(self, problem: UnlearningProblem) -> ProjectionReport:
        """How this method's fast projection handles ``problem``'s model: for every trainable parameter,
        the per-layer block form it takes, or the ``torch.func`` Jacobian and why (see
        :func:`overunlearn.linalg.explain_projection`), on the first retain examples.
        ``print(method.explain(problem))`` shows a table. Runs one hooked forward and backward pass on
        ``min(grad_sample_size, batch_size)`` retain examples (as many as a projection samples from a
        full retain batch) on the model's device; the model is not changed."""
        if self.config.implementation != "fast":
            raise ValueError(f"explain describes the fast projection; this {self.name} uses implementation="
                             f"{self.config.implementation!r} (a backward pass per score and a QR of the whole Jacobian)")
        p = next(q for q in problem.model.parameters())
        k = min(self.config.grad_sample_size, problem.batch_size)
        batch = first_examples(problem.retain, k, problem.collate).to(p.device)
        scores = problem.task.scores
        return explain_projection(problem.model, batch.inputs, scores,
                                  targets=batch.targets if takes_targets(scores) else None, mode=self.config.jacobian)

    def should_project(self, epoch: int, planned: int | None) -> bool:
        """Whether epoch ``epoch`` of a run of ``planned`` epochs projects (``None``: not known, so no
        final descent-only epochs)."""
        limit = float("inf") if planned is None else planned - self.config.num_gd_epochs
        return epoch < limit and epoch % self.config.proj_pd == 0

    def coefficient(self, k: int) -> float:
        """The strength ``c_k`` of the ``k``-th projection (0-based)."""
        return self.config.reg_coef * self.config.reg_coef_decay**k

    def _project(self, ctx, info, retain: Batch) -> None:
        if not self.should_project(info.epoch, ctx.planned_epochs):
            return
        task = ctx.problem.task
        try:
            removed = minnorm_projection_step(
                ctx.model, retain, task.scores, task.strata(retain.targets), self.coefficient(self.projections),
                self.config.grad_sample_size, ctx.generator, self.config.jacobian, self.config.implementation,
                with_targets=takes_targets(task.scores), anchor=self.anchor,
            )
        except NonFiniteLossError:
            raise
        except FloatingPointError as exc:  # a non-finite Jacobian: the model has diverged
            raise NonFiniteLossError(
                f"{self.name}: {exc} at step {info.step} (epoch {info.epoch}), i.e. the model's outputs "
                "diverged; lower the learning rate", step=info.step, method=self.name) from None
        if removed > self.LARGE_SHRINK and not self.warned:
            self.warned = True
            warnings.warn(
                f"minnorm_og: projection {self.projections} removed {removed:.0%} of the trainable parameters' norm "
                f"(reg_coef={self.config.reg_coef}, {min(self.config.grad_sample_size, len(retain))} samples): with "
                "far fewer samples than parameters almost every weight lies outside their gradients' span and is "
                "shrunk by about reg_coef; if the model degrades, lower reg_coef (the paper uses 0.01-0.1)",
                stacklevel=2)
        self.projections += 1

    def teardown(self, ctx):  # type: ignore[override]
        self.anchor = None  # (a copy of the trainable parameters)

    def before_step(self, ctx, info, retain):  # type: ignore[override]
        if self.config.order == "project_then_descend":
            self._project(ctx, info, retain)

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return ctx.batch_loss(retain)

    def after_step(self, ctx, info, retain):  # type: ignore[override]
        if self.config.order == "descend_then_project":
            self._project(ctx, info, retain)

    def _vectorisable(self) -> bool:
        # the vectorised runner computes the per-sample (eval-mode) Jacobian's Gram in float64, as "fast" does,
        # and shrinks towards zero
        return (self.config.implementation == "fast" and self.config.jacobian == "per_sample"
                and self.config.anchor == "zero")

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm | None:
        cfg = self.config
        if not self._vectorisable():
            return None
        if not cfg.reg_coef:  # every projection leaves theta as it is: descent only
            return VectorisedForm()
        return VectorisedForm(projection=ProjectionSchedule(
            projects=functools.partial(self.should_project, planned=epochs),
            coefficient=self.coefficient,
            after_step=cfg.order == "descend_then_project",
            sample_size=cfg.grad_sample_size,
            sampler_seed=sampling_seed(seed),  # the context's generator, which _project draws from
        ))

    def why_not_vectorised(self) -> str:
        if not self._vectorisable():
            return "MinNorm-OG is vectorised for implementation='fast', jacobian='per_sample', anchor='zero' only"
        return super().why_not_vectorised()
