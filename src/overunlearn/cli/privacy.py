"""``overunlearn privacy BENCHMARK``: privacy metrics (MIA, U-LiRA, KLoM) of unlearning methods.

For one data split of any registered benchmark (a plugin's included: ``--plugin MODULE``) that
has a ``privacy_setup(seed)`` method or that :func:`overunlearn.privacy.setups.adapt_benchmark`
adapts, it trains (or loads from the cache) ``N`` original models, ``N`` or ``2N`` oracles (models
retrained without the forget set) and, per method, ``N`` unlearned models, then prints
:func:`overunlearn.privacy.runner.format_rows` of :func:`overunlearn.privacy.runner.privacy_report`
and writes ``privacy_rows.json``, ``privacy_arrays.npz``, ``privacy_table.txt``,
``privacy_config.json`` and the plots to ``--out``.

Everything benchmark-specific comes from the benchmark (see :mod:`overunlearn.benchmarks.base`):
the methods run by default and their hyperparameters (``method_points(epochs)``), the epochs
(``privacy_defaults["epochs"]``, else ``default_epochs``), ``N`` and the ground-truth protocol
(``privacy_defaults``, :func:`overunlearn.privacy.runner.privacy_defaults`). Constructor options
are given with ``--option KEY=VALUE``; ``--recipe``/``--preset``, ``--dataset``, ``--data-root``,
``--n-train`` and ``--n-test`` are shorthands for the benchmarks whose constructor takes them.
``overunlearn bench NAME --privacy`` calls :func:`privacy_after_bench` with the methods that run used.
See ``docs/privacy.md``.
"""

from __future__ import annotations

import inspect
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import app
from overunlearn.cli.errors import KEPT, friendly_errors
from overunlearn.cli.options import CACHE_HELP, OPTION_HELP, QUIET_HELP, check_device, parse_epochs, parse_options

#: the options every benchmark constructor may take that this command sets itself when the constructor
#: names them: the training device, the cache root, the benchmark's own progress output, training workers
_AUTOMATIC = ("device", "cache_dir", "progress", "workers", "download")


def check_benchmark(benchmark: str) -> str:
    """``benchmark`` if it is registered (plugins included), else a clear error listing the registered ones."""
    from overunlearn.benchmarks import list_benchmarks

    name = benchmark.strip().lower()
    valid = list_benchmarks()
    if name not in valid:
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; valid: {', '.join(valid)} (a plugin's "
                                 "benchmark needs --plugin MODULE)", param_hint="'BENCHMARK'")
    return name


def _as_benchmark(bench: Any) -> Any:
    if isinstance(bench, str):
        from overunlearn.benchmarks import get_benchmark

        return get_benchmark(check_benchmark(bench))
    return bench


def _bench_name(bench: Any) -> str:
    return str(getattr(bench, "name", type(bench).__name__))


def default_methods(bench: Any, epochs: int | None = None) -> list[str]:
    """The methods ``bench`` runs by default (its ``method_points``), or a clear error if it names none."""
    from overunlearn.benchmarks.base import method_points

    bench = _as_benchmark(bench)
    try:
        return list(method_points(bench, int(epochs) if epochs is not None else _default_epochs(bench)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--methods'") from None


def resolve_methods(bench: Any, text: str | Sequence[str] | None, epochs: int | None = None) -> list[str]:
    """``"all"`` / ``None`` -> the benchmark's default methods (``method_points``); else comma-separated
    names, each checked against the registered methods (plugins' included)."""
    from overunlearn.methods import list_methods

    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all", "*")):
        return default_methods(bench, epochs)
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for m in items:
        key = m.strip().lower().replace("-", "_")
        if key and key not in names:
            names.append(key)
    if not names:
        raise typer.BadParameter("no method given", param_hint="'--methods'")
    valid = list_methods()
    bad = [m for m in names if m not in valid]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {', '.join(bad)}; registered methods: {', '.join(valid)} "
                                 "or 'all' (the benchmark's default methods)", param_hint="'--methods'")
    return names


def method_specs(bench: Any, methods: Sequence[str], epochs: int | Sequence[int],
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, str, dict, int]]:
    """``(label, method, hyper, T)`` for :func:`privacy_report`: each method at the benchmark's point for ``T``
    (its ``method_points(T)``; a method without one runs at its defaults), then ``overrides[method]``. With
    several ``T`` the labels are ``method@T``. ``bench``: a benchmark object or a registered name."""
    from overunlearn.benchmarks.base import method_points

    bench = _as_benchmark(bench)
    epoch_list = [int(epochs)] if isinstance(epochs, int) else [int(t) for t in epochs]
    specs = []
    for t in epoch_list:
        points = method_points(bench, t, list(methods))
        for m in methods:
            hyper = {**points.get(m, {}), **dict((overrides or {}).get(m, {}))}
            label = m if len(epoch_list) == 1 else f"{m}@{t}"
            specs.append((label, m, hyper, t))
    return specs


