"""``overunlearn bench erase`` and ``overunlearn bench collapse``: every method at one preset point.

For each seed the benchmark trains (or loads from the cache) the original and ground-truth
models, then runs every applicable method for ``T`` epochs at the hyperparameters of
``ERASE_METHOD_POINTS`` / ``COLLAPSE_METHOD_POINTS`` (override with ``--hp method.key=value``)
and prints one row per method (mean, and standard error over seeds when there are several)
below the original and ground-truth rows.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import bench_app
from overunlearn.cli.errors import KEPT, friendly_errors
from overunlearn.cli.options import parse_overrides, parse_seeds


def _message(exc: BaseException) -> str:
    """The text of ``exc`` (a ``KeyError`` quotes its message; undo that)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def format_table(rows: list[dict[str, Any]], metrics: list[str], extra: list[str]) -> str:
    """Rows grouped by ``row`` name; cells ``mean`` or ``mean ± se``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
    header = ["method", *metrics, *extra]
    lines = []
    for name, rs in groups.items():
        cells = [name]
        for m in [*metrics, *extra]:
            vals = [r[m] for r in rs if r.get(m) is not None and not (isinstance(r[m], float) and math.isnan(r[m]))]
            if not vals:
                cells.append("-")
                continue
            mean, se = _mean_se([float(v) for v in vals])
            digits = 2 if m.endswith("seconds") else 4
            cells.append(f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}"))
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*c) for c in lines]
    return "\n".join(out)


def write_results(path: Path, rows: list[dict[str, Any]], config: dict[str, Any]) -> None:
    from overunlearn.storage import atomic_write_json, atomic_write_text

    if path.suffix.lower() == ".json":
        atomic_write_json(path, {"config": config, "rows": rows})
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], dict)]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def run_image_benchmark(benchmark: str, *, dataset: str, seeds: list[int], preset: str, device: str,
                        data_root: Path | None, cache: Path | None, use_cache: bool, download: bool,
                        methods: str | None, epochs: int | None, p_retain: float | None,
                        p_forget: float | None, n_train: int | None, n_test: int | None,
                        overrides: dict[str, dict[str, Any]], progress: bool = True,
                        echo: Any = typer.echo) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the benchmark and return ``(rows, config)``; each row is one (method, seed)."""
    from overunlearn.benchmarks import get_benchmark
    from overunlearn.benchmarks.collapse import COLLAPSE_METHOD_POINTS
    from overunlearn.benchmarks.erase import ERASE_METHOD_POINTS
    from overunlearn.engine import Budget, unlearn
    from overunlearn.methods import create, list_methods

    t_start = time.perf_counter()
    points = ERASE_METHOD_POINTS if benchmark == "erase" else COLLAPSE_METHOD_POINTS
    # every check that needs no data or training comes first, so a bad option fails in a second
    if epochs is not None and epochs <= 0:
        raise typer.BadParameter(f"T must be positive, got {epochs}", param_hint="'-T' / '--epochs'")
    if not seeds:
        raise typer.BadParameter("no seeds given", param_hint="'--seeds'")
    available = list_methods(task="classification")
    if methods:
        chosen: list[str] = []
        for pat in methods.split(","):
            found = list_methods(pat.strip())
            if not found:
                raise typer.BadParameter(f"no method matches {pat!r}; valid: {', '.join(available)}")
            chosen += [m for m in found if m in available and m not in chosen]
        if not chosen:
            raise typer.BadParameter(f"no classification method matches {methods!r}; valid: {', '.join(available)}")
    else:
        chosen = available
    unknown = set(overrides) - set(available)
    if unknown:
        raise typer.BadParameter(f"--hp names unknown method(s) {sorted(unknown)}; valid: {', '.join(available)}")
    hypers: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys([*chosen, *overrides]):  # build every config now, not after training
        hyper = {**points.get(name, {}), **overrides.get(name, {})}
        try:
            create(name, **hyper)
        except (KeyError, ValueError, TypeError) as exc:
            raise typer.BadParameter(_message(exc), param_hint="'--hp'" if name in overrides else None) from None
        hypers[name] = hyper
    try:  # builds the preset and resolves dataset and device; loads no data
        bench = get_benchmark(benchmark, dataset=dataset, preset=preset, data_root=data_root, cache_dir=cache,
                              use_cache=use_cache, device=device, progress=progress, download=download,
                              p_retain=p_retain, p_forget=p_forget, n_train=n_train, n_test=n_test)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # unknown dataset, preset or device; bad option
        raise typer.BadParameter(_message(exc)) from None
    T = epochs if epochs is not None else bench.preset.epochs  # type: ignore[attr-defined]
    metric_names = [m.name for m in bench.metrics]
    p = bench.preset  # type: ignore[attr-defined]
    config = {"benchmark": benchmark, "dataset": bench.dataset, "preset": p.name, "recipe": p.recipe.to_dict(),  # type: ignore[attr-defined]
              "n_train": p.n_train, "n_test": p.n_test, "p_forget": p.p_forget, "p_retain": p.p_retain,
              "unlearn_batch_size": p.unlearn_batch_size, "epochs": T, "seeds": seeds,
              "device": str(bench.device), "methods": {}}  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.perf_counter()
        prob = bench.problem(seed)
        info = bench.training_info(seed)  # type: ignore[attr-defined]
        ref = bench.reference(seed)
        for role in ("original", "ground_truth"):
            i = info[role]
            echo(f"seed {seed} {role}: train accuracy {i['train_accuracy']['all_heads_acc']:.4f} on "
                 f"{i['n_train_images']} images, trained in {i['seconds']:.1f}s "
                 f"({'cached' if i.get('cache_hit') else 'fresh'})")
            rows.append({"row": role, "seed": seed, **ref[role], "train_acc": i["train_accuracy"]["all_heads_acc"],
                         "train_seconds": None if i.get("cache_hit") else i["seconds"]})
        echo(f"seed {seed}: |D_r'|={len(prob.retain)} |D_f|={len(prob.forget)} batch={prob.batch_size} "
             f"T={T} (models and references ready in {time.perf_counter() - t0:.1f}s)")
        for name in chosen:
            method = create(name, **hypers[name])
            config["methods"][name] = method.config.to_dict()
            row: dict[str, Any] = {"row": name, "seed": seed}
            try:
                res = unlearn(prob, method, Budget(epochs=T), seed=seed, device=bench.device)  # type: ignore[attr-defined]
                t_eval = time.perf_counter()
                row.update(bench.evaluate(res.model, seed))
                row.update({"unlearn_seconds": res.record.seconds, "steps": res.record.steps,
                            "eval_seconds": time.perf_counter() - t_eval, "status": "ok"})
            except Exception as exc:  # noqa: BLE001 -- one diverging method must not stop the table
                row.update({"status": f"error: {type(exc).__name__}: {exc}"})
                echo(f"  {name}: {row['status']}")
            rows.append(row)
            if progress:
                shown = ", ".join(f"{m}={row[m]:.4f}" for m in metric_names[:2] if m in row)
                echo(f"  {name:11s} {shown}  ({row.get('unlearn_seconds', float('nan')):.2f}s)")
    config["total_seconds"] = time.perf_counter() - t_start
    return rows, config


