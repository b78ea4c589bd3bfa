"""Each registered method's loss / update against the formulas of the paper's Appendix F.1 (as in the authors' reference code), and config validation.

Most checks use plain SGD without weight decay and full batches, so one step is
``theta - lr * grad(loss)`` and the expected loss can be written down directly; a learning rate
of 1e-30 keeps ``theta`` at ``theta*`` (in float32) so the recorded loss values expose the
method's coefficient schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import TwoHeadMLP, classification_problem, params_vector, regression_problem, same_state, state_copy
from torch import nn
from torch.nn import functional as F

import overunlearn.methods.minnorm_og as mnog
from overunlearn import (
    Budget,
    ClassificationTask,
    DataError,
    RegressionTask,
    TensorData,
    UnknownMethodError,
    UnlearningProblem,
    create,
    get_method,
    list_methods,
    unlearn,
)
from overunlearn.engine import StepInfo, UnlearningContext
from overunlearn.methods.minnorm_og import MinNormOGConfig
from overunlearn.methods.uniform import kl_to_uniform
from overunlearn.problem import Batch, as_heads

ALL_METHODS = ["ga", "gd", "kl_unif", "l1_sparse", "minnorm_og", "ngd", "ngp", "npo", "retrain", "ridge", "salun",
               "scrub"]
CLASSIFICATION_ONLY = ["kl_unif", "npo", "salun", "scrub"]
TINY_LR = 1e-30
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


# ---- helpers ----------------------------------------------------------------------------------

def sgd(name: str, lr: float = 0.1, **hyper):
    return create(name, optimizer="sgd", weight_decay=0.0, lr=lr, **hyper)


def run(problem, method, budget=None, seed=0, **kw):
    return unlearn(problem, method, budget or Budget(steps=1), seed=seed, device="cpu", **kw)


def full(data: TensorData) -> Batch:
    return data.take(torch.arange(len(data)))


def J(problem: UnlearningProblem, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The task loss written out by hand: MSE, or cross-entropy summed over heads."""
    out = model(batch.inputs)
    if isinstance(problem.task, RegressionTask):
        return ((out - batch.targets) ** 2).mean()
    return sum(F.cross_entropy(o, t) for o, t in zip(as_heads(out), as_heads(batch.targets), strict=False))


def jval(problem: UnlearningProblem, model: nn.Module, batch: Batch) -> float:
    return float(J(problem, model, batch).detach())


def manual_sgd(model: nn.Module, loss_fn, lr: float) -> torch.Tensor:
    m = copy.deepcopy(model)
    grads = torch.autograd.grad(loss_fn(m), list(m.parameters()))
    with torch.no_grad():
        for p, g in zip(m.parameters(), grads, strict=False):
            p -= lr * g
    return params_vector(m)


def make_ctx(problem, method, planned=1, seed=0, perturb=0.0):
    """A context as the engine builds it; ``perturb`` moves the working model away from theta* after setup."""
    ctx = UnlearningContext(problem, copy.deepcopy(problem.model), torch.device("cpu"), seed, planned, 1)
    method.setup(ctx)
    if perturb:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.add_(perturb * torch.randn(p.shape, generator=g))
    return ctx


def info(step=0, epoch=0, planned=1) -> StepInfo:
    return StepInfo(step, epoch, 0, 1, planned)


def recorded_losses(problem, method, budget, seed=0) -> list[float]:
    losses: list[float] = []
    unlearn(problem, method, budget, seed=seed, device="cpu", on_step=lambda i, v: losses.append(v))
    return losses


def softmax64(z: torch.Tensor) -> np.ndarray:
    z = z.detach().double().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---- registry and configs ---------------------------------------------------------------------

def _builtin(names: list[str]) -> list[str]:
    # other test modules may register methods of their own (e.g. the sweep tests' diverging method)
    return [n for n in names if get_method(n).__module__.startswith("overunlearn.")]


def test_registry_lists_exactly_the_twelve_methods():
    assert _builtin(list_methods()) == sorted(ALL_METHODS)
    assert set(_builtin(list_methods(task="regression"))) == set(ALL_METHODS) - set(CLASSIFICATION_ONLY)
    assert _builtin(list_methods("n*")) == ["ngd", "ngp", "npo"]
    assert create("MinNorm-OG").name == "minnorm_og"


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownMethodError) as exc:
        create("minnorm")
    msg = str(exc.value)
    assert "'minnorm'" in msg
    for name in ALL_METHODS:
        assert name in msg
    assert isinstance(exc.value, KeyError)


def test_create_rejects_unknown_hyperparameter_and_names_the_valid_ones():
    with pytest.raises(ValueError, match="reg_coef") as exc:
        create("gd", reg_coef=0.1)
    assert "lr" in str(exc.value)  # lists the hyperparameters it does have
    with pytest.raises(ValueError, match="noise_sigma"):
        create("ngd", noise_sigma=0.1)


@pytest.mark.parametrize("name, field, value, interval", [
    ("minnorm_og", "reg_coef", 1.5, "[0.0, 1.0]"),
    ("minnorm_og", "reg_coef", -0.1, "[0.0, 1.0]"),
    ("minnorm_og", "reg_coef_decay", 1.2, "[0.0, 1.0]"),
    ("minnorm_og", "proj_pd", 0, "[1, inf)"),
    ("minnorm_og", "grad_sample_size", 0, "[1, inf)"),
    ("ridge", "reg_coef_decay", 2.0, "[0.0, 1.0]"),
    ("npo", "reg_coef", 0.0, "(0.0, inf)"),
    ("ngd", "noise_sig", -1.0, "[0.0, inf)"),
    ("salun", "sparsity", 1.0, "[0.0, 1.0)"),
    ("gd", "lr", 0.0, "(0.0, inf)"),
    ("gd", "lr", float("nan"), "(0.0, inf)"),
])
def test_config_out_of_range_names_field_and_allowed_range(name, field, value, interval):
    with pytest.raises(ValueError) as exc:
        create(name, **{field: value})
    msg = str(exc.value)
    assert field in msg and interval in msg


