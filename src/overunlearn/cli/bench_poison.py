"""``overunlearn bench poison``: the Data Poisoning benchmark end to end (paper Table 1 and Figure 1).

The command trains (or loads from the cache) the original and ground-truth models of every seed
as one vectorised ensemble, in ``--threads`` worker processes; builds a sweep in memory (every
method at its Table 6 preset, one setting per ``T``) and runs it through the sweep runner and
journal (``<out>/poison_<recipe>.jsonl``; trials stacked into vectorised ensembles of
:data:`BATCH_CPU` where the model allows), so a run is resumable and its finished trials are never
recomputed; then prints the table and writes the CSV / JSON files and one figure of fits per ``T``
(:mod:`overunlearn.report.poison`). The journal keeps no models, so the figure seed's trials are
run again here (with the journal's arithmetic: the same numbers) for the figures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import bench_app
from overunlearn.cli.errors import KEPT, friendly_errors
from overunlearn.cli.options import (
    CACHE_HELP,
    QUIET_HELP,
    SEEDS_HELP,
    check_device,
    check_out,
    choose_methods,
    echo_log,
    parse_epochs,
    parse_seeds,
)

FULL_COMMAND = "overunlearn bench poison --recipe full --seeds 1-10 --epochs 10,100,1000"

#: most trials in one vectorised ensemble on a CPU: small stacks keep their parameters and AdamW state in
#: cache (``benchmarks/perf_unlearning.py``); on a GPU one large stack
BATCH_CPU = 5
BATCH_GPU = 256

#: intra-op threads of every unlearning trial on a CPU, whatever ``--threads`` says (parallelism comes from
#: the ``--jobs`` worker processes): a product's rounding may depend on how its sums are split over threads,
#: so a trial's numbers would otherwise depend on the machine that put it in the journal
UNLEARN_THREADS = 1


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def poison_spec(recipe: str, seeds: Sequence[int], epochs: Sequence[int], methods: Sequence[str], device: str,
                batch: int) -> dict[str, Any]:
    """The sweep spec (as the parsed TOML would be) of one ``bench poison`` run.

    One journal per recipe (``poison_<recipe>``) whatever the seeds, T and methods: trials are found by
    content, so a run of a subset reuses what a larger run finished and the other way round. Runs
    through the engine one trial at a time (``batch`` 0) get their own journal: the two arithmetics
    agree to float32 rounding only.
    """
    from overunlearn.benchmarks.poison import PoisonBenchmark, preset
    from overunlearn.cli.bench_sweep import bench_spec, sweep_name

    name = sweep_name(f"poison_{recipe}", {"arithmetic": "engine"}, default=batch > 1)
    return bench_spec(
        name=name, title=f"Data Poisoning (sine), recipe {recipe!r}: sup-norm error", benchmark="poison",
        options={"recipe": recipe}, seeds=seeds,
        settings=[(f"T={T}", T, {m: preset(m, T).kwargs() for m in methods}) for T in epochs],
        metrics={m.name: m.direction for m in PoisonBenchmark.metrics}, device=device, batch=batch)


@contextmanager
def cache_root(cache: Path | None) -> Iterator[None]:
    """``--cache`` for the sweep's workers: ``$OVERUNLEARN_CACHE`` while the sweep runs (spawned workers
    inherit it), so the cache's location stays out of the benchmark options, which identify trials."""
    from overunlearn.sweep.worker import clear_caches

    old = os.environ.get("OVERUNLEARN_CACHE")
    if cache is not None:
        os.environ["OVERUNLEARN_CACHE"] = str(cache)
    clear_caches()  # benchmarks this process configured for another cache
    try:
        yield
    finally:
        clear_caches()
        if cache is not None:
            if old is None:
                os.environ.pop("OVERUNLEARN_CACHE", None)
            else:
                os.environ["OVERUNLEARN_CACHE"] = old


