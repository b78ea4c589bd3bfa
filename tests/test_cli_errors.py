"""Command-line error handling: bad options fail fast and cleanly (exit 2, no traceback, nothing trained);
a run in which some methods fail exits 1; small output fixes (progress lines, table alignment, atomic figures)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sweep_fake  # noqa: F401  (registers the fake benchmark and method)
from typer.testing import CliRunner

from overunlearn.cli import _register, app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register()
    return CliRunner()


def _text(res) -> str:
    """Output plus a non-exit exception, with the error box's borders and line wrapping undone."""
    text = res.output + (str(res.exception) if res.exception and not isinstance(res.exception, SystemExit) else "")
    return " ".join(text.replace("│", " ").split())


def _images(benchmark: str, tmp_path, *args: str) -> list[str]:
    return ["bench", benchmark, "--dataset", "digits", "--preset", "test", "--cache", str(tmp_path / "c"),
            "--device", "cpu", *args]


@pytest.mark.parametrize("benchmark", ["erase", "collapse"])
@pytest.mark.parametrize("args, expected", [
    (["--methods", "gd", "-T", "-3"], ["epoch counts must be positive", "-3"]),
    (["--methods", "gd", "-T", "0"], ["epoch counts must be positive"]),
    (["--dataset", "imagenet", "--data-root", "/nonexistent"], ["unknown dataset 'imagenet'", "digits"]),
    (["--preset", "bogus"], ["preset 'bogus'", "paper"]),
    (["--methods", "gd", "--hp", "gd.learning_rate=0.1"], ["learning_rate", "lr"]),
    (["--methods", "gd", "--hp", "ga.learning_rate=0.1"], ["learning_rate"]),  # a method not run is checked too
    (["--methods", "gd", "--p-forget", "1.5"], ["p_forget=1.5"]),
    (["--methods", "gd", "--n-train", "-5"], ["n_train"]),
    (["--methods", "gd", "--seeds", "abc"], ["cannot read seeds", "abc"]),
    (["--methods", "gd", "--device", "bogus"], ["bogus"]),
    (["--methods", "foo"], ["no method matches 'foo'"]),
    # a subset larger than the data is an error, not silently the whole split (digits: 1437 / 360 images)
    (["--methods", "gd", "--n-train", "5000"], ["--n-train", "5000 training images", "digits has 1437"]),
    (["--methods", "gd", "--n-test", "999"], ["--n-test", "999 test images", "digits has 360"]),
])
def test_bench_images_bad_options_fail_before_training(runner, tmp_path, benchmark, args, expected):
    out = tmp_path / "out"
    res = runner.invoke(app, _images(benchmark, tmp_path, "--out", str(out), *args))
    assert res.exit_code == 2, res.output
    assert not isinstance(res.exception, Exception)  # a clean exit, not a traceback
    text = _text(res)
    for word in expected:
        assert word in text, (word, text)
    assert "Traceback" not in text and "train accuracy" not in text
    assert not list((tmp_path / "c").rglob("*.pt")) and not out.exists()  # nothing was trained or written


@pytest.mark.parametrize("benchmark", ["erase", "collapse"])
def test_bench_images_out_is_a_folder(runner, tmp_path, benchmark):
    res = runner.invoke(app, _images(benchmark, tmp_path, "--methods", "gd", "--out", str(tmp_path / "rows.xlsx")))
    assert res.exit_code == 2 and "folder" in _text(res), res.output
    assert not (tmp_path / "rows.xlsx").exists()


def test_bench_images_preset_larger_than_the_data_is_a_warning():
    from overunlearn.benchmarks import get_benchmark
    from overunlearn.cli.bench_images import check_sizes

    said: list[str] = []
    bench = get_benchmark("erase", dataset="digits", preset="cpu", device="cpu")  # n_train 5000, n_test 2000
    check_sizes(bench, {}, echo=lambda msg, err=False: said.append(msg))
    assert any("n_train asks for 5000 training images but digits has 1437: using all 1437" in m for m in said)
    assert any("2000 test images but digits has 360" in m for m in said)


def test_bench_erase_failed_methods_exit_1(runner, tmp_path, monkeypatch):
    import overunlearn.engine as engine
    from overunlearn.sweep.journal import read_journal

    real = engine.unlearn

    def flaky(problem, method, *a, **k):
        if method.name == "gd":
            raise FloatingPointError("boom from gd")
        return real(problem, method, *a, **k)

    monkeypatch.setattr(engine, "unlearn", flaky)
    # what succeeded is in the table and the journal, the summary points at the journal, the exit code is 1
    out = tmp_path / "out"
    res = runner.invoke(app, _images("erase", tmp_path, "--methods", "gd,ridge", "-q", "--out", str(out)))
    assert res.exit_code == 1, res.output
    (journal,) = out.glob("*.jsonl")
    status = {r["method"]: r["status"] for r in read_journal(journal).records if r.get("kind") == "trial"}
    assert status == {"gd": "failed", "ridge": "finished"}
    assert f"failed: gd (the messages are in {journal})" in res.output
    tail = res.output[res.output.index("failed: gd"):]
    assert "gd seed 1: error: FloatingPointError: boom from gd" in tail
    assert "| gd | failed |" in res.output