def test_minnorm_config_direct_construction_is_validated():
    with pytest.raises(ValueError, match=r"reg_coef=1\.5 .*\[0\.0, 1\.0\]"):
        MinNormOGConfig(reg_coef=1.5)
    with pytest.raises(ValueError, match="implementation"):
        MinNormOGConfig(implementation="turbo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        create("kl_unif", direction="sideways")
    with pytest.raises(ValueError, match="optimizer"):
        create("gd", optimizer="adam")


def test_configs_are_frozen_and_replace_revalidates():
    cfg = create("ridge").config
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.reg_coef = 2.0  # type: ignore[misc]
    assert cfg.replace(reg_coef=2.0).reg_coef == 2.0 and cfg.reg_coef == 0.1
    with pytest.raises(ValueError, match="reg_coef_decay"):
        cfg.replace(reg_coef_decay=3.0)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_a_run_never_mutates_the_config(name, cls_problem):
    method = create(name, reg_coef=0.5) if name in ("ridge", "minnorm_og", "l1_sparse", "npo", "scrub") else create(name)
    before = method.config.to_dict()
    res = run(cls_problem, method, Budget(epochs=3))
    assert method.config.to_dict() == before
    assert res.record.config == before
    assert res.record.steps == 3


@pytest.mark.parametrize("name", CLASSIFICATION_ONLY)
def test_classification_only_methods_reject_regression(name, reg_problem):
    before = state_copy(reg_problem.model)
    with pytest.raises(TypeError, match=rf"{name}.*classification"):
        run(reg_problem, create(name), Budget(epochs=2))
    assert same_state(before, state_copy(reg_problem.model))


# ---- GD, GA, NGP ------------------------------------------------------------------------------

def test_gd_step_is_descent_on_retain_loss(reg_problem):
    res = run(reg_problem, sgd("gd", lr=0.05))
    expected = manual_sgd(reg_problem.model, lambda m: J(reg_problem, m, full(reg_problem.retain)), 0.05)
    torch.testing.assert_close(params_vector(res.model), expected)


def test_gd_three_steps_are_three_independent_gradient_steps(reg_problem):
    p = reg_problem
    res = run(p, sgd("gd", lr=0.05), Budget(steps=3))
    model = copy.deepcopy(p.model)
    for _ in range(3):
        torch.nn.utils.vector_to_parameters(manual_sgd(model, lambda m: J(p, m, full(p.retain)), 0.05),
                                            model.parameters())
    torch.testing.assert_close(params_vector(res.model), params_vector(model))


def test_ga_loss_is_negative_forget_loss_and_ascends(reg_problem):
    p = reg_problem
    losses = recorded_losses(p, sgd("ga", lr=TINY_LR), Budget(steps=2))
    jf = jval(p, p.model, full(p.forget))
    assert losses == pytest.approx([-jf, -jf], rel=1e-6)
    res = run(p, sgd("ga", lr=0.05))
    expected = manual_sgd(p.model, lambda m: -J(p, m, full(p.forget)), 0.05)
    torch.testing.assert_close(params_vector(res.model), expected)
    assert jval(p, res.model, full(p.forget)) > jf  # the forget loss went up


@pytest.mark.parametrize("ga_coef", [0.0, 0.3, 2.0])
def test_ngp_is_retain_minus_weighted_forget(cls_problem, ga_coef):
    p = cls_problem
    jr, jf = jval(p, p.model, full(p.retain)), jval(p, p.model, full(p.forget))
    losses = recorded_losses(p, sgd("ngp", lr=TINY_LR, ga_coef=ga_coef), Budget(steps=1))
    assert losses[0] == pytest.approx(jr - ga_coef * jf, rel=1e-5)
    res = run(p, sgd("ngp", lr=0.05, ga_coef=ga_coef))
    expected = manual_sgd(p.model, lambda m: J(p, m, full(p.retain)) - ga_coef * J(p, m, full(p.forget)), 0.05)
    torch.testing.assert_close(params_vector(res.model), expected)


def test_sample_weighted_loss_is_mean_of_weighted_losses():
    p = regression_problem(n_retain=6)
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.0, 1.5])
    weighted = UnlearningProblem(p.model, TensorData(p.retain.inputs, p.retain.targets, w), p.forget, p.task)
    losses = recorded_losses(weighted, sgd("gd", lr=TINY_LR), Budget(steps=1))
    per = ((p.model(p.retain.inputs) - p.retain.targets) ** 2).reshape(-1)
    assert losses[0] == pytest.approx(float((per * w).mean().detach()), rel=1e-6)


# ---- NGD --------------------------------------------------------------------------------------

def test_ngd_adds_standard_gaussian_noise_of_scale_sigma():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 1))  # d = 1501
    base = regression_problem()
    p = UnlearningProblem(model, base.retain, base.forget, base.task)
    sigma = 0.5
    grad_step = manual_sgd(model, lambda m: J(p, m, full(p.retain)), 1.0)  # theta - grad
    theta0 = params_vector(model)
    res = run(p, sgd("ngd", lr=1.0, noise_sig=sigma), seed=4)
    xi = (grad_step - params_vector(res.model)) / sigma  # theta1 = theta0 - grad - sigma * xi
    n = xi.numel()
    assert abs(float(xi.mean())) < 4 / math.sqrt(n)
    assert float(xi.std()) == pytest.approx(1.0, abs=0.08)
    # reproducible per seed, different across seeds
    again = run(p, sgd("ngd", lr=1.0, noise_sig=sigma), seed=4)
    other = run(p, sgd("ngd", lr=1.0, noise_sig=sigma), seed=5)
    assert torch.equal(params_vector(again.model), params_vector(res.model))
    assert not torch.allclose(params_vector(other.model), params_vector(res.model))
    # sigma = 0 is GD
    zero = run(p, sgd("ngd", lr=1.0, noise_sig=0.0))
    torch.testing.assert_close(params_vector(zero.model), grad_step)
    assert not torch.equal(theta0, params_vector(res.model))


# ---- Ridge, L1-Sparse -------------------------------------------------------------------------

