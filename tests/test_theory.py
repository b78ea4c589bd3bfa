"""The mathematics of the paper, checked numerically (Theorems 1-5, Lemmas 1, 5, 6, Propositions 1-2; Appendices D.4.1, E, F.1.10).

Every test compares the library (MinNorm-OG's projection step, the engine, the
baselines) or an oracle in :mod:`overunlearn.theory` against an independent
characterisation: a definition (interpolation + membership in a span), a generic
solver (KKT system), an explicit formula from the paper, or a contrast case that
must fail. All computations are float64; tolerances are relative and stated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from overunlearn import Budget, RegressionTask, TensorData, UnlearningProblem, create, unlearn
from overunlearn.linalg.jacobian import output_jacobian, output_jacobian_reference
from overunlearn.methods.minnorm_og import MinNormOG, minnorm_projection_step
from overunlearn.problem import Batch
from overunlearn.theory import linear as lin
from overunlearn.theory import linear_network as lnet
from overunlearn.theory import two_layer as tl

TASK = RegressionTask()


# ---------------------------------------------------------------------------- helpers

def linear_model(theta: np.ndarray, bias: bool) -> nn.Linear:
    """``nn.Linear(m, 1)`` in float64 holding ``theta = [w; b]`` (``b`` only with ``bias``)."""
    m = theta.shape[0] - int(bias)
    model = nn.Linear(m, 1, bias=bias).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:m]).reshape(1, m))
        if bias:
            model.bias.copy_(torch.from_numpy(theta[m:]))
    return model


def params_of(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).numpy().copy()


def tdata(X: np.ndarray, y: np.ndarray) -> TensorData:
    return TensorData(torch.from_numpy(X), torch.from_numpy(y).reshape(-1, 1))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class LinearSetup:
    """An overparameterised regression problem ``n_r + n_f < m`` with an interpolating ``theta^*``."""

    def __init__(self, seed: int = 0, m: int = 30, n_r: int = 6, n_f: int = 4, bias: bool = True,
                 null_scale: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.bias = bias
        self.X_r = rng.standard_normal((n_r, m))
        self.X_f = rng.standard_normal((n_f, m)) + 2.0  # off-centre so the forget inputs are far from S_r
        self.y_r = rng.standard_normal(n_r)
        self.y_f = rng.standard_normal(n_f) + 3.0
        self.X = np.vstack([self.X_r, self.X_f])
        self.y = np.concatenate([self.y_r, self.y_f])
        # any interpolator of D (Lemma 4): min-norm one plus a kernel component
        self.theta_star = lin.random_interpolator(self.X, self.y, rng, scale=null_scale, bias=bias)
        # the unlearning target (Lemma 5 / Theorem 2)
        self.theta_r = np.linalg.pinv(lin.augment(self.X_r) if bias else self.X_r) @ self.y_r

    def design_r(self) -> np.ndarray:
        return lin.augment(self.X_r) if self.bias else self.X_r

    def perp(self, theta: np.ndarray) -> np.ndarray:
        return lin.project_onto_complement(self.X_r, theta, bias=self.bias)

    def problem(self, theta: np.ndarray | None = None, batch_size: int = 64) -> UnlearningProblem:
        model = linear_model(self.theta_star if theta is None else theta, self.bias)
        return UnlearningProblem(model, tdata(self.X_r, self.y_r), tdata(self.X_f, self.y_f), TASK,
                                 batch_size=batch_size)


def stable_lr(A: np.ndarray) -> float:
    """``1 / L`` for the MSE ``(1/n) ||A theta - y||^2`` (``L = 2 sigma_max(A)^2 / n``).

    The descent steps in these tests are zero in exact arithmetic; a stable step size keeps
    GD from amplifying their round-off (an unstable one multiplies it by ``|1 - lr L|`` per step).
    """
    return A.shape[0] / (2.0 * np.linalg.norm(A, 2) ** 2)


def loss_gradient(model: nn.Module, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``grad_theta J(theta; D)`` with the task's MSE, through autograd."""
    model.zero_grad()
    out = model(torch.from_numpy(X))
    TASK.per_sample_loss(out, torch.from_numpy(y).reshape(-1, 1)).mean().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


