"""MinNorm-OG's linear algebra: the fast path held to the slow, obviously-correct reference.

* fast Jacobian (``torch.func``) vs per-score backward loop, both BatchNorm semantics,
  MLPs and small CNNs, with and without BatchNorm, one or two heads, regression and
  max-logit classification scores (hypothesis-generated shapes);
* fast projection (float64 Gram + eigen-solve) vs float64 QR, and the whole projection
  step fast vs reference;
* rank-deficient Jacobians (duplicate samples) against a numpy pseudo-inverse;
* the Jacobian against central finite differences;
* ``sample_indices``: exact size, distinct, balanced across strata (also more strata than k);
* a projection leaves BatchNorm running statistics and train/eval flags unchanged.

Tolerances: float32 models are compared with relative error <= 1e-5 (float32 round-off is
~1e-7; the two paths do different arithmetic); float64 models with <= 1e-9.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from overunlearn.linalg.jacobian import output_jacobian, output_jacobian_reference, sample_indices
from overunlearn.linalg.projection import project_onto_span, project_onto_span_qr
from overunlearn.methods.minnorm_og import minnorm_projection_step
from overunlearn.problem import Batch, ClassificationTask, RegressionTask

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class Net(nn.Module):
    """A small MLP or CNN trunk with one or two linear heads (a tuple output for two)."""

    def __init__(self, kind: str, bn: bool, outs: list[int], cin: int, width: int, act: str) -> None:
        super().__init__()
        a = {"tanh": nn.Tanh, "relu": nn.ReLU, "silu": nn.SiLU}[act]
        if kind == "mlp":
            layers: list[nn.Module] = [nn.Flatten(), nn.Linear(cin * 4, width)]
            layers += [nn.BatchNorm1d(width)] if bn else []
            layers += [a(), nn.Linear(width, width)]
            layers += [nn.BatchNorm1d(width)] if bn else []
            layers += [nn.Tanh()]
        else:
            layers = [nn.Conv2d(cin, width, 3, padding=1)]
            layers += [nn.BatchNorm2d(width)] if bn else []
            layers += [a(), nn.Conv2d(width, width, 3, stride=2)]
            layers += [nn.BatchNorm2d(width)] if bn else []
            layers += [nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, o) for o in outs)

    def forward(self, x):
        z = self.body(x)
        out = tuple(h(z) for h in self.heads)
        return out[0] if len(out) == 1 else out


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BatchNorm is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


def inputs_for(kind: str, n: int, cin: int, dtype) -> torch.Tensor:
    return torch.randn(n, cin, 2, 2, dtype=dtype) if kind == "mlp" else torch.randn(n, cin, 5, 5, dtype=dtype)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def relerr(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    s = (b if scale is None else scale).double().norm()
    return float((a.double() - b.double()).norm() / s)


@st.composite
def setups(draw):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    bn = draw(st.booleans())
    mode = draw(st.sampled_from(["per_sample", "batch_train"]))
    heads = draw(st.integers(1, 2))
    classification = draw(st.booleans())
    outs = [draw(st.integers(2 if classification else 1, 4)) for _ in range(heads)]
    # train-mode BatchNorm on 2 samples maps every input to +-1: its input gradients are pure
    # float32 cancellation, so batch_train with BatchNorm draws at least 3 samples
    n = draw(st.integers(3 if (bn and mode == "batch_train") else 1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(kind=kind, bn=bn, mode=mode, outs=outs, classification=classification, n=n, dtype=dtype,
                cin=draw(st.integers(1, 3)), width=draw(st.integers(3, 8)),
                act=draw(st.sampled_from(["tanh", "relu", "silu"])), seed=draw(st.integers(0, 2**16)))


def build(cfg):
    torch.manual_seed(cfg["seed"])
    model = Net(cfg["kind"], cfg["bn"], cfg["outs"], cfg["cin"], cfg["width"], cfg["act"]).to(cfg["dtype"])
    randomise_bn(model)
    x = inputs_for(cfg["kind"], cfg["n"], cfg["cin"], cfg["dtype"])
    task = ClassificationTask() if cfg["classification"] else RegressionTask()
    return model, x, task


def tol(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-9


# ------------------------------------------------------------ fast vs reference

@settings(max_examples=15, deadline=None)
@given(cfg=setups())
def test_fast_jacobian_and_projection_match_reference(cfg):
    model, x, task = build(cfg)
    before = copy.deepcopy(model.state_dict())
    jf = output_jacobian(model, x, task.scores, mode=cfg["mode"])
    jr = output_jacobian_reference(model, x, task.scores, mode=cfg["mode"])
    rows = cfg["n"] * (len(cfg["outs"]) if cfg["classification"] else sum(cfg["outs"]))
    assert jf.shape == jr.shape == (rows, flat_params(model).numel())
    assert relerr(jf, jr) <= tol(cfg["dtype"])
    # the QR reference assumes full row rank: only compare projections where J has it
    sv = torch.linalg.svdvals(jr.double())
    assume(rows < jr.shape[1] and float(sv[-1] / sv[0]) > 1e-3)
    v = flat_params(model)
    pf = project_onto_span(jf, v)
    pr = project_onto_span_qr(jr, v)
    assert relerr(pf, pr, scale=v) <= tol(cfg["dtype"])
    # neither path touched the model's state
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


@settings(max_examples=10, deadline=None)
@given(cfg=setups(), coef=st.sampled_from([1.0, 0.3]))
def test_projection_step_fast_equals_reference(cfg, coef):
    model, x, task = build(cfg)
    jr = output_jacobian_reference(model, x, task.scores, mode=cfg["mode"])
    sv = torch.linalg.svdvals(jr.double())
    assume(jr.shape[0] < jr.shape[1] and float(sv[-1] / sv[0]) > 1e-3)
    targets = tuple(torch.zeros(cfg["n"], dtype=torch.long) for _ in cfg["outs"])
    batch = Batch(x, targets if len(targets) > 1 else targets[0])
    strata = task.strata(batch.targets)
    theta0 = flat_params(model)
    models = {impl: copy.deepcopy(model) for impl in ("fast", "reference")}
    for impl, m in models.items():
        minnorm_projection_step(m, batch, task.scores, strata, coef, n_pert=cfg["n"],
                                generator=torch.Generator().manual_seed(1), jacobian=cfg["mode"], implementation=impl)
    a, b = flat_params(models["fast"]), flat_params(models["reference"])
    assert relerr(a, b, scale=theta0) <= tol(cfg["dtype"])
    assert relerr(a, theta0) > 1e-4  # the step did something


# ---------------------------------------------------------------- rank deficiency

@pytest.mark.parametrize("mode", ["per_sample", "batch_train"])
def test_rank_deficient_jacobian_from_duplicate_samples_matches_pinv(mode):
    torch.manual_seed(0)
    model = Net("mlp", False, [1, 2], cin=2, width=5, act="tanh").double()
    x0 = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    x = torch.cat([x0, x0[:2], x0[1:2]])  # 7 samples, 4 distinct
    task = RegressionTask()
    jac = output_jacobian(model, x, task.scores, mode=mode)
    J = jac.numpy()
    assert np.linalg.matrix_rank(J) == 4 * 3 < J.shape[0]
    rng = np.random.default_rng(0)
    for v_np in (flat_params(model).numpy(), rng.standard_normal(J.shape[1])):
        v = torch.from_numpy(v_np.copy())
        expected = np.linalg.pinv(J) @ (J @ v_np)  # pinv(J) J is the orthogonal projector onto row(J)
        for chunk in (1 << 20, 7):
            p = project_onto_span(jac, v, chunk=chunk).numpy()
            assert np.linalg.norm(p - expected) <= 1e-9 * np.linalg.norm(v_np)
        # mathematical properties: idempotent, residual orthogonal to every gradient
        pv = project_onto_span(jac, v)
        assert torch.allclose(project_onto_span(jac, pv), pv, atol=1e-10)
        assert float((jac @ (v - pv)).abs().max()) <= 1e-9 * float(jac.norm() * v.norm())
    # and the projection step itself, with a batch full of duplicates
    m2 = copy.deepcopy(model)
    theta = flat_params(m2).numpy()
    minnorm_projection_step(m2, Batch(x, (torch.zeros(7, 1), torch.zeros(7, 2))), task.scores, None, 0.5, n_pert=7,
                            generator=torch.Generator().manual_seed(0), jacobian=mode)
    expected = theta - 0.5 * (theta - np.linalg.pinv(J) @ (J @ theta))
    assert np.linalg.norm(flat_params(m2).numpy() - expected) <= 1e-9 * np.linalg.norm(theta)


@pytest.mark.parametrize("decades", [3, 5])
def test_projection_keeps_every_direction_of_an_ill_conditioned_full_rank_jacobian(decades):
    """Rows spanning ``k`` independent directions with singular values from 1 down to ``10^-decades``:
    the span is still k-dimensional, and the fast path must not drop a direction (Gram eigenvalues
    reach ``10^(-2 decades)``, above its cut-off) -- checked against the exact projector ``V V^T``."""
    rng = np.random.default_rng(decades)
    k, d = 8, 60
    U, _ = np.linalg.qr(rng.standard_normal((k, k)))
    V, _ = np.linalg.qr(rng.standard_normal((d, k)))
    J = U @ np.diag(np.logspace(0, -decades, k)) @ V.T
    v = rng.standard_normal(d)
    exact = V @ (V.T @ v)
    p = project_onto_span(torch.from_numpy(J), torch.from_numpy(v)).numpy()
    assert np.linalg.norm(p - exact) <= 1e-6 * np.linalg.norm(v)
    q = project_onto_span_qr(torch.from_numpy(J), torch.from_numpy(v)).numpy()
    assert np.linalg.norm(q - exact) <= 1e-9 * np.linalg.norm(v)


@pytest.mark.parametrize("kind", ["duplicates", "zero row", "full rank"])
def test_reference_qr_projection_on_a_rank_deficient_jacobian(kind):
    # unpivoted QR of a rank-deficient J^T has columns outside the span (the paper's code was ~15% off here)
    torch.manual_seed(0)
    J = torch.randn(4, 50, dtype=torch.float64)
    if kind == "duplicates":
        J = torch.cat([J, J[:2]])
    elif kind == "zero row":  # a language model's sample without scored tokens
        J = torch.cat([J[:2], torch.zeros(1, 50, dtype=torch.float64), J[2:]])
    v = torch.randn(50, dtype=torch.float64)
    exact = torch.from_numpy(np.linalg.pinv(J.numpy()) @ (J.numpy() @ v.numpy()))
    assert relerr(project_onto_span(J, v), exact, scale=v) < 1e-12
    assert relerr(project_onto_span_qr(J, v), exact, scale=v) < 1e-12


def test_projection_of_empty_and_zero_jacobians():
    v = torch.randn(10, dtype=torch.float64)
    assert torch.equal(project_onto_span(torch.zeros(0, 10, dtype=torch.float64), v), torch.zeros(10, dtype=torch.float64))
    assert float(project_onto_span(torch.zeros(3, 10, dtype=torch.float64), v).abs().max()) == 0.0


# ---------------------------------------------------------- finite differences

@pytest.mark.parametrize("mode", ["per_sample", "batch_train"])
@pytest.mark.parametrize("classification", [False, True])
def test_fast_jacobian_matches_finite_differences(mode, classification):
    torch.manual_seed(1)
    model = Net("mlp", True, [3, 2], cin=1, width=4, act="tanh").double()
    randomise_bn(model)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    task = ClassificationTask() if classification else RegressionTask()
    jac = output_jacobian(model, x, task.scores, mode=mode)
    params = [p for p in model.parameters() if p.requires_grad]
    work = copy.deepcopy(model)
    wparams = [p for p in work.parameters() if p.requires_grad]

    def scores() -> torch.Tensor:
        with torch.no_grad():
            if mode == "per_sample":
                work.eval()
                s = torch.cat([task.scores(work(x[i : i + 1])) for i in range(x.shape[0])])
            else:
                work.train()
                s = task.scores(work(x))
        return s.T.reshape(-1)  # head-major, as the Jacobian rows

    eps = 1e-6
    fd = torch.zeros_like(jac)
    col = 0
    for p in wparams:
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = scores()
            flat[i] = old - eps
            down = scores()
            flat[i] = old
            fd[:, col] = (up - down) / (2 * eps)
            col += 1
    assert col == sum(p.numel() for p in params)
    assert relerr(jac, fd) < 1e-6


# ----------------------------------------------------------------- sample_indices

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sample_indices_exact_size_distinct_and_balanced(data):
    n = data.draw(st.integers(1, 60))
    k = data.draw(st.integers(1, 70))
    n_strata = data.draw(st.integers(1, 25))
    labels = data.draw(st.lists(st.integers(0, n_strata - 1), min_size=n, max_size=n))
    strata = torch.tensor(labels)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    for s in (None, strata):
        idx = sample_indices(n, k, gen, s)
        assert idx.dtype == torch.long and idx.numel() == min(k, n)
        assert len(set(idx.tolist())) == idx.numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < n
    # balance (water-filling): a stratum with fewer picks than another (by 2 or more) is exhausted
    sizes = Counter(labels)
    picks = Counter(strata[idx].tolist())
    counts = {c: picks.get(c, 0) for c in sizes}
    for a in counts:
        for b in counts:
            if counts[a] + 1 < counts[b]:
                assert counts[a] == sizes[a], (counts, sizes)
    if len(sizes) >= min(k, n):  # more strata than picks: every pick from a different stratum
        assert max(counts.values()) <= 1


def test_sample_indices_more_strata_than_k_covers_every_stratum_fairly():
    """The reference code's ``k // C`` per class draws nothing when ``C > k``; here each draw takes k
    distinct strata, and over many draws every stratum is chosen about ``k / C`` of the time."""
    C, per, k, draws = 12, 3, 4, 600
    strata = torch.arange(C).repeat_interleave(per)
    gen = torch.Generator().manual_seed(0)
    hits = Counter()
    for _ in range(draws):
        idx = sample_indices(C * per, k, gen, strata)
        chosen = strata[idx].tolist()
        assert len(idx) == k and len(set(chosen)) == k
        hits.update(chosen)
    expected = draws * k / C  # 200
    assert all(abs(hits[c] - expected) < 5 * np.sqrt(expected) for c in range(C)), hits


# ---------------------------------------------------------------- BatchNorm state

@pytest.mark.parametrize("mode", ["per_sample", "batch_train"])
@pytest.mark.parametrize("implementation", ["fast", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_projection_leaves_batchnorm_running_stats_and_modes_unchanged(mode, implementation, train):
    torch.manual_seed(2)
    model = Net("cnn", True, [4, 3], cin=3, width=4, act="relu")
    randomise_bn(model)
    model.train(train)
    model.body[0].train(not train)  # a mixed pattern of flags must survive too
    flags = {name: m.training for name, m in model.named_modules()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    theta0 = flat_params(model)
    x = torch.randn(6, 3, 5, 5)
    targets = (torch.randint(0, 4, (6,)), torch.randint(0, 3, (6,)))
    task = ClassificationTask()
    minnorm_projection_step(model, Batch(x, targets), task.scores, task.strata(targets), 0.5, n_pert=4,
                            generator=torch.Generator().manual_seed(0), jacobian=mode, implementation=implementation)
    assert relerr(flat_params(model), theta0) > 1e-4
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    assert {name: m.training for name, m in model.named_modules()} == flags


# ---------------------------------------------------------------- logit clamp

def test_saturated_logits_keep_their_constraint_under_a_loss_clamp():
    """The task's logit clamp guards the loss only: a point whose max logit is far beyond the clamp
    must still contribute its (nonzero) output-gradient row, the same as without a clamp."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[2].weight.mul_(10.0)
        model[2].bias[0] = 100.0  # max logit ~100, far beyond a clamp of 30
    x = torch.randn(6, 3, dtype=torch.float64)
    assert model(x).max(dim=1).values.min() > 30
    clamped, raw = ClassificationTask(logit_clamp=30.0), ClassificationTask()
    for jac_fn in (output_jacobian, output_jacobian_reference):
        j_clamped = jac_fn(model, x, clamped.scores, mode="per_sample")
        j_raw = jac_fn(model, x, raw.scores, mode="per_sample")
        assert torch.allclose(j_clamped, j_raw)
        assert j_clamped.norm(dim=1).min() > 0
    # the loss itself is clamped
    y = torch.zeros(6, dtype=torch.long)
    assert clamped.per_sample_loss(model(x), y).max() <= 60 + 2 * np.log(4)