def test_ridge_lambda_decays_after_every_step():
    p = regression_problem(n_forget=4, batch_size=2, n_retain=2)  # 2 steps per epoch, full retain batch
    jr = jval(p, p.model, full(p.retain))
    sq = float((params_vector(p.model) ** 2).sum())
    losses = recorded_losses(p, sgd("ridge", lr=TINY_LR, reg_coef=0.3, reg_coef_decay=0.5), Budget(epochs=3))
    lambdas = [(v - jr) / sq for v in losses]
    assert lambdas == pytest.approx([0.3 * 0.5**t for t in range(6)], rel=1e-4)


def test_l1_sparse_schedule_matches_reference():
    """First step: lambda; every later step: (2 - 2 t/T) lambda with t the epoch of the previous step."""
    p = regression_problem(n_forget=4, batch_size=2, n_retain=2)  # 2 steps per epoch
    jr = jval(p, p.model, full(p.retain))
    l1 = float(params_vector(p.model).abs().sum())
    lam, T = 0.2, 3
    losses = recorded_losses(p, sgd("l1_sparse", lr=TINY_LR, reg_coef=lam), Budget(epochs=T))
    coefs = [(v - jr) / l1 for v in losses]
    prev_epochs = [None, 0, 0, 1, 1, 2]  # step 0..5 run in epochs 0,0,1,1,2,2
    expected = [lam] + [(2 - 2 * t / T) * lam for t in prev_epochs[1:]]
    assert coefs == pytest.approx(expected, rel=1e-4)
    assert expected[-1] == pytest.approx(2 * lam / T)


def test_l1_sparse_needs_planned_epochs(reg_problem):
    with pytest.raises(ValueError, match="epochs"):
        run(reg_problem, create("l1_sparse"), Budget(seconds=10.0))


# ---- SCRUB ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, num_gd, kinds", [
    (5, 0, "min max min max min"),
    (5, 1, "min max min max min"),
    (4, 1, "min max min min"),
    (6, 3, "min max min min min min"),
])
def test_scrub_min_max_epoch_alternation(cls_problem, T, num_gd, kinds):
    """At theta = theta* the KL terms vanish: min epochs report J(B_r), max epochs report 0."""
    jr = jval(cls_problem, cls_problem.model, full(cls_problem.retain))
    losses = recorded_losses(cls_problem, sgd("scrub", lr=TINY_LR, num_gd_epochs=num_gd), Budget(epochs=T))
    got = ["min" if v == pytest.approx(jr, rel=1e-5) else "max" if abs(v) < 1e-5 else f"?{v}" for v in losses]
    assert got == kinds.split()


def kl_np(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of KL(p || q)."""
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


def test_scrub_kl_is_teacher_to_student_on_both_phases(cls_problem):
    p = cls_problem
    reg, ga = 0.7, 0.4
    method = sgd("scrub", reg_coef=reg, ga_coef=ga)
    ctx = make_ctx(p, method, planned=3, perturb=0.5)
    r, f = full(p.retain), full(p.forget)

    def kl_sum(x, reverse=False):
        s, t = as_heads(ctx.model(x)), as_heads(p.model(x))
        return sum(kl_np(softmax64(b), softmax64(a)) if reverse else kl_np(softmax64(a), softmax64(b))
                   for a, b in zip(t, s, strict=False))

    min_loss = float(method.loss(ctx, info(epoch=0, planned=3), r, f))
    expected_min = jval(p, ctx.model, r) + reg * kl_sum(r.inputs)
    assert min_loss == pytest.approx(expected_min, rel=1e-5)
    # the wrong direction would give a visibly different value
    assert abs(kl_sum(r.inputs) - kl_sum(r.inputs, reverse=True)) > 1e-3
    max_loss = float(method.loss(ctx, info(epoch=1, planned=3), r, f))
    assert max_loss == pytest.approx(-ga * kl_sum(f.inputs), rel=1e-5)
    # the teacher is the frozen original
    assert all(not q.requires_grad for q in method.teacher.parameters())
    assert same_state(state_copy(method.teacher), state_copy(p.model))


# ---- NPO --------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_matches_direct_numpy_formula(cls_problem, beta):
    p = cls_problem
    method = sgd("npo", reg_coef=beta)
    ctx = make_ctx(p, method, perturb=0.4)
    f = full(p.forget)
    loss = float(method.loss(ctx, info(), full(p.retain), f))
    expected = 0.0
    for s, t, y in zip(as_heads(ctx.model(f.inputs)), as_heads(p.model(f.inputs)), as_heads(f.targets), strict=False):
        pi, pref = softmax64(s), softmax64(t)
        rows = np.arange(len(y))
        ratio = pi[rows, y.numpy()] / pref[rows, y.numpy()]
        expected += 2.0 / beta * np.mean(np.log1p(ratio**beta))
    assert loss == pytest.approx(expected, rel=1e-5)
    # at theta = theta* the ratio is 1: (2 / beta) log 2 per head
    ctx0 = make_ctx(p, sgd("npo", reg_coef=beta))
    assert float(method.loss(ctx0, info(), full(p.retain), f)) == pytest.approx(2 * 2 / beta * math.log(2), rel=1e-5)


def test_npo_ignores_retain_data(cls_problem):
    p = cls_problem
    method = sgd("npo")
    ctx = make_ctx(p, method, perturb=0.3)
    f = full(p.forget)
    a = float(method.loss(ctx, info(), full(p.retain), f))
    b = float(method.loss(ctx, info(), p.retain.take(torch.arange(2)), f))
    assert a == b


# ---- SalUn ------------------------------------------------------------------------------------

def no_hooks(model: nn.Module) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    for q in model.parameters():
        if q._backward_hooks or getattr(q, "_post_accumulate_grad_hooks", None):
            return False
    return True


def _salun_setup(**hyper):
    """A SalUn method after setup, and the |gradient| entries its mask was built from (summed over
    the forget batches in the engine's order)."""
    from overunlearn.batching import forget_epoch

    p = classification_problem(n_forget=6, batch_size=4)  # two forget batches: the gradient is their sum
    method = sgd("salun", **hyper)
    make_ctx(p, method)
    grads = [torch.zeros_like(q) for q in p.model.parameters()]
    for b in forget_epoch(p.forget, p.batch_size, torch.Generator().manual_seed(0)):
        for acc, g in zip(grads, torch.autograd.grad(J(p, p.model, b), list(p.model.parameters())), strict=False):
            acc += g
    mask = torch.cat([m.reshape(-1) for m in method.masks])
    return mask, torch.cat([g.abs().reshape(-1) for g in grads])


def test_salun_mask_is_the_median_of_forget_gradient_magnitudes():
    mask, mags = _salun_setup()
    torch.testing.assert_close(mask, (mags >= mags.median()).float())
    assert 0.45 <= float(mask.mean()) <= 0.55


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.8])
def test_salun_freezes_exactly_the_smallest_sparsity_fraction(sparsity):
    mask, mags = _salun_setup(sparsity=sparsity)
    assert mags.unique().numel() == mags.numel()  # distinct magnitudes: "the k smallest" is well defined
    k = round(sparsity * mags.numel())
    frozen = 1 - mask
    assert int(frozen.sum()) == k
    # the frozen entries are the k smallest magnitudes
    assert torch.equal(frozen.bool(), mags <= mags.sort().values[k - 1])


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_salun_freezes_about_sparsity_fraction_and_leaves_no_hooks(sparsity):
    p = classification_problem(n_retain=12, n_forget=6)
    assert no_hooks(p.model)
    res = run(p, sgd("salun", lr=0.1, sparsity=sparsity, ga_coef=0.5), Budget(epochs=3))
    unchanged = (params_vector(res.model) == params_vector(p.model)).float().mean()
    assert float(unchanged) == pytest.approx(sparsity, abs=0.03)
    assert no_hooks(res.model) and no_hooks(p.model)
    # the returned model trains normally afterwards: every entry receives its gradient
    out = res.model(p.retain.inputs)
    J(p, res.model, full(p.retain)).backward()
    assert all(q.grad is not None and bool((q.grad != 0).any()) for q in res.model.parameters())
    del out