def fit_figures(bench: Any, epochs: Sequence[int], methods: Sequence[str], seed: int, device: str,
                vectorise: bool = True, store: Path | None = None,
                ids: dict[tuple[str, int], str] | None = None,
                progress: Callable[[int], None] | None = None) -> list[Any]:
    """One :class:`~overunlearn.report.poison.FitFigure` per T: the reference models of ``seed`` and every
    method's unlearned model. The sweep keeps no models, so the figure seed's trials are run again here
    through :func:`overunlearn.engine.unlearn_many`, with the journal's arithmetic (``vectorise``: the
    vectorised runner, whose numbers do not depend on what is computed with them; else the engine one
    trial at a time), so the curves are those of the trials in the table. ``progress``: called after every
    step (it may raise to stop the work).

    ``store``: a JSON file of the curves computed before, by trial id (``ids``: (method, T) -> the sweep's
    trial id), valid for the same source fingerprint and arithmetic; its curves are reused, new ones added.
    """
    import json
    import math

    import torch

    from overunlearn.benchmarks.poison import preset
    from overunlearn.engine import BatchedRun, Budget, unlearn_many
    from overunlearn.methods import create
    from overunlearn.report.poison import FitFigure, FitPanel, jsonable
    from overunlearn.storage import atomic_write_json
    from overunlearn.sweep.journal import code_fingerprint

    grid = bench.grid()
    dev = bench.device

    def curve(model: torch.nn.Module) -> list[float]:
        with torch.no_grad():
            model.eval()
            return model(grid.reshape(-1, 1).to(dev)).reshape(-1).cpu().tolist()

    retain, forget = bench.data(seed)
    refs = []
    for kind, title in (("original", "original model"), ("ground_truth", "ground truth (retain only)")):
        model = bench.load_model(seed, kind)
        refs.append(FitPanel(kind, title, curve(model), bench.evaluate(model, seed)["sup_error"]))
    ids = ids or {}
    tag = {"code": code_fingerprint(), "arithmetic": "vectorised" if vectorise else "engine",
           "device": str(torch.device(device).type), "grid_points": int(grid.numel())}
    kept: dict[str, Any] = {}
    if store is not None and store.is_file():
        try:
            data = json.loads(store.read_text())
            if {k: data.get(k) for k in tag} == tag and isinstance(data.get("fits"), dict):
                kept = data["fits"]
        except (OSError, ValueError):  # unreadable: computed again, and the file rewritten
            kept = {}
    panels: dict[tuple[str, int], FitPanel] = {}
    for T in epochs:
        for m in methods:
            hit = kept.get(ids.get((m, T), ""))
            if isinstance(hit, dict) and "sup_error" in hit:
                panels[(m, T)] = FitPanel(m, m, hit.get("curve"), float(hit["sup_error"]))
    problem = bench.problem(seed)
    runs = [BatchedRun(problem, create(m, **preset(m, T).kwargs()), Budget(epochs=T), seed=seed, key=(m, T))
            for T in epochs for m in methods if (m, T) not in panels]
    for out in unlearn_many(runs, device, vectorise=vectorise, progress=progress) if runs else []:
        m, T = out.key
        if out.model is None:  # diverged
            panels[(m, T)] = FitPanel(m, m, None, math.inf)
        else:
            panels[(m, T)] = FitPanel(m, m, curve(out.model), bench.evaluate(out.model, seed)["sup_error"])
        if (m, T) in ids:
            kept[ids[(m, T)]] = {"curve": panels[(m, T)].curve, "sup_error": panels[(m, T)].sup_error}
    if store is not None and runs:
        store.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(store, jsonable({**tag, "fits": kept}))
    return [FitFigure(
        epochs=T, seed=seed, recipe=bench.recipe.name, grid=grid.tolist(),
        retain=(retain.inputs.reshape(-1).tolist(), retain.targets.reshape(-1).tolist()),  # type: ignore[union-attr]
        forget=(forget.inputs.reshape(-1).tolist(), forget.targets.reshape(-1).tolist()),  # type: ignore[union-attr]
        panels=refs + [panels[(m, T)] for m in methods])
        for T in epochs]


class _Cancelled(BaseException):
    """Stops the figures' thread at its next step (a ``BaseException``: the engine's capture of a run's own
    errors lets it through)."""


