"""``overunlearn bench erase`` and ``overunlearn bench collapse``: every method at one preset point.

The command builds a sweep in memory (every chosen method at its point of ``ERASE_METHOD_POINTS`` /
``COLLAPSE_METHOD_POINTS``, overridable with ``--hp method.key=value``; the chosen seeds; ``T``
epochs) and runs it through the sweep runner and journal (``<out>/<benchmark>_<dataset>_<preset>.jsonl``),
so a run is resumable (run the same command again), its finished trials are never recomputed, and its
numbers are those of ``overunlearn sweep`` on the same trials. It then prints one row per model
(original, ground truth, each method: mean ± standard error over seeds, and the unlearning seconds)
and writes the table (Markdown, CSV) and a figure of the first two metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import bench_app
from overunlearn.cli.errors import KEPT, friendly_errors
from overunlearn.cli.options import (
    CACHE_HELP,
    JOBS_HELP,
    QUIET_HELP,
    SEEDS_HELP,
    THREADS_HELP,
    check_device,
    check_out,
    choose_methods,
    echo_log,
    parse_epochs,
    parse_overrides,
    parse_seeds,
)

#: the benchmark options of the preset that ``--n-train`` etc. override, and the command's option names
SIZE_OPTIONS = {"n_train": "--n-train", "n_test": "--n-test"}


def _message(exc: BaseException) -> str:
    """The text of ``exc`` (a ``KeyError`` quotes its message; undo that)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def check_sizes(bench: Any, explicit: dict[str, Any], echo: Any = typer.echo,
                hints: dict[str, str] = SIZE_OPTIONS) -> None:
    """A subset size above the dataset's split: an error when the user asked for it (``explicit``), a
    warning when it is the preset's (the whole split is used then). Loads the dataset, trains nothing."""
    over = bench.oversized()
    for field, (asked, available) in over.items():
        split = "training" if field == "n_train" else "test"
        what = f"{asked} {split} images but {bench.dataset} has {available}"
        if explicit.get(field) is not None:
            raise typer.BadParameter(f"{hints[field]} {what}; pass at most {available} (0: all)",
                                     param_hint=f"'{hints[field]}'")
        echo(f"warning: the {bench.preset.name} preset's {field} asks for {what}: using all {available}",
             err=True)


def image_spec(benchmark: str, bench: Any, *, seeds: list[int], epochs: list[int], methods: list[str],
               points: dict[str, dict[str, Any]], options: dict[str, Any], runtime: dict[str, Any],
               device: str) -> dict[str, Any]:
    """The sweep spec (as the parsed TOML would be) of one ``bench erase|collapse`` run.

    ``options``: the benchmark options that change results (dataset, preset, ``n_train``...);
    ``runtime``: those that do not (cache, data root, download, device), kept out of the sweep's name.
    """
    from overunlearn.cli.bench_sweep import bench_spec, sweep_name

    p = bench.preset
    base = f"{benchmark}_{bench.dataset}_{p.name}"
    extra = {k: v for k, v in options.items() if k not in ("dataset", "preset")}
    presets = bench.method_points(epochs[0])
    default = (not extra and list(epochs) == [int(bench.default_epochs)]
               and all(points[m] == presets.get(m, {}) for m in methods))
    name = sweep_name(base, {"options": extra, "epochs": list(epochs), "points": {m: points[m] for m in methods}},
                      default)
    what = "Label Erasure" if benchmark == "erase" else "Representation Collapse" if benchmark == "collapse" \
        else benchmark
    return bench_spec(name=name, title=f"{what}, {bench.dataset} ({p.name} preset)", benchmark=benchmark,
                      options={**options, **runtime}, seeds=seeds,
                      settings=[(f"T={T}", T, {m: points[m] for m in methods}) for T in epochs],
                      metrics={m.name: m.direction for m in bench.metrics}, device=device, statistic="mean_se")


