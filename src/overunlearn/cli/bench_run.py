"""``overunlearn bench run BENCHMARK``: any registered benchmark, every method at one point, as a sweep.

The benchmark may come from a plugin module (``@register_benchmark``). Its constructor options are
given with ``--option KEY=VALUE``; the methods, their points and the epochs default to what the
benchmark declares (``method_points(epochs)``, ``default_epochs``: the optional protocol members of
:mod:`overunlearn.benchmarks.base`), and its metrics and their directions are its ``metrics``.
Like every bench command it builds the sweep in memory and runs it through the sweep runner and
journal (``<out>/<name>.jsonl``), so a run is resumable by running the same command again, then
prints and writes one table per epoch count (mean ± standard error over seeds, or median (range)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import bench_app
from overunlearn.cli.options import (
    JOBS_HELP,
    OPTION_HELP,
    QUIET_HELP,
    SEEDS_HELP,
    THREADS_HELP,
    check_device,
    check_out,
    choose_methods,
    echo_log,
    parse_epochs,
    parse_options,
    parse_overrides,
    parse_seeds,
)

STATISTICS = {"mean_se": "mean ± SE over seeds", "median": "median (range) over seeds"}


def bench_run_spec(benchmark: str, bench: Any, *, options: dict[str, Any], seeds: list[int], epochs: list[int],
                   points: dict[int, dict[str, dict[str, Any]]], default: bool, device: str,
                   statistic: str) -> dict[str, Any]:
    """The sweep spec of one ``bench run``: a setting ``T=<epochs>`` per epoch count, each method at its point."""
    from overunlearn.cli.bench_sweep import bench_spec, sweep_name

    module = type(bench).__module__
    imports = [] if module.startswith("overunlearn.") or module == "__main__" else [module]
    name = sweep_name(benchmark, {"options": options, "epochs": epochs,
                                  "points": {str(T): points[T] for T in epochs}}, default)
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    return bench_spec(name=name, title=f"{benchmark}" + (f" ({shown})" if shown else ""), benchmark=benchmark,
                      options=options, seeds=seeds, settings=[(f"T={T}", T, points[T]) for T in epochs],
                      metrics={m.name: m.direction for m in bench.metrics}, device=device, imports=imports,
                      statistic=statistic)


@bench_app.command("run")
def run_cmd(
    benchmark: str = typer.Argument(..., help="a registered benchmark (built in, or from a plugin module)"),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    methods: str | None = typer.Option(None, "--methods", help="comma-separated names or patterns (default: the "
                                       "benchmark's methods, method_points)"),
    epochs: str | None = typer.Option(None, "--epochs", "-T", help="unlearning epochs, e.g. 5 or 10,100 (default: "
                                      "the benchmark's default_epochs)"),
    seeds: str = typer.Option("1", "--seeds", help=SEEDS_HELP),
    hp: list[str] = typer.Option([], "--hp", help="override a hyperparameter: METHOD.KEY=VALUE (repeatable)"),
    statistic: str = typer.Option("mean_se", "--statistic", help="mean_se (mean ± SE) | median (median (range))"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", callback=check_device),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help=JOBS_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    out: Path | None = typer.Option(None, "--out", help="output folder (journal, table, figure; default "
                                    "results/<benchmark>); run the same command again to resume"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Run any registered benchmark: every method at its point, for the given epochs and seeds; prints the table."""
    from overunlearn.benchmarks import get_benchmark, list_benchmarks
    from overunlearn.benchmarks.base import default_epochs, method_points
    from overunlearn.cli.bench_images import check_sizes
    from overunlearn.cli.bench_sweep import run_bench, write_bench_tables
    from overunlearn.cli.errors import KEPT, friendly_errors
    from overunlearn.errors import BenchmarkDefinitionError
    from overunlearn.methods import create, list_methods

    # every option is checked before anything trains
    name = benchmark.strip()
    out = check_out(out, [""]) or Path("results") / name
    if statistic not in STATISTICS:
        raise typer.BadParameter(f"{statistic!r}; use one of {', '.join(STATISTICS)}", param_hint="'--statistic'")
    if name not in list_benchmarks():
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; registered: {', '.join(list_benchmarks())} "
                                 "(a plugin's benchmark: --plugin MODULE)", param_hint="'BENCHMARK'")
    options = parse_options(option)
    seed_list = parse_seeds(seeds)
    epoch_arg = parse_epochs(epochs) if epochs is not None else None
    overrides = parse_overrides(hp)
    try:
        bench = get_benchmark(name, **options)
    except BenchmarkDefinitionError as exc:  # the benchmark's own code, not the options
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (KeyError, ValueError, TypeError) as exc:  # an unknown or bad constructor option, preset, dataset...
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise typer.BadParameter(f"benchmark {name!r}: {msg}", param_hint="'--option'") from None
    try:
        own_epochs: list[int] | None = list(default_epochs(bench))
    except ValueError as exc:
        own_epochs = None
        if epoch_arg is None:
            raise typer.BadParameter(str(exc), param_hint="'--epochs'") from None
    epoch_list = list(epoch_arg) if epoch_arg is not None else list(own_epochs or ())
    known = list_methods()
    chosen = choose_methods(methods, known) if methods else None
    points: dict[int, dict[str, dict[str, Any]]] = {}
    for T in epoch_list:
        try:
            points[T] = method_points(bench, T, chosen)
        except ValueError as exc:  # the benchmark names no methods
            raise typer.BadParameter(str(exc), param_hint="'--methods'") from None
    run_methods = list(dict.fromkeys(m for T in epoch_list for m in points[T]))
    unknown = [m for m in run_methods if m not in known]
    if unknown:
        raise typer.BadParameter(f"benchmark {name!r} names unregistered method(s) {unknown}; registered: "
                                 f"{', '.join(known)}", param_hint="'--methods'")
    for m in overrides:
        if m not in run_methods:
            raise typer.BadParameter(f"--hp names method {m!r}, which is not run (run: {', '.join(run_methods)})",
                                     param_hint="'--hp'")
    presets = {T: {m: dict(hp_) for m, hp_ in points[T].items()} for T in epoch_list}
    for T in epoch_list:
        for m in points[T]:
            points[T][m].update(overrides.get(m, {}))
            try:
                create(m, **points[T][m])
            except Exception as exc:  # noqa: BLE001 - a plugin method's constructor may raise anything
                msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else f"{type(exc).__name__}: {exc}"
                msg = msg.removeprefix("ValueError: ").removeprefix("TypeError: ")
                raise typer.BadParameter(f"{m}: {msg}", param_hint="'--hp'" if m in overrides else None) from None
    # the default journal: the benchmark's own options, epochs and points (a subset of its methods included)
    default = not options and points == presets and epoch_list == own_epochs
    with friendly_errors(KEPT):
        if callable(getattr(bench, "oversized", None)):  # image benchmarks: say when a subset exceeds the data
            check_sizes(bench, options, hints={"n_train": "--option n_train", "n_test": "--option n_test"})
        raw = bench_run_spec(name, bench, options=options, seeds=seed_list, epochs=epoch_list, points=points,
                             default=default, device=device, statistic=statistic)
        metrics = [m.name for m in bench.metrics]
        del bench  # the workers build their own
        run = run_bench(raw, out, jobs=jobs, threads=threads, device=device, log=echo_log(quiet))
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    title = (f"{name}" + (f" ({shown})" if shown else "") + f", T={epoch_list[0] if len(epoch_list) == 1 else epoch_list}"
             f", seeds {seed_list}; {STATISTICS[statistic]}, seconds: unlearning time")
    written = write_bench_tables(run, out, raw["name"], metrics, title=title)
    typer.echo(f"wrote {run.journal}, {', '.join(str(p) for p in written if not p.name.endswith('.csv'))}")
    if run.result.failed:
        typer.echo(f"{run.result.failed} trial(s) failed; their errors are in {run.journal}", err=True)
        raise typer.Exit(1)