def _command(benchmark: str):
    def cmd(
        dataset: str = typer.Option("fashion-mnist", "--dataset", "-d",
                                    help="fashion-mnist | mnist | cifar10 | tiny-imagenet | digits"),
        data_root: Path | None = typer.Option(None, "--data-root", help="dataset root (see `overunlearn data status`)"),
        seeds: str = typer.Option("1", "--seeds", help="e.g. 1 or 1,2,3 or 1-5"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        preset: str = typer.Option("auto", "--preset", help="auto (paper on CUDA, cpu otherwise) | cpu | paper | test"),
        out: Path | None = typer.Option(None, "--out", help="write per-seed rows to a .csv or .json file"),
        cache: Path | None = typer.Option(None, "--cache", help="model cache dir (default $OVERUNLEARN_CACHE/models)"),
        no_cache: bool = typer.Option(False, "--no-cache", help="train the reference models without caching them"),
        download: bool = typer.Option(False, "--download", help="let torchvision download a missing dataset"),
        methods: str | None = typer.Option(None, "--methods", help="comma-separated names or patterns (default: all)"),
        epochs: int | None = typer.Option(None, "--epochs", "-T", help="unlearning epochs (default: the preset's)"),
        p_retain: float | None = typer.Option(None, "--p-retain", help="accessible retain fraction"),
        p_forget: float | None = typer.Option(None, "--p-forget",
                                                 help="erase: p_color; collapse: forget fraction per class"),
        n_train: int | None = typer.Option(None, "--n-train", help="class-balanced training subset size (0: all)"),
        n_test: int | None = typer.Option(None, "--n-test", help="class-balanced test subset size (0: all)"),
        hp: list[str] = typer.Option([], "--hp", help="override a hyperparameter: METHOD.KEY=VALUE (repeatable)"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
        privacy: bool = typer.Option(False, "--privacy", help="then run the privacy report (MIA, U-LiRA, KLoM; "
                                     "see `overunlearn privacy`) of the methods run, on the first seed"),
        privacy_models: int | None = typer.Option(None, "--privacy-models", min=4, help="N for --privacy (default 8)"),
    ) -> None:
        with friendly_errors(KEPT):
            rows, config = run_image_benchmark(
                benchmark, dataset=dataset, seeds=parse_seeds(seeds), preset=preset, device=device,
                data_root=data_root, cache=cache, use_cache=not no_cache, download=download, methods=methods,
                epochs=epochs, p_retain=p_retain, p_forget=p_forget, n_train=n_train, n_test=n_test,
                overrides=parse_overrides(hp), progress=not quiet)
        from overunlearn.benchmarks.collapse import COLLAPSE_METRICS
        from overunlearn.benchmarks.erase import ERASE_METRICS

        specs = ERASE_METRICS if benchmark == "erase" else COLLAPSE_METRICS
        metrics = [m.name for m in specs]
        typer.echo("")
        typer.echo(f"{benchmark} on {config['dataset']} (preset {config['preset']}, T={config['epochs']}, "
                   f"seeds {config['seeds']}, device {config['device']})")
        typer.echo(format_table([r for r in rows if "error" not in str(r.get("status", ""))], metrics,
                                ["unlearn_seconds"]))
        failures = [r for r in rows if "error" in str(r.get("status", ""))]
        failed = sorted({r["row"] for r in failures})
        typer.echo(f"total {config['total_seconds']:.1f}s")
        if out is not None:
            write_results(out, rows, config)
            typer.echo(f"wrote {out}")
        if failed:
            if out is not None:
                typer.echo(f"failed: {', '.join(failed)} (the messages are in {out})", err=True)
            else:
                typer.echo(f"failed: {', '.join(failed)}", err=True)
                for r in failures:
                    typer.echo(f"  {r['row']} seed {r['seed']}: {r['status']}", err=True)
        succeeded = list(dict.fromkeys(r["row"] for r in rows if r.get("status") == "ok"))
        if privacy and not succeeded:
            typer.echo("privacy: skipped, no method ran to the end", err=True)
        elif privacy:
            from overunlearn.cli.privacy import privacy_after_bench

            privacy_after_bench(
                benchmark, succeeded, config["epochs"],
                seed=parse_seeds(seeds)[0], n_models=privacy_models, out=out.parent / "privacy" if out else None,
                device=device, cache=cache, recipe=preset, dataset=dataset, data_root=data_root, download=download,
                overrides=parse_overrides(hp), progress=not quiet,
                image_options={"n_train": n_train, "n_test": n_test, "p_retain": p_retain, "p_forget": p_forget})
        if failed:
            raise typer.Exit(1)

    cmd.__doc__ = ("Label Erasure: erase red/green copies from a two-head model; prints retain accuracy and "
                   "forget error for every method." if benchmark == "erase" else
                   "Representation Collapse: unlearn off-colour copies; prints colour accuracy for every method.")
    return cmd


bench_app.command("erase")(_command("erase"))
bench_app.command("collapse")(_command("collapse"))
