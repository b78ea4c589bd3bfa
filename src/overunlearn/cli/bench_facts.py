"""``overunlearn bench facts``: fact unlearning in a GPT-2 language model with a retrained ground truth.

The command builds a sweep in memory (every applicable method at its preset point of
``FACTS_METHOD_POINTS``, the chosen seeds, ``T`` epochs) and runs it through the sweep runner and
journal (``<out>/facts_<preset>.jsonl``), so a run is resumable, its trials are cached, and its numbers
are those of ``overunlearn sweep`` on the same trials. It then prints one row per model (original,
ground truth, each method: median and range over seeds) and writes the table (Markdown, CSV) and a
figure of forget against retain exact match.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from overunlearn.cli import bench_app
from overunlearn.cli.errors import friendly_errors
from overunlearn.cli.options import (
    JOBS_HELP,
    QUIET_HELP,
    SEEDS_HELP,
    THREADS_HELP,
    check_device,
    check_out,
    choose_methods,
    echo_log,
    parse_overrides,
    parse_seeds,
)

REF_LABELS = {"original": "original model", "ground_truth": "ground truth (retrained without the forget facts)"}


def facts_spec(preset: str, seeds: list[int], epochs: int, methods: list[str], points: dict[str, dict[str, Any]],
               options: dict[str, Any], device: str) -> dict[str, Any]:
    """The sweep spec (as the parsed TOML would be) of one ``bench facts`` run."""
    from overunlearn.benchmarks.facts import FACTS_METHOD_POINTS, FACTS_METRICS, get_preset
    from overunlearn.cli.bench_sweep import bench_spec, sweep_name

    order = ["forget_em", "retain_em"] + [m.name for m in FACTS_METRICS if m.name not in ("forget_em", "retain_em")]
    default = not options and epochs == get_preset(preset).epochs and points == {m: FACTS_METHOD_POINTS[m] for m in points}
    name = sweep_name(f"facts_{preset}", {"options": options, "epochs": epochs, "points": points}, default)
    return bench_spec(name=name, title=f"Fact unlearning, GPT-2 ({preset} preset), T = {epochs}", benchmark="facts",
                      options={"preset": preset, **options}, seeds=seeds,
                      settings=[(f"T={epochs}", epochs, {m: points[m] for m in methods})],
                      metrics={m.name: m.direction for m in FACTS_METRICS}, report_metrics=order, device=device)


@bench_app.command("facts")
def facts_cmd(
    preset: str = typer.Option("cpu", "--preset", help="cpu | gpu | test"),
    seeds: str = typer.Option("1-3", "--seeds", help=SEEDS_HELP),
    epochs: int | None = typer.Option(None, "--epochs", "-T", min=1, help="unlearning epochs (default: the preset's)"),
    methods: str | None = typer.Option(None, "--methods", help="comma-separated names (default: all)"),
    forget_fraction: float | None = typer.Option(None, "--forget-fraction",
                                                 help="fraction of the people whose facts are forgotten"),
    p_retain: float | None = typer.Option(None, "--p-retain", help="accessible fraction of the retain sequences"),
    people: int | None = typer.Option(None, "--people", help="people in the generated world"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1,
                                          help="unlearning batch size (retain and forget; default: the preset's)"),
    hp: list[str] = typer.Option([], "--hp", help="override a hyperparameter: METHOD.KEY=VALUE (repeatable)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", callback=check_device),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help=JOBS_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    out: Path = typer.Option(Path("results/facts"), "--out", help="output folder (journal, table, figure)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    privacy: bool = typer.Option(False, "--privacy", help="then the privacy report (MIA, U-LiRA, KLoM against "
                                 "retrained oracles) of the methods run, on the first seed; trains 3N models"),
    privacy_models: int = typer.Option(4, "--privacy-models", min=4, help="N for --privacy"),
) -> None:
    """Unlearn memorised facts from a GPT-2 built from a config; ground truth retrained without them."""
    from overunlearn.benchmarks.facts import FACTS_METHOD_POINTS, FACTS_METRICS, get_preset
    from overunlearn.cli.bench_sweep import run_bench, write_bench_tables
    from overunlearn.methods import get_method

    # every option is checked before anything trains
    check_out(out, [""])
    try:
        base = get_preset(preset)
        options = {k: v for k, v in {"forget_fraction": forget_fraction, "p_retain": p_retain, "people": people,
                                     "unlearn_batch_size": batch_size}.items() if v is not None}
        chosen = base.replace(**options)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    names = choose_methods(methods, list(FACTS_METHOD_POINTS))
    points = {m: dict(FACTS_METHOD_POINTS[m]) for m in names}
    for m, kv in parse_overrides(hp).items():
        if m not in points:
            raise typer.BadParameter(f"--hp names method {m!r}, which is not run", param_hint="'--hp'")
        fields = set(get_method(m).Config.__dataclass_fields__)
        bad = set(kv) - fields
        if bad:
            raise typer.BadParameter(f"{m} has no hyperparameter(s) {sorted(bad)}", param_hint="'--hp'")
        points[m].update(kv)
    T = epochs or chosen.epochs
    seed_list = parse_seeds(seeds)
    raw = facts_spec(preset, seed_list, T, names, points, options, device)
    run = run_bench(raw, out, jobs=jobs, threads=threads, device=device, log=echo_log(quiet))
    journal, result = run.journal, run.result
    metrics = [m.name for m in FACTS_METRICS]
    prior = chance = f"{math.nan:.3f}"
    try:
        from overunlearn.benchmarks.facts import FactsBenchmark

        bench = FactsBenchmark(chosen, use_cache=False, device="cpu")
        prior, chance = f"{bench.prior(seed_list):.3f}", f"{bench.chance():.3f}"
    except Exception:  # noqa: BLE001 - the prior is information only
        pass
    title = (f"facts ({preset} preset: {chosen.people} people x {chosen.attributes} attributes, forget "
             f"{chosen.n_forget()} people; T = {T}; seeds {seed_list}; median (range) over seeds). Prior exact "
             f"match on the forget facts (each attribute's most frequent retain answer, mean over seeds): {prior}; "
             f"chance {chance}")
    written = write_bench_tables(run, out, raw["name"], metrics, title=title, ref_labels=REF_LABELS,
                                 figure_title=f"facts ({preset}), T = {T}")
    typer.echo(f"wrote {journal}, {', '.join(str(p) for p in written if not p.name.endswith('.csv'))}")
    if privacy:
        from overunlearn.benchmarks.facts import FactsBenchmark
        from overunlearn.privacy.runner import format_rows, privacy_report

        kept = "trained models and signals are kept in the cache; run the same command again to continue"
        with friendly_errors(kept, "lower --privacy-models"):
            rows = privacy_report(FactsBenchmark(chosen, device=device), [(m, m, points[m], T) for m in names],
                                  n_models=privacy_models, seed=seed_list[0], device=device,
                                  out_dir=out / f"{raw['name']}_privacy", progress=not quiet)
        typer.echo(f"\nprivacy (seed {seed_list[0]}, N = {privacy_models}; lower KLoM and U-LiRA AUC = closer to "
                   "retraining):")
        typer.echo(format_rows(rows))
    if result.failed:
        typer.echo(f"{result.failed} trial(s) failed; their errors are in {journal}", err=True)
        raise typer.Exit(1)
