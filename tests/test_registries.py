"""Registering one's own methods and benchmarks, from a review of a researcher extending the library: names with a
dash, duplicate names, configs that are not frozen dataclasses, methods that misuse the loop, benchmarks whose
metrics are malformed or missing, and benchmarks that draw from unseeded global generators."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from torch import nn

from overunlearn import Budget, ClassificationTask, TensorData, UnlearningProblem, unlearn
from overunlearn.benchmarks import MetricSpec, list_benchmarks, register_benchmark
from overunlearn.benchmarks.base import _BENCHMARKS, check_metrics, get_benchmark, seeded
from overunlearn.methods import create, get_method, list_methods, register_method
from overunlearn.methods.base import Method, MethodConfig
from overunlearn.methods.registry import _REGISTRY


@pytest.fixture
def clean_registries():
    list_benchmarks()  # (the built-ins register when first needed: load them before taking the copy)
    methods, benches = dict(_REGISTRY), dict(_BENCHMARKS)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(methods)
    _BENCHMARKS.clear()
    _BENCHMARKS.update(benches)


def _method(name: str, config: type | None = None, **members) -> type[Method]:  # noqa: ANN003
    def loss(self, ctx, info, retain, forget):  # noqa: ANN001, ANN202
        return ctx.batch_loss(retain)

    body = {"loss": loss, **members}
    if config is not None:
        body["Config"] = config
    return type(name, (Method,), body)


def _problem() -> UnlearningProblem:
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    return UnlearningProblem(nn.Linear(3, 2), TensorData(x[:8], y[:8]), TensorData(x[8:], y[8:]), ClassificationTask(),
                             batch_size=4)


# ---- methods ---------------------------------------------------------------------------------------------------

def test_a_method_name_with_a_dash_is_usable(clean_registries):
    register_method("my-ga")(_method("MyGA"))
    assert "my_ga" in list_methods()
    assert create("my-ga").name == create("my_ga").name == "my_ga"


def test_another_class_under_a_taken_name_is_refused_and_the_same_definition_replaces(clean_registries):
    with pytest.raises(ValueError, match="a method named 'gd' is already registered"):
        register_method("gd")(_method("Other"))

    def define():  # the same module and qualified name each time: a module reloaded, a cell run twice
        class Reloaded(Method):
            def loss(self, ctx, info, retain, forget):  # noqa: ANN001, ANN202
                return ctx.batch_loss(retain)

        return register_method("reloaded")(Reloaded)

    first, second = define(), define()
    assert first is not second and get_method("reloaded") is second


def test_a_method_config_must_be_a_frozen_method_config_dataclass(clean_registries):
    @dataclasses.dataclass(frozen=True)
    class Plain:
        alpha: float = 0.1

    @dataclasses.dataclass
    class Mutable:
        alpha: float = 0.1

    class Undecorated(MethodConfig):
        alpha: float = 0.1

    for config, message in ((Plain, "deriving from overunlearn.methods.MethodConfig"), (Mutable, "deriving from"),
                            (Undecorated, r"annotates \['alpha'\] but they are not dataclass fields")):
        with pytest.raises(TypeError, match=message):
            register_method("bad_config")(_method("Bad", config))
    with pytest.raises(TypeError, match="subclass of overunlearn.methods.Method"):
        register_method("not_a_method")(object)
    with pytest.raises(TypeError, match="takes the method's name"):
        register_method(_method("NoName"))  # type: ignore[arg-type]


def test_a_method_that_reads_forget_without_uses_forget_or_returns_no_scalar_gets_one_message():
    def uses(self, ctx, info, retain, forget):  # noqa: ANN001, ANN202
        return ctx.batch_loss(forget)

    with pytest.raises(TypeError, match="uses_forget = True"):
        unlearn(_problem(), _method("NoForget", loss=uses)(), Budget(steps=1), device="cpu")

    def per_sample(self, ctx, info, retain, forget):  # noqa: ANN001, ANN202
        return ctx.problem.task.per_sample_loss(ctx.forward(retain), retain.targets)

    with pytest.raises(TypeError, match=r"loss\(\) must return a scalar tensor .* shape \(4,\)"):
        unlearn(_problem(), _method("PerSample", loss=per_sample)(), Budget(steps=1), device="cpu")


# ---- benchmarks --------------------------------------------------------------------------------------------------

class Toy:
    """A tiny benchmark that draws its data from torch's, NumPy's and Python's global generators unseeded."""

    name = "toy_unseeded"
    metrics = (MetricSpec("retain_loss", "min"), MetricSpec("noise", "min"))

    def problem(self, seed):  # noqa: ANN001, ANN201
        x = torch.randn(12, 3)  # unseeded, on purpose
        y = (x[:, 0] > 0).long()
        model = nn.Linear(3, 2)
        return UnlearningProblem(model, TensorData(x[:8], y[:8]), TensorData(x[8:], y[8:]), ClassificationTask(),
                                 batch_size=4)

    def evaluate(self, model, seed):  # noqa: ANN001, ANN201
        return {"retain_loss": float(model.weight.detach().sum()), "noise": float(np.random.rand() + random.random())}

    def reference(self, seed):  # noqa: ANN001, ANN201
        return {"original": {"retain_loss": 0.0, "noise": 0.0}, "ground_truth": {"retain_loss": 0.0, "noise": 0.0}}