class Background:
    """``fn(job)`` in a thread started now (``concurrent``), else on :meth:`result`; :meth:`result` returns
    its value or raises its exception here. ``fn`` calls ``job.check`` between steps, so that :meth:`cancel`
    can stop it."""

    def __init__(self, fn: Any, concurrent: bool) -> None:
        import threading

        self.fn, self.box, self.thread = fn, {}, None
        self.stop = threading.Event()
        if concurrent:
            self.thread = threading.Thread(target=self._run, daemon=True, name="bench-poison-figures")
            self.thread.start()

    def _run(self) -> None:
        try:
            self.box["value"] = self.fn(self)
        except _Cancelled:
            self.box["error"] = RuntimeError("the figures were cancelled")
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            self.box["error"] = exc

    def check(self, _steps: int = 0) -> None:
        """Raise :class:`_Cancelled` once :meth:`cancel` was called (a progress callback of the engine)."""
        if self.stop.is_set():
            raise _Cancelled

    def cancel(self) -> None:
        """Stop the thread at its next step and wait for it: a thread still computing in torch when the
        interpreter exits makes the process abort ("terminate called without an active exception")."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def result(self) -> Any:
        if self.thread is None:
            self._run()
        else:
            self.thread.join()
        if "error" in self.box:
            raise self.box["error"]
        return self.box["value"]


@bench_app.command("poison")
def poison_cmd(
    seeds: str = typer.Option("1-10", "--seeds", help=SEEDS_HELP),
    epochs: str = typer.Option("10,100,1000", "--epochs", "-T", help="unlearning epochs T (one full-batch step each), "
                               "e.g. '10,100,1000'"),
    methods: str = typer.Option("all", "--methods", help="comma-separated methods or 'all': "
                                "retrain,minnorm_og,gd,ga,ngp,ngd,ridge,l1_sparse"),
    recipe: str = typer.Option("quick", "--recipe", help="'full' = the paper's (100k original / 50k ground-truth "
                               "AdamW steps); 'quick' = 15k / 7.5k steps (the default: a 2-minute demo; the full "
                               "recipe takes about 7 minutes on 2 CPU cores); 'smoke' = a few hundred steps"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", callback=check_device),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="worker processes of the unlearning trials, one "
                             "torch thread each (0 = as many as --threads; 1: run in this process)"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU cores for training the reference models (one "
                                "single-threaded worker process each; 0 = all available cores)"),
    out: Path = typer.Option(Path("results/poison"), "--out", help="output folder: journal, table, CSV, JSON, "
                             "figures"),
    cache: Path | None = typer.Option(None, "--cache", help=CACHE_HELP),
    figure_seed: int | None = typer.Option(None, "--figure-seed", help="seed whose fits are plotted (default: the "
                                           "first seed)"),
    per_trial: bool = typer.Option(False, "--per-trial", help="run every trial on its own through the engine "
                                   "(default: vectorised ensembles, 2-3x faster on a CPU; the two agree to float32 "
                                   "rounding, so these trials get their own journal)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    privacy: bool = typer.Option(False, "--privacy", help="then run the privacy report (MIA, U-LiRA, KLoM; see "
                                 "`overunlearn privacy`) of these methods at these T on the first seed"),
    privacy_models: int | None = typer.Option(None, "--privacy-models", min=4, help="N for --privacy (default 16)"),
) -> None:
    """Data Poisoning (paper Section 5.1): unlearn 5 poisoned points from a sine regression MLP.

    Trains (or loads from the cache) the original and ground-truth model of every seed as one
    vectorised ensemble, runs every method at every T with the paper's Table 6 hyperparameters
    through the sweep runner (journal under --out: run the same command again to resume), and
    reports the sup-norm error against sin x next to the paper's Table 1 / Table 5 values.
    """
    import torch

    from overunlearn.benchmarks.poison import PAPER_TABLE5, PRESET_SOURCE, RECIPES, PoisonBenchmark, preset
    from overunlearn.cli.bench_sweep import run_bench
    from overunlearn.engine import resolve_device
    from overunlearn.report.poison import format_table, load_results, write_outputs

    # every option is checked before anything trains
    if recipe not in RECIPES:
        raise typer.BadParameter(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}",
                                 param_hint="'--recipe'")
    seed_list = parse_seeds(seeds)
    epoch_list = parse_epochs(epochs)
    from overunlearn.benchmarks.poison import POISON_METHODS

    method_list = choose_methods(methods, list(POISON_METHODS))
    check_out(out, [""])
    fig_seed = seed_list[0] if figure_seed is None else figure_seed
    if fig_seed not in seed_list:
        raise typer.BadParameter(f"figure seed {fig_seed} is not among the seeds {seed_list}",
                                 param_hint="'--figure-seed'")
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:  # an unknown device name, or cuda without CUDA
        raise typer.BadParameter(str(exc), param_hint="'--device'") from None
    n_threads = threads if threads > 0 else _cpu_count()
    n_jobs = jobs if jobs > 0 else (n_threads if dev.type == "cpu" else 1)
    batch = 0 if per_trial else (BATCH_CPU if dev.type == "cpu" else BATCH_GPU)
    r = RECIPES[recipe]
    log = echo_log(quiet)
    typer.echo(f"Data Poisoning: recipe {recipe!r} ({r.original_steps} original / {r.ground_truth_steps} "
               f"ground-truth steps), seeds {seeds}, T {epoch_list}, {len(method_list)} methods, "
               f"{n_threads} CPU thread(s) for training, {n_jobs} unlearning worker(s), device {dev}")
    raw = poison_spec(recipe, seed_list, epoch_list, method_list, str(dev), batch)
    prev_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    with friendly_errors(f"the trained models are kept in the cache ({cache or 'the default cache'}) and every "
                         f"finished trial in {out / (raw['name'] + '.jsonl')}; run the same command again to "
                         "continue", "run fewer seeds or methods at once, or lower --threads / --jobs"):
        bench = PoisonBenchmark(recipe, cache_dir=cache, device=dev, workers=n_threads, progress=not quiet)
        trained = bench.prepare(seed_list)  # all seeds as one ensemble, before the sweep's workers need them
    t_trained = time.perf_counter()
    fig_seconds: list[float] = []

    from overunlearn.sweep.spec import parse_spec

    ids = {(t.method, int(t.budget["epochs"])): t.id
           for t in parse_spec(dict(raw), source="bench poison", default_name=raw["name"]).trials if t.seed == fig_seed}

    def draw(job: Background) -> list[Any]:
        t0 = time.perf_counter()
        figs = fit_figures(bench, epoch_list, method_list, fig_seed, str(dev), vectorise=batch > 1,
                           store=out / f"{raw['name']}_fits.json", ids=ids, progress=job.check)
        fig_seconds.append(time.perf_counter() - t0)
        return figs

    try:
        if dev.type == "cpu":  # the trials' arithmetic (one intra-op thread), for the figures' trials too
            torch.set_num_threads(UNLEARN_THREADS)
        # the figure seed's trials run again for the figures: next to the sweep's worker processes (this
        # process only waits for them), or after the sweep when it runs in this process
        figures_job = Background(draw, concurrent=n_jobs > 1)
        try:
            with cache_root(cache):
                run = run_bench(raw, out, jobs=n_jobs, threads=UNLEARN_THREADS if dev.type == "cpu" else None,
                                device=str(dev), log=log, on_failure="lower --jobs")
        except BaseException:  # (Ctrl-C, a locked journal, an unwritable folder: stop the figures first)
            figures_job.cancel()
            raise
        t_end = time.perf_counter()
        with friendly_errors(KEPT, "lower --threads"):
            figures = figures_job.result()
    finally:
        torch.set_num_threads(prev_threads)
    t_figures = time.perf_counter()
    presets = {f"{m}@{T}": {"hyper": preset(m, T).kwargs(), "note": preset(m, T).note}
               for T in epoch_list for m in method_list}
    results = load_results(run.journal, raw["name"], recipe=r.to_dict(), paper=PAPER_TABLE5, presets=presets)
    typer.echo("")
    typer.echo(format_table(results))
    for note in results.notes:
        typer.echo(f"note: {note}")
    timings = {"train_s": t_trained - t_start, "unlearn_s": t_end - t_trained, "figures_s": sum(fig_seconds),
               "total_s": t_figures - t_start}
    extra = {"device": str(dev), "threads": n_threads, "jobs": n_jobs, "batch": batch, "timings_s": timings,
             "trained_models": trained, "reused_trials": run.result.skipped, "preset_source": PRESET_SOURCE,
             "figure_seed": fig_seed,
             "figure_sup_errors": {f"{p.key}@{f.epochs}": p.sup_error for f in figures for p in f.panels}}
    with friendly_errors(KEPT):
        paths = write_outputs(results, out, figures, extra)
    res = run.result
    typer.echo("")
    trained_txt = "all cached" if trained == 0 else f"{timings['train_s']:.1f} s for {trained} models"
    typer.echo(f"time: {timings['total_s']:.1f} s (training: {trained_txt}, unlearning {timings['unlearn_s']:.1f} s: "
               f"{res.total - res.skipped} of {res.total} trials run, {res.skipped} from the journal; fits of the figure "
               f"seed {timings['figures_s']:.1f} s{' alongside' if n_jobs > 1 else ''})")
    typer.echo("written:")
    for key, path in {"journal": run.journal, **paths}.items():
        label = "Figure 1" if key == "figure_T100" else key
        typer.echo(f"  {label:<12} {path}")
    if recipe != "full":
        typer.echo("")
        typer.echo(f"note: this used the lighter {recipe!r} recipe, so the numbers are not the paper's setting. "
                   f"The paper's recipe (about 7 minutes on 2 CPU cores when nothing is cached) is:\n  {FULL_COMMAND}")
    if privacy:
        from overunlearn.cli.privacy import privacy_after_bench

        privacy_after_bench("poison", method_list, epoch_list, seed=seed_list[0], n_models=privacy_models,
                            out=out / "privacy", device=device, cache=cache, recipe=recipe, progress=not quiet)
    if results.failed:
        typer.echo(f"{len(results.failed)} trial(s) failed; their errors are in {run.journal} (run the same command "
                   "again to retry them)", err=True)
        raise typer.Exit(1)
