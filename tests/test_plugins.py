"""Plugins: a method and a benchmark registered in the user's own module, loaded with ``--plugin MODULE`` on
every command (and through the ``overunlearn.plugins`` entry points), reach the sweep's worker processes,
the privacy report and the generic bench command; a bad plugin is one clear message. Also the cache root's
``XDG_CACHE_HOME`` and the help's flags."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
from typer.testing import CliRunner

from overunlearn import plugins
from overunlearn.cli import _register, app
from overunlearn.errors import PluginError

BENCH = "plugin_toy"
METHOD = "plugin_gd"

PLUGIN = textwrap.dedent('''
    """A user's plugin: a method (a tiny subclass of gd) and a tiny classification benchmark."""
    import torch
    from torch import nn

    from overunlearn import ClassificationTask, TensorData, UnlearningProblem
    from overunlearn.benchmarks import MetricSpec, register_benchmark
    from overunlearn.methods import get_method, list_methods, register_method

    if "plugin_gd" not in list_methods():

        @register_method("plugin_gd")
        class PluginGD(get_method("gd")):
            """Gradient descent on the retain set, registered by a plugin."""


    class ToyBenchmark:
        """12 points in 2-d, 3 classes, a 2-16-3 MLP; 4 points to forget. Trains in milliseconds."""

        name = "plugin_toy"
        metrics = (MetricSpec("retain_acc", "max", "retain accuracy"), MetricSpec("forget_acc", "min", "forget acc"))
        default_epochs = (2,)
        privacy_defaults = {"n_models": 4, "ground_truth": "split", "epochs": 1}

        def __init__(self, hidden: int = 16) -> None:
            self.hidden = int(hidden)

        def method_points(self, epochs):
            return {"plugin_gd": {"lr": 0.01}, "gd": {"lr": 0.02}}

        def _data(self, seed):
            g = torch.Generator().manual_seed(100 + seed)
            x = torch.randn(16, 2, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            return TensorData(x[:12], y[:12]), TensorData(x[12:], y[12:])

        def problem(self, seed):
            retain, forget = self._data(seed)
            torch.manual_seed(seed)
            model = nn.Sequential(nn.Linear(2, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 3))
            opt = torch.optim.Adam(model.parameters(), lr=0.05)
            x, y = torch.cat([retain.inputs, forget.inputs]), torch.cat([retain.targets, forget.targets])
            for _ in range(20):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return UnlearningProblem(model, retain, forget, ClassificationTask(), batch_size=4)

        def evaluate(self, model, seed):
            retain, forget = self._data(seed)
            model = model.cpu()
            with torch.no_grad():
                acc = lambda d: float((model(d.inputs).argmax(1) == d.targets).float().mean())
                return {"retain_acc": acc(retain), "forget_acc": acc(forget)}

        def reference(self, seed):
            orig = self.evaluate(self.problem(seed).model, seed)
            return {"original": orig, "ground_truth": {"retain_acc": 1.0, "forget_acc": 0.0}}

        def privacy_setup(self, seed):
            from overunlearn.privacy.setups import digits_setup

            return digits_setup(seed=seed, n_retain=40, n_forget=8, n_test=20, hidden=8, steps=10, lr=1e-2,
                                batch_size=16, train_batch_size=None)


    register_benchmark("plugin_toy")(ToyBenchmark)
''')


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin module's name, importable here (sys.path) and in subprocesses (PYTHONPATH); the active
    plugins and $OVERUNLEARN_PLUGINS are restored afterwards, so no other test's workers import it."""
    folder = tmp_path_factory.mktemp("plugin")
    name = "overunlearn_test_plugin_toy"
    (folder / f"{name}.py").write_text(PLUGIN)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
        mp.setenv(plugins.ENV_VAR, "")
        mp.setattr(plugins, "_LOADED", [])
        yield name
    sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    monkeypatch.setattr(plugins, "_LOADED", [])
    monkeypatch.setenv(plugins.ENV_VAR, "")


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register()
    return CliRunner()


def _text(res) -> str:
    return " ".join(res.output.replace("│", " ").split())


def test_methods_lists_the_plugins_method(runner, plugin):
    for args in (["methods", "--plugin", plugin], ["--plugin", plugin, "methods"], [f"--plugin={plugin}", "methods"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert METHOD in res.output and "gd " in res.output
    assert plugins.active_plugins() == [plugin]
    assert os.environ[plugins.ENV_VAR] == plugin  # what worker processes import at start


SPEC = '''
name = "plug"
seeds = [1, 2]
methods = ["plugin_gd", "gd"]
[benchmark]
name = "plugin_toy"
[budget]
epochs = 2
[metrics]
retain_acc = "max"
forget_acc = "min"
'''


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sweep_runs_the_plugins_benchmark_and_method(runner, plugin, tmp_path, jobs):
    spec = tmp_path / "plug.toml"
    spec.write_text(SPEC)
    journal = tmp_path / "plug.jsonl"
    res = runner.invoke(app, ["sweep", str(spec), "--journal", str(journal), "--jobs", jobs, "--threads", "1",
                              "--plugin", plugin, "-q"])
    assert res.exit_code == 0, res.output
    assert "4 finished" in res.output
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    trials = [r for r in records if r.get("kind") == "trial"]
    assert sorted(r["method"] for r in trials) == ["gd", "gd", METHOD, METHOD]
    assert all(r["status"] == "finished" for r in trials), trials
    if jobs == "2":  # the trials ran in spawned workers, which imported the plugin
        assert os.getpid() not in {r["pid"] for r in trials}


def test_sweep_tasks_name_the_active_plugins(plugin):
    from overunlearn.sweep.run import make_tasks, reference_tasks
    from overunlearn.sweep.spec import parse_spec

    plugins.load_plugins([plugin])
    import tomllib

    sp = parse_spec(tomllib.loads(SPEC))
    tasks = make_tasks(sp.trials, "cpu")
    assert tasks and all(plugin in t["imports"] for t in tasks)
    assert all(plugin in t["imports"] for t in reference_tasks(sp, set(), "cpu", None))
    from overunlearn.sweep.executors import _worker_env

    assert _worker_env()[plugins.ENV_VAR] == plugin


def test_privacy_runs_on_the_plugins_benchmark(runner, plugin, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["privacy", BENCH, "--plugin", plugin, "--models", "4", "--out", str(out),
                              "--cache", str(tmp_path / "cache"), "--device", "cpu", "-q", "--no-plots"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "privacy_rows.json").read_text())
    # the methods, their points, the epochs, N and the ground truth are the benchmark's own
    assert [r["label"] for r in rows] == ["original", "ground_truth", METHOD, "gd"]
    assert {r["n_models"] for r in rows if r["label"] != "ground_truth"} == {4}
    config = json.loads((out / "privacy_config.json").read_text())
    assert config["ground_truth"] == "split"
    assert {m["method"]: (m["hyper"], m["epochs"]) for m in config["methods"]} == {
        METHOD: ({"lr": 0.01}, 1), "gd": ({"lr": 0.02}, 1)}
    # a constructor option, read from the factory's signature
    res = runner.invoke(app, ["privacy", BENCH, "--plugin", plugin, "--n-train", "5", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "'plugin_toy' takes no option 'n_train'" in _text(res), res.output
    res = runner.invoke(app, ["privacy", BENCH, "--plugin", plugin, "--option", "widht=3", "--out",
                              str(tmp_path / "x")])
    assert res.exit_code == 2 and "widht" in _text(res), res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not importlib.util.find_spec("overunlearn.cli.bench_run"),
                    reason="the generic `bench run` command is not there yet")
def test_bench_run_runs_the_plugins_benchmark(runner, plugin, tmp_path):
    res = runner.invoke(app, ["bench", "run", BENCH, "--plugin", plugin, "--seeds", "1", "--out", str(tmp_path / "o"),
                              "-q", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert METHOD in res.output


def test_entry_points_load_their_modules(plugin, monkeypatch):
    import importlib.metadata

    seen = []

    def fake_entry_points(*, group=None, **_):
        seen.append(group)
        return [EntryPoint(name="toy", value=f"{plugin}:anything", group=group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_DONE", {})
    assert plugins.load_entry_points() == [plugin]
    assert seen == [plugins.ENTRY_POINT_GROUP] and plugin in plugins.active_plugins()
    assert plugins.load_entry_points() == [plugin] and len(seen) == 1  # once per process
    from overunlearn.benchmarks import list_benchmarks

    assert BENCH in list_benchmarks()

    def broken(*, group=None, **_):
        return [EntryPoint(name="bad", value="no_such_module_xyz", group=group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    monkeypatch.setattr(plugins, "_ENTRY_POINTS_DONE", {})
    with pytest.raises(PluginError, match="entry point 'bad'.*no_such_module_xyz"):
        plugins.load_entry_points()


def test_a_bad_plugin_is_one_clear_message(runner, tmp_path, monkeypatch):
    for args in (["methods", "--plugin", "no_such_module_xyz"], ["--plugin", "no_such_module_xyz", "sweep", "x.toml"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit)
        assert ("cannot import plugin module 'no_such_module_xyz': No module named 'no_such_module_xyz'; "
                "is it on PYTHONPATH?") in res.output
        assert "Traceback" not in res.output
    (tmp_path / "raising_plugin_xyz.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = runner.invoke(app, ["methods", "--plugin", "raising_plugin_xyz"])
    assert res.exit_code == 2 and "RuntimeError: boom at import" in res.output and "Traceback" not in res.output
    # the console script: one line on stderr, exit 2
    proc = subprocess.run([sys.executable, "-m", "overunlearn", "methods", "--plugin=no_such_module_xyz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cannot import plugin module 'no_such_module_xyz': No module named 'no_such_module_xyz'; "
        "is it on PYTHONPATH?"]


def test_split_plugin_args():
    names, rest = plugins.split_plugin_args(["bench", "run", "x", "--plugin", "a", "--plugin=b.c", "-q", "--",
                                             "--plugin", "z"])
    assert names == ["a", "b.c"] and rest == ["bench", "run", "x", "-q", "--", "--plugin", "z"]
    with pytest.raises(PluginError, match="--plugin needs a module name"):
        plugins.split_plugin_args(["methods", "--plugin"])


def test_a_plugin_exiting_or_raising_on_import_is_one_message_naming_it(tmp_path, monkeypatch):
    """A plugin calling sys.exit() on import used to end the command silently; one that raises was asked
    whether it is on PYTHONPATH. Both now say what happened, the latter where."""
    (tmp_path / "plug_exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "plug_raises.py").write_text("x = 1\nraise RuntimeError('broken plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"'plug_exits' called sys.exit\(3\) while being imported"):
        plugins.load_plugins(["plug_exits"], record=False)
    with pytest.raises(PluginError) as info:
        plugins.load_plugins(["plug_raises"], record=False)
    text = str(info.value)
    assert "raised RuntimeError: broken plugin" in text and "plug_raises.py, line 2" in text
    assert "PYTHONPATH" not in text
    (tmp_path / "plug_syntax.py").write_text("def f(:\n")
    with pytest.raises(PluginError) as info:
        plugins.load_plugins(["plug_syntax"], record=False)
    text = str(info.value)  # (its own file and line, not a line of overunlearn's)
    assert "SyntaxError" in text and "plug_syntax.py, line 1" in text and "plugins.py" not in text


def test_help_shows_the_plugin_option_and_flags_as_flags(runner):
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "--plugin" in res.output and "MODULE" in res.output
    for command in (["sweep"], ["privacy"], ["report"], ["bench", "erase"]):
        res = runner.invoke(app, [*command, "--help"])
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output, (command, res.output)
    res = runner.invoke(app, ["sweep", "--help"])
    assert "[engine].device" in _text(res)  # square brackets are not taken for markup
    assert "--jobs" in res.output and "-j" in res.output


def test_cache_root_honours_xdg_cache_home(tmp_path, monkeypatch):
    from overunlearn.storage import default_cache_dir

    monkeypatch.delenv("OVERUNLEARN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "overunlearn"
    monkeypatch.setenv("OVERUNLEARN_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("OVERUNLEARN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # ignored, as the XDG specification says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "overunlearn"