def test_salun_random_labels_are_always_incorrect_and_cover_the_other_classes():
    p = classification_problem(classes=(5, 2))
    method = sgd("salun")
    ctx = make_ctx(p, method)
    f = full(p.forget)
    seen: list[set[int]] = [set(), set()]
    out = ctx.forward(f)
    for _ in range(100):
        new = p.task.random_labels(out, f.targets, ctx.generator)
        for h, (y, z) in enumerate(zip(as_heads(f.targets), as_heads(new), strict=False)):
            assert bool((z != y).all())
            assert int(z.min()) >= 0 and int(z.max()) < (5, 2)[h]
            seen[h].update(int(v) for v in z[y == y[0]])
    y0a, y0b = int(f.targets[0][0]), int(f.targets[1][0])
    assert seen[0] == set(range(5)) - {y0a}
    assert seen[1] == {1 - y0b}


def test_salun_loss_is_retain_plus_weighted_random_label_loss(cls_problem):
    p = cls_problem
    method = sgd("salun", ga_coef=0.3)
    ctx = make_ctx(p, method, perturb=0.2)
    r, f = full(p.retain), full(p.forget)
    state = ctx.generator.get_state()
    loss = float(method.loss(ctx, info(), r, f))
    ctx.generator.set_state(state)
    relabelled = Batch(f.inputs, p.task.random_labels(ctx.forward(f), f.targets, ctx.generator), f.weights)
    expected = jval(p, ctx.model, r) + 0.3 * jval(p, ctx.model, relabelled)
    assert loss == pytest.approx(expected, rel=1e-6)


# ---- KL-Unif ----------------------------------------------------------------------------------

def test_kl_to_uniform_both_directions_match_closed_forms():
    torch.manual_seed(1)
    z = torch.randn(7, 6, dtype=torch.float64) * 2
    p = softmax64(z)
    k = z.shape[1]
    entropy = -(p * np.log(p)).sum(axis=1)
    np.testing.assert_allclose(kl_to_uniform(z, "model_to_uniform").numpy(), math.log(k) - entropy, rtol=1e-10)
    u = np.full_like(p, 1 / k)
    np.testing.assert_allclose(kl_to_uniform(z, "uniform_to_model").numpy(),
                               (u * (np.log(u) - np.log(p))).sum(axis=1), rtol=1e-10)
    # uniform_to_model is what F.kl_div(log_softmax(z), 1/K) computes
    torch.testing.assert_close(kl_to_uniform(z, "uniform_to_model"),
                               F.kl_div(F.log_softmax(z, 1), torch.full_like(z, 1 / k), reduction="none").sum(1))
    # both vanish at uniform logits
    assert kl_to_uniform(torch.zeros(2, 4), "model_to_uniform").abs().max() < 1e-6
    assert kl_to_uniform(torch.zeros(2, 4), "uniform_to_model").abs().max() < 1e-6


@pytest.mark.parametrize("direction", ["model_to_uniform", "uniform_to_model"])
def test_kl_unif_loss(cls_problem, direction):
    p = cls_problem
    method = sgd("kl_unif", kl_coef=0.6, direction=direction)
    ctx = make_ctx(p, method, perturb=0.3)
    r, f = full(p.retain), full(p.forget)
    loss = float(method.loss(ctx, info(), r, f))
    kl = 0.0
    for h in as_heads(ctx.model(f.inputs)):
        q = softmax64(h)
        u = np.full_like(q, 1 / q.shape[1])
        kl += kl_np(q, u) if direction == "model_to_uniform" else kl_np(u, q)
    assert loss == pytest.approx(jval(p, ctx.model, r) + 0.6 * kl, rel=1e-5)