# ------------------------------------------------------------------ 1. Theorem 1

@pytest.mark.parametrize("null_scale", [0.0, 1.0])
def test_theorem1_loss_gradients_vanish_at_any_interpolator(null_scale):
    s = LinearSetup(seed=1, null_scale=null_scale)
    model = linear_model(s.theta_star, s.bias)
    scale = np.linalg.norm(s.theta_star) * np.linalg.norm(s.X, 2) ** 2
    assert np.linalg.norm(loss_gradient(model, s.X_r, s.y_r)) < 1e-12 * scale
    assert np.linalg.norm(loss_gradient(model, s.X_f, s.y_f)) < 1e-12 * scale
    # contrast: off the interpolating set the gradients are far from zero
    off = linear_model(s.theta_star + 0.1 * np.random.default_rng(2).standard_normal(s.theta_star.shape), s.bias)
    assert np.linalg.norm(loss_gradient(off, s.X_r, s.y_r)) > 1e-3


@pytest.mark.parametrize("name,extra", [("gd", {}), ("ga", {}), ("ngp", {"ga_coef": 0.5})])
def test_theorem1_loss_gradient_methods_leave_an_interpolator_unchanged(name, extra):
    s = LinearSetup(seed=3)
    method = create(name, lr=0.01, optimizer="sgd", weight_decay=0.0, **extra)
    out = params_of(unlearn(s.problem(), method, Budget(epochs=3), seed=0, device="cpu").model)
    assert rel(out, s.theta_star) < 1e-12
    # the forget component is still there: the method has not unlearned anything
    assert np.linalg.norm(s.perp(out)) > 0.1 * np.linalg.norm(s.perp(s.theta_star))
    # contrast: from a non-interpolating point the same method moves
    moved = s.theta_star + 0.1
    out2 = params_of(unlearn(s.problem(moved), method, Budget(epochs=1), seed=0, device="cpu").model)
    assert rel(out2, moved) > 1e-4


def test_theorem1_ngd_adds_only_zero_mean_noise():
    s = LinearSetup(seed=4, m=3000, n_r=5, n_f=3, bias=False)
    lr, sig = 0.5, 1.0
    method = create("ngd", lr=lr, optimizer="sgd", weight_decay=0.0, noise_sig=sig)
    out = params_of(unlearn(s.problem(), method, Budget(steps=1), seed=0, device="cpu").model)
    xi = (s.theta_star - out) / (lr * sig)  # the loss gradient is 0, so this is the raw noise
    d = xi.size
    assert abs(xi.mean()) < 5.0 / math.sqrt(d)
    assert abs(xi.std() - 1.0) < 0.1


# ------------------------------------------------------- 2. Theorem 2 / Lemmas 3-5

