"""``overunlearn privacy``: the privacy report on the command line (fast: Data Poisoning, smoke recipe).

Defaults (methods, their points, epochs, N, ground truth) come from the benchmark; the tests read them
from the benchmark instead of naming values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from overunlearn.cli import _register, app


@pytest.fixture(autouse=True)
def _keep_threads():
    # the poison privacy path sets torch to one intra-op thread; give the other tests theirs back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register()
    return CliRunner()


def test_privacy_poison_smoke(runner, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["privacy", "poison", "--recipe", "smoke", "--models", "4", "--epochs", "5", "--methods",
            "gd,minnorm_og", "--out", str(out), "--cache", str(cache), "--device", "cpu", "-q",
            "--seed", "1", "--ground-truth", "extra"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["label"])
    labels = [line.split()[0] for line in lines[header + 1: header + 5]]
    assert labels == ["original", "ground_truth", "gd", "minnorm_og"]
    for col in ("ulira_auc", "klom_forget_mean", "mia_auc", "loss_forget"):
        assert col in lines[header]
    for name in ("privacy_rows.json", "privacy_arrays.npz", "privacy_table.txt", "privacy_config.json",
                 "loss_hist.png", "klom_cdf.png"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in res.output
    rows = json.loads((out / "privacy_rows.json").read_text())
    assert [r["label"] for r in rows] == labels
    assert all(r["n_models"] == 4 and r["setup"] == "poison-smoke" for r in rows)
    assert all(0.0 <= r["ulira_auc"] <= 1.0 and np.isfinite(r["klom_forget_mean"]) for r in rows)
    # hyperparameters are the benchmark's points (poison: paper Table 6 at the nearest tabulated T)
    from overunlearn.benchmarks import get_benchmark
    from overunlearn.benchmarks.base import method_points
    from overunlearn.privacy.runner import privacy_defaults

    bench = get_benchmark("poison", recipe="smoke")
    by_label = {r["label"]: r for r in rows}
    assert by_label["minnorm_og"]["hyper"] == method_points(bench, 5, ["minnorm_og"])["minnorm_og"]
    assert by_label["gd"]["budget"]["epochs"] == 5
    config = json.loads((out / "privacy_config.json").read_text())
    assert config["n_models"] == 4 and config["klom_bins"] == 3 and config["ground_truth"] == "extra"
    assert privacy_defaults(bench)["ground_truth"] in ("extra", "split")
    assert (out / "loss_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert any(cache.glob("privacy/poison-smoke-*/original/*.pt"))  # models and signals went to --cache


@pytest.mark.parametrize("args, expected", [
    (["privacy", "poison", "--methods", "gd,no_such_method"], ["no_such_method", "METHODS"]),
    (["privacy", "erase", "--methods", "bogus"], ["bogus", "METHODS"]),
    (["privacy", "no_such_benchmark"], ["no_such_benchmark", "BENCHMARKS"]),
    (["privacy", "poison", "--recipe", "huge"], ["huge", "quick", "smoke"]),
    (["privacy", "poison", "--models", "3"], ["--models 3", "at least 4"]),
    (["privacy", "poison", "--ground-truth", "both"], ["extra", "split"]),
    (["privacy", "poison", "--klom-bins", "many"], ["auto"]),
    (["privacy", "poison", "--dataset", "mnist"], ["'poison' takes no option 'dataset'", "recipe"]),
    (["privacy", "poison", "--option", "bogus=1"], ["bogus"]),
    (["privacy", "poison", "--option", "no-equals"], ["KEY=VALUE"]),
    (["privacy", "poison", "--epochs", "0"], ["positive"]),
    (["privacy", "poison", "--out", "x.json"], ["folder"]),
    (["privacy", "poison", "--quiet", "true"], ["true"]),
])
def test_privacy_bad_arguments(runner, tmp_path, args, expected):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "o")]
    res = runner.invoke(app, args + ["--cache", str(tmp_path / "c")])
    assert res.exit_code != 0
    text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    text = " ".join(text.replace("│", " ").split())  # undo the error box's line wrapping
    from overunlearn.benchmarks import list_benchmarks
    from overunlearn.methods import list_methods

    registry = {"METHODS": list_methods(), "BENCHMARKS": list_benchmarks()}  # the message names every one
    expected = [w for e in expected for w in registry.get(e, [e])]
    for word in expected:
        assert word in text, (word, text)
    assert not (tmp_path / "o").exists()  # nothing was run


def test_method_specs_use_the_benchmarks_points():
    from overunlearn.benchmarks import get_benchmark, list_benchmarks
    from overunlearn.benchmarks.base import method_points
    from overunlearn.cli.privacy import method_specs, resolve_methods

    poison = get_benchmark("poison", recipe="smoke")
    specs = method_specs(poison, ["gd", "minnorm_og"], 100)
    points = method_points(poison, 100, ["gd", "minnorm_og"])
    assert specs == [("gd", "gd", points["gd"], 100), ("minnorm_og", "minnorm_og", points["minnorm_og"], 100)]
    two = method_specs("erase", ["scrub"], [2, 5], overrides={"scrub": {"lr": 0.5}})
    assert [s[0] for s in two] == ["scrub@2", "scrub@5"]
    assert two[0][2] == {**method_points(get_benchmark("erase"), 2, ["scrub"])["scrub"], "lr": 0.5}
    # 'all': every method the benchmark runs by default, for every registered benchmark that names some
    for name in list_benchmarks():
        try:
            bench = get_benchmark(name)
        except ImportError:  # an optional dependency (facts: transformers)
            continue
        if callable(getattr(bench, "method_points", None)):
            assert resolve_methods(bench, "all", 10) == list(method_points(bench, 10))


def test_factory_options_are_read_from_the_signature():
    from overunlearn.cli.privacy import benchmark_options, factory_parameters

    names, open_ended = factory_parameters("poison")
    assert "recipe" in names and not open_ended
    assert benchmark_options("poison", recipe="smoke", options={"workers": 2})["recipe"] == "smoke"
    names, open_ended = factory_parameters("erase")  # the image benchmarks pass **kwargs on to their base
    assert {"dataset", "preset", "cache_dir", "device"} <= set(names) and open_ended
    opts = benchmark_options("erase", recipe="test", dataset="digits", n_train=100, n_test=None)
    assert opts["preset"] == "test" and opts["dataset"] == "digits" and opts["n_train"] == 100
    assert "n_test" not in opts and opts["progress"] is False


@pytest.fixture
def fake_report(monkeypatch):
    import overunlearn.cli.privacy as cli_privacy

    calls = []
    monkeypatch.setattr(cli_privacy, "privacy_after_bench", lambda *a, **k: calls.append((a, k)))
    return calls


def test_bench_poison_privacy_flag(runner, tmp_path, fake_report):
    out = tmp_path / "out"
    res = runner.invoke(app, ["bench", "poison", "--recipe", "smoke", "--seeds", "2", "--epochs", "1",
                              "--methods", "gd", "--out", str(out), "--cache", str(tmp_path / "cache"),
                              "-q", "--device", "cpu", "--privacy", "--privacy-models", "6"])
    assert res.exit_code == 0, res.output
    (args, kwargs), = fake_report
    assert args == ("poison", ["gd"], [1])
    assert kwargs["seed"] == 2 and kwargs["n_models"] == 6 and kwargs["recipe"] == "smoke"
    assert kwargs["out"] == out / "privacy"


def test_bench_images_privacy_flag(runner, tmp_path, monkeypatch, fake_report):
    import overunlearn.cli.bench_images as bench_images

    def fake_run(benchmark, **kw):
        rows = [{"row": "original", "seed": 4}, {"row": "ground_truth", "seed": 4},
                {"row": "gd", "seed": 4, "status": "ok"}, {"row": "ga", "seed": 4, "status": "error: boom"},
                {"row": "scrub", "seed": 4, "status": "ok"}]
        return rows, {"dataset": kw["dataset"], "preset": "cpu", "epochs": 7, "seeds": [4], "device": "cpu",
                      "total_seconds": 0.0}

    monkeypatch.setattr(bench_images, "run_image_benchmark", fake_run)
    res = runner.invoke(app, ["bench", "collapse", "--dataset", "digits", "--seeds", "4-5", "--preset", "cpu",
                              "--n-train", "500", "--hp", "gd.lr=0.5", "--privacy", "-q"])
    assert res.exit_code == 1, res.output  # a method failed: the command says so in its exit code
    (args, kwargs), = fake_report
    assert args == ("collapse", ["gd", "scrub"], 7)  # failed methods are left out
    assert kwargs["seed"] == 4 and kwargs["n_models"] is None and kwargs["recipe"] == "cpu"
    assert kwargs["dataset"] == "digits" and kwargs["overrides"] == {"gd": {"lr": 0.5}}
    assert kwargs["image_options"]["n_train"] == 500