# ---- MinNorm-OG -------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["project_then_descend", "descend_then_project"])
def test_minnorm_projects_in_the_right_epochs_with_decaying_coefficients(monkeypatch, order):
    events: list[tuple] = []

    def fake_projection(model, batch, score_fn, strata, coef, n_pert, generator, jacobian, implementation,
                        with_targets=False, anchor=None):
        events.append(("proj", coef))
        return 0.0

    monkeypatch.setattr(mnog, "minnorm_projection_step", fake_projection)
    p = regression_problem(n_forget=4, batch_size=2, n_retain=2)  # 2 steps per epoch
    T, num_gd, pd = 7, 3, 2
    method = sgd("minnorm_og", lr=TINY_LR, reg_coef=0.8, reg_coef_decay=0.5, num_gd_epochs=num_gd, proj_pd=pd,
                 order=order)
    descent_loss = method.loss

    def loss(ctx, info, retain, forget):
        events.append(("loss", info.epoch))
        return descent_loss(ctx, info, retain, forget)

    method.loss = loss  # type: ignore[method-assign]
    unlearn(p, method, Budget(epochs=T), device="cpu")
    assert sum(e[0] == "loss" for e in events) == 2 * T
    projected_epochs = []
    for i, e in enumerate(events):
        if e[0] != "proj":
            continue
        # project_then_descend: the projection precedes its step's loss; descend_then_project: follows it
        j = i + 1 if order == "project_then_descend" else i - 1
        assert events[j][0] == "loss"
        projected_epochs.append(events[j][1])
    assert projected_epochs == [0, 0, 2, 2]  # t < T - num_gd = 4 and t % 2 == 0 (epoch 4 excluded)
    coefs = [e[1] for e in events if e[0] == "proj"]
    assert coefs == pytest.approx([0.8 * 0.5**k for k in range(4)])
    assert method.config.reg_coef == 0.8


def test_minnorm_without_planned_epochs_projects_every_epoch(monkeypatch, reg_problem):
    calls = []
    monkeypatch.setattr(mnog, "minnorm_projection_step", lambda *a, **k: calls.append(a[4]) or 0.0)
    run(reg_problem, sgd("minnorm_og", lr=TINY_LR, reg_coef=1.0, reg_coef_decay=0.9), Budget(steps=3))
    assert calls == pytest.approx([1.0, 0.9, 0.81])
    with pytest.raises(ValueError, match="epochs"):
        run(reg_problem, create("minnorm_og", num_gd_epochs=1), Budget(seconds=5.0))


def linear_interpolation_problem(seed=0, n_r=4, n_f=2, m=10):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_r + n_f, m, generator=g, dtype=torch.float64)
    y = torch.randn(n_r + n_f, generator=g, dtype=torch.float64)
    theta_mn = torch.linalg.pinv(X) @ y
    kernel = torch.eye(m, dtype=torch.float64) - torch.linalg.pinv(X) @ X
    theta_star = theta_mn + kernel @ torch.randn(m, generator=g, dtype=torch.float64)  # some interpolator of D
    model = nn.Linear(m, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(theta_star.float().unsqueeze(0))
    Xr, yr = X[:n_r], y[:n_r]
    problem = UnlearningProblem(model, TensorData(Xr.float(), yr.float().unsqueeze(1)),
                                TensorData(X[n_r:].float(), y[n_r:].float().unsqueeze(1)), RegressionTask())
    return problem, theta_star, torch.linalg.pinv(Xr) @ yr, Xr


@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_minnorm_one_full_projection_recovers_min_norm_retain_interpolator(implementation):
    """Theorem 2 / Lemma 5: reg_coef = 1 with all retain gradients gives X_r^+ y_r in one step."""
    problem, theta_star, theta_r, _ = linear_interpolation_problem()
    res = run(problem, sgd("minnorm_og", lr=TINY_LR, reg_coef=1.0, implementation=implementation))
    got = res.model.weight.detach().double().reshape(-1)
    assert float((theta_star - theta_r).norm()) > 0.1  # the test can fail
    torch.testing.assert_close(got, theta_r, atol=1e-5, rtol=1e-5)


def test_minnorm_partial_projection_shrinks_only_the_orthogonal_component():
    problem, theta_star, theta_r, Xr = linear_interpolation_problem(seed=3)
    res = run(problem, sgd("minnorm_og", lr=TINY_LR, reg_coef=0.5))
    P = torch.linalg.pinv(Xr) @ Xr
    expected = P @ theta_star + 0.5 * (theta_star - P @ theta_star)
    torch.testing.assert_close(res.model.weight.detach().double().reshape(-1), expected, atol=1e-5, rtol=1e-5)


def test_minnorm_fast_and_reference_runs_agree(cls_problem):
    fast = run(cls_problem, sgd("minnorm_og", reg_coef=0.5, grad_sample_size=5), Budget(epochs=3), seed=2)
    ref = run(cls_problem, sgd("minnorm_og", reg_coef=0.5, grad_sample_size=5, implementation="reference"),
              Budget(epochs=3), seed=2)
    torch.testing.assert_close(params_vector(fast.model), params_vector(ref.model), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(params_vector(fast.model), params_vector(cls_problem.model))


# ---- Retrain ----------------------------------------------------------------------------------

def test_retrain_starts_from_make_model_under_the_run_seed():
    base = regression_problem()
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))  # noqa: E731
    p = UnlearningProblem(base.model, base.retain, base.forget, base.task, make_model=make)
    res = run(p, sgd("retrain", lr=TINY_LR), seed=7)
    torch.manual_seed(7)
    fresh = make()
    torch.testing.assert_close(params_vector(res.model), params_vector(fresh))
    assert not torch.allclose(params_vector(res.model), params_vector(p.model))


def test_retrain_reset_parameters_is_seeded_and_ignores_global_rng(reg_problem):
    torch.manual_seed(1)
    a = run(reg_problem, sgd("retrain", lr=TINY_LR), seed=3)
    torch.manual_seed(2)
    torch.rand(10)
    b = run(reg_problem, sgd("retrain", lr=TINY_LR), seed=3)
    c = run(reg_problem, sgd("retrain", lr=TINY_LR), seed=4)
    va, vb, vc = (params_vector(r.model) for r in (a, b, c))
    assert torch.equal(va, vb)
    assert not torch.allclose(va, vc)
    assert not torch.allclose(va, params_vector(reg_problem.model))


