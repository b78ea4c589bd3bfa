"""The unlearning loop: budgets, batch streams, determinism, isolation of the caller's model, errors."""

from __future__ import annotations

import math
import time

import pytest
import torch
from conftest import TwoHeadMLP, classification_problem, params_vector, regression_problem, same_state, state_copy
from torch import nn
from torch.utils.data import Dataset

from overunlearn import (
    Budget,
    ClassificationTask,
    DataError,
    NonFiniteLossError,
    OverunlearnError,
    RegressionTask,
    TensorData,
    UnlearningProblem,
    create,
    unlearn,
)
from overunlearn.methods.base import Method, MethodConfig

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


class Probe(Method):
    """A GD-like method that records what the engine hands it."""

    name = "probe"
    uses_forget = True

    def __init__(self, sleep: float = 0.0, setup_sleep: float = 0.0, nan_at: int | None = None) -> None:
        super().__init__(MethodConfig(optimizer="sgd", weight_decay=0.0, lr=1e-3))
        self.sleep, self.setup_sleep, self.nan_at = sleep, setup_sleep, nan_at
        self.infos, self.retain_ids, self.forget_ids, self.starts = [], [], [], []
        self.torn_down = False

    def setup(self, ctx):  # type: ignore[override]
        self.t_setup = time.perf_counter()
        time.sleep(self.setup_sleep)

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        self.starts.append(time.perf_counter())
        self.infos.append(info)
        self.retain_ids.append(retain.inputs[:, 0].long().tolist())
        self.forget_ids.append(forget.inputs[:, 0].long().tolist())
        if self.sleep:
            time.sleep(self.sleep)
        loss = ctx.batch_loss(retain)
        if info.step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def teardown(self, ctx):  # type: ignore[override]
        self.torn_down = True


def indexed_problem(n_retain: int, n_forget: int, batch_size: int) -> UnlearningProblem:
    """Regression data whose first input column is the example's index (retain 0.., forget 1000..)."""
    g = torch.Generator().manual_seed(0)

    def data(n, offset):
        x = torch.cat([torch.arange(n, dtype=torch.float32).unsqueeze(1) + offset, torch.randn(n, 1, generator=g)], 1)
        return TensorData(x, torch.randn(n, 1, generator=g))

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    return UnlearningProblem(model, data(n_retain, 0), data(n_forget, 1000), RegressionTask(), batch_size=batch_size)


def run(problem, method, budget, seed=0, **kw):
    return unlearn(problem, method, budget, seed=seed, device="cpu", **kw)


# ---- budgets ----------------------------------------------------------------------------------

def test_budget_needs_a_limit_and_rejects_negative_values():
    with pytest.raises(ValueError, match="at least one"):
        Budget()
    with pytest.raises(ValueError, match="epochs"):
        Budget(epochs=-1)
    with pytest.raises(ValueError, match="steps"):
        Budget(steps=-2)
    with pytest.raises(ValueError, match="seconds"):
        Budget(seconds=0)


