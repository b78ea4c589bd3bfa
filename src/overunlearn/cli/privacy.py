"""``overunlearn privacy BENCHMARK``: privacy metrics (MIA, U-LiRA, KLoM) of unlearning methods.

For one data split of a built-in benchmark it trains (or loads from the cache) ``N`` original
models, ``N`` or ``2N`` oracles (models retrained without the forget set) and, per method, ``N``
unlearned models, then prints :func:`overunlearn.privacy.runner.format_rows` of
:func:`overunlearn.privacy.runner.privacy_report` and writes ``privacy_rows.json``,
``privacy_arrays.npz``, ``privacy_table.txt``, ``privacy_config.json`` and the plots to ``--out``.

Hyperparameters are the benchmark's shipped presets: Data Poisoning ``preset(method, T).kwargs()``
(the paper's Table 6), Label Erasure / Representation Collapse ``ERASE_METHOD_POINTS`` /
``COLLAPSE_METHOD_POINTS``. ``overunlearn bench poison|erase|collapse --privacy`` calls
:func:`privacy_after_bench` with the methods that benchmark run used. See ``docs/privacy.md``.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import app
from overunlearn.cli.errors import KEPT, friendly_errors
from overunlearn.privacy.runner import DEFAULT_GROUND_TRUTH, DEFAULT_MODELS

#: benchmarks with shipped method presets, and their defaults
BENCHMARKS: tuple[str, ...] = ("poison", "erase", "collapse")
DEFAULT_RECIPE: Mapping[str, str] = {"poison": "quick", "erase": "auto", "collapse": "auto"}
POISON_EPOCHS = 100


def check_benchmark(benchmark: str) -> str:
    name = benchmark.strip().lower()
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    return name


def valid_methods(benchmark: str) -> list[str]:
    """The methods that apply to ``benchmark`` (poison: the paper's table; images: every classifier method)."""
    if benchmark == "poison":
        from overunlearn.benchmarks.poison import POISON_METHODS

        return list(POISON_METHODS)
    from overunlearn.methods import list_methods

    return list_methods(task="classification")


def resolve_methods(benchmark: str, text: str | Sequence[str] | None) -> list[str]:
    """``"all"`` / ``None`` -> every applicable method; else comma-separated names, checked."""
    valid = valid_methods(benchmark)
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all", "*")):
        return valid
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for m in items:
        key = m.strip().lower().replace("-", "_")
        if key and key not in names:
            names.append(key)
    bad = [m for m in names if m not in valid]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {', '.join(bad)} for benchmark {benchmark!r}; "
                                 f"valid: {', '.join(valid)} or 'all'")
    if not names:
        raise typer.BadParameter("no method given")
    return names