def test_retrain_refuses_parameters_it_cannot_reset_unless_given_an_init_fn(reg_problem):
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(3, 1)
            self.scale = nn.Parameter(torch.tensor(2.0))  # no module resets this one

        def forward(self, x):
            return self.scale * self.body(x)

    model = Scaled()
    p = UnlearningProblem(model, reg_problem.retain, reg_problem.forget, reg_problem.task)
    with pytest.raises(DataError, match=r"1 trainable parameter.*scale.*init_fn"):
        run(p, sgd("retrain", lr=TINY_LR), Budget(steps=1))

    def init_fn(m):
        if isinstance(m, Scaled):
            nn.init.ones_(m.scale)

    p2 = UnlearningProblem(model, reg_problem.retain, reg_problem.forget, reg_problem.task, init_fn=init_fn)
    res = unlearn(p2, sgd("retrain", lr=TINY_LR), Budget(steps=0), device="cpu")
    assert float(res.model.scale) == 1.0 and float(model.scale) == 2.0
    assert not torch.equal(res.model.body.weight, model.body.weight)
    frozen = Scaled()
    frozen.scale.requires_grad_(False)  # a frozen parameter needs no reset and keeps its value
    p3 = UnlearningProblem(frozen, reg_problem.retain, reg_problem.forget, reg_problem.task)
    assert float(unlearn(p3, sgd("retrain", lr=TINY_LR), Budget(steps=0), device="cpu").model.scale) == 2.0
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")  # a model every module of which can reset: no warning
        run(reg_problem, sgd("retrain", lr=TINY_LR), Budget(steps=1))


def test_retrain_then_trains_on_retain(reg_problem):
    make = lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))  # noqa: E731
    p = UnlearningProblem(reg_problem.model, reg_problem.retain, reg_problem.forget, reg_problem.task, make_model=make)
    res = run(p, sgd("retrain", lr=0.05), seed=7)
    torch.manual_seed(7)
    fresh = make()
    expected = manual_sgd(fresh, lambda m: J(p, m, full(p.retain)), 0.05)
    torch.testing.assert_close(params_vector(res.model), expected)


def test_classification_task_loss_sums_heads(cls_problem):
    p = cls_problem
    losses = recorded_losses(p, sgd("gd", lr=TINY_LR), Budget(steps=1))
    out = p.model(p.retain.inputs)
    ce = [float(F.cross_entropy(o, t)) for o, t in zip(out, p.retain.targets, strict=False)]
    assert losses[0] == pytest.approx(sum(ce), rel=1e-6)
    assert isinstance(p.task, ClassificationTask)
    assert isinstance(TwoHeadMLP()(torch.zeros(1, 4)), tuple)


# ---- MinNorm-OG's factored fast path (linear layers never materialised) ----------------------

class _Mixed(nn.Module):
    """Conv + BatchNorm + in-place ReLU + bias-free and frozen linear layers + two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm1d(12)
        self.fc = nn.Linear(12, 16, bias=False)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.relu = nn.ReLU(inplace=True)
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 3)

    def forward(self, x):
        h = self.relu(self.fc(self.bn(self.conv(x).flatten(1))))
        h = torch.tanh(self.frozen(h))
        return self.a(h), self.b(h)


class _Shared(nn.Module):
    """A linear layer applied twice and one applied to a sequence: the factored path must decline."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.seq = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(torch.tanh(self.lin(x))))
        h = torch.tanh(self.seq(h.unsqueeze(1).expand(-1, 3, -1))).mean(1)
        return self.out(h)


class _SmallResNet(nn.Module):
    """Convolutions of every kind the factored path handles: padding, stride, dilation, bias or not,
    a 1x1 shortcut, eval-mode BatchNorm2d, in-place ReLU, a residual sum, two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.dil = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.short = nn.Conv2d(4, 6, 1, stride=2)
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        h = self.relu(self.bn(self.stem(x)))
        r = self.dil(torch.tanh(self.down(h))) + self.short(h)
        z = torch.tanh(r).mean(dim=(2, 3))
        return self.a(z), self.b(z)


class _Uncovered(nn.Module):
    """Hooked layers next to parameters the hooks do not cover (LayerNorm, a bare scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.fc = nn.Linear(8, 24)
        self.a, self.b = nn.Linear(24, 3), nn.Linear(24, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x).mean(dim=(2, 3))) * self.scale)
        h = torch.tanh(self.fc(h))
        return self.a(h), self.b(h)