def test_a_taken_benchmark_name_is_refused(clean_registries):
    with pytest.raises(ValueError, match="a benchmark named 'erase' is already registered"):
        register_benchmark("erase")(Toy)
    register_benchmark("toy_unseeded")(Toy)
    register_benchmark("toy_unseeded")(Toy)  # the same definition again: fine


def test_malformed_benchmarks_are_one_message(clean_registries):
    class Strings(Toy):
        metrics = ("retain_loss", "noise")

    class NoEvaluate:
        name = "no_evaluate"
        metrics = Toy.metrics

        def problem(self, seed):  # noqa: ANN001, ANN201
            return None

        def reference(self, seed):  # noqa: ANN001, ANN201
            return {}

    register_benchmark("strings")(Strings)
    register_benchmark("no_evaluate")(NoEvaluate)
    with pytest.raises(ValueError, match=r"every entry of metrics must be a MetricSpec.*'retain_loss'"):
        get_benchmark("strings")
    with pytest.raises(ValueError, match=r"has no method\(s\) evaluate"):
        get_benchmark("no_evaluate")
    with pytest.raises(ValueError, match=r"evaluate\(\) returned no 'noise'"):
        check_metrics(Toy(), {"retain_loss": 1.0})
    assert check_metrics(Toy(), {"retain_loss": 1, "noise": np.float32(2.5)}) == {"retain_loss": 1.0, "noise": 2.5}


def test_a_benchmark_drawing_unseeded_gets_the_same_numbers_whatever_ran_before(clean_registries):
    """The worker runs problem, reference and evaluate under generators seeded by the trial's seed (a plugin's
    numbers depended on the worker count), and leaves the caller's generators as they were."""
    from overunlearn.sweep import worker

    register_benchmark("toy_unseeded")(Toy)
    task = {"id": "t", "config_key": "c", "benchmark_key": "toy", "device": "cpu",
            "trial": {"benchmark": {"name": "toy_unseeded", "options": {}}, "seed": 3, "method": "gd",
                      "config": {"lr": 0.01}, "budget": {"epochs": 1}, "engine": {}}}
    records = []
    for burn in (0, 5):
        worker.clear_caches()
        torch.rand(burn), np.random.rand(burn), [random.random() for _ in range(burn)]  # what ran before
        state = torch.get_rng_state()
        records.append(worker._run_trial(task))
        assert torch.equal(torch.get_rng_state(), state)
    assert records[0]["status"] == "finished", records[0].get("error")
    assert records[0]["metrics"] == records[1]["metrics"]
    with seeded(7):
        a = (torch.rand(2), np.random.rand(), random.random())
    with seeded(7):
        assert (torch.equal(a[0], torch.rand(2)), a[1] == np.random.rand(), a[2] == random.random()) == (True,) * 3


def test_a_trial_whose_evaluate_misses_a_metric_fails_and_says_which(clean_registries):
    from overunlearn.sweep import worker

    class Partial(Toy):
        def evaluate(self, model, seed):  # noqa: ANN001, ANN201
            return {"retain_loss": 0.0}

    register_benchmark("partial")(Partial)
    worker.clear_caches()
    rec = worker._run_trial({"id": "t", "config_key": "c", "benchmark_key": "partial", "device": "cpu",
                             "trial": {"benchmark": {"name": "partial", "options": {}}, "seed": 1, "method": "gd",
                                       "config": {}, "budget": {"epochs": 1}, "engine": {}}})
    assert rec["status"] == "failed" and rec["phase"] == "evaluate"
    assert "returned no 'noise'" in rec["error"]


def test_seeded_leaves_the_cuda_seed_alone():
    """``torch.manual_seed`` would also reseed CUDA's generators (on a machine without CUDA: queued until it starts),
    which ``fork_rng(devices=[])`` does not restore."""
    import torch.cuda

    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(7)
        state = torch.cuda.get_rng_state_all()
        with seeded(1234):
            pass
        assert all(torch.equal(a, b) for a, b in zip(state, torch.cuda.get_rng_state_all()))
        return
    tracker = torch.cuda._lazy_seed_tracker
    torch.cuda.manual_seed_all(7)
    queued = tracker.manual_seed_all_cb
    with seeded(1234):
        pass
    get_benchmark("poison")  # (factories run under seeded(0))
    assert tracker.manual_seed_all_cb is queued
