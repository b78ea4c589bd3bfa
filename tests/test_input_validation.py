"""Bad input gets a clear, early error: budgets, hyperparameters, data, models (found by a user review)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import overunlearn.engine as engine
from overunlearn import (
    Budget,
    ClassificationTask,
    RegressionTask,
    TensorData,
    UnlearningProblem,
    create,
    unlearn,
)
from overunlearn.errors import DataError, NonFiniteLossError


def _clf_problem(n=60, classes=3, batch_size=8, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, classes))
    retain, forget = TensorData(x[10:], y[10:]), TensorData(x[:10], y[:10])
    args = dict(model=model, retain=retain, forget=forget, task=ClassificationTask(), batch_size=batch_size) | kw
    return UnlearningProblem(**args)


# ---- budgets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,msg", [
    (dict(epochs=2.5), ValueError, "whole number"),
    (dict(steps=float("inf")), ValueError, "whole number"),
    (dict(epochs="3"), TypeError, "whole number"),
    (dict(steps=True), TypeError, "whole number"),
    (dict(seconds="1"), TypeError, "number"),
    (dict(epochs=-1), ValueError, ">= 0"),
])
def test_budget_rejects_non_integral_or_non_numeric_limits(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        Budget(**kw)


def test_budget_accepts_integral_floats_as_ints():
    b = Budget(epochs=3.0, steps=7.0)
    assert (b.epochs, b.steps) == (3, 7) and isinstance(b.epochs, int) and isinstance(b.steps, int)


# ---- hyperparameters -------------------------------------------------------------------------

@pytest.mark.parametrize("method,kw,exc,msg", [
    ("gd", dict(lr="0.1"), TypeError, "lr='0.1' must be a number"),
    ("gd", dict(lr=float("inf")), ValueError, "lr=inf must be finite"),
    ("minnorm_og", dict(grad_sample_size=2.5), TypeError, "grad_sample_size=2.5 must be an integer"),
    ("minnorm_og", dict(proj_pd=True), TypeError, "proj_pd=True must be an integer"),
    ("ridge", dict(reg_coef=None), TypeError, "reg_coef=None must be a number"),
])
def test_configs_check_types_and_finiteness(method, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        create(method, **kw)


def test_configs_accept_ints_for_floats_and_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert create("gd", lr=1).config.lr == 1
    assert create("minnorm_og", proj_pd=np.int64(3), reg_coef=np.float32(0.5)).config.proj_pd == 3


# ---- data and models -------------------------------------------------------------------------

def test_weights_must_be_finite_and_non_negative():
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    with pytest.raises(DataError, match="NaN or infinite"):
        TensorData(x, y, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(DataError, match=">= 0"):
        TensorData(x, y, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="floating point"):
        TensorData(x, y, torch.tensor([1, 1, 1, 1]))


def test_task_class_instead_of_instance_is_named():
    with pytest.raises(TypeError, match=r"ClassificationTask\(\)"):
        _clf_problem(task=ClassificationTask)


@pytest.mark.parametrize("wrap", ["dataloader", "iterable"])
def test_dataloader_or_iterable_dataset_is_refused_with_advice(wrap):
    ds = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))

    class It(IterableDataset):
        def __iter__(self):
            return iter(ds)

    data = DataLoader(ds, batch_size=4) if wrap == "dataloader" else It()
    with pytest.raises(DataError, match="map-style torch Dataset"):
        _clf_problem(retain=data)


def test_non_finite_model_parameters_are_refused_before_unlearning():
    p = _clf_problem()
    with torch.no_grad():
        p.model[2].bias[1] = float("inf")
    with pytest.raises(DataError, match=r"parameters contain NaN or infinite values.*2\.bias"):
        UnlearningProblem(p.model, p.retain, p.forget, p.task, batch_size=8)


def test_model_failing_on_the_inputs_names_the_set_shape_and_dtype():
    p = _clf_problem()
    bad = UnlearningProblem(p.model, TensorData(torch.randn(50, 7), p.retain.targets[:50]), p.forget, p.task,
                            batch_size=8)
    with pytest.raises(DataError, match=r"retain set: the model failed on the first batch \(inputs of shape \(8, 7\)"):
        unlearn(bad, create("gd"), Budget(epochs=1))


def test_class_index_out_of_range_beyond_the_first_batch_is_found_before_the_run():
    p = _clf_problem(n=200)
    targets = p.retain.targets.clone()
    targets[150] = 9  # far beyond the first batch of 8
    bad = UnlearningProblem(p.model, TensorData(p.retain.inputs, targets), p.forget, p.task, batch_size=8)
    with pytest.raises(DataError, match="retain set: head 0: class index 9 of example 150 is out of range"):
        unlearn(bad, create("gd"), Budget(epochs=1))


class _ExpHead(nn.Module):
    """exp of a linear map: finite parameters whose outputs (and output gradients) overflow."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        with torch.no_grad():
            self.lin.weight.fill_(100.0)

    def forward(self, x):
        return torch.exp(self.lin(x))