class _SharedRow(nn.Module):
    """A linear layer applied to a learned row shared by all samples (its output does not depend on
    the input): its per-sample gradients are not outer products of per-sample factors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16)
        self.row = nn.Parameter(torch.randn(1, 3))
        self.shared = nn.Linear(3, 16)
        self.a, self.b = nn.Linear(16, 3), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x) + self.shared(self.row))
        return self.a(h), self.b(h)


@pytest.mark.parametrize("make, shape, task", [
    (lambda: _Uncovered(), (5, 2, 5, 5), ClassificationTask()),
    (lambda: _SharedRow(), (6, 4), ClassificationTask()),
    (lambda: _Mixed(), (6, 2, 4, 4), ClassificationTask()),
    (lambda: _SmallResNet(), (5, 2, 6, 6), ClassificationTask()),
    (lambda: nn.Sequential(nn.Linear(3, 40), nn.SiLU(), nn.Linear(40, 40), nn.SiLU(), nn.Linear(40, 1)), (7, 3),
     RegressionTask()),
    (lambda: _Shared(), (6, 5), ClassificationTask()),
    (lambda: TwoHeadMLP(4, 32, (5, 3)), (5, 4), ClassificationTask()),
])
@pytest.mark.parametrize("mode", ["per_sample", "batch_train"])
def test_factored_projection_equals_materialised_and_qr(make, shape, task, mode):
    from overunlearn.linalg.jacobian import output_jacobian, output_jacobian_reference
    from overunlearn.linalg.projection import project_model_onto_span, project_onto_span, project_onto_span_qr

    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        model.train()
        model(torch.randn(*shape) * 2 + 0.5)
    model.train()
    before = state_copy(model)
    x = torch.randn(*shape)
    v = torch.cat([q.detach().reshape(-1) for q in model.parameters() if q.requires_grad])
    got = project_model_onto_span(model, x, task.scores, v, mode=mode)
    dense = project_onto_span(output_jacobian(model, x, task.scores, mode=mode), v)
    qr = project_onto_span_qr(output_jacobian_reference(model, x, task.scores, mode=mode), v)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6 * float(v.norm()))
    torch.testing.assert_close(got, qr, rtol=1e-5, atol=1e-5 * float(v.norm()))
    assert float(got.norm()) > 1e-3 * float(v.norm())  # a real projection, not zero
    assert same_state(before, state_copy(model)) and model.training and no_hooks(model)


@pytest.mark.parametrize("ghost", [True, False])
def test_factored_convolutions_equal_materialised_and_qr(monkeypatch, ghost):
    # every convolution through the ghost Gram (or none), whatever the cost rule says
    import overunlearn.linalg.projection as P
    from overunlearn.linalg.jacobian import output_jacobian
    from overunlearn.linalg.projection import project_model_onto_span, project_onto_span

    monkeypatch.setattr(P, "_conv_factored_cheaper", lambda *a: ghost)
    monkeypatch.setattr(P, "_MIN_FACTORED_FRACTION", 0.0)
    torch.manual_seed(1)
    model = _SmallResNet()
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 2, 6, 6) * 2 + 0.5)
    layers, ghosts = P._factored_layers(model, torch.randn(4, 2, 6, 6), [q for q in model.parameters()], 2)
    assert len(ghosts) == (4 if ghost else 0)
    assert {id(q) for m in layers for q in m.parameters(recurse=False)} == {id(q) for q in model.parameters()}
    task = ClassificationTask()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    model = model.double()
    v = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    got = project_model_onto_span(model, x, task.scores, v)
    dense = project_onto_span(output_jacobian(model, x, task.scores), v)
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-10 * float(v.norm()))
    assert float(got.norm()) > 1e-3 * float(v.norm())


def test_factored_path_picks_the_late_convolutions_of_a_cifar_resnet18():
    # the cost rule on the model of performance case (c): ResNet-18 on 32x32 inputs, k = 50 samples
    # x 2 heads: layer4's 3x3 convolutions (4x4 outputs) and its 1x1 shortcut go through the ghost
    # Gram, the larger feature maps of layers 1-3 stay materialised
    import overunlearn.linalg.projection as P
    from overunlearn.models.resnet import two_head_resnet18

    model = two_head_resnet18(num_classes=10, color_classes=3).eval()
    params = [q for q in model.parameters() if q.requires_grad]
    layers, ghosts = P._factored_layers(model, torch.randn(50, 3, 32, 32), params, 2)
    names = {m: n for n, m in model.named_modules()}
    convs = sorted(names[m] for m in ghosts)
    assert convs and all("layer4" in c for c in convs), convs
    assert len(convs) == 5  # four 3x3 convolutions and the downsampling shortcut
    assert sum(q.numel() for m in ghosts for q in m.parameters()) > 0.7 * sum(q.numel() for q in params)
    # every other parameter (convolutions, BatchNorm, heads) is hooked too: no vmapped Jacobian
    assert {id(q) for m in layers for q in m.parameters(recurse=False)} == {id(q) for q in params}


@pytest.mark.parametrize("cfg", [dict(kernel_size=3), dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2),
                                 dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=1, stride=2),
                                 dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))])
def test_conv_patches_equal_unfold(cfg):
    from overunlearn.linalg.projection import _patches

    conv = nn.Conv2d(3, 4, **cfg)
    a = torch.randn(5, 3, 9, 8)
    ref = F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    got = _patches(a, conv)
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert got.shape[2] == conv(a).shape[2] * conv(a).shape[3]


# ---- models the hooked projection must not get wrong (found by a review): each must equal the
# vmapped Jacobian's projection, through the hooked path or by declining it

class _Tied(nn.Module):
    """A tied autoencoder: the encoder's weight is used again outside its layer."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.db = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.db)


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Proto(nn.Module):
    """A linear layer applied to 5 learned prototypes: as many rows as samples, but not per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 6)
        self.protos = nn.Parameter(torch.randn(5, 3))
        self.proj = nn.Linear(3, 6)

    def forward(self, x):
        return torch.tanh(self.f(x)) @ self.proj(self.protos).T


class _Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(input=x)


class _Centred(nn.Module):
    """Mixes the batch (subtracts its mean) without any BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))


def _pruned_conv():
    import torch.nn.utils.prune as prune

    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2))
    prune.l1_unstructured(m[0], "weight", 0.5)
    return m


def _weight_normed():
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    torch.nn.utils.parametrizations.weight_norm(m[0])
    return m


def _hooked_output():
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    m[0].register_forward_hook(lambda mod, a, o: o * 3)
    return m


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over weight_norm
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Tanh(),
                           nn.Flatten(), nn.Linear(48, 2)), (4, 2, 6, 6)),
    (_Tied, (5, 6)),
    (lambda: nn.Sequential(_Scaled(4, 8), nn.Tanh(), nn.Linear(8, 2)), (5, 4)),
    (_weight_normed, (5, 4)),
    (_pruned_conv, (4, 2, 6, 6)),
    (_hooked_output, (5, 4)),
    (_Proto, (5, 4)),
    (_Keyword, (5, 4)),
    (lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)), (5, 4)),
    (_Centred, (5, 4)),
])
def test_hooked_projection_is_right_or_declines(make, shape):
    from overunlearn.linalg.jacobian import output_jacobian
    from overunlearn.linalg.projection import project_model_onto_span, project_onto_span

    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    x_before = x.clone()
    scores = lambda out: out  # noqa: E731  (one score per output column)
    v = torch.randn(sum(q.numel() for q in model.parameters() if q.requires_grad), dtype=torch.float64)
    before = state_copy(model)
    for _ in range(2):  # the second call uses the memo of the first call's check
        got = project_model_onto_span(model, x, scores, v)
        ref = project_onto_span(output_jacobian(model, x, scores), v)
        assert float((got - ref).norm() / ref.norm()) < 1e-9
    assert torch.equal(x, x_before)  # in-place ops in the model never reach the caller's tensor
    assert same_state(before, state_copy(model))