def _default_epochs(bench: Any) -> int:
    from overunlearn.privacy.runner import privacy_defaults

    epochs = privacy_defaults(bench)["epochs"]
    if epochs is None:
        raise typer.BadParameter(f"benchmark {_bench_name(bench)!r} has no default epochs; give --epochs",
                                 param_hint="'--epochs'")
    return int(epochs)


def factory_parameters(name: str) -> tuple[list[str], bool]:
    """The keyword options the factory of benchmark ``name`` names, and whether it takes others too
    (``**kwargs``). A class is read along its bases while each ``__init__`` passes ``**kwargs`` on."""
    from overunlearn.benchmarks import base

    base.list_benchmarks()
    factory = base._BENCHMARKS[name]
    targets: list[Any] = [factory]
    if isinstance(factory, type):
        targets = [c.__init__ for c in factory.__mro__ if c is not object and "__init__" in vars(c)]
    names: list[str] = []
    for target in targets:
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):  # no signature to read: take anything
            return names, True
        open_ended = False
        for p in params:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                open_ended = True
            elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                if p.name != "self" and p.name not in names:
                    names.append(p.name)
        if not open_ended:
            return names, False
    return names, True


def benchmark_options(name: str, *, recipe: str | None = None, dataset: str | None = None,
                      data_root: Path | None = None, cache: Path | None = None, device: str = "auto",
                      download: bool = False, workers: int | None = None,
                      options: Mapping[str, Any] | None = None, **shorthands: Any) -> dict[str, Any]:
    """The constructor options of benchmark ``name`` for a privacy run.

    In order (later wins): the benchmark's ``privacy_defaults["options"]``; the options this command sets
    when the constructor names them (``device``, ``cache_dir``, ``progress=False``, ``workers``,
    ``download``); the shorthands ``recipe`` (the constructor's ``recipe`` or ``preset``), ``dataset``,
    ``data_root`` and ``shorthands`` (``n_train``, ``n_test``, ...; ``None`` = not given), each only for a
    constructor that takes it (else a clear error); then ``options`` (``--option KEY=VALUE``) as given.
    """
    from overunlearn.privacy.runner import privacy_defaults

    names, open_ended = factory_parameters(name)
    out: dict[str, Any] = dict(privacy_defaults(name)["options"])
    auto = {"device": device, "cache_dir": cache, "progress": False, "workers": workers,
            "download": download or None}
    for key in _AUTOMATIC:
        if key in names and auto[key] is not None:
            out[key] = auto[key]
    given: dict[str, tuple[str, Any]] = {}
    if recipe is not None:
        key = "recipe" if "recipe" in names else "preset" if "preset" in names else None
        if key is None:
            raise typer.BadParameter(f"benchmark {name!r} takes neither a recipe nor a preset (its options: "
                                     f"{', '.join(names) or 'none'}); use --option KEY=VALUE",
                                     param_hint="'--recipe'")
        given[key] = ("--recipe", recipe)
    for key, value in (("dataset", dataset), ("data_root", data_root), *shorthands.items()):
        if value is not None:
            given[key] = ("--" + key.replace("_", "-"), value)
    for key, (flag, value) in given.items():
        if key not in names and not open_ended:
            raise typer.BadParameter(f"benchmark {name!r} takes no option {key!r} (its options: "
                                     f"{', '.join(names) or 'none'})", param_hint=f"'{flag}'")
        out[key] = value
    out.update(options or {})
    return out