@pytest.mark.parametrize("n_forget, batch, epochs", [(10, 4, 2), (8, 4, 3), (3, 8, 2), (1, 1, 4)])
def test_epoch_budget_gives_epochs_times_forget_batches(n_forget, batch, epochs):
    p = indexed_problem(12, n_forget, batch)
    probe = Probe()
    res = run(p, probe, Budget(epochs=epochs))
    per_epoch = math.ceil(n_forget / batch)
    assert res.record.steps == len(probe.infos) == epochs * per_epoch
    assert res.record.steps_per_epoch == per_epoch
    assert res.record.epochs_completed == epochs
    assert res.record.stopped_by == "epochs"
    assert len(res.record.epoch_losses) == epochs
    assert [i.epoch for i in probe.infos] == [e for e in range(epochs) for _ in range(per_epoch)]
    assert [i.step for i in probe.infos] == list(range(epochs * per_epoch))
    assert all(i.planned_epochs == epochs for i in probe.infos)
    # each epoch is one shuffled pass over the forget set, last (short) batch kept
    for e in range(epochs):
        batches = probe.forget_ids[e * per_epoch : (e + 1) * per_epoch]
        assert [len(b) for b in batches] == [min(batch, n_forget - j * batch) for j in range(per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(1000, 1000 + n_forget))


def test_forget_order_is_reshuffled_between_epochs():
    p = indexed_problem(12, 10, 4)
    probe = Probe()
    run(p, probe, Budget(epochs=4))
    orders = {tuple(i for b in probe.forget_ids[e * 3 : (e + 1) * 3] for i in b) for e in range(4)}
    assert len(orders) > 1


def test_steps_budget_caps_and_counts_partial_epochs():
    p = indexed_problem(12, 10, 4)  # 3 steps per epoch
    probe = Probe()
    res = run(p, probe, Budget(epochs=5, steps=4))
    assert (res.record.steps, res.record.stopped_by, res.record.epochs_completed) == (4, "steps", 1)
    assert len(res.record.epoch_losses) == 2  # one full epoch and one partial
    probe = Probe()
    res = run(p, probe, Budget(steps=7))
    assert res.record.steps == 7 and res.record.stopped_by == "steps"
    assert [i.epoch for i in probe.infos] == [0, 0, 0, 1, 1, 1, 2]
    assert probe.infos[0].planned_epochs == 3  # ceil(7 / 3)
    res = run(p, Probe(), Budget(epochs=2, steps=100))
    assert (res.record.steps, res.record.stopped_by) == (6, "epochs")
    res = run(p, Probe(), Budget(epochs=0))
    assert res.record.steps == 0 and same_state(state_copy(res.model), state_copy(p.model))


def test_seconds_budget_starts_steps_only_before_the_deadline():
    p = indexed_problem(12, 10, 4)
    probe = Probe(sleep=0.02)
    limit = 0.25
    res = run(p, probe, Budget(seconds=limit))
    rec = res.record
    assert rec.stopped_by == "seconds"
    assert 1 <= rec.steps == len(probe.starts)
    assert rec.steps <= limit / 0.02 + 1  # every step takes at least its sleep
    # t0 precedes setup, so "started before t0 + limit" implies "started before setup + limit"
    assert all(s - probe.t_setup < limit for s in probe.starts)
    assert rec.seconds >= limit
    # overshoot: at most the last step plus bookkeeping (generous: machines are noisy)
    assert rec.seconds < limit + 1.0
    assert rec.steps > 3 or rec.seconds > limit  # it ran over several epochs or was genuinely slow
    assert probe.torn_down


def test_seconds_budget_counts_setup_and_can_allow_zero_steps():
    p = indexed_problem(12, 10, 4)
    probe = Probe(setup_sleep=0.3)
    res = run(p, probe, Budget(epochs=50, seconds=0.1))
    assert res.record.steps == 0 and res.record.stopped_by == "seconds"
    assert res.record.setup_seconds >= 0.3 and res.record.seconds >= 0.3
    assert same_state(state_copy(res.model), state_copy(p.model))


def test_seconds_combined_with_epochs_stops_at_whichever_comes_first():
    p = indexed_problem(12, 10, 4)
    res = run(p, Probe(), Budget(epochs=2, seconds=60.0))
    assert (res.record.steps, res.record.stopped_by) == (6, "epochs")
    res = run(p, Probe(sleep=0.02), Budget(epochs=1000, seconds=0.1))
    assert res.record.stopped_by == "seconds" and res.record.steps < 3000


# ---- batch streams ----------------------------------------------------------------------------

def test_retain_iterator_cycles_across_epoch_boundaries_and_reshuffles():
    p = indexed_problem(6, 10, 2)  # retain passes of 3 batches; epochs of 5 steps
    probe = Probe()
    run(p, probe, Budget(epochs=3))
    ids = probe.retain_ids
    assert all(len(b) == 2 for b in ids)
    passes = [sorted(i for b in ids[k : k + 3] for i in b) for k in range(0, 15, 3)]
    assert all(ps == list(range(6)) for ps in passes)  # pass 2 (steps 3-5) straddles the epoch boundary at 5
    orders = {tuple(i for b in ids[k : k + 3] for i in b) for k in range(0, 15, 3)}
    assert len(orders) > 1


def test_retain_drops_last_incomplete_batch_when_larger_than_a_batch():
    p = indexed_problem(7, 12, 2)
    probe = Probe()
    run(p, probe, Budget(epochs=1))
    assert all(len(b) == 2 for b in probe.retain_ids)
    for k in range(0, 6, 3):
        ids = [i for b in probe.retain_ids[k : k + 3] for i in b]
        assert len(set(ids)) == 6
    small = indexed_problem(3, 4, 8)  # retain smaller than a batch: every batch is the whole set
    probe = Probe()
    run(small, probe, Budget(epochs=3))
    assert all(sorted(b) == [0, 1, 2] for b in probe.retain_ids)


# ---- determinism and isolation ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["ngd", "minnorm_og", "salun", "scrub", "retrain"])
def test_same_seed_same_parameters_different_seed_differs(name):
    p = classification_problem(n_retain=12, n_forget=6, batch_size=4)
    runs = [run(p, create(name), Budget(epochs=2), seed=s) for s in (3, 3, 4)]
    a, b, c = (params_vector(r.model) for r in runs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(self.bn(x))


def bn_problem(batch_size=64):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    xr, xf = torch.randn(8, 3, generator=g), torch.randn(4, 3, generator=g) + 10.0
    return UnlearningProblem(BNNet(), TensorData(xr, torch.randn(8, 1, generator=g)),
                             TensorData(xf, torch.randn(4, 1, generator=g)), RegressionTask(), batch_size=batch_size)


@pytest.mark.parametrize("name", ["gd", "ga", "minnorm_og", "ridge", "retrain"])
def test_callers_model_is_never_modified(name):
    p = bn_problem()
    p.model.eval()
    before = state_copy(p.model)
    res = unlearn(p, create(name), Budget(epochs=3), device="cpu", forget_bn_stats=True)
    assert same_state(before, state_copy(p.model))
    assert all(q.grad is None for q in p.model.parameters())
    assert not p.model.training  # its mode is left alone too
    assert res.model is not p.model
    assert not same_state(before, state_copy(res.model))


def test_forget_bn_stats_forwards_forget_batches_before_the_retain_batch():
    p = bn_problem()
    rm0 = p.model.bn.running_mean.clone()
    xr, xf = p.retain.inputs, p.forget.inputs
    without = run(p, create("gd", lr=1e-30), Budget(steps=1))
    with_f = run(p, create("gd", lr=1e-30), Budget(steps=1), forget_bn_stats=True)
    torch.testing.assert_close(without.model.bn.running_mean, 0.9 * rm0 + 0.1 * xr.mean(0))
    expected = 0.9 * (0.9 * rm0 + 0.1 * xf.mean(0)) + 0.1 * xr.mean(0)
    torch.testing.assert_close(with_f.model.bn.running_mean, expected)
    # a method that uses forget batches already forwards them once; the flag adds nothing
    a = run(p, create("ngp", lr=1e-30), Budget(steps=1))
    b = run(p, create("ngp", lr=1e-30), Budget(steps=1), forget_bn_stats=True)
    torch.testing.assert_close(a.model.bn.running_mean, b.model.bn.running_mean)


# ---- errors -----------------------------------------------------------------------------------

def test_non_finite_loss_names_the_step_and_leaves_callers_model_alone(reg_problem):
    before = state_copy(reg_problem.model)
    probe = Probe(nan_at=3)
    with pytest.raises(NonFiniteLossError, match="step 3") as exc:
        run(reg_problem, probe, Budget(steps=10))
    assert exc.value.step == 3 and exc.value.method == "probe"
    assert isinstance(exc.value, OverunlearnError) and isinstance(exc.value, FloatingPointError)
    assert probe.torn_down
    assert same_state(before, state_copy(reg_problem.model))


def test_ga_with_a_huge_learning_rate_diverges_into_a_clear_error(reg_problem):
    before = state_copy(reg_problem.model)
    with pytest.raises(NonFiniteLossError, match="ga: the loss became") as exc:
        run(reg_problem, create("ga", lr=1e6, optimizer="sgd"), Budget(steps=200))
    assert 0 < exc.value.step < 200
    assert same_state(before, state_copy(reg_problem.model))


def test_empty_forget_or_retain_set_is_a_data_error(reg_problem):
    empty = TensorData(torch.zeros(0, 3), torch.zeros(0, 1))
    with pytest.raises(DataError, match="forget set is empty"):
        UnlearningProblem(reg_problem.model, reg_problem.retain, empty, RegressionTask())
    with pytest.raises(DataError, match="retain set is empty"):
        UnlearningProblem(reg_problem.model, empty, reg_problem.forget, RegressionTask())
    with pytest.raises(DataError, match="forget set is empty"):
        UnlearningProblem(reg_problem.model, reg_problem.retain, ListDataset([]), RegressionTask())


def test_regression_shape_mismatch_is_a_readable_data_error(reg_problem):
    p = reg_problem
    bad = UnlearningProblem(p.model, TensorData(p.retain.inputs, torch.zeros(len(p.retain), 3)), p.forget, p.task)
    with pytest.raises(DataError, match=r"output shape \(8, 1\) does not match target shape \(8, 3\)"):
        run(bad, create("gd"), Budget(epochs=1))
    with pytest.raises(DataError, match="rows"):
        TensorData(torch.zeros(4, 3), torch.zeros(5, 1))
    with pytest.raises(DataError, match="weights"):
        TensorData(torch.zeros(4, 3), torch.zeros(4, 1), torch.ones(3))


@pytest.mark.parametrize("name", ["gd", "ga", "ngp", "salun", "kl_unif", "scrub", "npo"])
def test_classification_target_errors_are_data_errors(cls_problem, name):
    p = cls_problem
    n = len(p.forget)
    cases = [
        (p.forget.targets[0], "heads"),  # a single tensor for a two-head model
        ((p.forget.targets[0] + 10, p.forget.targets[1]), "out of range"),
        ((p.forget.targets[0].float(), p.forget.targets[1]), "integers"),
        ((p.forget.targets[0].reshape(n, 1), p.forget.targets[1]), "class indices"),
    ]
    for targets, msg in cases:
        bad_f = TensorData(p.forget.inputs, targets)
        bad_r = TensorData(p.retain.inputs, p.retain.targets[0] if msg == "heads" else
                           tuple(t if i else _like(targets[0], t) for i, t in enumerate(p.retain.targets)))
        for retain, forget in [(p.retain, bad_f), (bad_r, p.forget)]:
            with pytest.raises(DataError, match=msg):
                run(UnlearningProblem(p.model, retain, forget, p.task, batch_size=64), create(name), Budget(epochs=2))


def _like(bad: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """Retain targets broken the same way as ``bad`` (a broken forget target)."""
    if bad.dtype.is_floating_point:
        return good.float()
    if bad.dim() == 2:
        return good.reshape(-1, 1)
    return good + 10


def test_nan_inputs_are_rejected_clearly():
    with pytest.raises(DataError, match="NaN"):
        TensorData(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(DataError, match="NaN"):
        TensorData(torch.zeros(1, 2), torch.tensor([[float("inf")]]))
    p = regression_problem()
    x = p.retain.inputs.clone()
    x[2, 1] = float("nan")
    ds = ListDataset([(x[i], p.retain.targets[i]) for i in range(len(x))])
    before = state_copy(p.model)
    with pytest.raises(DataError, match="retain batch of step 0 contains NaN or infinite inputs"):
        run(UnlearningProblem(p.model, ds, p.forget, p.task), create("gd"), Budget(epochs=1))
    assert same_state(before, state_copy(p.model))


# ---- data sources: torch Datasets, weights, tuple outputs -------------------------------------

class ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def as_dataset(data: TensorData) -> ListDataset:
    items = []
    for i in range(len(data)):
        y = data.targets[i] if isinstance(data.targets, torch.Tensor) else tuple(t[i] for t in data.targets)
        items.append((data.inputs[i], y) if data.weights is None else (data.inputs[i], y, data.weights[i]))
    return ListDataset(items)


@pytest.mark.parametrize("name", ["gd", "minnorm_og", "salun", "ngd"])
@pytest.mark.parametrize("weighted", [False, True])
def test_torch_dataset_gives_the_same_run_as_tensor_data(name, weighted):
    p = classification_problem(n_retain=10, n_forget=7, batch_size=3)
    if weighted:
        w = torch.linspace(0.2, 2.0, len(p.retain))
        p = UnlearningProblem(p.model, TensorData(p.retain.inputs, p.retain.targets, w), p.forget, p.task,
                              batch_size=3)
    ds = UnlearningProblem(p.model, as_dataset(p.retain), as_dataset(p.forget), p.task, batch_size=3)
    a = run(p, create(name), Budget(epochs=2), seed=5)
    b = run(ds, create(name), Budget(epochs=2), seed=5)
    torch.testing.assert_close(params_vector(a.model), params_vector(b.model))
    assert a.record.epoch_losses == pytest.approx(b.record.epoch_losses)


def test_sample_weights_scale_each_examples_loss():
    """GD with weights (2, 2, 0, 0) over four examples equals unweighted GD on the first two."""
    p = regression_problem(n_retain=4)
    w = torch.tensor([2.0, 2.0, 0.0, 0.0])
    weighted = UnlearningProblem(p.model, TensorData(p.retain.inputs, p.retain.targets, w), p.forget, p.task)
    subset = UnlearningProblem(p.model, p.retain.subset([0, 1]), p.forget, p.task)
    sgd = dict(optimizer="sgd", weight_decay=0.0, lr=0.1)
    a = run(weighted, create("gd", **sgd), Budget(steps=3))
    b = run(subset, create("gd", **sgd), Budget(steps=3))
    torch.testing.assert_close(params_vector(a.model), params_vector(b.model))


class TwoHeadRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.a, self.b = nn.Linear(8, 1), nn.Linear(8, 2)

    def forward(self, x):
        h = self.body(x)
        return self.a(h), self.b(h)


@pytest.mark.parametrize("name", ["gd", "ga", "ngp", "minnorm_og", "ridge", "l1_sparse", "ngd", "retrain"])
def test_tuple_outputs_for_regression(name):
    """A two-head regressor: the loss is the sum over heads of each head's mean squared error."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TwoHeadRegressor()

    def data(n):
        return TensorData(torch.randn(n, 3, generator=g), (torch.randn(n, 1, generator=g), torch.randn(n, 2, generator=g)))

    p = UnlearningProblem(model, data(8), data(4), RegressionTask(), batch_size=64)
    losses = []
    res = run(p, create(name, lr=1e-30), Budget(epochs=2), on_step=lambda i, v: losses.append(v))
    assert res.record.steps == 2 and isinstance(res.model(p.retain.inputs), tuple)
    if name in ("gd", "ngd"):  # theta stays at theta* (lr 1e-30): the loss is J(theta*; D_r)
        with torch.no_grad():
            out_a, out_b = model(p.retain.inputs)
        per = ((out_a - p.retain.targets[0]) ** 2).mean(1) + ((out_b - p.retain.targets[1]) ** 2).mean(1)
        assert losses == pytest.approx([float(per.mean())] * 2, rel=1e-6)
    assert all(math.isfinite(v) for v in losses)


def test_two_head_classifier_runs_every_method(cls_problem):
    from overunlearn import list_methods

    for name in list_methods():
        res = run(cls_problem, create(name), Budget(epochs=2))
        assert res.record.steps == 2 and all(math.isfinite(v) for v in res.record.epoch_losses)
        assert isinstance(res.model(cls_problem.retain.inputs), tuple)


def test_cuda_request_without_cuda_is_a_clear_error(reg_problem):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        unlearn(reg_problem, create("gd"), Budget(steps=1), device="cuda")


def test_classification_task_is_the_default_for_two_heads():
    assert isinstance(classification_problem().task, ClassificationTask)
    assert isinstance(TwoHeadMLP()(torch.zeros(2, 4)), tuple)
