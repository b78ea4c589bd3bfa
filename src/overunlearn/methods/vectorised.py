"""A method's step as data: what a vectorised runner needs to run many trials of it at once.

The per-trial engine (:func:`overunlearn.engine.unlearn`) runs a method through its hooks; a
vectorised runner (:mod:`overunlearn.engine.vectorised`) stacks many small full-batch runs and
computes their steps together, so it cannot call hooks. A method that can be run that way says so
by returning a :class:`VectorisedForm` from :meth:`Method.vectorised <overunlearn.methods.base.Method.vectorised>`:
its step written as a weighted data loss plus a few standard terms, each described by numbers and by
the *same* schedule functions its hooks call, so that both paths follow one definition.

Within a vectorised form, every epoch is one full-batch step: step ``t`` is epoch ``t``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectionSchedule:
    """MinNorm-OG's orthogonal-gradient projection ``theta <- (1 - c_k) theta + c_k P_span(J^T) theta``.

    ``J`` holds the per-sample output gradients of ``sample_size`` points of the current retain batch
    (all of them when the batch has no more), drawn with
    :func:`overunlearn.linalg.jacobian.sample_indices` from a CPU generator seeded with ``sampler_seed``.

    Attributes:
        projects: ``projects(t)``: whether epoch ``t`` projects.
        coefficient: ``coefficient(k)``: the strength ``c_k`` of the ``k``-th projection (0-based,
            counting only the projections made).
        after_step: project after the descent step of the epoch (else before it).
        sample_size: the number of retain points whose output gradients span ``J``.
        sampler_seed: the seed of the generator that draws the sampled points.
    """

    projects: Callable[[int], bool]
    coefficient: Callable[[int], float]
    after_step: bool
    sample_size: int
    sampler_seed: int

    def samples_subset(self, retain_points: int) -> bool:
        """Whether the projection samples a subset of a batch of ``retain_points`` points; the sample
        then depends on the batch's order, so a runner must replay the engine's batch shuffles."""
        return self.sample_size < retain_points


@dataclass(frozen=True)
class VectorisedForm:
    """One method's full-batch step, for a planned number of epochs and a seed.

    The step minimises ``retain_weight * J(theta; B_r) + forget_weight * J(theta; B_f)`` (data losses
    are batch means) plus the penalties below, with the run's optimizer:

    Attributes:
        retain_weight: weight of the retain loss (``alpha``; 0: the retain set is not looked at).
        forget_weight: weight of the forget loss (``beta``; negative for ascent, 0: not looked at).
        fresh_start: the run starts from a re-initialised model (Retrain).
        noise_sigma: standard deviation of Gaussian noise added to every gradient entry (0: none).
        noise_seed: the seed of the noise generator (parameters in module order, each drawn in its
            own shape); required when ``noise_sigma > 0``.
        ridge: ``ridge(t)``: coefficient ``c_t`` of a penalty ``c_t ||theta||_2^2`` at step ``t``
            (gradient ``2 c_t theta``); ``None``: no such penalty.
        l1: ``l1(t)``: coefficient ``c_t`` of a penalty ``c_t ||theta||_1`` at step ``t`` (gradient
            ``c_t sign(theta)``); ``None``: no such penalty.
        projection: the projection schedule, or ``None``.
    """

    retain_weight: float = 1.0
    forget_weight: float = 0.0
    fresh_start: bool = False
    noise_sigma: float = 0.0
    noise_seed: int | None = None
    ridge: Callable[[int], float] | None = None
    l1: Callable[[int], float] | None = None
    projection: ProjectionSchedule | None = None

    def __post_init__(self) -> None:
        if self.noise_sigma and self.noise_seed is None:
            raise ValueError("a vectorised form with gradient noise needs its noise_seed")


__all__ = ["ProjectionSchedule", "VectorisedForm"]