def test_minnorm_og_non_finite_jacobian_is_a_non_finite_loss_error_with_its_step():
    x = torch.full((12, 3), 5.0)
    p = UnlearningProblem(_ExpHead(), TensorData(x[4:], torch.zeros(8, 1)), TensorData(x[:4], torch.zeros(4, 1)),
                          RegressionTask(), batch_size=4)
    with pytest.raises(NonFiniteLossError) as exc:
        unlearn(p, create("minnorm_og", reg_coef=0.5), Budget(epochs=2))
    assert exc.value.step == 0 and exc.value.method == "minnorm_og"
    assert "Jacobian" in str(exc.value)


# ---- wall-clock budgets ------------------------------------------------------------------------

def test_one_off_process_warm_up_is_not_charged_to_the_run(monkeypatch):
    # the first optimizer of a process imports torch._dynamo (seconds); unlearn pays that before
    # its clock starts, so a seconds budget is not cut short for the first run of a process
    calls = []

    def slow_warm_up():
        calls.append(1)
        time.sleep(0.6)

    monkeypatch.setattr(engine, "warm_up", slow_warm_up)
    rec = unlearn(_clf_problem(), create("gd"), Budget(seconds=0.5), seed=0).record
    assert calls and rec.steps > 0 and rec.setup_seconds < 0.3 and rec.stopped_by == "seconds"


def test_user_config_with_unresolvable_annotation_still_validates_its_numbers():
    # a method config written elsewhere, with an annotation only a type checker can resolve
    import dataclasses

    from overunlearn.methods.base import MethodConfig

    @dataclasses.dataclass(frozen=True)
    class MyConfig(MethodConfig):
        strength: float = 1.0
        helper: NotImportableAnywhere | None = None  # noqa: F821

    assert MyConfig(strength=2).strength == 2
    with pytest.raises(TypeError, match="strength='x' must be a number"):
        MyConfig(strength="x")


# ---- a new user's review (2026-12-03) ----------------------------------------------------------

def test_subset_takes_a_boolean_mask_as_indexing_does_and_refuses_what_it_cannot_read():
    x, y = torch.arange(12.0).view(6, 2), torch.arange(6)
    data = TensorData(x, y)
    mask = torch.tensor([False, False, False, False, True, True])
    assert data.subset(mask).targets.tolist() == [4, 5]  # (a long cast read it as positions 0 and 1)
    assert data.subset(~mask).targets.tolist() == [0, 1, 2, 3]
    assert data.subset([True, False, True, False, False, False]).targets.tolist() == [0, 2]
    assert data.subset(range(2, 4)).targets.tolist() == [2, 3]
    assert data.subset([-1]).targets.tolist() == [5]
    with pytest.raises(DataError, match="one entry per example"):
        data.subset(torch.tensor([True, False]))
    with pytest.raises(DataError, match="integer positions or a boolean mask"):
        data.subset(torch.tensor([0.0, 1.0]))
    with pytest.raises(DataError, match=r"lie in \[-6, 6\)"):
        data.subset([0, 6])


@pytest.mark.parametrize("targets,msg", [
    (None, "targets are missing"),
    ([0, 1, 2, 1], "list of int.*torch.tensor"),
    ((), "empty sequence"),
])
def test_targets_of_the_wrong_type_name_the_fix(targets, msg):
    with pytest.raises(DataError, match=msg):
        TensorData(torch.randn(4, 3), targets)


def test_numpy_targets_name_the_conversion():
    np = pytest.importorskip("numpy")
    with pytest.raises(DataError, match="numpy.ndarray.*torch.as_tensor"):
        TensorData(torch.randn(4, 3), np.zeros(4, dtype=np.int64))


def test_a_dict_as_forget_set_names_tensor_data():
    p = _clf_problem()
    with pytest.raises(DataError, match="forget is a dict.*TensorData"):
        UnlearningProblem(p.model, p.retain, {"x": torch.randn(4, 5), "labels": torch.zeros(4)}, ClassificationTask())