def build_benchmark(benchmark: str, *, recipe: str | None = None, dataset: str | None = None,
                    data_root: Path | None = None, cache: Path | None = None, device: str = "auto",
                    download: bool = False, workers: int | None = None, options: Mapping[str, Any] | None = None,
                    **shorthands: Any) -> Any:
    """The benchmark the privacy setup comes from: ``get_benchmark(benchmark, **benchmark_options(...))``.

    A benchmark whose constructor takes ``workers`` trains its reference models in that many worker
    processes (default: the torch thread count); this process then unlearns on one torch thread (small
    models run fastest so, and the workers own the cores).
    """
    import torch

    from overunlearn.benchmarks import get_benchmark

    name = check_benchmark(benchmark)
    names, _ = factory_parameters(name)
    if "workers" in names:
        workers = workers or torch.get_num_threads()
    kwargs = benchmark_options(name, recipe=recipe, dataset=dataset, data_root=data_root, cache=cache,
                               device=device, download=download, workers=workers, options=options, **shorthands)
    try:
        bench = get_benchmark(name, **kwargs)
    except KeyError as exc:  # unknown preset, recipe or dataset
        raise typer.BadParameter(str(exc.args[0]) if exc.args else str(exc)) from None
    except (TypeError, ValueError) as exc:  # an option the constructor does not take, or a bad value
        raise typer.BadParameter(f"benchmark {name!r} with options {kwargs}: {exc}") from None
    if "workers" in names and "workers" in kwargs:
        torch.set_num_threads(1)
    return bench


def describe(bench: Any) -> str:
    """One line on the benchmark: its name, recipe or preset, dataset and device, where it has them."""
    parts = [_bench_name(bench)]
    dataset = getattr(bench, "dataset", None)
    if isinstance(dataset, str) and dataset:
        parts[0] += f" on {dataset}"
    for attr in ("recipe", "preset"):
        obj = getattr(bench, attr, None)
        label = getattr(obj, "name", obj)
        if isinstance(label, str) and label:
            parts.append(f"{attr} {label!r}")
    device = getattr(bench, "device", None)
    if device is not None:
        parts.append(f"device {device}")
    return ", ".join(parts)


def run_privacy(bench: Any, specs: Sequence[tuple[str, str, dict, int]], *, n_models: int, seed: int,
                out: Path, device: str = "auto", cache: Path | None = None, ground_truth: str = "extra",
                klom_bins: int | str = "auto", plots: bool = True, progress: bool = True,
                echo: Callable[[str], Any] = typer.echo, command: str | None = None,
                setup: Any = None) -> list[dict[str, Any]]:
    """Run :func:`privacy_report` on ``bench`` (or on its ``setup``, when already built), print the table and
    the files written; return the rows."""
    from overunlearn.privacy.runner import format_rows, privacy_report
    from overunlearn.storage import atomic_write_json, atomic_write_text

    out = Path(out)
    n_oracles = 2 * n_models if ground_truth == "extra" else n_models
    echo(f"privacy: {describe(bench)}; data seed {seed}; N = {n_models} originals, {n_oracles} oracles, "
         f"{n_models} unlearned models per method ({len(specs)} methods: "
         f"{', '.join(label for label, *_ in specs)}); ground truth {ground_truth!r}; KLoM bins {klom_bins}")
    t0 = time.perf_counter()
    rows = privacy_report(bench if setup is None else setup, list(specs), n_models=n_models, seed=seed, cache_dir=cache, device=device,
                          out_dir=out, progress=progress, plots=plots, ground_truth=ground_truth,  # type: ignore[arg-type]
                          klom_bins=klom_bins)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    table = format_rows(rows)
    secs = ", ".join(f"{r['label']} {r['seconds']:.2f}" for r in rows
                     if isinstance(r.get("seconds"), float) and r["seconds"] == r["seconds"])
    atomic_write_text(out / "privacy_table.txt", table + "\n")
    atomic_write_json(out / "privacy_config.json", {
        "command": command, "benchmark": describe(bench), "seed": seed, "n_models": n_models,
        "ground_truth": ground_truth, "klom_bins": rows[0]["klom_bins"] if rows else klom_bins,
        "methods": [{"label": label, "method": m, "hyper": h, "epochs": t} for label, m, h, t in specs],
        "wall_seconds": wall})
    echo("")
    echo(table)
    echo("")
    echo(f"time: {wall:.1f} s" + (f" (mean seconds per model, this run: {secs})" if secs else
                                 " (everything came from the cache)"))
    echo(f"written to {out}:")
    for name in ("privacy_rows.json", "privacy_arrays.npz", "privacy_table.txt", "privacy_config.json",
                 *(("loss_hist.png", "klom_cdf.png") if plots else ())):
        if (out / name).exists():
            echo(f"  {out / name}")
    return rows


