"""Tests the mutation run of issue 19 found missing: KLoM clips the oracle's margins too; SCRUB's
teacher_mode matters on a BatchNorm model; the Gram solve's eigenvalue cut-off is relative (the
projection does not change when the Jacobian is scaled by 1e6 or 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from overunlearn import Budget, ClassificationTask, TensorData, UnlearningProblem, create, unlearn
from overunlearn.linalg.projection import project_onto_span, project_onto_span_qr, solve_gram
from overunlearn.metrics.klom import klom_values

# ---- KLoM: the oracle's margins are clipped as well ----------------------------------------------------


def test_klom_clips_confident_oracle_margins():
    """Unlearned margins just past the clip and confident oracles far past it are the same after clipping
    (KLoM 0); unclipped oracles would stretch the shared bins and put the two samples in opposite end
    bins (KLoM = log(1 / eps) = 11.5)."""
    rng = np.random.default_rng(0)
    unlearned = 100.0 + rng.uniform(1.0, 50.0, size=(16, 8))
    oracle = rng.uniform(1e3, 1e4, size=(16, 8))
    assert np.allclose(klom_values(unlearned, oracle), 0.0)
    assert np.allclose(klom_values(-unlearned, -oracle), 0.0)
    unclipped = klom_values(unlearned, oracle, clip=np.inf)
    assert np.all(unclipped > 11.0)  # what dropping the oracle's clip gives


def test_klom_clip_of_the_oracle_changes_a_mixed_histogram():
    """Half the oracles are confident (margin 1e4): clipped to 100, they share the unlearned models' top bin."""
    rng = np.random.default_rng(1)
    unlearned = np.concatenate([rng.normal(0.0, 1.0, size=(10, 5)), np.full((10, 5), 100.0)])
    oracle = np.concatenate([rng.normal(0.0, 1.0, size=(10, 5)), np.full((10, 5), 1e4)])
    clipped = klom_values(unlearned, oracle)
    by_hand = klom_values(unlearned, np.clip(oracle, -100.0, 100.0), clip=np.inf)
    assert np.allclose(clipped, by_hand)
    assert np.all(clipped < 1e-12) and np.all(klom_values(unlearned, oracle, clip=np.inf) > 0.5)


# ---- SCRUB: teacher_mode on a BatchNorm model --------------------------------------------------------------


def _bn_problem() -> UnlearningProblem:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(48, 4, generator=g) * 2.0 + 1.0  # batch statistics far from the running (0, 1)
    y = torch.randint(0, 3, (48,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # a few steps: the running statistics lag behind the batch statistics
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return UnlearningProblem(model, TensorData(x[:36], y[:36]), TensorData(x[36:], y[36:]), ClassificationTask(),
                             batch_size=12)


def _scrub(problem: UnlearningProblem, mode: str) -> torch.Tensor:
    method = create("scrub", lr=1e-2, reg_coef=1.0, ga_coef=0.5, teacher_mode=mode)
    model = unlearn(problem, method, Budget(epochs=2), seed=3, device="cpu").model
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_scrub_teacher_mode_changes_the_result_on_a_batchnorm_model():
    problem = _bn_problem()
    train, train_again, evaluated = _scrub(problem, "train"), _scrub(problem, "train"), _scrub(problem, "eval")
    assert torch.equal(train, train_again)  # deterministic, so the difference below is the mode's
    assert not torch.allclose(train, evaluated, atol=1e-6)


def test_scrub_teacher_mode_is_irrelevant_without_batchnorm_or_dropout():
    problem = _bn_problem()
    problem.model[1] = nn.Identity()
    assert torch.equal(_scrub(problem, "train"), _scrub(problem, "eval"))


# ---- the Gram solve's cut-off is relative -----------------------------------------------------------------


def _rank_deficient_jacobian() -> tuple[torch.Tensor, torch.Tensor]:
    """A (6, 40) Jacobian of rank 3 (singular values 1, 0.3, 1e-3; three rows are combinations of the
    others) and a vector to project."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))
    jac = u @ torch.diag(torch.tensor([1.0, 0.3, 1e-3], dtype=torch.float64)) @ v.T
    return jac, torch.randn(40, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_projection_does_not_change_when_the_jacobian_is_scaled(scale):
    jac, v = _rank_deficient_jacobian()
    reference = project_onto_span_qr(jac[:3], v)  # the first three rows span the row space
    base = project_onto_span(jac, v)
    scaled = project_onto_span(jac * scale, v)
    assert torch.allclose(base, reference, rtol=1e-6, atol=1e-9)
    assert torch.allclose(scaled, base, rtol=1e-6, atol=1e-9), float((scaled - base).abs().max())


@pytest.mark.parametrize("scale", [1e6, 1e-6])
def test_solve_gram_cuts_eigenvalues_relative_to_the_largest(scale):
    jac, v = _rank_deficient_jacobian()
    gram, rhs = jac @ jac.T, jac @ v
    alpha = solve_gram(gram, rhs)
    alpha_scaled = solve_gram(gram * scale**2, rhs * scale)
    # G (s J) = s^2 G and (s J) v = s J v, so the minimum-norm solution scales by 1 / s
    assert torch.allclose(alpha_scaled * scale, alpha, rtol=1e-6, atol=1e-9)
    assert torch.allclose(jac.T @ alpha, project_onto_span_qr(jac[:3], v), rtol=1e-6, atol=1e-9)
