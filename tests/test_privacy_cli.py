"""``overunlearn privacy``: the privacy report on the command line (fast: Data Poisoning, smoke recipe)."""

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
            "gd,minnorm_og", "--out", str(out), "--cache", str(cache), "--device", "cpu", "--no-progress",
            "--seed", "1"]
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
    # hyperparameters are the benchmark's presets (paper Table 6 at the nearest tabulated T)
    from overunlearn.benchmarks.poison import preset

    by_label = {r["label"]: r for r in rows}
    assert by_label["minnorm_og"]["hyper"] == preset("minnorm_og", 5).kwargs()
    assert by_label["gd"]["budget"]["epochs"] == 5
    config = json.loads((out / "privacy_config.json").read_text())
    assert config["n_models"] == 4 and config["ground_truth"] == "extra" and config["klom_bins"] == 3
    assert (out / "loss_hist.png").read_bytes()[:4] == b"\x89PNG"
    assert any(cache.glob("privacy/poison-smoke-*/original/*.pt"))  # models and signals went to --cache


@pytest.mark.parametrize("args, expected", [
    (["privacy", "poison", "--methods", "gd,no_such_method"], ["no_such_method", "minnorm_og", "l1_sparse"]),
    (["privacy", "erase", "--methods", "bogus"], ["bogus", "scrub", "salun"]),
    (["privacy", "no_such_benchmark"], ["no_such_benchmark", "poison", "erase", "collapse"]),
    (["privacy", "poison", "--recipe", "huge"], ["huge", "quick", "smoke"]),
    (["privacy", "poison", "--models", "3"], ["--models 3", "at least 4"]),
    (["privacy", "poison", "--ground-truth", "both"], ["extra", "split"]),
    (["privacy", "poison", "--klom-bins", "many"], ["auto"]),
])
def test_privacy_bad_arguments(runner, tmp_path, args, expected):
    res = runner.invoke(app, args + ["--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    text = " ".join(text.replace("│", " ").split())  # undo the error box's line wrapping
    for word in expected:
        assert word in text, (word, text)
    assert not (tmp_path / "o").exists()  # nothing was run


def test_method_specs_use_the_shipped_presets():
    from overunlearn.benchmarks.erase import ERASE_METHOD_POINTS
    from overunlearn.benchmarks.poison import POISON_METHODS, preset
    from overunlearn.cli.privacy import method_specs, resolve_methods

    assert resolve_methods("poison", "all") == list(POISON_METHODS)
    specs = method_specs("poison", ["gd", "minnorm_og"], 100)
    assert specs == [("gd", "gd", preset("gd", 100).kwargs(), 100),
                     ("minnorm_og", "minnorm_og", preset("minnorm_og", 100).kwargs(), 100)]
    two = method_specs("erase", ["scrub"], [2, 5], overrides={"scrub": {"lr": 0.5}})
    assert [s[0] for s in two] == ["scrub@2", "scrub@5"]
    assert two[0][2] == {**ERASE_METHOD_POINTS["scrub"], "lr": 0.5}
    assert "kl_unif" in resolve_methods("collapse", None)



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
                              "--no-progress", "--device", "cpu", "--privacy", "--privacy-models", "6"])
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