def bench_rows(run: Any, benchmark: str, options: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per (model, seed) of a bench run, read back from its journal: ``row`` (``original``,
    ``ground_truth`` or the method), ``seed``, the metrics, ``unlearn_seconds`` and ``status`` (``ok`` or
    ``error: ...``); with several settings also ``setting``."""
    from overunlearn.sweep.journal import FINISHED, read_journal
    from overunlearn.sweep.spec import benchmark_key

    refs = read_journal(run.journal).references()
    key = benchmark_key(benchmark, options)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        r = refs.get((key, seed))
        if r is not None and r.get("status") == FINISHED:
            rows += [{"row": kind, "seed": seed, **vals} for kind, vals in r.get("reference", {}).items()]
    several = len(run.settings) > 1
    for s in run.settings:
        label = {"setting": s.setting} if several else {}
        for mr in s.methods:
            for g in mr.groups:
                for seed in seeds:
                    if seed in g.metrics:
                        rows.append({"row": mr.method, "seed": seed, **label, **g.metrics[seed],
                                     "unlearn_seconds": g.seconds.get(seed), "status": "ok"})
                    elif seed in g.failed:
                        rows.append({"row": mr.method, "seed": seed, **label, "status": f"error: {g.failed[seed]}"})
    return rows


def run_image_benchmark(benchmark: str, *, dataset: str, seeds: list[int], preset: str, device: str,
                        data_root: Path | None, cache: Path | None, use_cache: bool, download: bool,
                        methods: str | None, epochs: list[int] | int | None, p_retain: float | None,
                        p_forget: float | None, n_train: int | None, n_test: int | None,
                        overrides: dict[str, dict[str, Any]], out: Path, jobs: int = 1,
                        threads: int | None = None, progress: bool = True,
                        echo: Any = typer.echo) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the benchmark as a sweep (resuming the journal under ``out``) and return ``(rows, config)``.

    ``rows``: :func:`bench_rows`; ``config``: what ran (dataset, preset, epochs, seeds, device, the
    methods' configs), the sweep's ``name`` and ``run`` (the :class:`~overunlearn.cli.bench_sweep.BenchRun`).
    Every option is checked, and the dataset found, before anything trains.
    """
    import time

    from overunlearn.benchmarks import get_benchmark
    from overunlearn.cli.bench_sweep import run_bench
    from overunlearn.methods import create, list_methods

    t_start = time.perf_counter()
    # every check that needs no data or training comes first, so a bad option fails in a second
    if isinstance(epochs, int):
        epochs = [epochs]
    if epochs is not None and any(T <= 0 for T in epochs):
        raise typer.BadParameter(f"T must be positive, got {', '.join(str(T) for T in epochs)}",
                                 param_hint="'-T' / '--epochs'")
    if not seeds:
        raise typer.BadParameter("no seeds given", param_hint="'--seeds'")
    available = list_methods(task="classification")
    chosen = choose_methods(methods, available)
    unknown = set(overrides) - set(available)
    if unknown:
        raise typer.BadParameter(f"--hp names unknown method(s) {sorted(unknown)}; valid: {', '.join(available)}",
                                 param_hint="'--hp'")
    sizes = {"n_train": n_train, "n_test": n_test}
    results_options = {k: v for k, v in {"p_retain": p_retain, "p_forget": p_forget, **sizes}.items()
                       if v is not None}
    runtime: dict[str, Any] = {"progress": False}
    if data_root is not None:
        runtime["data_root"] = str(data_root)
    if cache is not None:
        runtime["cache_dir"] = str(Path(cache) / "models")
    if not use_cache:
        runtime["use_cache"] = False
    if download:
        runtime["download"] = True
    if device != "auto":
        runtime["device"] = device
    try:  # builds the preset and resolves dataset and device; loads no data
        bench = get_benchmark(benchmark, dataset=dataset, preset=preset, **runtime, **results_options)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # unknown dataset, preset or device; bad option
        raise typer.BadParameter(_message(exc)) from None
    epoch_list = list(epochs) if epochs is not None else [int(bench.default_epochs)]
    presets = bench.method_points(epoch_list[0])
    points: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([*chosen, *overrides]):  # build every config now, not after training
        hyper = {**presets.get(name, {}), **overrides.get(name, {})}
        try:
            create(name, **hyper)
        except Exception as exc:  # noqa: BLE001 - a plugin method's constructor may raise anything
            raise typer.BadParameter(f"{name}: {_message(exc)}", param_hint="'--hp'" if name in overrides else None) from None
        points[name] = hyper
    check_sizes(bench, sizes, echo)  # loads the dataset: a missing one is reported now, not by the workers
    p = bench.preset
    options = {"dataset": bench.dataset, "preset": p.name, **results_options}
    raw = image_spec(benchmark, bench, seeds=seeds, epochs=epoch_list, methods=chosen, points=points,
                     options=options, runtime=runtime, device=device)
    config: dict[str, Any] = {
        "benchmark": benchmark, "dataset": bench.dataset, "preset": p.name, "recipe": p.recipe.to_dict(),
        "n_train": p.n_train, "n_test": p.n_test, "p_forget": p.p_forget, "p_retain": p.p_retain,
        "unlearn_batch_size": p.unlearn_batch_size, "epochs": epoch_list[0] if len(epoch_list) == 1 else epoch_list,
        "seeds": seeds, "device": str(bench.device),
        "methods": {m: create(m, **points[m]).config.to_dict() for m in chosen}, "name": raw["name"]}
    del bench  # the workers build their own (and load the data again); free this one's images
    if progress:
        echo(f"{benchmark} on {config['dataset']} (preset {p.name}): |D_r| subset {p.n_train or 'all'}, "
             f"p_forget {p.p_forget}, p_retain {p.p_retain}, batch {p.unlearn_batch_size}, T={config['epochs']}, "
             f"seeds {seeds}; journal {out / (raw['name'] + '.jsonl')}", err=True)
    run = run_bench(raw, out, jobs=jobs, threads=threads, device=device, log=echo_log(not progress))
    config["run"] = run
    config["total_seconds"] = time.perf_counter() - t_start
    return bench_rows(run, benchmark, {**options, **runtime}, seeds), config


def _command(benchmark: str):
    def cmd(
        dataset: str = typer.Option("fashion-mnist", "--dataset", "-d",
                                    help="fashion-mnist | mnist | cifar10 | tiny-imagenet | digits"),
        data_root: Path | None = typer.Option(None, "--data-root", help="dataset root (see `overunlearn data status`)"),
        seeds: str = typer.Option("1", "--seeds", help=SEEDS_HELP),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", callback=check_device),
        preset: str = typer.Option("auto", "--preset", help="auto (paper on CUDA, cpu otherwise) | cpu | paper | test"),
        out: Path = typer.Option(Path(f"results/{benchmark}"), "--out",
                                 help="output folder (journal, table, figure); run the same command again to resume"),
        cache: Path | None = typer.Option(None, "--cache", help=CACHE_HELP),
        no_cache: bool = typer.Option(False, "--no-cache", help="train the reference models without caching them"),
        download: bool = typer.Option(False, "--download", help="let torchvision download a missing dataset"),
        methods: str | None = typer.Option(None, "--methods", help="comma-separated names or patterns (default: all)"),
        epochs: str | None = typer.Option(None, "--epochs", "-T",
                                          help="unlearning epochs, e.g. 2 or 2,5 (default: the preset's)"),
        p_retain: float | None = typer.Option(None, "--p-retain", help="accessible retain fraction"),
        p_forget: float | None = typer.Option(None, "--p-forget",
                                                 help="erase: p_color; collapse: forget fraction per class"),
        n_train: int | None = typer.Option(None, "--n-train", help="class-balanced training subset size (0: all)"),
        n_test: int | None = typer.Option(None, "--n-test", help="class-balanced test subset size (0: all)"),
        hp: list[str] = typer.Option([], "--hp", help="override a hyperparameter: METHOD.KEY=VALUE (repeatable)"),
        jobs: int = typer.Option(1, "--jobs", "-j", min=1, help=JOBS_HELP),
        threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
        quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
        privacy: bool = typer.Option(False, "--privacy", help="then run the privacy report (MIA, U-LiRA, KLoM; "
                                     "see `overunlearn privacy`) of the methods run, on the first seed"),
        privacy_models: int | None = typer.Option(None, "--privacy-models", min=4, help="N for --privacy (default 8)"),
    ) -> None:
        check_out(out, [""])
        seed_list = parse_seeds(seeds)
        epoch_list = parse_epochs(epochs) if epochs is not None else None
        overrides = parse_overrides(hp)
        with friendly_errors(KEPT):
            rows, config = run_image_benchmark(
                benchmark, dataset=dataset, seeds=seed_list, preset=preset, device=device,
                data_root=data_root, cache=cache, use_cache=not no_cache, download=download, methods=methods,
                epochs=epoch_list, p_retain=p_retain, p_forget=p_forget, n_train=n_train, n_test=n_test,
                overrides=overrides, out=out, jobs=jobs, threads=threads, progress=not quiet)
        run = config.get("run")
        if run is not None:
            from overunlearn.cli.bench_sweep import write_bench_tables

            metrics = [m for m, _ in run.settings[0].metrics] if run.settings else []
            title = (f"{benchmark} on {config['dataset']} (preset {config['preset']}, T={config['epochs']}, "
                     f"seeds {config['seeds']}, device {config['device']}; mean ± SE over seeds, seconds: "
                     "mean unlearning time)")
            written = write_bench_tables(run, out, config["name"], metrics, title=title,
                                         figure_title=f"{benchmark}, {config['dataset']} ({config['preset']})")
            typer.echo(f"total {config['total_seconds']:.1f}s; wrote {run.journal}, "
                       f"{', '.join(str(p) for p in written if not p.name.endswith('.csv'))}")
        failures = [r for r in rows if str(r.get("status", "")).startswith("error")]
        failed = list(dict.fromkeys(r["row"] for r in failures))
        if failed:
            where = f" (the messages are in {run.journal})" if run is not None else ""
            typer.echo(f"failed: {', '.join(failed)}{where}", err=True)
            for r in failures:
                typer.echo(f"  {r['row']} seed {r['seed']}: {str(r['status'])[:300]}", err=True)
        succeeded = list(dict.fromkeys(r["row"] for r in rows if r.get("status") == "ok" and r["row"] not in failed))
        if privacy and not succeeded:
            typer.echo("privacy: skipped, no method ran to the end", err=True)
        elif privacy:
            from overunlearn.cli.privacy import privacy_after_bench

            privacy_after_bench(
                benchmark, succeeded, config["epochs"],
                seed=seed_list[0], n_models=privacy_models, out=out / "privacy",
                device=device, cache=cache, recipe=preset, dataset=dataset, data_root=data_root, download=download,
                overrides=overrides, progress=not quiet,
                image_options={"n_train": n_train, "n_test": n_test, "p_retain": p_retain, "p_forget": p_forget})
        if failed:
            raise typer.Exit(1)

    cmd.__doc__ = ("Label Erasure: erase red/green copies from a two-head model; prints retain accuracy and "
                   "forget error for every method." if benchmark == "erase" else
                   "Representation Collapse: unlearn off-colour copies; prints colour accuracy for every method.")
    return cmd


bench_app.command("erase")(_command("erase"))
bench_app.command("collapse")(_command("collapse"))