def test_unlearn_takes_a_method_name_or_class_and_refuses_a_bare_number_as_budget():
    from overunlearn.methods.descent import GD

    p = _clf_problem()
    assert unlearn(p, "gd", Budget(steps=1), device="cpu").record.method == "gd"
    assert unlearn(p, GD, Budget(steps=1), device="cpu").record.method == "gd"
    with pytest.raises(TypeError, match=r"Budget\(epochs=5\)"):
        unlearn(p, create("gd"), 5, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="method must be a Method"):
        unlearn(p, 3, Budget(steps=1), device="cpu")  # type: ignore[arg-type]


def test_float16_parameters_with_adamw_are_refused_before_any_work_and_sgd_runs():
    p = _clf_problem()
    half = UnlearningProblem(p.model.half(), TensorData(p.retain.inputs.half(), p.retain.targets),
                             TensorData(p.forget.inputs.half(), p.forget.targets), ClassificationTask())
    with pytest.raises(ValueError, match="AdamW cannot step float16.*optimizer='sgd'"):
        unlearn(half, create("gd", lr=1e-3), Budget(steps=2), device="cpu")
    assert unlearn(half, create("gd", lr=1e-3, optimizer="sgd"), Budget(steps=2), device="cpu").record.steps == 2


def test_empty_subsets_stay_empty():
    data = TensorData(torch.randn(6, 3), torch.arange(6))
    for empty in ([], range(0), torch.zeros(0, dtype=torch.long)):
        assert len(data.subset(empty)) == 0  # ([] reads as float32: it was refused as "not integer positions")


def test_the_autocast_decline_sees_layers_returning_tuples():
    """``nn.MultiheadAttention`` returns a tuple; under autocast its block crashed on a dtype mismatch."""
    import overunlearn.linalg.projection as P
    from overunlearn.linalg.jacobian import output_jacobian

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.att(x, x, x, need_weights=False)[0].float().mean(1)[:, :3]

    torch.manual_seed(0)
    m, x = Attend(), torch.randn(5, 4, 8)
    v = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = P.project_onto_span(output_jacobian(m, x, lambda out: out), v)
        got = P.project_model_onto_span(m, x, lambda out: out, v)
    assert P.last_route.reason == "autocast"
    torch.testing.assert_close(got, ref)


def test_select_output_positions_and_bad_selectors():
    from overunlearn.structure import select_output

    a, b = torch.zeros(1), torch.ones(1)
    assert select_output((a, b), 1) is b and select_output((a, b), -2) is a
    assert select_output({"x": a, "none": None, "y": b}, 1) is b  # (None entries skipped, as to_tuple() does)
    np = pytest.importorskip("numpy")
    assert select_output((a, b), np.int64(1)) is b
    for bad in (True, 1.5):
        with pytest.raises(DataError, match="name an entry"):
            select_output((a, b), bad)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="returned 2 outputs"):
        select_output((a, b), 2)


# ---- a new user's review of their own PyTorch model (2026-12-03) -------------------------------------

class _Examples(torch.utils.data.Dataset):
    def __init__(self, items):  # noqa: ANN001
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        return self.items[i]


@pytest.mark.parametrize("weight, msg", [(-1.0, "must be >= 0"), (float("nan"), "contain NaN or infinite"),
                                         (1, "must be floating point")])
@pytest.mark.parametrize("where", ["retain", "forget"])
def test_a_datasets_weights_follow_tensor_datas_rule(weight, msg, where):
    """Weights a Dataset yields were never checked: a negative one silently turned GA's ascent into descent
    (forget accuracy 1.0), a NaN one read as a diverged loss with advice to lower the learning rate."""
    p = _clf_problem()
    data = getattr(p, where)
    # (one bad weight among good ones; integer weights on every example, as a batch collates to one dtype)
    items = [(data.inputs[i], data.targets[i], weight if i == len(data) - 1 or isinstance(weight, int) else 1.0)
             for i in range(len(data))]
    kw = {where: _Examples(items)}
    bad = UnlearningProblem(**{"model": p.model, "retain": p.retain, "forget": p.forget, "task": p.task,
                               "batch_size": 4, **kw})
    with pytest.raises(DataError, match=f"a batch's weights {msg}"):
        unlearn(bad, create("ga" if where == "forget" else "gd", lr=1e-3), Budget(epochs=3), device="cpu")