def test_categorical_means_are_per_example_whatever_the_row_count():
    from overunlearn.methods.base import mean_over_examples
    from overunlearn.problem import Categorical

    # three examples: two scored tokens, none, one -- as many rows as examples, but not one row each
    cat = Categorical(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 2]), 3)
    assert float(mean_over_examples(cat, torch.tensor([1.0, 3.0, 10.0]))) == pytest.approx((2.0 + 10.0) / 2)
    one_each = Categorical(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.arange(3), 3, per_example=True)
    assert float(mean_over_examples(one_each, torch.tensor([1.0, 3.0, 10.0]))) == pytest.approx(14.0 / 3)


def test_a_task_whose_scores_take_only_the_outputs_still_works_with_minnorm():
    from overunlearn.methods.minnorm_og import takes_targets

    class OldStyle(RegressionTask):
        def scores(self, outputs):  # written before scores took the targets
            return outputs.reshape(outputs.shape[0], -1)

    base = regression_problem()
    p = UnlearningProblem(base.model, base.retain, base.forget, OldStyle())
    assert not takes_targets(p.task.scores) and takes_targets(RegressionTask().scores)
    assert unlearn(p, create("minnorm_og", reg_coef=0.05), Budget(steps=2), device="cpu").record.steps == 2


# ---- MinNorm-OG's anchor ------------------------------------------------------------------------------------

def test_minnorm_step_with_an_anchor_shrinks_the_difference_inside_the_complement():
    """``theta <- theta - c P_perp(theta - a)``: with ``a = 0`` the paper's step; the change is orthogonal to every
    sampled output gradient, and the anchored step equals the formula computed with the vmapped Jacobian."""
    from overunlearn.linalg.jacobian import output_jacobian
    from overunlearn.linalg.projection import project_onto_span
    from overunlearn.methods.minnorm_og import minnorm_projection_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    batch = Batch(x, torch.zeros(6, 1, dtype=torch.float64))
    task = RegressionTask()
    params = [p for p in model.parameters()]
    anchor = [torch.randn_like(p) for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    a = torch.cat([t.reshape(-1) for t in anchor])
    jac = output_jacobian(model, x, task.scores)
    for given, centre in ((None, torch.zeros_like(theta)), ([torch.zeros_like(p) for p in params], torch.zeros_like(theta)),
                          (anchor, a)):
        m = copy.deepcopy(model)
        minnorm_projection_step(m, batch, task.scores, None, 0.3, 6, torch.Generator().manual_seed(0), anchor=given)
        got = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        v = theta - centre
        expected = theta - 0.3 * (v - project_onto_span(jac, v))
        assert float((got - expected).abs().max()) < 1e-10
        assert float((jac @ (got - theta)).abs().max()) < 1e-9  # outputs fixed to first order


def test_minnorm_anchors_are_the_init_mean_or_retrains_starting_point():
    from overunlearn.engine import reinitialise_trainable
    from overunlearn.initialisation import init_draw, init_mean

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # trained values, far from any init
    data = TensorData(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    problem = UnlearningProblem(model, data, data, ClassificationTask())
    mean = init_mean(problem, model)
    names = [n for n, _ in model.named_parameters()]
    by_name = dict(zip(names, mean))
    assert torch.equal(by_name["1.weight"], torch.ones(8)) and torch.equal(by_name["1.bias"], torch.zeros(8))
    assert all(float(by_name[n].abs().max()) == 0.0 for n in ("0.weight", "0.bias", "3.weight", "3.bias"))
    draw = init_draw(problem, model, seed=5)
    fresh = reinitialise_trainable(problem, copy.deepcopy(model), 5)
    assert all(torch.equal(d, q) for d, q in zip(draw, fresh.parameters()))
    # a benchmark's make_model builds the same model at every call: init_mean does not read it
    fixed = UnlearningProblem(model, data, data, ClassificationTask(), make_model=lambda: copy.deepcopy(fresh))
    assert float(init_mean(fixed, model)[0].abs().max()) == 0.0


@pytest.mark.filterwarnings("ignore:minnorm_og. projection 0 removed")
def test_minnorm_anchor_option_runs_and_is_not_vectorised():
    problem = classification_problem(seed=1)
    for anchor in ("init_mean", "init"):
        method = create("minnorm_og", reg_coef=0.2, anchor=anchor, grad_sample_size=8)
        assert method.vectorised(2, 0) is None and "anchor='zero'" in method.why_not_vectorised()
        out = unlearn(problem, method, Budget(epochs=1), device="cpu").model
        assert all(torch.isfinite(p).all() for p in out.parameters())
    assert create("minnorm_og").vectorised(2, 0) is not None
    with pytest.raises(ValueError, match="anchor='one' is not one of"):
        create("minnorm_og", anchor="one")


def test_init_mean_in_half_precision_and_its_errors_name_the_anchor():
    from overunlearn.initialisation import cpu_copy, init_mean

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).bfloat16()
    data = TensorData(torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16())
    problem = UnlearningProblem(model, data, data, RegressionTask())
    mean = init_mean(problem, model)
    assert float(mean[0].abs().max()) == 0.0  # two bfloat16 draws of a weight agreed by chance at ~0.1% of entries
    assert mean[0].dtype == torch.bfloat16 and torch.equal(mean[2], torch.ones(64, dtype=torch.bfloat16))

    class Bare(nn.Module):  # a parameter no module can re-initialise
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):  # noqa: ANN001, ANN201
            return x * self.w

    bare = Bare()
    d3 = TensorData(torch.randn(4, 3), torch.randn(4, 3))
    p = UnlearningProblem(bare, d3, d3, RegressionTask(), make_model=Bare)
    with pytest.raises(DataError, match=r"MinNorm-OG's anchor='init_mean': 1 trainable parameter.*init_fn=\.\.\.\) \(called "
                                        r"on every module\), or freeze"):
        init_mean(p, bare)
    # the CPU copy shares tied parameters as the model does
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    twin = cpu_copy(tied)
    assert twin[1].weight is twin[0].weight and twin[0].weight is not tied[0].weight
    assert torch.equal(twin[0].weight, tied[0].weight)