@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(8, 40), frac=st.floats(0.2, 0.9))
def test_lemma5_projection_of_any_interpolator_is_the_min_norm_retain_interpolator(bias, seed, m, frac):
    rng = np.random.default_rng(seed)
    n = max(2, m // 2)
    n_r = max(1, int(frac * n))
    X, y = rng.standard_normal((n, m)), rng.standard_normal(n)
    theta_star = lin.random_interpolator(X, y, rng, scale=3.0, bias=bias)
    A = lin.augment(X) if bias else X
    assert np.allclose(A @ theta_star, y, atol=1e-9)
    theta_r = lin.project_onto_span(X[:n_r], theta_star, bias=bias)
    A_r = A[:n_r]
    # Lemma 3's characterisation, independent of any pseudo-inverse: interpolates D_r and lies in row(X_r)
    assert np.allclose(A_r @ theta_r, y[:n_r], atol=1e-9)
    coef = np.linalg.lstsq(A_r.T, theta_r, rcond=None)[0]
    assert np.linalg.norm(A_r.T @ coef - theta_r) < 1e-9 * max(1.0, np.linalg.norm(theta_r))
    # ... equals X_r^+ y_r, and no other retain interpolator is shorter
    assert rel(theta_r, lin.min_norm_interpolator(X[:n_r], y[:n_r], bias=bias)) < 1e-9
    other = lin.random_interpolator(X[:n_r], y[:n_r], rng, bias=bias)
    assert np.linalg.norm(theta_r) <= np.linalg.norm(other) + 1e-12


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("jacobian", ["per_sample", "batch_train"])
def test_one_minnorm_projection_with_all_retain_gradients_gives_pinv(bias, implementation, jacobian):
    """Item 2: one projection, reg_coef = 1 (lambda = 0), all retain gradients ``[x; 1]`` -> ``[X_r, 1]^+ y_r``."""
    s = LinearSetup(seed=5, bias=bias)
    model = linear_model(s.theta_star, bias)
    batch = Batch(torch.from_numpy(s.X_r), torch.from_numpy(s.y_r).reshape(-1, 1))
    minnorm_projection_step(model, batch, TASK.scores, None, 1.0, n_pert=len(s.y_r),
                            generator=torch.Generator().manual_seed(0), jacobian=jacobian,
                            implementation=implementation)
    out = params_of(model)
    assert rel(out, s.theta_r) < 1e-10
    assert np.linalg.norm(s.perp(out)) < 1e-10 * np.linalg.norm(s.perp(s.theta_star))


@pytest.mark.parametrize("order", ["project_then_descend", "descend_then_project"])
@pytest.mark.parametrize("epochs", [1, 4])
def test_minnorm_og_end_to_end_recovers_pinv(order, epochs):
    """Through ``unlearn``: the descent steps are exactly zero here, by Theorem 1, in both orders.

    ``descend_then_project`` descends at ``theta^*`` (interpolates ``D``); ``project_then_descend``
    descends at ``P_{S_r} theta^*`` (interpolates ``D_r``). Either way ``grad J(.; B_r) = 0``, and
    later projections fix ``theta_r^* in S_r``. So a full-size (stable) SGD step keeps ``theta_r^*``:
    the projection is isolated by the mathematics, not by a tiny learning rate.
    """
    s = LinearSetup(seed=6)
    method = create("minnorm_og", reg_coef=1.0, reg_coef_decay=0.5, lr=stable_lr(s.design_r()), optimizer="sgd",
                    weight_decay=0.0,
                    grad_sample_size=len(s.y_r), order=order)
    out = params_of(unlearn(s.problem(), method, Budget(epochs=epochs), seed=0, device="cpu").model)
    assert rel(out, s.theta_r) < 1e-10


def test_minnorm_og_end_to_end_with_adamw_recovers_pinv_up_to_adam_epsilon():
    """Default optimiser (AdamW) without weight decay: a zero gradient ``g`` (round-off ~1e-16) still moves
    each coordinate by ``lr * g / (|g| + eps) <= lr * |g| / eps`` ~ 1e-11, hence the looser tolerance."""
    s = LinearSetup(seed=7)
    method = create("minnorm_og", reg_coef=1.0, lr=1e-3, weight_decay=0.0, grad_sample_size=len(s.y_r))
    out = params_of(unlearn(s.problem(), method, Budget(steps=1), seed=0, device="cpu").model)
    assert rel(out, s.theta_r) < 1e-8


def test_minnorm_og_with_too_few_gradients_does_not_interpolate_retain():
    """Contrast for item 2: projecting onto a strict subspace of ``S_r`` (n_pert < n_r) loses interpolation."""
    s = LinearSetup(seed=8)
    model = linear_model(s.theta_star, s.bias)
    batch = Batch(torch.from_numpy(s.X_r), torch.from_numpy(s.y_r).reshape(-1, 1))
    minnorm_projection_step(model, batch, TASK.scores, None, 1.0, n_pert=len(s.y_r) - 2,
                            generator=torch.Generator().manual_seed(0))
    out = params_of(model)
    assert np.abs(s.design_r() @ out - s.y_r).max() > 1e-3


# -------------------------------------------------------------- 3. Appendix E

@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(3, 30), k=st.integers(1, 6),
       lam=st.sampled_from([0.0, 0.25, 1.0, 9.0]), dup=st.booleans())