def privacy_setup_of(bench: Any, seed: int) -> Any:
    """The benchmark's :class:`~overunlearn.privacy.runner.PrivacySetup` for data seed ``seed``: its own
    ``privacy_setup(seed)``, else :func:`overunlearn.privacy.setups.adapt_benchmark`'s; a clear error (exit 2)
    for a benchmark with neither, before anything trains."""
    from overunlearn.privacy.runner import as_privacy_setup
    from overunlearn.privacy.setups import adapt_benchmark

    if callable(getattr(bench, "privacy_setup", None)):
        return as_privacy_setup(bench, seed)
    setup = adapt_benchmark(bench, seed)
    if setup is None:
        raise typer.BadParameter(f"benchmark {_bench_name(bench)!r} cannot be evaluated for privacy: give "
                                 f"{type(bench).__name__} a privacy_setup(seed) method returning an "
                                 "overunlearn.privacy.runner.PrivacySetup (data split, model factory, training "
                                 "function)", param_hint="'BENCHMARK'")
    return setup


def privacy_after_bench(benchmark: str, methods: Sequence[str], epochs: int | Sequence[int], *, seed: int,
                        n_models: int | None = None, out: Path | None = None, device: str = "auto",
                        cache: Path | None = None, recipe: str | None = None, dataset: str | None = None,
                        data_root: Path | None = None, download: bool = False,
                        overrides: Mapping[str, Mapping[str, Any]] | None = None,
                        image_options: Mapping[str, Any] | None = None, progress: bool = True,
                        echo: Callable[[str], Any] = typer.echo, options: Mapping[str, Any] | None = None,
                        ground_truth: str | None = None) -> list[dict[str, Any]]:
    """The ``--privacy`` step of ``overunlearn bench ...``: the privacy report of the methods just run.

    ``recipe``, ``dataset``, ``data_root``, ``image_options`` (``n_train``, ``n_test``, ``p_retain``,
    ``p_forget``; ``None`` values are left out) and ``options`` become constructor options as in
    :func:`benchmark_options`. Defaults: ``n_models`` and the ground truth from the benchmark's
    ``privacy_defaults`` (else 8 and ``split``), KLoM bins ``auto``; ``out`` defaults to
    ``results/privacy/<benchmark>``.
    """
    from overunlearn.privacy.runner import privacy_defaults

    name = check_benchmark(benchmark)
    names = resolve_methods(name, list(methods))
    shorthands = {k: v for k, v in dict(image_options or {}).items() if v is not None}
    bench = build_benchmark(name, recipe=recipe, dataset=dataset, data_root=data_root, cache=cache, device=device,
                            download=download, options=options, **shorthands)
    setup = privacy_setup_of(bench, seed)
    defaults = privacy_defaults(bench)
    echo("")
    return run_privacy(bench, method_specs(bench, names, epochs, overrides), n_models=n_models or defaults["n_models"],
                       seed=seed, out=Path(out) if out is not None else Path("results/privacy") / name, device=device,
                       cache=cache, ground_truth=ground_truth or defaults["ground_truth"], klom_bins="auto",
                       progress=progress, echo=echo, command=" ".join(shlex.quote(a) for a in sys.argv), setup=setup)


