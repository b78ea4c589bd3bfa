"""``overunlearn bench run BENCHMARK``: a benchmark registered by this module (as a plugin would) runs
through the sweep runner and journal, prints the bench table, and resumes without recomputing."""

from __future__ import annotations

import torch
from torch import nn
from typer.testing import CliRunner

from overunlearn import RegressionTask, TensorData, UnlearningProblem
from overunlearn.benchmarks import MetricSpec, register_benchmark
from overunlearn.cli import _register, app
from overunlearn.sweep.journal import read_journal

NAME = "bench_run_toy"
NO_POINTS = "bench_run_toy_bare"


class ToyBenchmark:
    """Regression of 12 points with a 2-5-1 MLP: 9 retain points, 3 forget points with a shifted target."""

    name = NAME
    metrics = (MetricSpec("retain_mse", "min", "retain MSE"), MetricSpec("forget_mse", "max", "forget MSE"))
    default_epochs = 2

    def __init__(self, shift: float = 2.0, width: int = 5) -> None:
        self.shift = float(shift)
        self.width = int(width)

    def _data(self, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(12, 2, generator=g)
        y = x[:, :1] - x[:, 1:]
        return x[:9], y[:9], x[9:], y[9:] + self.shift

    def _fit(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(2, self.width), nn.Tanh(), nn.Linear(self.width, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(40):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        return model

    def problem(self, seed: int) -> UnlearningProblem:
        xr, yr, xf, yf = self._data(seed)
        model = self._fit(torch.cat([xr, xf]), torch.cat([yr, yf]), seed)
        return UnlearningProblem(model, TensorData(xr, yr), TensorData(xf, yf), RegressionTask(), batch_size=3)

    def evaluate(self, model: nn.Module, seed: int) -> dict[str, float]:
        xr, yr, xf, yf = self._data(seed)
        with torch.no_grad():
            return {"retain_mse": float(((model(xr) - yr) ** 2).mean()),
                    "forget_mse": float(((model(xf) - yf) ** 2).mean())}

    def reference(self, seed: int) -> dict[str, dict[str, float]]:
        xr, yr, _, _ = self._data(seed)
        return {"original": self.evaluate(self.problem(seed).model, seed),
                "ground_truth": self.evaluate(self._fit(xr, yr, seed), seed)}

    def method_points(self, epochs: int) -> dict[str, dict[str, float]]:
        return {"gd": {"lr": 0.05}, "ga": {"lr": 0.01}}


class BareBenchmark(ToyBenchmark):
    """The same, without the optional protocol members (no default methods or epochs)."""

    name = NO_POINTS
    default_epochs = None  # type: ignore[assignment]
    method_points = None  # type: ignore[assignment]


register_benchmark(NAME)(ToyBenchmark)
register_benchmark(NO_POINTS)(BareBenchmark)


def _invoke(*args: str):
    _register()
    return CliRunner().invoke(app, ["bench", "run", *args])


def _trials(journal) -> list[dict]:
    return [r for r in read_journal(journal).records if r.get("kind") == "trial"]


def test_bench_run_runs_a_plugin_benchmark_and_resumes(tmp_path):
    out = tmp_path / "out"
    res = _invoke(NAME, "--seeds", "1-2", "--out", str(out), "-q", "--device", "cpu", "--threads", "1")
    assert res.exit_code == 0, res.output
    journal = out / f"{NAME}.jsonl"
    assert journal.exists() and (out / f"{NAME}_table.md").exists() and (out / f"{NAME}_table.csv").exists()
    assert (out / f"{NAME}.png").exists()
    lines = [line for line in res.output.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["original", "ground truth", "gd", "ga"]
    assert "±" in res.output and "T=2" in res.output  # two seeds: mean ± SE; the benchmark's default epochs
    trials = _trials(journal)
    assert sorted((t["method"], t["seed"]) for t in trials) == [("ga", 1), ("ga", 2), ("gd", 1), ("gd", 2)]
    assert {t["method"]: t["config"]["lr"] for t in trials} == {"gd": 0.05, "ga": 0.01}
    assert all(t["budget"] == {"epochs": 2} for t in trials)
    # the rerun recomputes nothing and prints the same table
    again = _invoke(NAME, "--seeds", "1-2", "--out", str(out), "-q", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert len(_trials(journal)) == 4
    assert [line for line in again.output.splitlines() if line.startswith("|")] == lines


def test_bench_run_options_epochs_methods_and_hp(tmp_path):
    out = tmp_path / "out"
    res = _invoke(NAME, "--option", "shift=3", "--option", "width=4", "--methods", "gd", "-T", "1,3",
                  "--hp", "gd.lr=0.02", "--statistic", "median", "--out", str(out), "-q", "--device", "cpu")
    assert res.exit_code == 0, res.output
    journals = list(out.glob("*.jsonl"))
    assert len(journals) == 1 and journals[0].name != f"{NAME}.jsonl"  # not the default run's journal
    trials = _trials(journals[0])
    assert sorted(t["budget"]["epochs"] for t in trials) == [1, 3]
    assert all(t["method"] == "gd" and t["config"]["lr"] == 0.02 for t in trials)
    assert all(t["benchmark"]["options"] == {"shift": 3, "width": 4} for t in trials)
    assert len(list(out.glob("*_table.md"))) == 2  # one table per epoch count
    assert "(" in res.output and "±" not in res.output  # median (range)


def test_bench_run_clear_errors(tmp_path):
    cases = [
        (["no_such_benchmark"], "unknown benchmark"),
        ([NO_POINTS, "-T", "1"], "--methods"),  # no method_points: name them
        ([NO_POINTS, "--methods", "gd"], "--epochs"),  # no default epochs: give them
        ([NAME, "--option", "colour=red"], "colour"),
        ([NAME, "--option", "novalue"], "KEY=VALUE"),
        ([NAME, "--hp", "ridge.lr=0.1"], "not run"),
        ([NAME, "--hp", "gd.learning_rate=0.1"], "learning_rate"),
        ([NAME, "--methods", "nope*"], "no method matches"),
        ([NAME, "--out", str(tmp_path / "x.xlsx")], "folder"),
        ([NAME, "-T", "0"], "positive"),
    ]
    for args, expected in cases:
        res = _invoke(*args, *([] if "--out" in args else ["--out", str(tmp_path / "o")]))
        text = " ".join(res.output.replace("│", " ").split())
        assert res.exit_code == 2, (args, res.output)
        assert expected in text, (args, text)
    assert not (tmp_path / "o").exists()  # nothing ran


def test_bench_run_without_points_runs_named_methods(tmp_path):
    res = _invoke(NO_POINTS, "--methods", "gd", "-T", "1", "--out", str(tmp_path / "o"), "-q", "--device", "cpu")
    assert res.exit_code == 0, res.output
    (journal,) = (tmp_path / "o").glob(f"{NO_POINTS}*.jsonl")
    (trial,) = _trials(journal)
    assert trial["method"] == "gd" and trial["budget"] == {"epochs": 1}


def test_every_registered_benchmark_declares_registered_methods_at_valid_points():
    """``method_points(e)`` of each registered benchmark (at its default epochs) names registered methods
    whose configs accept the points; ``privacy_defaults`` has the documented keys."""
    from overunlearn.benchmarks import get_benchmark, list_benchmarks
    from overunlearn.benchmarks.base import default_epochs
    from overunlearn.methods import create, list_methods

    checked = []
    for name in list_benchmarks():
        try:
            bench = get_benchmark(name)
        except Exception:  # noqa: BLE001 - a benchmark that needs constructor options (e.g. a test's own)
            continue
        fn = getattr(bench, "method_points", None)
        if not callable(fn):
            continue
        for T in default_epochs(bench):
            points = fn(T)
            assert points, name
            for method, hyper in points.items():
                assert method in list_methods(), (name, method)
                create(method, **hyper)  # raises if the config rejects a point
        privacy = getattr(bench, "privacy_defaults", None)
        if privacy is not None:
            assert set(privacy) >= {"n_models", "ground_truth", "epochs"} and privacy["n_models"] >= 4, name
            assert privacy["ground_truth"] in ("extra", "split"), name
        checked.append(name)
    assert {"erase", "collapse", "facts"} <= set(checked)


def test_bench_runs_trials_of_other_code_again(tmp_path, monkeypatch):
    """A bench table shows what this code computes: after a code change the journalled trials run again."""
    import overunlearn.sweep.journal as journal_module
    import overunlearn.sweep.run as run_module

    out = tmp_path / "out"
    args = (NAME, "--seeds", "1", "--out", str(out), "-q", "--device", "cpu")
    assert _invoke(*args).exit_code == 0
    journal = out / f"{NAME}.jsonl"
    before = _trials(journal)
    monkeypatch.setattr(run_module, "code_fingerprint", lambda: "othercode000")
    monkeypatch.setattr(journal_module, "code_fingerprint", lambda: "othercode000")
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    after = _trials(journal)
    assert len(after) == 2 * len(before)  # every trial ran again under the new fingerprint
    assert {t["code"] for t in after[len(before):]} == {"othercode000"}
