"""``overunlearn bench poison``: the Data Poisoning benchmark end to end (paper Table 1 and Figure 1)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from overunlearn.cli import bench_app

FULL_COMMAND = "overunlearn bench poison --recipe full --seeds 1-10 --epochs 10,100,1000"


def parse_int_list(text: str, what: str = "value") -> list[int]:
    """``"1-10"``, ``"1,2,3"`` or a mix such as ``"1-3,7"`` -> a list of distinct ints in order."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                i = part.index("-", 1)
                lo, hi = int(part[:i]), int(part[i + 1 :])
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise typer.BadParameter(f"cannot read {what}s from {text!r}; write e.g. '1-10' or '1,2,3'") from None
    seen: set[int] = set()
    uniq = [v for v in out if not (v in seen or seen.add(v))]  # type: ignore[func-returns-value]
    if not uniq:
        raise typer.BadParameter(f"no {what} given")
    return uniq


def parse_methods(text: str) -> list[str]:
    from overunlearn.benchmarks.poison import POISON_METHODS

    if text.strip().lower() in ("all", "*", ""):
        return list(POISON_METHODS)
    names = [m.strip().lower().replace("-", "_") for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in POISON_METHODS]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {bad}; choose from {', '.join(POISON_METHODS)} or 'all'")
    return names


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@bench_app.command("poison")
def poison_cmd(
    seeds: str = typer.Option("1-10", help="seeds, e.g. '1-10' or '1,2,3'"),
    epochs: str = typer.Option("10,100,1000", help="unlearning epochs T (one full-batch step each), e.g. '10,100,1000'"),
    methods: str = typer.Option("all", help="comma-separated methods or 'all': "
                                "retrain,minnorm_og,gd,ga,ngp,ngd,ridge,l1_sparse"),
    recipe: str = typer.Option("quick", help="'full' = the paper's (100k original / 50k ground-truth AdamW steps); "
                               "'quick' = 15k / 7.5k steps (the default: a 3-minute demo; the full recipe takes about "
                               "10 minutes on 2 CPU cores); 'smoke' = a few hundred steps"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    out: Path = typer.Option(Path("results/poison"), help="directory for the table, CSV, JSON and figures"),
    cache: Path | None = typer.Option(None, help="model cache directory (default $OVERUNLEARN_CACHE or "
                                      "~/.cache/overunlearn)"),
    threads: int = typer.Option(0, help="CPU cores: training worker processes (one thread each) and parallel "
                                                 "unlearning shards (0 = all available cores)"),
    figure_seed: int | None = typer.Option(None, help="seed whose fits are plotted (default: the first seed)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show progress bars"),
    reuse: bool = typer.Option(True, "--reuse/--recompute", help="reuse unlearning trials cached by an earlier run "
                               "with the same recipe, presets and code (models are always reused)"),
    batched: bool = typer.Option(True, "--batched/--per-trial", help="run the unlearning trials as vectorised "
                                 "ensembles (default, 2-3x faster on a CPU) or one at a time through the engine"),
    privacy: bool = typer.Option(False, "--privacy", help="then run the privacy report (MIA, U-LiRA, KLoM; see "
                                 "`overunlearn privacy`) of these methods at these T on the first seed"),
    privacy_models: int | None = typer.Option(None, "--privacy-models", min=4, help="N for --privacy (default 16)"),
) -> None:
    """Data Poisoning (paper Section 5.1): unlearn 5 poisoned points from a sine regression MLP.

    Trains (or loads from the cache) the original and ground-truth model of every seed as one
    vectorised ensemble, runs every method at every T with the paper's Table 6 hyperparameters,
    and reports the sup-norm error against sin x next to the paper's Table 1 / Table 5 values.
    """
    import torch

    from overunlearn.benchmarks.poison import RECIPES, format_table, run_poison, write_outputs

    if recipe not in RECIPES:
        raise typer.BadParameter(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    seed_list = parse_int_list(seeds, "seed")
    epoch_list = parse_int_list(epochs, "epoch count")
    if any(t <= 0 for t in epoch_list):
        raise typer.BadParameter("every T must be positive")
    method_list = parse_methods(methods)
    if figure_seed is not None and figure_seed not in seed_list:
        raise typer.BadParameter(f"figure seed {figure_seed} is not among the seeds {seed_list}",
                                 param_hint="'--figure-seed'")
    from overunlearn.engine import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:  # an unknown device name, or cuda without CUDA
        raise typer.BadParameter(str(exc), param_hint="'--device'") from None
    n_threads = threads if threads > 0 else _cpu_count()
    torch.set_num_threads(n_threads)
    r = RECIPES[recipe]
    typer.echo(f"Data Poisoning: recipe {recipe!r} ({r.original_steps} original / {r.ground_truth_steps} "
               f"ground-truth steps), seeds {seeds}, T {epoch_list}, {len(method_list)} methods, "
               f"{n_threads} CPU thread(s), device {device}")
    from overunlearn.errors import OverunlearnError

    try:
        run = run_poison(seed_list, epoch_list, method_list, recipe=recipe, cache_dir=cache, device=device,
                         threads=n_threads, progress=progress, figure_seed=figure_seed, reuse_trials=reuse,
                         batched=batched)
    except OverunlearnError as exc:  # a cache file that cannot be used even after a rebuild, ...
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted: the trained models and the finished trials are kept in the cache "
                   f"({cache or 'the default cache'}); run the same command again to continue", err=True)
        raise typer.Exit(130) from None
    except MemoryError:
        typer.echo("error: out of memory; run fewer seeds or methods at once, or lower --threads (finished trials "
                   "are kept in the cache and reused)", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the cache or output folder cannot be written
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo("")
    typer.echo(format_table(run))
    paths = write_outputs(run, out)
    t = run.timings
    typer.echo("")
    trained = "all cached" if run.trained_models == 0 else f"{t['train_s']:.1f} s for {run.trained_models} models"
    typer.echo(f"time: {t['total_s']:.1f} s (training: {trained}, unlearning {t['unlearn_s']:.1f} s; "
               f"{run.reused_trials} of {len(run.trials)} trials reused from the cache)")
    typer.echo("written:")
    for key, path in paths.items():
        label = "Figure 1" if key == "figure_T100" else key
        typer.echo(f"  {label:<12} {path}")
    if recipe != "full":
        typer.echo("")
        typer.echo(f"note: this used the lighter {recipe!r} recipe, so the numbers are not the paper's setting. "
                   f"The paper's recipe (about 10 minutes on 2 CPU cores when nothing is cached) is:\n  {FULL_COMMAND}")
    if privacy:
        from overunlearn.cli.privacy import privacy_after_bench

        privacy_after_bench("poison", method_list, epoch_list, seed=seed_list[0], n_models=privacy_models,
                            out=out / "privacy", device=device, cache=cache, recipe=recipe, progress=progress)