def test_solve_gram_vector_and_matrix_right_hand_sides_agree():
    """Both arithmetic paths of solve_gram give the pseudo-inverse solution (to float64 rounding); the
    matrix one is the vectorised engine's."""
    from overunlearn.linalg.projection import solve_gram

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 9, dtype=torch.float64, generator=g)
    a[5] = a[0] + a[1]  # rank deficient
    gram, b = a @ a.T, torch.randn(6, dtype=torch.float64, generator=g)
    ref = torch.linalg.pinv(gram, rtol=1e-12) @ b
    vec, mat = solve_gram(gram, b), solve_gram(gram, b.unsqueeze(-1))
    assert mat.shape == (6, 1)
    assert torch.allclose(vec, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(mat.squeeze(-1), vec, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 60), d=st.integers(1, 40_000), chunk=st.sampled_from([None, 7, 1024, 5000]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10**6))
def test_gram_and_rhs_blocks_equal_the_plain_blockwise_products(k, d, chunk, dtype, seed):
    """``gram_and_rhs`` converts its float64 blocks into a reused buffer: the same numbers, bit for bit,
    as converting each block afresh (the layout of a block decides the product's rounding), and the
    float64 product to rounding."""
    from overunlearn.linalg.projection import _chunk, gram_and_rhs

    g = torch.Generator().manual_seed(seed)
    jac, v = torch.randn(k, d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    gram, rhs = gram_and_rhs(jac, v, chunk)
    step = _chunk(k, chunk)
    ref_gram = torch.zeros(k, k, dtype=torch.float64)
    ref_rhs = torch.zeros(k, dtype=torch.float64)
    for s in range(0, d, step):
        block = jac[:, s : s + step].double()
        ref_gram += block @ block.T
        ref_rhs += block @ v[s : s + step].double()
    assert torch.equal(gram, ref_gram) and torch.equal(rhs, ref_rhs)
    j64 = jac.double()
    assert torch.allclose(gram, j64 @ j64.T, rtol=1e-12, atol=1e-12 * d)


# ---- the back-projection when the solve's coefficients cancel -------------------------------------------------

def _ill_conditioned_mlp():
    from overunlearn.models.mlp import MLP

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 2, generator=g)  # smooth, low-dimensional inputs: Gram eigenvalues over 13 decades
    return MLP(2, (16, 16), 1, generator=torch.Generator().manual_seed(1)).eval(), x


