"""``overunlearn sweep SPEC``: expand a spec, run its pending trials, append them to a journal."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from overunlearn.cli import app
from overunlearn.cli.options import JOBS_HELP, QUIET_HELP, THREADS_HELP

if TYPE_CHECKING:  # the package imports torch: loaded only when a command runs
    from overunlearn.sweep.spec import SweepSpec


@app.command("sweep")
def sweep_cmd(
    spec: Path = typer.Argument(..., help="sweep spec (.toml), e.g. configs/table1_poison.toml"),
    journal: Path | None = typer.Option(None, "--journal", help="JSONL journal (default: results/<spec name>.jsonl)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the expanded trial table and counts; run nothing"),
    summary_only: bool = typer.Option(False, "--summary", help="with --dry-run: counts only, no per-trial table"),
    executor: str = typer.Option("local", "--executor", "-e", help="'local' or 'ray'"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="local executor: " + JOBS_HELP),
    jobs_alias: int | None = typer.Option(None, "-n", min=1, hidden=True, help="old spelling of --jobs"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)"),
    gpus: float | None = typer.Option(None, "--gpus",
                                         help="local: GPUs to spread workers over; ray: GPUs per trial"),
    device: str | None = typer.Option(None, "--device", help="override [engine].device: auto, cpu, cuda"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="rerun trials that failed with a NaN loss"),
    max_trials: int | None = typer.Option(None, "--max-trials", min=0, help="run at most this many pending trials"),
    batch: int | None = typer.Option(None, "--batch", min=0,
                                     help="run up to N epoch-budget trials as one vectorised ensemble where the "
                                          "model allows (default: the spec's [engine] batch; 0: one at a time)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    limit: int | None = typer.Option(None, "--limit", min=1,
                                     help="refuse a spec that expands to more trials than this (default 200000)"),
    rerun_stale: bool = typer.Option(False, "--rerun-stale", help="rerun finished trials that other code (another "
                                     "source fingerprint or torch version) recorded, instead of reusing them"),
) -> None:
    """Run a sweep spec. Killing it is safe: run it again and it continues where it stopped.

    Exit codes: 0 when every trial ran (a trial that diverged with a NaN/inf loss is a result, not a
    failure); 1 when a trial failed otherwise (rerun the command to retry it), the sweep stopped, or
    the journal is locked; 2 for a bad spec or option; 130 on Ctrl-C.
    """
    from overunlearn.sweep.journal import JournalLockedError
    from overunlearn.sweep.run import SweepAborted, run_sweep
    from overunlearn.sweep.spec import DEFAULT_TRIAL_LIMIT, SpecError, load_spec

    if jobs_alias is not None:
        jobs = jobs_alias

    try:
        sp = load_spec(spec, limit=DEFAULT_TRIAL_LIMIT if limit is None else limit)
    except SpecError as exc:
        _fail(str(exc), 2)
    except MemoryError:
        _fail(f"{spec}: out of memory while expanding the spec; shrink its grid or seeds", 1)
    jpath = journal or Path("results") / f"{sp.name}.jsonl"
    if jpath.is_dir():
        _fail(f"journal {jpath} is a folder; give a file path with --journal (e.g. {jpath / (sp.name + '.jsonl')})", 1)
    resume = _resume_command(spec, journal, jobs, executor, batch, threads=threads, address=address, gpus=gpus,
                             device=device, limit=limit, quiet=quiet)
    if dry_run:
        _dry_run(sp, jpath, batch, summary_only)
        return
    dev = _check_device(device, sp.device)
    ex = _executor(sp, executor, jobs, threads, address, gpus)
    log = (lambda _m: None) if quiet else (lambda m: typer.echo(m))  # progress on stdout, as the summary
    try:
        with ex:
            res = run_sweep(sp, jpath, ex, device=dev, threads=threads, retry_failed=retry_failed,
                            max_trials=max_trials, batch=batch, log=log, warn=_warn, rerun_stale=rerun_stale)
    except (SweepAborted, JournalLockedError) as exc:
        _fail(str(exc), 1)
    except OSError as exc:  # the journal (or its folder) cannot be read or written
        _fail(f"journal {jpath}: {exc.strerror or exc}; check the path and its permissions", 1)
    except KeyboardInterrupt:
        _interrupted(sp, jpath, resume)
    except MemoryError:
        _fail(f"out of memory while running {sp.name}; the finished trials are kept in {jpath}. Lower --jobs or "
              f"--batch and resume with: {resume}", 1)
    typer.echo(f"{sp.name}: {res.finished} finished, {res.diverged} diverged (non-finite loss: a result, not "
               f"retried), {res.failed - res.diverged} failed, {res.skipped} already done, {res.references} reference record(s), {res.total} trials in the "
               f"spec; journal {jpath} ({res.seconds:.1f} s)")
    if res.failed - res.diverged > 0:
        _fail(f"{res.failed - res.diverged} trial(s) failed (see the FAILED lines{'' if quiet else ' above'} or the "
              f"journal's 'error' fields); fix the cause and rerun to retry them: {resume}", 1)


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _resume_command(spec: Path, journal: Path | None, jobs: int, executor: str, batch: int | None, *,
                    threads: int | None = None, address: str | None = None, gpus: float | None = None,
                    device: str | None = None, limit: int | None = None, quiet: bool = False) -> str:
    """The command line that continues this sweep: the same options that shape its trials and their
    arithmetic (threads, device, batch, executor), without the one-off ones (--dry-run, --max-trials,
    --retry-failed, --rerun-stale)."""
    from overunlearn.plugins import active_plugins

    parts = ["overunlearn", *(f"--plugin={shlex.quote(m)}" for m in active_plugins()), "sweep",
             shlex.quote(str(spec))]
    if journal is not None:
        parts += ["--journal", shlex.quote(str(journal))]
    if executor != "local":
        parts += ["--executor", executor]
    if address is not None:
        parts += ["--address", shlex.quote(address)]
    if jobs != 1:
        parts += ["--jobs", str(jobs)]
    if threads is not None:
        parts += ["--threads", str(threads)]
    if gpus is not None:
        parts += ["--gpus", f"{gpus:g}"]
    if device is not None:
        parts += ["--device", shlex.quote(device)]
    if batch is not None:
        parts += ["--batch", str(batch)]
    if limit is not None:
        parts += ["--limit", str(limit)]
    if quiet:
        parts += ["-q"]
    return " ".join(parts)


def _interrupted(sp: SweepSpec, jpath: Path, resume: str) -> NoReturn:
    """Ctrl-C: say what the journal kept and how to continue, then exit 130."""
    from overunlearn.sweep.journal import read_journal

    ids = {t.id for t in sp.trials}
    done = len(ids & read_journal(jpath).finished_ids())
    typer.echo(f"\ninterrupted: {done} of {len(ids)} trials of {sp.name} are finished and kept in {jpath} (trials "
               f"in flight are lost and rerun). Resume with:\n  {resume}", err=True)
    raise typer.Exit(130)


def _check_device(device: str | None, spec_device: str) -> str | None:
    """Stop up front on a device that is unknown or absent (``cuda`` without CUDA)."""
    from overunlearn.sweep.spec import valid_device

    if device is not None and not valid_device(device):
        _fail(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N", 2)
    wanted = device or spec_device
    if wanted.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            source = "--device" if device is not None else "[engine].device in the spec"
            _fail(f"{source} asks for {wanted!r} but CUDA is not available on this machine; use --device cpu "
                  "(or auto)", 2)
        index = int(wanted.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            _fail(f"device {wanted!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)", 2)
    return device


def _dry_run(sp: SweepSpec, jpath: Path, batch: int | None, summary_only: bool) -> None:
    """Print the expanded trials and counts, what the journal already holds, and any spec problem."""
    from overunlearn.sweep.journal import read_journal
    from overunlearn.sweep.run import emit_warnings, make_tasks
    from overunlearn.sweep.spec import check_benchmark, describe

    done = None
    if jpath.exists():
        contents = read_journal(jpath)
        emit_warnings(contents.warnings(), _warn)
        done = contents.finished_ids()
    typer.echo(describe(sp, finished=done, show_trials=not summary_only))
    n_batch = sp.batch if batch is None else batch
    if n_batch > 1:
        tasks = make_tasks(sp.trials, sp.device, batch=n_batch)
        grouped = [t for t in tasks if t["kind"] == "batch" and len(t["tasks"]) > 1]
        typer.echo(f"batches: {len(grouped)} task(s) of up to {n_batch} epoch-budget trials "
                   f"({sum(len(t['tasks']) for t in grouped)} trials), {len(tasks) - len(grouped)} single "
                   "trial task(s); a worker runs a batch as one vectorised ensemble where the model allows")
    typer.echo(f"journal: {jpath}")
    problems = check_benchmark(sp)
    for p in problems:
        typer.echo(f"error: {sp.path}: {p}", err=True)
    if problems:
        raise typer.Exit(2)


def _executor(sp: SweepSpec, executor: str, jobs: int, threads: int | None, address: str | None,
              gpus: float | None) -> Any:
    """The executor the options ask for (exit 2 for an unknown one), after checking the benchmark."""
    from overunlearn.sweep.executors import make_executor
    from overunlearn.sweep.spec import check_benchmark

    problems = check_benchmark(sp)
    for p in problems:
        typer.echo(f"error: {sp.path}: {p}", err=True)
    if problems:
        raise typer.Exit(2)
    timed = any("seconds" in s.budget for s in sp.settings)
    if timed and executor == "local" and jobs > 1:
        from overunlearn.sweep.executors import _gpu_count

        if jobs > max(1, _gpu_count()):
            _warn(f"{sp.name} has wall-clock budgets but runs {jobs} trials at once on {max(1, _gpu_count())} "
                  "device(s); concurrent trials slow each other down. Use --jobs equal to the number of GPUs (or 1) "
                  "for equal-wall-clock comparisons.")
    if executor == "ray":
        try:
            return make_executor("ray", threads=threads, address=address, gpus=gpus)
        except RuntimeError as exc:
            _fail(str(exc), 2)
    if executor == "local":
        return make_executor("local", jobs=jobs, threads=threads, gpus=gpus)
    _fail(f"unknown executor {executor!r}; use 'local' or 'ray'", 2)
