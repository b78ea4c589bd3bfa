"""Methods declare their vectorised form (methods/vectorised.py); the engine runs any method that has
one as a vectorised ensemble member, every other one trial by trial (engine.unlearn_many)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_ensemble_unlearn import _max_diff, _problem

import overunlearn
from overunlearn.engine import BatchedRun, Budget, batchable, unlearn, unlearn_batched, unlearn_many
from overunlearn.errors import NonFiniteLossError
from overunlearn.methods import Method, MethodConfig, create, get_method, list_methods
from overunlearn.methods.descent import squared_norm
from overunlearn.methods.vectorised import VectorisedForm
from overunlearn.problem import TensorData


@dataclass(frozen=True)
class _ShrinkConfig(MethodConfig):
    ascent: float = 0.2
    start: float = 0.3


class _ShrinkingAscent(Method):
    """A user's method (not registered): descent on retain, ascent on forget, and a ridge penalty whose
    coefficient falls as ``start / (1 + t)``."""

    name = "shrinking_ascent"
    Config = _ShrinkConfig
    uses_forget = True

    def penalty(self, step: int) -> float:
        return self.config.start / (1.0 + step)

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return (ctx.batch_loss(retain) - self.config.ascent * ctx.batch_loss(forget)
                + self.penalty(info.step) * squared_norm(ctx.trainable()))

    def vectorised(self, epochs: int, seed: int) -> VectorisedForm:
        return VectorisedForm(retain_weight=1.0, forget_weight=-self.config.ascent, ridge=self.penalty)


class _Halved(Method):
    """A user's method without a vectorised form."""

    name = "halved"

    def loss(self, ctx, info, retain, forget):  # type: ignore[override]
        return 0.5 * ctx.batch_loss(retain)


def _run(method: Method, seed: int = 1, epochs: int = 6, key=None) -> BatchedRun:
    return BatchedRun(_problem(seed), method, Budget(epochs=epochs), seed=seed, key=key)


def test_a_user_method_with_a_form_runs_vectorised_and_matches_the_engine():
    runs = [_run(_ShrinkingAscent(lr=1e-2), seed=s, key=s) for s in (1, 2)] + [_run(create("gd", lr=1e-2), key="gd")]
    assert all(batchable(r.problem, r.method, r.budget) is None for r in runs)
    for run, out in zip(runs, unlearn_many(runs, "cpu"), strict=True):
        assert out.key == run.key and out.vectorised and out.batch_size == 3 and out.model is not None
        solo = unlearn(run.problem, run.method, run.budget, seed=run.seed, device="cpu")
        assert _max_diff(solo.model, out.model) < 2e-5
        assert out.record.epoch_losses == pytest.approx(solo.record.epoch_losses, rel=1e-4, abs=1e-6)


def test_a_method_without_a_form_runs_on_its_own_through_unlearn_many():
    method = _Halved(lr=1e-2)
    run = _run(method, key="halved")
    assert batchable(run.problem, method, run.budget) == "method 'halved' has no vectorised form"
    with pytest.raises(ValueError, match="no vectorised form"):
        unlearn_batched([run])
    steps: list[int] = []
    gd = _run(create("gd", lr=1e-2), key="gd")
    out, out_gd = unlearn_many([run, gd], "cpu", progress=steps.append)
    assert not out.vectorised and out.batch_size == 1 and out.model is not None and out.key == "halved"
    assert out_gd.vectorised and out_gd.key == "gd"
    solo = unlearn(run.problem, method, run.budget, seed=run.seed, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(solo.model.parameters(), out.model.parameters(), strict=True))
    assert out.record.epoch_losses == solo.record.epoch_losses
    assert sum(steps) == 2 * 6
    # vectorise=False: every run on its own
    assert not any(o.vectorised for o in unlearn_many([run, gd], "cpu", vectorise=False))


def test_every_registered_method_runs_vectorised_exactly_when_it_has_a_form():
    names = list_methods(task="regression")
    runs = [_run(create(n, lr=1e-2), key=n) for n in names]
    forms = {n: get_method(n)(lr=1e-2).vectorised(6, 1) for n in names}
    assert any(f is not None for f in forms.values())
    for run, out in zip(runs, unlearn_many(runs, "cpu"), strict=True):
        assert out.vectorised == (forms[run.key] is not None), run.key
        assert (batchable(run.problem, run.method, run.budget) is None) == out.vectorised
        if out.model is None:  # (a method another test registered may fail here): it fails on its own too
            assert not out.vectorised, out.error
            with pytest.raises(Exception) as info:
                unlearn(run.problem, run.method, run.budget, seed=run.seed, device="cpu")
            assert type(info.value).__name__ == out.error_type
            continue
        solo = unlearn(run.problem, run.method, run.budget, seed=run.seed, device="cpu")
        assert _max_diff(solo.model, out.model) < 1e-4, run.key
    for n in list_methods():  # the ones for other tasks: a form is optional, its reason is given
        method = create(n)
        if method.vectorised(6, 1) is None:
            assert method.why_not_vectorised()