def _klom_bins(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        bins = int(text)
    except ValueError:
        bins = 0
    if bins < 2:
        raise typer.BadParameter(f"--klom-bins must be 'auto' or an integer >= 2, got {text!r}",
                                 param_hint="'--klom-bins'")
    return bins


@app.command("privacy")
def privacy_cmd(
    benchmark: str = typer.Argument(..., help="a registered benchmark (`overunlearn bench --help`; a plugin's with "
                                    "--plugin MODULE) that has a privacy setup"),
    methods: str = typer.Option("all", "--methods", help="comma-separated registered methods, or 'all' (the "
                                "benchmark's default methods at its preset points)"),
    models: int | None = typer.Option(None, "--models", "-N", help="N: originals, oracles and unlearned models per "
                                      "method (default: the benchmark's privacy default, else 8; at least 4)"),
    epochs: str | None = typer.Option(None, "--epochs", "-T", help="unlearning epochs T, e.g. 100 or 10,100 "
                                      "(default: the benchmark's)"),
    recipe: str | None = typer.Option(None, "--recipe", "--preset", help="the benchmark's recipe or preset (its "
                                      "constructor's `recipe` or `preset` option)"),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="dataset (benchmarks with a `dataset` "
                                       "option, e.g. erase, collapse)"),
    data_root: Path | None = typer.Option(None, "--data-root", help="dataset root (benchmarks with a "
                                          "`data_root` option)"),
    n_train: int | None = typer.Option(None, "--n-train", help="class-balanced training subset size (benchmarks "
                                       "with an `n_train` option; 0: all)"),
    n_test: int | None = typer.Option(None, "--n-test", help="class-balanced test subset size (benchmarks with "
                                      "an `n_test` option)"),
    option: list[str] | None = typer.Option(None, "--option", metavar="KEY=VALUE", help=OPTION_HELP),
    ground_truth: str | None = typer.Option(None, "--ground-truth", help="extra (N further oracles) | split (one "
                                            "half of the oracles vs the other); default: the benchmark's, else "
                                            "split"),
    klom_bins: str = typer.Option("auto", "--klom-bins", help="KLoM bins: 'auto' (max(3, sqrt N) below 80 models) "
                                  "or a number (20 = the published setting, meant for ~100 models)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", callback=check_device),
    out: Path | None = typer.Option(None, "--out", help="output folder (default results/privacy/<benchmark>)"),
    cache: Path | None = typer.Option(None, "--cache", help=CACHE_HELP + "; privacy models and signals go to "
                                      "<cache>/privacy/"),
    seed: int = typer.Option(1, "--seed", help="data seed (which split; model seeds derive from it)"),
    threads: int | None = typer.Option(None, "--threads", min=0, help="torch threads of this process (default: "
                                       "torch's choice); a benchmark that trains in worker processes (a `workers` "
                                       "option, e.g. poison) trains in this many (unless --jobs) and unlearns on "
                                       "one thread"),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1, help="worker processes that train the reference "
                                    "models, for a benchmark that trains in worker processes (default: --threads, "
                                    "else the torch thread count)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw loss_hist.png and klom_cdf.png"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP + " (no line per trained model)"),
) -> None:
    """Privacy metrics (population MIA, MIA-efficacy, U-LiRA, KLoM) of unlearning methods on a benchmark.

    Rows: `original` (the untouched originals), `ground_truth` (independently retrained models, i.e.
    what a perfect unlearner scores at this N) and one row per method. See docs/privacy.md.
    """
    import torch

    from overunlearn.cli.options import check_out
    from overunlearn.privacy.runner import privacy_defaults

    name = check_benchmark(benchmark)
    check_out(out, ("",))
    extra = parse_options(option)
    epoch_list = parse_epochs(epochs) if epochs is not None else None
    gt = ground_truth.strip().lower() if ground_truth is not None else None
    if gt is not None and gt not in ("extra", "split"):
        raise typer.BadParameter(f"--ground-truth must be 'extra' or 'split', got {ground_truth!r}",
                                 param_hint="'--ground-truth'")
    bins = _klom_bins(klom_bins)
    if models is not None and models < 4:
        raise typer.BadParameter(f"--models {models}: at least 4 models per set are needed (U-LiRA fits its "
                                 "Gaussians on N - 1 shadow models; the ground-truth row splits the oracles)",
                                 param_hint="'--models'")
    if methods.strip().lower() not in ("", "all", "*"):
        names: list[str] | None = resolve_methods(name, methods)  # checked before anything is built
    else:
        names = None
    if threads:
        torch.set_num_threads(threads)
    with friendly_errors(KEPT):
        bench = build_benchmark(name, recipe=recipe, dataset=dataset, data_root=data_root, cache=cache,
                                device=device, workers=jobs or threads or None, options=extra,
                                n_train=n_train, n_test=n_test)
        setup = privacy_setup_of(bench, seed)
        defaults = privacy_defaults(bench)
        T = epoch_list if epoch_list is not None else [_default_epochs(bench)]
        if names is None:
            names = default_methods(bench, T[0])
        rows = run_privacy(bench, method_specs(bench, names, T), n_models=models or defaults["n_models"],
                           seed=seed, out=out if out is not None else Path("results/privacy") / name,
                           device=device, cache=cache, ground_truth=gt or defaults["ground_truth"], klom_bins=bins,
                           plots=plots, progress=not quiet, echo=typer.echo,
                           command=" ".join(shlex.quote(a) for a in sys.argv), setup=setup)
    if not rows:  # pragma: no cover
        raise typer.Exit(1)


__all__ = ["privacy_cmd", "privacy_after_bench", "run_privacy", "method_specs", "resolve_methods", "default_methods",
           "build_benchmark", "benchmark_options", "factory_parameters", "check_benchmark", "describe",
           "privacy_setup_of"]