def test_hooked_projection_keeps_outputs_fixed_when_the_coefficients_cancel():
    """``J (v - P v)`` is the step's first-order change of the retained outputs. On a float32 MLP whose Gram is
    nearly singular, blocks summing ``J^T alpha`` in float32 left it at ~1e3 times the materialised Jacobian's;
    the positional blocks' ``back(exact=True)`` is at that level, and a block without the keyword (rows formed
    again, summed in float64) within 100 times it."""
    from overunlearn.linalg import register_block
    from overunlearn.linalg.blocks import linear as linear_blocks
    from overunlearn.linalg.blocks.base import _REGISTRY, _RESOLVED
    from overunlearn.linalg.projection import project_model_onto_span

    model, x = _ill_conditioned_mlp()
    task = RegressionTask()
    j64 = output_jacobian(copy.deepcopy(model).double(), x.double(), task.scores)
    v = flat_params(model)
    floor = float((j64 @ (v.double() - project_onto_span(output_jacobian(model, x, task.scores), v).double())).norm())

    def residual(m: nn.Module) -> float:
        pv = project_model_onto_span(m, x, task.scores, flat_params(m)).double()
        return float((j64 @ (v.double() - pv)).norm())

    assert residual(model) <= 3 * floor + 1e-7

    class FloatOnly(linear_blocks.LinearBlock):  # a user's block: its back-projection has no exact keyword
        def back(self, name, alpha):  # noqa: ANN001, ANN201
            return super().back(name, alpha)

    saved = dict(_REGISTRY)
    try:
        register_block(nn.Linear)(FloatOnly)
        # rows formed again in float32 are not quite the ghost Gram's exact products: 27x the floor here, and
        # 30x better than the blocks' float32 sums, which the engine takes without the cancellation test
        from overunlearn.linalg import projection as P

        summed = residual(copy.deepcopy(model))
        assert summed <= 100 * floor
        original = P._cancels
        P._cancels = lambda *a: False
        try:
            assert residual(copy.deepcopy(model)) >= 10 * summed
        finally:
            P._cancels = original
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
        _RESOLVED.clear()


def test_well_conditioned_projections_keep_the_blocks_own_back_projection(monkeypatch):
    from overunlearn.linalg import projection as P

    calls = []
    monkeypatch.setattr(P, "_back_exact", lambda *a: calls.append(a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1)).eval()
    x = torch.randn(8, 6)
    P.project_model_onto_span(model, x, RegressionTask().scores, flat_params(model))
    gram = torch.eye(3, dtype=torch.float64)
    assert not P._cancels(gram, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    rows = torch.tensor([[1.0, 0.0], [1.0, 1e-5]], dtype=torch.float64)  # two nearly equal rows, v = e2
    gram, rhs = rows @ rows.T, rows @ torch.tensor([0.0, 1.0], dtype=torch.float64)
    alpha = P.solve_gram(gram, rhs)  # (-1e5, 1e5): terms of 1e5 summing to the unit vector e2
    assert P._cancels(gram, rhs, alpha)
    assert not calls