def test_closed_form_prox_step_matches_kkt_solver(seed, d, k, lam, dup):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((k, d))
    if dup:  # rank-deficient constraint set
        G = np.vstack([G, G[:1] * 2.0])
    theta = rng.standard_normal(d)
    closed = lin.orthogonal_prox_step(theta, G, lam)
    kkt = lin.prox_step_kkt(theta, G, lam)
    assert np.linalg.norm(closed - kkt) <= 1e-9 * max(1.0, np.linalg.norm(theta))
    # it is feasible and no feasible perturbation does better
    delta = closed - theta
    assert np.abs(G @ delta).max() < 1e-9 * max(1.0, np.linalg.norm(theta))

    def obj(dl):
        return np.sum((theta + dl) ** 2) + lam * np.sum(dl**2)

    for _ in range(5):
        z = lin.project_onto_complement(G, rng.standard_normal(d))
        assert obj(delta) <= obj(delta + 0.1 * z) + 1e-12


@pytest.mark.parametrize("lam", [0.0, 1.5])
def test_minnorm_projection_step_on_an_mlp_solves_appendix_e(lam):
    """The library's step ``theta - c P_{G^perp} theta`` with ``c = 1/(1+lam)`` equals the KKT minimiser
    of ``||theta + Delta||^2 + lam ||Delta||^2`` s.t. ``Delta perp grad f(theta, x_i)`` on a nonlinear net."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    G = output_jacobian_reference(model, x, TASK.scores).numpy()
    theta = params_of(model)
    expected = lin.prox_step_kkt(theta, G, lam)
    minnorm_projection_step(model, Batch(x, torch.zeros(6, 1, dtype=torch.float64)), TASK.scores, None,
                            1.0 / (1.0 + lam), n_pert=6, generator=torch.Generator().manual_seed(0))
    assert rel(params_of(model), expected) < 1e-10


# ------------------------------------------------------------------ 4. schedule

@settings(max_examples=25, deadline=None)
@given(reg=st.floats(1e-3, 1.0), decay=st.floats(0.05, 1.0), k=st.integers(1, 40))
def test_lambda_recursion_equals_geometric_coefficients(reg, decay, k):
    c = lin.projection_coefficients(reg, decay, k)
    expected = reg * decay ** np.arange(k)
    np.testing.assert_allclose(c, expected, rtol=1e-9)
    method = MinNormOG(reg_coef=reg, reg_coef_decay=decay)
    np.testing.assert_allclose([method.coefficient(j) for j in range(k)], c, rtol=1e-9)


@pytest.mark.parametrize("epochs,proj_pd,num_gd", [(5, 1, 0), (6, 2, 2), (7, 3, 1), (4, 1, 1), (4, 3, 0)])
def test_projection_only_iterates_follow_the_product_formula(epochs, proj_pd, num_gd):
    """Item 4: ``theta_k = theta_r^* + prod_{j<k} (1 - c_j) P_{S_r^perp} theta^*`` through the engine.

    Every partial projection keeps ``theta`` interpolating ``D_r`` (the removed part is orthogonal
    to the retain inputs), so the descent steps are exactly zero and only the projections act.
    Two steps per epoch (forget set = 2 batches); projections in epochs ``t < T - T_GD``,
    ``t % T_Proj == 0`` (the paper, Table 4 and Appendix F.1.10), one per step.
    """
    s = LinearSetup(seed=9, m=40, n_r=6, n_f=10)
    reg, decay = 0.6, 0.7
    method = create("minnorm_og", reg_coef=reg, reg_coef_decay=decay, lr=stable_lr(s.design_r()), optimizer="sgd",
                    weight_decay=0.0,
                    grad_sample_size=6, proj_pd=proj_pd, num_gd_epochs=num_gd)
    res = unlearn(s.problem(batch_size=6), method, Budget(epochs=epochs), seed=0, device="cpu")
    assert res.record.steps == 2 * epochs
    n_proj = 2 * sum(1 for t in range(epochs) if t < epochs - num_gd and t % proj_pd == 0)
    expected = lin.projection_only_iterate(s.X_r, s.theta_star, lin.projection_coefficients(reg, decay, n_proj),
                                           bias=True)
    out = params_of(res.model)
    assert rel(out, expected) < 1e-10
    # and not the formula with one projection more or less
    for other in (n_proj - 1, n_proj + 1):
        wrong = lin.projection_only_iterate(s.X_r, s.theta_star, lin.projection_coefficients(reg, decay, other),
                                            bias=True)
        assert rel(out, wrong) > 1e-4


# ------------------------------------------------------- 5. Ridge vs MinNorm-OG

def test_ridge_only_shrinks_the_forget_component_and_never_removes_it():
    s = LinearSetup(seed=10)
    lr, reg, decay, steps = 0.02, 1.0, 0.9, 150
    ridge = create("ridge", lr=lr, reg_coef=reg, reg_coef_decay=decay, optimizer="sgd", weight_decay=0.0)
    out = params_of(unlearn(s.problem(), ridge, Budget(steps=steps), seed=0, device="cpu").model)
    p0, p1 = s.perp(s.theta_star), s.perp(out)
    factor = lin.ridge_perp_factor(lr, reg, decay, steps)
    # exactly the predicted shrinkage: S_r^perp is untouched by the retain-loss gradient
    assert rel(p1, factor * p0) < 1e-9
    # and bounded away from zero for every number of steps: prod(1 - a_k) >= 1 - sum a_k
    assert factor >= 1.0 - 2 * lr * reg / (1 - decay) > 0.5
    assert np.linalg.norm(p1) > 0.5 * np.linalg.norm(p0)
    # MinNorm-OG with reg_coef = 1 removes it in a single step
    og = create("minnorm_og", reg_coef=1.0, lr=lr, optimizer="sgd", weight_decay=0.0, grad_sample_size=len(s.y_r))
    out_og = params_of(unlearn(s.problem(), og, Budget(steps=1), seed=0, device="cpu").model)
    assert np.linalg.norm(s.perp(out_og)) < 1e-10 * np.linalg.norm(p0)
    # so its forget predictions are those of the min-norm retain model, Ridge's are not
    A_f = lin.augment(s.X_f)
    assert np.allclose(A_f @ out_og, A_f @ s.theta_r, atol=1e-9)
    assert np.abs(A_f @ out - A_f @ s.theta_r).max() > 0.1


# ------------------------------------------------------ linear networks: helpers

def linear_net_module(c: np.ndarray, As: list[np.ndarray]) -> nn.Sequential:
    layers = [nn.Linear(A.shape[1], A.shape[0], bias=False) for A in As]
    layers.append(nn.Linear(c.shape[0], 1, bias=False))
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for layer, A in zip(net, [*As, c[None, :]], strict=True):
            layer.weight.copy_(torch.from_numpy(A))
    return net


def random_interpolating_network(rng, X, y, hidden):
    w_star = lin.random_interpolator(X, y, rng, scale=1.0)
    c = rng.standard_normal(hidden[-1])
    rest = [rng.standard_normal((hidden[i], hidden[i - 1])) for i in range(1, len(hidden))]
    A1 = lnet.interpolating_first_layer(c, rest, w_star, rng.standard_normal((hidden[0], X.shape[1])))
    return c, [A1, *rest]


# ----------------------------------------------------------------- 6. Lemma 1

@pytest.mark.parametrize("hidden", [[5], [4, 6], [6, 3, 5]])
def test_lemma1_first_layer_update_is_orthogonal_and_gives_min_norm_predictor(hidden):
    rng = np.random.default_rng(11)
    m, n_r, n_f = 12, 4, 3
    X = rng.standard_normal((n_r + n_f, m))
    y = rng.standard_normal(n_r + n_f)
    X_r, y_r = X[:n_r], y[:n_r]
    c, As = random_interpolating_network(rng, X, y, hidden)
    assert np.allclose(lnet.network_output(c, As, X), y, atol=1e-9)
    net = linear_net_module(c, As)
    assert np.allclose(net(torch.from_numpy(X)).detach().numpy().ravel(), y, atol=1e-9)

    dA1 = lnet.lemma1_delta_A1(c, As, X_r)
    # orthogonal to b x^T for every retain x ...
    for x in X_r:
        assert abs(np.sum(dA1 * lnet.first_layer_gradient(c, As, x))) < 1e-10
    # ... i.e. to every row of the library's output Jacobian (other blocks of Delta are zero)
    delta = np.concatenate([dA1.ravel()] + [np.zeros(A.size) for A in As[1:]] + [np.zeros(c.size)])
    J = output_jacobian(net, torch.from_numpy(X_r), TASK.scores).numpy()
    assert np.abs(J @ delta).max() < 1e-10 * np.linalg.norm(J) * np.linalg.norm(delta)
    # the update is not trivial: it changes the forget outputs
    J_f = output_jacobian(net, torch.from_numpy(X[n_r:]), TASK.scores).numpy()
    assert np.abs(J_f @ delta).max() > 1e-3
    # w(theta + Delta) = P_{S_r} w(theta^*) = X_r^+ y_r
    c2, As2 = lnet.unlearn_predictor_norm(c, As, X_r)
    w_new = lnet.effective_predictor(c2, As2)
    assert rel(w_new, lin.project_onto_span(X_r, lnet.effective_predictor(c, As))) < 1e-10
    assert rel(w_new, np.linalg.pinv(X_r) @ y_r) < 1e-10
    # the constraint is exact, not only linearised: the network still interpolates D_r
    assert np.allclose(lnet.network_output(c2, As2, X_r), y_r, atol=1e-9)


# ------------------------------------------------------- 7. counterexample D.4.1

@pytest.mark.parametrize("m", [3, 5])
def test_d41_counterexample_satisfies_linearised_constraint_but_breaks_interpolation(m):
    cx = lnet.counterexample_d41(m)
    # theta^* interpolates D
    assert np.allclose(cx.X @ cx.A.T @ cx.c, cx.y)
    # the linearised constraint of (6) holds, also against the library's Jacobian at e_1
    assert np.allclose(cx.linearized_constraint(), 0.0)
    net = linear_net_module(cx.c, [cx.A])
    J = output_jacobian(net, torch.from_numpy(cx.X_r), TASK.scores).numpy()
    delta = np.concatenate([cx.delta_A.ravel(), cx.delta_c])
    assert np.abs(J @ delta).max() < 1e-14
    # predictor norm 0 (a global minimiser of (6)) ...
    assert np.allclose(cx.predictor_after(), 0.0)
    # ... but the network outputs 0 on the retain input instead of 1
    out = lnet.network_output(cx.c + cx.delta_c, [cx.A + cx.delta_A], cx.X_r)
    assert np.allclose(out, 0.0) and not np.allclose(out, cx.y_r)
    # with the drift regulariser (only A_1 moves, Lemma 1) the solution interpolates D_r
    c2, As2 = lnet.unlearn_predictor_norm(cx.c, [cx.A], cx.X_r)
    assert np.allclose(lnet.network_output(c2, As2, cx.X_r), cx.y_r)
    assert np.allclose(lnet.effective_predictor(c2, As2), np.eye(m)[0])


# --------------------------------------------------------------- 8. Theorem 4

@pytest.mark.parametrize("hidden", [[3], [4, 2], [3, 5, 4], [2, 2, 2, 2]])
def test_theorem4_balanced_factorisation_has_least_parameter_norm(hidden):
    rng = np.random.default_rng(12)
    m, n_r = 9, 4
    X_r, y_r = rng.standard_normal((n_r, m)), rng.standard_normal(n_r)
    w_r = np.linalg.pinv(X_r) @ y_r
    L = len(hidden) + 1
    c, As = lnet.balanced_factorization(w_r, hidden, rng=rng)
    assert rel(lnet.effective_predictor(c, As), w_r) < 1e-12
    assert np.allclose(lnet.network_output(c, As, X_r), y_r, atol=1e-10)
    rho = np.linalg.norm(w_r)
    bound = L * rho ** (2.0 / L)
    assert lnet.parameter_norm_sq(c, As) == pytest.approx(bound, rel=1e-12)
    assert lnet.min_factorization_norm_sq(w_r, L) == pytest.approx(bound, rel=1e-12)
    # balanced: every block carries rho^{2/L}
    for block in [c, *As]:
        assert np.sum(block**2) == pytest.approx(rho ** (2.0 / L), rel=1e-12)
    # AM-GM: no other factorisation of w_r^* is shorter
    for noise in (0.0, 0.3, 1.0):
        for _ in range(10):
            c2, As2 = lnet.random_factorization(w_r, hidden, rng, noise=noise)
            assert rel(lnet.effective_predictor(c2, As2), w_r) < 1e-9
            assert lnet.parameter_norm_sq(c2, As2) >= bound * (1 - 1e-12)
    # nor a small perturbation of the balanced one along the constraint set
    for _ in range(10):
        c3 = c + 1e-3 * rng.standard_normal(c.shape)
        rest = [A + 1e-3 * rng.standard_normal(A.shape) for A in As[1:]]
        A1 = lnet.interpolating_first_layer(c3, rest, w_r, As[0])
        assert lnet.parameter_norm_sq(c3, [A1, *rest]) >= bound * (1 - 1e-12)


# ------------------------------------------- 9. Theorem 5 / Lemma 6 / Prop. 1

def two_layer_module(c: np.ndarray, A: np.ndarray, phi: str) -> nn.Sequential:
    act = {"tanh": nn.Tanh(), "relu": nn.ReLU(), "silu": nn.SiLU()}[phi]
    net = nn.Sequential(nn.Linear(A.shape[1], A.shape[0], bias=False), act, nn.Linear(A.shape[0], 1, bias=False))
    net = net.double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(A))
        net[2].weight.copy_(torch.from_numpy(c)[None, :])
    return net


@pytest.mark.parametrize("phi", ["tanh", "relu", "silu"])
@pytest.mark.parametrize("pivoting", ["canonical", "qr"])
@pytest.mark.parametrize("duplicate", [False, True])
def test_theorem5_width_reduction(phi, pivoting, duplicate):
    rng = np.random.default_rng(13)
    m, h, n_r, n_f = 6, 24, 7, 5
    X = rng.standard_normal((n_r + n_f, m))
    if duplicate:  # two retain points coincide: rank(Phi_r) = s < n_r
        X[1] = X[0]
    y = rng.standard_normal(n_r + n_f)
    if duplicate:
        y[1] = y[0]
    A = rng.standard_normal((h, m))
    c = tl.fit_output_layer(A, X, y, phi)
    assert np.allclose(tl.two_layer_output(c, A, X, phi), y, atol=1e-8)
    X_r, y_r = X[:n_r], y[:n_r]
    Phi_r = tl.features(A, X_r, phi)
    s = tl.numerical_rank(Phi_r)
    assert s == n_r - int(duplicate)
    assert np.count_nonzero(c) == h  # the original network uses every neuron

    new_c, delta = tl.lemma6_sparsify(c, Phi_r, pivoting=pivoting)
    # Lemma 6: Delta_c in G^perp, so the retain outputs are unchanged, and ||c'||_0 <= s
    assert np.abs(Phi_r @ delta).max() < 1e-9 * np.linalg.norm(c)
    assert np.allclose(Phi_r @ new_c, y_r, atol=1e-8)
    assert np.count_nonzero(new_c) <= s

    red = tl.reduce_width(c, A, X_r, phi, pivoting=pivoting)
    assert red.rank == s and red.active <= s
    # Proposition 1: pruned rows of A are zero, the function is unchanged everywhere
    assert np.count_nonzero(np.linalg.norm(red.A, axis=1)) <= s
    Z = rng.standard_normal((50, m))
    np.testing.assert_array_equal(tl.two_layer_output(red.c, red.A, Z, phi), tl.two_layer_output(new_c, A, Z, phi))
    # the torch network with the reduced weights interpolates D_r
    net = two_layer_module(red.c, red.A, phi)
    assert np.allclose(net(torch.from_numpy(X_r)).detach().numpy().ravel(), y_r, atol=1e-8)
    # and only the retained neurons can still carry information: the rest of A is zero
    dead = np.setdiff1d(np.arange(h), red.kept)
    assert dead.size >= h - s and np.all(red.A[dead] == 0.0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(2, 12), k=st.integers(1, 6), rank_def=st.booleans())
def test_reduced_column_echelon_form(seed, h, k, rank_def):
    rng = np.random.default_rng(seed)
    k = min(k, h)
    P = rng.standard_normal((h, k))
    if rank_def and k >= 2:
        P[:, -1] = P[:, 0] - 0.5 * P[:, 1]
    r = np.linalg.matrix_rank(P)
    for pivoting in ("canonical", "qr"):
        Pt, piv = tl.reduced_column_echelon(P, pivoting=pivoting)
        assert Pt.shape == (h, r) and len(piv) == r and piv == sorted(set(piv))
        np.testing.assert_array_equal(Pt[piv, :], np.eye(r))
        # same column space: each is in the other's span
        for M, N in ((Pt, P), (P, Pt)):
            coef = np.linalg.lstsq(N, M, rcond=None)[0]
            assert np.linalg.norm(N @ coef - M) < 1e-8 * max(1.0, np.linalg.norm(M))
        if pivoting == "canonical":
            # echelon: column i vanishes above its pivot row
            for i, j in enumerate(piv):
                assert np.all(Pt[:j, i] == 0.0)


# ---------------------------------------------------------- 10. Proposition 2

def test_proposition2_gd_from_zero_gives_min_norm_interpolator_that_leaks_the_forget_set():
    s = LinearSetup(seed=14, m=20, n_r=4, n_f=2, bias=False)
    theta = lin.gd_least_squares(s.X, s.y, steps=3000)
    theta_min = np.linalg.pinv(s.X) @ s.y
    assert rel(theta, theta_min) < 1e-8
    assert np.linalg.norm(lin.project_onto_complement(s.X, theta)) < 1e-10 * np.linalg.norm(theta)
    # it minimises the retain loss, yet has a large component outside S_r: along the forget inputs
    assert np.allclose(s.X_r @ theta, s.y_r, atol=1e-8)
    leak = s.perp(theta)
    assert np.linalg.norm(leak) > 0.1 * np.linalg.norm(theta)
    assert np.abs(s.X_f @ leak).max() > 0.1
    # the same through the library: GD from a zero-initialised nn.Linear on all of D
    model = nn.Linear(20, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    problem = UnlearningProblem(model, tdata(s.X, s.y), tdata(s.X_f, s.y_f), TASK, batch_size=64)
    lr = len(s.y) / (2.0 * np.linalg.norm(s.X, 2) ** 2)
    gd = create("gd", lr=lr, optimizer="sgd", weight_decay=0.0)
    out = params_of(unlearn(problem, gd, Budget(steps=1500), seed=0, device="cpu").model)
    assert rel(out, theta_min) < 1e-6