def method_specs(benchmark: str, methods: Sequence[str], epochs: int | Sequence[int],
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> list[tuple[str, str, dict, int]]:
    """``(label, method, hyper, T)`` for :func:`privacy_report`, from the benchmark's presets.

    Poison: ``preset(method, T).kwargs()``; images: ``ERASE_METHOD_POINTS`` /
    ``COLLAPSE_METHOD_POINTS`` (then ``overrides[method]``). With several ``T`` the labels are
    ``method@T``.
    """
    epoch_list = [int(epochs)] if isinstance(epochs, int) else [int(t) for t in epochs]
    if benchmark == "poison":
        from overunlearn.benchmarks.poison import preset

        def hyper_of(m: str, t: int) -> dict[str, Any]:
            return preset(m, t).kwargs()
    else:
        if benchmark == "erase":
            from overunlearn.benchmarks.erase import ERASE_METHOD_POINTS as points
        else:
            from overunlearn.benchmarks.collapse import COLLAPSE_METHOD_POINTS as points

        def hyper_of(m: str, t: int) -> dict[str, Any]:
            return dict(points.get(m, {}))

    specs = []
    for t in epoch_list:
        for m in methods:
            hyper = {**hyper_of(m, t), **dict((overrides or {}).get(m, {}))}
            label = m if len(epoch_list) == 1 else f"{m}@{t}"
            specs.append((label, m, hyper, t))
    return specs


def build_benchmark(benchmark: str, *, recipe: str | None = None, dataset: str = "fashion-mnist",
                    data_root: Path | None = None, cache: Path | None = None, device: str = "auto",
                    download: bool = False, workers: int | None = None, **image_options: Any) -> Any:
    """The benchmark object the privacy setup is adapted from (options as on the ``bench`` commands).

    ``recipe``: poison ``quick`` | ``full`` | ``smoke``; images the preset (``auto`` | ``cpu`` |
    ``paper`` | ``test``). ``image_options``: ``n_train``, ``n_test``, ``p_retain``, ``p_forget``.
    Poison: ensembles train in ``workers`` shards (default: the current torch thread count), and
    the process is then set to one torch thread for unlearning and signals.
    """
    from overunlearn.benchmarks import get_benchmark

    name = recipe or DEFAULT_RECIPE[benchmark]
    if benchmark == "poison":
        import torch

        from overunlearn.benchmarks.poison import RECIPES

        if name not in RECIPES:
            raise typer.BadParameter(f"unknown poison recipe {name!r}; valid: {', '.join(RECIPES)}")
        # the ensemble trainer runs `workers` single-threaded shards; unlearning and signals of the tiny
        # MLP run fastest on one intra-op thread (multi-threaded OpenMP stalls on a busy shared machine)
        workers = workers or torch.get_num_threads()
        torch.set_num_threads(1)
        return get_benchmark("poison", recipe=name, cache_dir=cache, device=device, workers=workers)
    try:
        return get_benchmark(benchmark, dataset=dataset, preset=name, data_root=data_root,
                             cache_dir=None if cache is None else Path(cache) / "models", device=device,
                             progress=False, download=download, **image_options)
    except KeyError as exc:  # unknown preset or dataset
        raise typer.BadParameter(str(exc.args[0]) if exc.args else str(exc)) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def describe(bench: Any) -> str:
    if getattr(bench, "name", "") == "poison":
        r = bench.recipe
        return (f"poison, recipe {r.name!r} ({r.original_steps} original / {r.ground_truth_steps} oracle steps), "
                f"device {bench.device}")
    p = bench.preset
    return (f"{bench.name} on {bench.dataset}, preset {p.name!r} ({p.recipe.arch}, {p.recipe.epochs} epochs, "
            f"n_train {p.n_train}), device {bench.device}")


def run_privacy(bench: Any, specs: Sequence[tuple[str, str, dict, int]], *, n_models: int, seed: int,
                out: Path, device: str = "auto", cache: Path | None = None, ground_truth: str = "extra",
                klom_bins: int | str = "auto", plots: bool = True, progress: bool = True,
                echo: Callable[[str], Any] = typer.echo, command: str | None = None) -> list[dict[str, Any]]:
    """Run :func:`privacy_report` on ``bench``, print the table and the files written; return the rows."""
    from overunlearn.privacy.runner import format_rows, privacy_report
    from overunlearn.storage import atomic_write_json, atomic_write_text

    out = Path(out)
    n_oracles = 2 * n_models if ground_truth == "extra" else n_models
    echo(f"privacy: {describe(bench)}; data seed {seed}; N = {n_models} originals, {n_oracles} oracles, "
         f"{n_models} unlearned models per method ({len(specs)} methods: "
         f"{', '.join(label for label, *_ in specs)}); ground truth {ground_truth!r}; KLoM bins {klom_bins}")
    t0 = time.perf_counter()
    rows = privacy_report(bench, list(specs), n_models=n_models, seed=seed, cache_dir=cache, device=device,
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


def privacy_after_bench(benchmark: str, methods: Sequence[str], epochs: int | Sequence[int], *, seed: int,
                        n_models: int | None = None, out: Path | None = None, device: str = "auto",
                        cache: Path | None = None, recipe: str | None = None, dataset: str = "fashion-mnist",
                        data_root: Path | None = None, download: bool = False,
                        overrides: Mapping[str, Mapping[str, Any]] | None = None,
                        image_options: Mapping[str, Any] | None = None, progress: bool = True,
                        echo: Callable[[str], Any] = typer.echo) -> list[dict[str, Any]]:
    """The ``--privacy`` step of ``overunlearn bench ...``: the privacy report of the methods just run.

    Defaults: ``n_models`` 16 (poison) / 8 (images), ground truth ``extra`` (poison) / ``split``
    (images), KLoM bins ``auto``; ``out`` defaults to ``results/privacy/<benchmark>``.
    """
    benchmark = check_benchmark(benchmark)
    names = resolve_methods(benchmark, list(methods))
    bench = build_benchmark(benchmark, recipe=recipe, dataset=dataset, data_root=data_root, cache=cache,
                            device=device, download=download, **dict(image_options or {}))
    n = n_models or DEFAULT_MODELS[benchmark]
    echo("")
    return run_privacy(bench, method_specs(benchmark, names, epochs, overrides), n_models=n, seed=seed,
                       out=Path(out) if out is not None else Path("results/privacy") / benchmark, device=device,
                       cache=cache, ground_truth=DEFAULT_GROUND_TRUTH[benchmark], klom_bins="auto",
                       progress=progress, echo=echo, command=" ".join(shlex.quote(a) for a in sys.argv))


def _klom_bins(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        bins = int(text)
    except ValueError:
        bins = 0
    if bins < 2:
        raise typer.BadParameter(f"--klom-bins must be 'auto' or an integer >= 2, got {text!r}")
    return bins


@app.command("privacy")
def privacy_cmd(
    benchmark: str = typer.Argument(..., help="poison | erase | collapse"),
    methods: str = typer.Option("all", "--methods", help="comma-separated methods or 'all' (every method that "
                                "applies, at the benchmark's shipped presets)"),
    models: int | None = typer.Option(None, "--models", "-N", help="N: originals, oracles and unlearned "
                                      "models per method (default 16 for poison, 8 for images; at least 4)"),
    epochs: int | None = typer.Option(None, "--epochs", "-T", min=1, help="unlearning epochs T (default: 100 for "
                                      "poison, the preset's for images)"),
    recipe: str | None = typer.Option(None, "--recipe", "--preset", help="poison: quick (default) | full | smoke; "
                                      "images: auto (default: paper on CUDA, cpu otherwise) | cpu | paper | test"),
    dataset: str = typer.Option("fashion-mnist", "--dataset", "-d", help="images: fashion-mnist | mnist | "
                                "cifar10 | tiny-imagenet | digits"),
    data_root: Path | None = typer.Option(None, "--data-root", help="dataset root (images)"),
    n_train: int | None = typer.Option(None, "--n-train", help="images: class-balanced training subset size "
                                       "(default: the preset's; 0: all)"),
    n_test: int | None = typer.Option(None, "--n-test", help="images: class-balanced test subset size"),
    ground_truth: str | None = typer.Option(None, "--ground-truth", help="extra (N further oracles; default for "
                                            "poison) | split (one half of the oracles vs the other; default for "
                                            "images)"),
    klom_bins: str = typer.Option("auto", "--klom-bins", help="KLoM bins: 'auto' (max(3, sqrt N) below 80 models) "
                                  "or a number (20 = the published setting, meant for ~100 models)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    out: Path | None = typer.Option(None, "--out", help="output directory (default results/privacy/<benchmark>)"),
    cache: Path | None = typer.Option(None, "--cache", help="cache root (default $OVERUNLEARN_CACHE or "
                                      "~/.cache/overunlearn); models and signals go to <cache>/privacy/"),
    seed: int = typer.Option(1, "--seed", help="data seed (which split; model seeds derive from it)"),
    threads: int = typer.Option(0, "--threads", help="CPU cores (0 = all available); poison: training "
                                "worker processes, one thread each (unlearning runs on one thread)"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="draw loss_hist.png and klom_cdf.png"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="one line per trained model"),
) -> None:
    """Privacy metrics (population MIA, MIA-efficacy, U-LiRA, KLoM) of unlearning methods on a benchmark.

    Rows: `original` (the untouched originals), `ground_truth` (independently retrained models, i.e.
    what a perfect unlearner scores at this N) and one row per method. See docs/privacy.md.
    """
    import torch


    name = check_benchmark(benchmark)
    names = resolve_methods(name, methods)
    gt = (ground_truth or DEFAULT_GROUND_TRUTH[name]).strip().lower()
    if gt not in ("extra", "split"):
        raise typer.BadParameter(f"--ground-truth must be 'extra' or 'split', got {ground_truth!r}")
    bins = _klom_bins(klom_bins)
    if models is not None and models < 4:
        raise typer.BadParameter(f"--models {models}: at least 4 models per set are needed (U-LiRA fits its "
                                 "Gaussians on N - 1 shadow models; the ground-truth row splits the oracles)")
    if threads > 0:
        torch.set_num_threads(threads)
    with friendly_errors(KEPT):
        bench = build_benchmark(name, recipe=recipe, dataset=dataset, data_root=data_root, cache=cache,
                                device=device, workers=threads if threads > 0 else None,
                                n_train=n_train, n_test=n_test)
        T = epochs if epochs is not None else (POISON_EPOCHS if name == "poison" else bench.preset.epochs)
        if name == "poison":
            from overunlearn.benchmarks.poison import preset

            for m in names:
                note = preset(m, T).note
                if note:
                    typer.echo(f"note: {m} @ T={T}: {note}")
        rows = run_privacy(bench, method_specs(name, names, T), n_models=models or DEFAULT_MODELS[name],
                           seed=seed, out=out if out is not None else Path("results/privacy") / name,
                           device=device, cache=cache, ground_truth=gt, klom_bins=bins, plots=plots,
                           progress=progress, command=" ".join(shlex.quote(a) for a in sys.argv))
    if not rows:  # pragma: no cover
        raise typer.Exit(1)


__all__ = ["privacy_cmd", "privacy_after_bench", "run_privacy", "method_specs", "resolve_methods",
           "build_benchmark", "BENCHMARKS"]