def test_bench_poison_figure_seed_not_among_seeds(runner, tmp_path):
    out = tmp_path / "p"
    res = runner.invoke(app, ["bench", "poison", "--recipe", "smoke", "--seeds", "1", "--epochs", "3",
                              "--figure-seed", "7", "--out", str(out), "--cache", str(tmp_path / "c"),
                              "-q", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert "figure seed 7 is not among the seeds [1]" in text and "--figure-seed" in text
    assert not out.exists() and not (tmp_path / "c").exists()


def test_bench_poison_bad_device(runner, tmp_path):
    res = runner.invoke(app, ["bench", "poison", "--recipe", "smoke", "--seeds", "1", "--epochs", "3",
                              "--out", str(tmp_path / "p"), "--cache", str(tmp_path / "c"), "--device", "bogus"])
    assert res.exit_code == 2 and "--device" in _text(res), res.output


@pytest.mark.parametrize("pattern", ["zzz", "minnorm*x"])
def test_methods_without_a_match(runner, pattern):
    res = runner.invoke(app, ["methods", pattern])
    assert res.exit_code == 2, res.output
    text = _text(res)
    assert f"no method matches '{pattern}'" in text and "minnorm_og" in text and "gd" in text


def test_methods_with_a_match(runner):
    res = runner.invoke(app, ["methods", "minnorm*"])
    assert res.exit_code == 0 and res.output.startswith("minnorm_og"), res.output


def test_sweep_progress_shows_reference_values(tmp_path):
    from overunlearn.sweep.run import run_sweep
    from overunlearn.sweep.spec import parse_spec

    spec = parse_spec({"name": "r", "seeds": [1], "methods": ["gd"], "budget": {"epochs": 1},
                       "benchmark": {"name": "sweep_fake", "imports": ["sweep_fake"]},
                       "grid": {"lr": [1e-2]}})
    lines: list[str] = []
    run_sweep(spec, tmp_path / "j.jsonl", log=lines.append)
    ref = next(line for line in lines if "reference seed=1:" in line)
    values = ref.split("reference seed=1:", 1)[1]
    assert "original retain_mse=" in values and "ground_truth retain_mse=0.5 forget_gap=0.5" in values, ref


def test_poison_table_columns_line_up():
    from overunlearn.report.poison import format_table

    summary = [{"method": m, "T": T, "n": 3, "median": 0.5, "range_lo": 0.25, "range_hi": 0.75, "diverged": 0,
                "paper_median": pm, "paper_lo": pl, "paper_hi": ph}
               for m, T, pm, pl, ph in [("minnorm_og", 100, 0.6, 0.3, 0.9), ("gd", 100, None, None, None),
                                        ("original", None, None, None, None),
                                        ("ground_truth", None, None, None, None)]]
    run = SimpleNamespace(recipe={"name": "smoke", "original_steps": 10, "ground_truth_steps": 5},
                          seeds=[1, 2, 3], summary=lambda: summary)
    lines = format_table(run).splitlines()  # type: ignore[arg-type]
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    table = lines[header:]
    assert [line.split()[0] for line in table] == ["method", "minnorm_og", "gd", "(original)", "(ground"]
    median_end = table[0].index("median") + len("median")
    for line in table[1:]:
        assert line[:median_end].endswith("0.50"), line  # every median sits under the header
        assert line[median_end] == " "
    assert len({len(line) for line in table}) == 1


def test_frontier_plot_is_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from overunlearn.report.aggregate import ConfigGroup, MethodResult, SettingResult
    from overunlearn.report.figures import frontier_plot

    groups = [ConfigGroup("gd", f"gd{a}", {}, {}, metrics={1: {"acc": a, "err": 1 - a}}) for a in (0.7, 0.9)]
    s = SettingResult("sw", "s", "", [1], {"epochs": 1}, [("acc", "max"), ("err", "min")], "pareto", "mean_se",
                      [MethodResult("gd", groups, groups)], {})
    path = tmp_path / "fig" / "front.png"
    frontier_plot(s, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    good = path.read_bytes()

    def broken_savefig(self, fname, *args, **kwargs):  # dies half-way through writing
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG partial")
        else:
            with open(fname, "wb") as fh:
                fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        frontier_plot(s, path)
    assert path.read_bytes() == good  # the earlier figure is intact
    assert [p.name for p in path.parent.iterdir()] == ["front.png"]  # no temporary file left