def test_forms_use_the_schedules_the_hooks_use():
    ridge = create("ridge", reg_coef=0.5, reg_coef_decay=0.7)
    assert ridge.vectorised(5, 0).ridge == ridge.coefficient
    l1 = create("l1_sparse", reg_coef=0.05)
    form = l1.vectorised(5, 0)
    assert [form.l1(t) for t in range(5)] == [l1.coefficient(t, t - 1, 5) for t in range(5)]
    mn = create("minnorm_og", reg_coef=0.5, num_gd_epochs=2, proj_pd=2, grad_sample_size=3)
    proj = mn.vectorised(7, 4).projection
    assert [proj.projects(t) for t in range(7)] == [mn.should_project(t, 7) for t in range(7)]
    assert proj.coefficient == mn.coefficient and proj.sample_size == 3 and proj.sampler_seed == 4
    assert create("minnorm_og", reg_coef=0.0).vectorised(7, 4).projection is None
    ref = create("minnorm_og", implementation="reference")
    assert ref.vectorised(7, 4) is None and "fast" in ref.why_not_vectorised()
    assert create("retrain").vectorised(3, 0).fresh_start and not create("gd").vectorised(3, 0).fresh_start
    with pytest.raises(ValueError, match="noise_seed"):
        VectorisedForm(noise_sigma=0.1)


def test_unlearn_many_captures_failures_per_run_and_survives_a_broken_batch(monkeypatch):
    wild = _problem(4)
    wild.forget = TensorData(wild.forget.inputs, torch.full_like(wild.forget.targets, 1e30))  # the loss overflows
    with pytest.raises(NonFiniteLossError) as info:
        unlearn(wild, create("ga", lr=1e-2), Budget(epochs=5), seed=4, device="cpu")
    runs = [BatchedRun(wild, create("ga", lr=1e-2), Budget(epochs=5), seed=4, key="vectorised"),
            BatchedRun(wild, create("ga", lr=1e-2, optimizer="sgd"), Budget(epochs=5), seed=4, key="alone"),
            _run(create("gd", lr=1e-2), key="fine")]
    vec, alone, fine = unlearn_many(runs, "cpu")
    assert vec.vectorised and not alone.vectorised and fine.model is not None
    for out in (vec, alone):
        assert out.model is None and out.error_type == "NonFiniteLossError" and out.error_step == info.value.step
    assert alone.traceback and "NonFiniteLossError" in alone.traceback

    import overunlearn.engine.many as many

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(many, "unlearn_batched", broken)
    outs = unlearn_many([_run(create("gd", lr=1e-2), key=1)], "cpu")
    assert not outs[0].vectorised and outs[0].model is not None


def test_methods_and_linalg_never_import_the_engine():
    root = Path(overunlearn.__file__).parent
    for sub in ("methods", "linalg"):
        for path in (root / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == "overunlearn.engine" or n.startswith("overunlearn.engine.") or
                               n == "overunlearn.ensemble_unlearn" for n in names), path


def test_a_subclass_that_changes_the_step_does_not_inherit_the_vectorised_form():
    """A user's subclass of GD with another loss must run its own step, not GD's vectorised one."""

    class ZeroLossGD(get_method("gd")):
        name = "zero_loss_gd"

        def loss(self, ctx, info, retain, forget):
            return 0.0 * ctx.batch_loss(retain)

    problem = _problem(0)
    method = ZeroLossGD()
    assert "redefines loss" in batchable(problem, method, Budget(epochs=3))
    out = unlearn_many([BatchedRun(problem, method, Budget(epochs=3), seed=0, key=0)])[0]
    assert not out.vectorised
    alone = unlearn(problem, ZeroLossGD(), Budget(epochs=3), seed=0).model
    gd = unlearn(problem, create("gd"), Budget(epochs=3), seed=0).model
    assert _max_diff(out.model, alone) == 0.0  # its own step, through the engine
    assert _max_diff(out.model, gd) > 0.0
