"""``overunlearn sweep SPEC``: expand a spec, run its pending trials, append them to a journal."""

from __future__ import annotations

from pathlib import Path

import typer

from overunlearn.cli import app


@app.command("sweep")
def sweep_cmd(
    spec: Path = typer.Argument(..., help="sweep spec (.toml), e.g. configs/table1_poison.toml"),
    journal: Path | None = typer.Option(None, "--journal", "-j",
                                           help="JSONL journal (default: results/<spec name>.jsonl)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the expanded trial table and counts; run nothing"),
    summary_only: bool = typer.Option(False, "--summary", help="with --dry-run: counts only, no per-trial table"),
    executor: str = typer.Option("local", "--executor", "-e", help="'local' or 'ray'"),
    jobs: int = typer.Option(1, "--jobs", "-n", help="local worker processes (1: run in this process)"),
    threads: int | None = typer.Option(None, "--threads", help="torch threads per trial / worker"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)"),
    gpus: float | None = typer.Option(None, "--gpus",
                                         help="local: GPUs to spread workers over; ray: GPUs per trial"),
    device: str | None = typer.Option(None, "--device", help="override [engine].device: auto, cpu, cuda"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="rerun trials that failed with a NaN loss"),
    max_trials: int | None = typer.Option(None, "--max-trials", help="run at most this many pending trials"),
    batch: int | None = typer.Option(None, "--batch", min=0,
                                     help="run up to N epoch-budget trials as one vectorised ensemble where the "
                                          "model allows (default: the spec's [engine] batch; 0: one at a time)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-trial lines"),
) -> None:
    """Run a sweep spec. Killing it is safe: run it again and it continues where it stopped."""
    from overunlearn.sweep.journal import read_journal
    from overunlearn.sweep.run import SweepAborted, run_sweep
    from overunlearn.sweep.spec import SpecError, check_benchmark, describe, load_spec

    try:
        sp = load_spec(spec)
    except SpecError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    jpath = journal or Path("results") / f"{sp.name}.jsonl"
    problems = check_benchmark(sp)
    if dry_run:
        done = read_journal(jpath).finished_ids() if jpath.exists() else None
        typer.echo(describe(sp, finished=done, show_trials=not summary_only))
        n_batch = sp.batch if batch is None else batch
        if n_batch > 1:
            from overunlearn.sweep.run import make_tasks

            tasks = make_tasks(sp.trials, sp.device, batch=n_batch)
            grouped = [t for t in tasks if t["kind"] == "batch"]
            typer.echo(f"batches: {len(grouped)} task(s) of up to {n_batch} epoch-budget trials "
                       f"({sum(len(t['tasks']) for t in grouped)} trials), {len(tasks) - len(grouped)} single "
                       "trial task(s); a worker runs a batch as one vectorised ensemble where the model allows")
        typer.echo(f"journal: {jpath}")
    for p in problems:
        typer.echo(f"error: {spec}: {p}", err=True)
    if problems:
        raise typer.Exit(2)
    if dry_run:
        return
    from overunlearn.sweep.executors import make_executor

    log = (lambda _m: None) if quiet else (lambda m: typer.echo(m))
    timed = any("seconds" in s.budget for s in sp.settings)
    if timed and executor == "local" and jobs > 1:
        from overunlearn.sweep.executors import _gpu_count

        if jobs > max(1, _gpu_count()):
            typer.echo(f"warning: {sp.name} has wall-clock budgets but runs {jobs} trials at once on "
                       f"{max(1, _gpu_count())} device(s); concurrent trials slow each other down. Use --jobs "
                       "equal to the number of GPUs (or 1) for equal-wall-clock comparisons.", err=True)
    if executor == "ray":
        ex = make_executor("ray", threads=threads, address=address, gpus=gpus)
    elif executor == "local":
        ex = make_executor("local", jobs=jobs, threads=threads, gpus=gpus)
    else:
        typer.echo(f"error: unknown executor {executor!r}; use 'local' or 'ray'", err=True)
        raise typer.Exit(2)
    try:
        with ex:
            res = run_sweep(sp, jpath, ex, device=device, threads=threads, retry_failed=retry_failed,
                            max_trials=max_trials, batch=batch, log=log)
    except SweepAborted as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{sp.name}: {res.finished} finished, {res.failed} failed, {res.skipped} already done, "
               f"{res.references} reference record(s), {res.total} trials in the spec; journal {jpath} "
               f"({res.seconds:.1f} s)")
