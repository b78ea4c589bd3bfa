"""Command-line reliability (issue 19): spec values and devices validated up front, absurd grids refused
fast, our errors and the foreseeable system ones as one message with exit code 1 or 2, never a traceback;
exit 1 when a trial failed; Ctrl-C says what was kept and how to resume."""

from __future__ import annotations

import time

import pytest
import test_reliability_fake as fake
import torch
from typer.testing import CliRunner

from overunlearn.cli import _register, app
from overunlearn.sweep.journal import JournalWriter, read_journal
from overunlearn.sweep.spec import SpecError, parse_spec

HEAD = '''
seeds = {seeds}
methods = {methods}
[benchmark]
name = "sweep_fake"
imports = ["test_reliability_fake"]
[budget]
epochs = {epochs}
'''


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    _register()
    return CliRunner()


def write_spec(tmp_path, seeds="[1]", methods='["gd"]', extra="", name="rel", epochs=2) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(HEAD.format(seeds=seeds, methods=methods, epochs=epochs) + extra)
    return str(path)


def clean(res) -> str:
    """Output of a command that must have ended cleanly: no exception escaped, no traceback printed."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.output
    assert "Traceback" not in text, text
    return " ".join(text.replace("│", " ").split())  # (an error box's borders and line wrapping undone)


@pytest.mark.parametrize("seeds, expected", [
    ("{start = 1, stop = 3.5}", "stop = 3.5 must be a whole number"),
    ('{start = 1, stop = "x"}', "stop = 'x' must be a whole number"),
    ("{start = 1, stop = 1e9}", "stop = 1000000000.0 must be a whole number"),
    ("{start = 1, stop = 1000000000}", "holds 1000000000 seeds, more than"),
    ("{start = 5, stop = 1}", "below start"),
    ("{start = true, stop = 3}", "start = True must be a whole number"),
    ("[-1, 4294967295]", "differ by a multiple of 2^32"),
])
def test_bad_seed_ranges_are_spec_errors(runner, tmp_path, seeds, expected):
    t0 = time.perf_counter()
    res = runner.invoke(app, ["sweep", write_spec(tmp_path, seeds=seeds), "--dry-run"])
    assert time.perf_counter() - t0 < 2.0
    assert res.exit_code == 2 and expected in clean(res), res.output


@pytest.mark.parametrize("device", ["tpu", "cuda:x", 3])
def test_unknown_devices_are_spec_errors(device):
    raw = {"seeds": [1], "methods": ["gd"], "benchmark": {"name": "sweep_fake"}, "budget": {"epochs": 2},
           "engine": {"device": device}}
    with pytest.raises(SpecError, match=r"\[engine\].device .* is not a device"):
        parse_spec(raw)
    parse_spec(dict(raw, engine={"device": "cuda:1"}))  # a valid name: whether it exists is checked at run time


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("args, where", [(["--device", "cuda"], "--device"), ([], "[engine].device")])
def test_cuda_without_cuda_stops_up_front(runner, tmp_path, args, where):
    spec = write_spec(tmp_path, extra='[engine]\ndevice = "cuda"\n' if not args else "")
    journal = tmp_path / "j.jsonl"
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), *args])
    text = clean(res)
    assert res.exit_code == 2 and where in text and "CUDA is not available" in text
    assert not journal.exists()  # nothing ran, nothing was recorded


def test_bad_device_option(runner, tmp_path):
    res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--device", "tpu", "--journal", str(tmp_path / "j")])
    assert res.exit_code == 2 and "--device 'tpu' is not a device" in clean(res)


def test_a_huge_grid_is_refused_fast_and_the_limit_can_be_raised(runner, tmp_path):
    # 6 x 10 x 10 x 10 x 10 x 10 x 10 values = 6 million combinations of one method, at one seed
    grid = ('[grid]\nlr = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]\nreg_coef = [{v}]\nreg_coef_decay = [{v}]\n'
            'weight_decay = [{v}]\n').format(v=", ".join(str(0.01 * (i + 1)) for i in range(10)))
    grid += "[grid.minnorm_og]\ngrad_sample_size = [{g}]\nproj_pd = [{g}]\nnum_gd_epochs = [{z}]\n".format(
        g=", ".join(str(i + 1) for i in range(10)), z=", ".join(str(i) for i in range(10)))
    spec = write_spec(tmp_path, methods='["minnorm_og"]', extra=grid)
    t0 = time.perf_counter()
    res = runner.invoke(app, ["sweep", spec, "--dry-run", "--summary"])
    assert time.perf_counter() - t0 < 2.0
    assert res.exit_code == 2 and "6,000,000 trials" in clean(res) and "--limit" in res.output
    small = write_spec(tmp_path, seeds="[1, 2, 3]", extra="[grid]\nlr = [1e-2, 1e-3]\n", name="small")
    res = runner.invoke(app, ["sweep", small, "--dry-run", "--summary", "--limit", "5"])
    assert res.exit_code == 2 and "6 trials" in clean(res)
    res = runner.invoke(app, ["sweep", small, "--dry-run", "--summary", "--limit", "6"])
    assert res.exit_code == 0 and "6 trials in 1 setting" in clean(res)


@pytest.mark.parametrize("name", ["..", ".", "a/b", ""])
def test_spec_names_that_would_leave_the_output_folder_are_refused(name):
    raw = {"name": name, "seeds": [1], "methods": ["gd"], "benchmark": {"name": "sweep_fake"}, "budget": {"epochs": 2}}
    with pytest.raises(SpecError, match="name="):
        parse_spec(raw)


def test_report_folders_stay_inside_out(tmp_path):
    from overunlearn.report import _slug

    for text in ("..", ".", "...", "a/../..", "/etc"):
        out = tmp_path / "out"
        target = (out / _slug(text)).resolve()
        assert target.parent == out.resolve() and target.name not in ("", ".", ".."), text


def test_a_locked_journal_is_one_message(runner, tmp_path):
    journal = tmp_path / "j.jsonl"
    with JournalWriter(journal):
        res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(journal), "-q"])
    assert res.exit_code == 1 and "being written by another sweep" in clean(res)


def test_exit_code_1_when_a_trial_failed_0_when_one_only_diverged(runner, tmp_path, monkeypatch):
    journal = tmp_path / "j.jsonl"
    monkeypatch.setenv(fake.FLAKY, "1")
    spec = write_spec(tmp_path, methods='["gd", "rel_flaky", "sweep_nan"]', extra="[grid]\nlr = [1e-2]\n", epochs=3)
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), "-q"])
    text = clean(res)
    assert res.exit_code == 1 and "1 trial(s) failed" in text and "rerun to retry" in text
    assert "1 diverged" in text
    monkeypatch.setenv(fake.FLAKY, "0")
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), "-q"])
    assert res.exit_code == 0 and "1 finished" in clean(res)  # the failed one was retried; the NaN one was not


def test_warnings_are_printed_under_quiet(runner, tmp_path):
    journal = tmp_path / "j.jsonl"
    spec = write_spec(tmp_path)
    assert runner.invoke(app, ["sweep", spec, "--journal", str(journal), "-q"]).exit_code == 0
    with open(journal, "ab") as fh:
        fh.write(b'{"kind":"trial","status":"finished"}\n')
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), "-q"])
    n = len(journal.read_bytes().splitlines()) - 1  # the line before this run's header
    assert res.exit_code == 0 and f"line {n}: skipped: a 'trial' record without 'id'" in res.stderr
    res = runner.invoke(app, ["report", str(journal), "--out", str(tmp_path / "rep"), "--no-figures"])
    assert res.exit_code == 0 and f"line {n}: skipped" in res.stderr


def test_ctrl_c_says_what_was_kept_and_how_to_resume(runner, tmp_path, monkeypatch):
    import overunlearn.sweep.run as run_mod

    journal = tmp_path / "j.jsonl"
    spec = write_spec(tmp_path, seeds="[1, 2]")
    assert runner.invoke(app, ["sweep", spec, "--journal", str(journal), "-q", "--max-trials", "1"]).exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_sweep", interrupted)
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), "--batch", "4"])
    text = clean(res)
    assert res.exit_code == 130
    assert f"1 of 2 trials of rel are finished and kept in {journal}" in text
    assert f"overunlearn sweep {spec} --journal {journal} --batch 4" in text


def test_out_of_memory_is_one_message(runner, tmp_path, monkeypatch):
    import overunlearn.sweep.run as run_mod

    def oom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(run_mod, "run_sweep", oom)
    res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(tmp_path / "j.jsonl")])
    assert res.exit_code == 1 and "out of memory" in clean(res) and "resume with" in clean(res)


def test_journal_records_carry_the_code_fingerprint(runner, tmp_path):
    from overunlearn.sweep.journal import code_fingerprint

    journal = tmp_path / "j.jsonl"
    assert runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(journal), "-q"]).exit_code == 0
    assert {r.get("code") for r in read_journal(journal).records} == {code_fingerprint()}


@pytest.mark.parametrize("exc, code, expected", [
    (lambda: __import__("overunlearn.errors").errors.CacheFileError("cannot load /c/x.pt: corrupt; delete it"), 1,
     "cannot load /c/x.pt"),
    (MemoryError, 1, "out of memory"),
    (KeyboardInterrupt, 130, "kept in the cache"),
])
def test_bench_images_turns_foreseeable_errors_into_messages(runner, tmp_path, monkeypatch, exc, code, expected):
    import overunlearn.cli.bench_images as bi

    def failing(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(bi, "run_image_benchmark", failing)
    res = runner.invoke(app, ["bench", "erase", "--dataset", "digits", "--preset", "test", "--methods", "gd",
                              "--cache", str(tmp_path), "--device", "cpu"])
    assert res.exit_code == code and expected in clean(res)


def test_a_journal_path_that_is_a_folder_is_one_message(runner, tmp_path):
    folder = tmp_path / "j.jsonl"
    folder.mkdir()
    res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(folder), "-q"])
    assert res.exit_code == 1 and f"journal {folder}" in clean(res)


def test_friendly_errors_turn_gpu_out_of_memory_into_one_message(capsys):
    import typer

    from overunlearn.cli.errors import friendly_errors

    with pytest.raises(typer.Exit) as info, friendly_errors("nothing"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert info.value.exit_code == 1
    assert "out of memory" in capsys.readouterr().err


# ---- a read-only review of the command line (2026-12-03) -------------------------------------------

@pytest.mark.parametrize("args", [
    ["bench", "poison", "--device", "mps", "--seeds", "1"],
    ["bench", "run", "poison", "--device", "tpu"],
    ["privacy", "poison", "--device", "cpu:1"],
    ["report", "nothing.jsonl", "--privacy", "--device", "meta"],
])
def test_every_device_option_is_checked_before_anything_runs(runner, tmp_path, args):
    t0 = time.perf_counter()
    res = runner.invoke(app, args)
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 2 and "is not a device: use auto, cpu, cuda or cuda:N" in clean(res)


@pytest.mark.parametrize("seeds, expected", [("1-1000000000", "holds more than 100000 seeds"),
                                             ("5-1", "ends below its start")])
def test_seed_ranges_on_the_command_line_are_bounded(runner, tmp_path, seeds, expected):
    t0 = time.perf_counter()
    res = runner.invoke(app, ["bench", "poison", "--seeds", seeds, "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 5
    assert res.exit_code == 2 and expected in clean(res)


def test_the_resume_command_repeats_the_options_that_shape_the_run(runner, tmp_path, monkeypatch):
    import overunlearn.sweep.run as run_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "run_sweep", interrupted)
    spec, journal = write_spec(tmp_path), tmp_path / "j.jsonl"
    res = runner.invoke(app, ["sweep", spec, "--journal", str(journal), "--threads", "1", "--device", "cpu",
                              "--batch", "0", "--limit", "50", "-q"])
    assert res.exit_code == 130
    assert (f"overunlearn sweep {spec} --journal {journal} --threads 1 --device cpu --batch 0 --limit 50 -q"
            in clean(res))


def test_a_dry_run_on_a_journal_folder_and_a_negative_max_trials_are_one_message(runner, tmp_path):
    folder = tmp_path / "j.jsonl"
    folder.mkdir()
    res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(folder), "--dry-run"])
    assert res.exit_code == 1 and f"journal {folder} is a folder" in clean(res)
    res = runner.invoke(app, ["sweep", write_spec(tmp_path), "--journal", str(tmp_path / "k.jsonl"),
                              "--max-trials", "-1"])
    assert res.exit_code == 2 and "--max-trials" in clean(res)


def test_a_method_whose_vectorised_form_raises_runs_on_its_own(tmp_path):
    """A plugin method whose ``vectorised()`` raises used to crash the whole batch of a sweep; it now runs
    through the engine, as with batching off, and the batch's other runs are vectorised as before."""
    from conftest import tiny_method

    from overunlearn.benchmarks.poison import PoisonBenchmark
    from overunlearn.engine import BatchedRun, Budget, unlearn_many
    from overunlearn.methods import create

    def vectorised(self, epochs, seed):  # noqa: ANN001, ANN202
        raise RuntimeError("a plugin's bug")

    Broken = tiny_method("broken_vectorised", lambda ctx, info, r, f: ctx.batch_loss(r), vectorised=vectorised)
    problem = PoisonBenchmark("smoke", cache_dir=tmp_path, workers=1).problem(1)
    runs = [BatchedRun(problem, Broken(lr=1e-3), Budget(epochs=2), seed=1, key="broken"),
            BatchedRun(problem, create("gd", lr=1e-3), Budget(epochs=2), seed=1, key="gd")]
    broken, gd = unlearn_many(runs, "cpu")
    assert broken.model is not None and not broken.vectorised and broken.record.steps == 2
    assert gd.model is not None and gd.vectorised


def test_the_poison_figures_thread_stops_when_the_sweep_fails():
    """``bench poison`` draws its figures in a thread next to the sweep's workers; when the sweep stops (Ctrl-C,
    a locked journal) the thread must end before the process exits, or the process aborts inside torch."""
    import threading

    from overunlearn.cli.bench_poison import Background

    started = threading.Event()

    def work(job):  # noqa: ANN001, ANN202
        started.set()
        while True:  # (an endless computation that calls the engine's progress callback)
            job.check(1)
            time.sleep(0.01)

    job = Background(work, concurrent=True)
    assert started.wait(5)
    t0 = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - t0 < 5 and not job.thread.is_alive()
    with pytest.raises(RuntimeError, match="cancelled"):
        job.result()


def test_an_output_folder_may_have_a_dot_in_its_name():
    from pathlib import Path

    import typer

    from overunlearn.cli.options import check_out

    assert check_out(Path("results/v1.2"), [""]) == Path("results/v1.2")  # (a version, not a file type)
    with pytest.raises(typer.BadParameter, match="not '.md'"):
        check_out(Path("results/table.md"), [""])