@pytest.mark.parametrize("label, msg", [(7, r"batch of step \d+: label 7 \(head 0\) is out of range \[0, 3\).*check "
                                            r"the labels of the whole set"),
                                        (-100, r"batch of step \d+: label -100 \(head 0\) is negative; labels are class "
                                               r"indices \(a classifier has no unscored mark\)"),
                                        (-1, r"batch of step \d+: label -1 \(head 0\) is negative")])
def test_a_bad_label_in_a_later_batch_names_the_step(label, msg):
    p = _clf_problem(classes=3)
    items = [(p.retain.inputs[i], p.retain.targets[i] if i < 40 else torch.tensor(label)) for i in range(len(p.retain))]
    bad = UnlearningProblem(p.model, _Examples(items), p.forget, ClassificationTask(), batch_size=4)
    with pytest.raises(DataError, match=msg) as info:
        unlearn(bad, create("gd", lr=1e-3), Budget(epochs=20), device="cpu")
    assert info.value.step > 0 and f"step {info.value.step}" in str(info.value)  # (what a sweep's record keeps)
    from overunlearn.engine import BatchedRun, unlearn_many

    (out,) = unlearn_many([BatchedRun(bad, create("gd", lr=1e-3), Budget(epochs=20), seed=0, key=0)], "cpu")
    assert out.model is None and out.error_step == info.value.step and out.error_type == "DataError"


def test_a_methods_own_index_error_is_not_blamed_on_the_data():
    """An IndexError from a method's own wrong targets (in-memory data, step 0) stays the method's error."""
    import torch.nn.functional as F
    from conftest import tiny_method

    # (2 of the 3 classes' logits: the method's own bug)
    Wrong = tiny_method("wrong_targets", lambda ctx, info, r, f: F.cross_entropy(ctx.forward(r)[:, :2], r.targets))
    p = _clf_problem(classes=3)
    with pytest.raises(IndexError, match="out of bounds"):
        unlearn(p, Wrong(lr=1e-3), Budget(steps=3), device="cpu")


def test_device_typos_integer_images_and_a_budget_that_runs_out_before_a_step():
    p = _clf_problem()
    with pytest.raises(RuntimeError, match="'gpu' is not a device: use 'auto', 'cpu'"):
        unlearn(p, create("gd"), Budget(steps=1), device="gpu")
    ints = UnlearningProblem(p.model, TensorData((p.retain.inputs * 10).to(torch.uint8), p.retain.targets), p.forget,
                             ClassificationTask())
    with pytest.raises(DataError, match="uint8.*converted to the model's float dtype"):
        unlearn(ints, create("gd"), Budget(steps=1), device="cpu")
    with pytest.warns(UserWarning, match="ran out before the first step"):
        res = unlearn(p, create("gd"), Budget(seconds=1e-9), device="cpu")
    assert res.record.steps == 0


def test_a_forward_drawing_random_numbers_is_named_as_such():
    from conftest import LinearThen

    import overunlearn.linalg.projection as P
    from overunlearn.methods import MinNormOG  # (exported, as the class a user looks for)

    p = _clf_problem()
    noisy = UnlearningProblem(LinearThen(5, 3, lambda lin, x: lin(x + 0.1 * torch.randn_like(x))),  # (eval mode too)
                              p.retain, p.forget, ClassificationTask())
    report = create("minnorm_og").explain(noisy)
    assert isinstance(create("minnorm_og"), MinNormOG)
    assert P.last_route.reason == "nondeterministic" and "two identical forward passes" in str(report)
    again = create("minnorm_og").explain(noisy)  # (the remembered failure keeps its reason)
    assert P.last_route.reason == "nondeterministic" and "two identical forward passes" in str(again)


def test_data_errors_name_the_example_and_read_a_single_target_tensor_as_targets():
    x = torch.randn(6, 3)
    x[4, 1] = float("nan")
    with pytest.raises(DataError, match=r"inputs contains NaN or infinite values \(example 4\)"):
        TensorData(x, torch.zeros(6))
    with pytest.raises(DataError, match=r"^targets has 5 rows but inputs have 6"):
        TensorData(torch.randn(6, 3), torch.zeros(5, 3))
    with pytest.raises(DataError, match=r"targets\[1\] \(head 1\) has 5 rows"):
        TensorData(torch.randn(6, 3), (torch.zeros(6), torch.zeros(5)))


def test_a_model_on_the_meta_device_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = nn.Linear(5, 3)
    p = _clf_problem()
    with pytest.raises(DataError, match=r"meta device, without values \(weight, bias\): load its weights first"):
        UnlearningProblem(model, p.retain, p.forget, ClassificationTask())
