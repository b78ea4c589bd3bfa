"""``overunlearn report JOURNAL``: tables (markdown, CSV) and frontier figures from a sweep journal.

With ``--privacy`` the selected hyperparameters of every method are also evaluated by
population MIA, MIA-efficacy, U-LiRA and KLoM (``privacy.md`` / ``.csv`` per sweep; see
:mod:`overunlearn.privacy.columns` and ``docs/privacy.md``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from overunlearn.cli import app
from overunlearn.cli.options import CACHE_HELP, QUIET_HELP, THREADS_HELP, check_device, check_out


@app.command("report")
def report_cmd(
    journal: Path = typer.Argument(..., help="a sweep journal (.jsonl)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default: <journal>_report/)"),
    sweep: list[str] | None = typer.Option(None, "--sweep", help="only these sweep names (repeatable)"),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="also select among settings that lack some seeds"),
    no_figures: bool = typer.Option(False, "--no-figures", help="tables only"),
    select_seeds: str | None = typer.Option(None, "--select-seeds", help="held-out selection: choose each "
                                            "method's hyperparameters on these seeds (e.g. 1-5) and report "
                                            "every statistic on the other seeds"),
    privacy: bool = typer.Option(False, "--privacy", help="also evaluate each method's selected hyperparameters "
                                 "for privacy (MIA, U-LiRA, KLoM; trains N originals, N or 2N oracles and N "
                                 "unlearned models per method and setting): privacy.md / .csv"),
    privacy_models: int | None = typer.Option(None, "--privacy-models", help="N (default: as `overunlearn "
                                              "privacy`: the benchmark's privacy default, else 8; at least 4)"),
    privacy_seed: int | None = typer.Option(None, "--privacy-seed", help="data seed of the privacy evaluation "
                                            "(default: the first seed of each setting)"),
    privacy_pareto_metric: str | None = typer.Option(None, "--privacy-pareto-metric", help="Pareto sweeps: "
                                                     "evaluate each method's front point that is best on this "
                                                     "metric (default: the first report metric)"),
    privacy_ground_truth: str | None = typer.Option(None, "--privacy-ground-truth", help="extra (N further "
                                                    "oracles) | split (one half of the oracles vs the other); "
                                                    "default: the benchmark's, else split"),
    device: str = typer.Option("auto", "--device", help="privacy: unlearning and signal device (auto | cpu | cuda)", callback=check_device),
    cache: Path | None = typer.Option(None, "--cache", help="privacy: " + CACHE_HELP.replace(
                                      "(default: ", "(default: the benchmark's cache_dir option, else ")),
    threads: int | None = typer.Option(None, "--threads", min=1, help="privacy: " + THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
    imports: list[str] | None = typer.Option(None, "--import", metavar="MODULE", help="same as --plugin MODULE "
                                             "(a plugin registering the sweep's benchmark or methods; repeatable)"),
) -> None:
    """Write Table 1/2-style tables, Pareto-front figures and the winning hyperparameters.

    With --privacy, also the privacy (MIA, U-LiRA, KLoM) of every selected setting: see docs/privacy.md.
    """
    from overunlearn.privacy.columns import PrivacyOptions, privacy_section
    from overunlearn.report import ReportSectionError, build_report
    from overunlearn.report.aggregate import SeedSplitError, UnknownSweepError

    if not journal.exists():
        typer.echo(f"error: journal {str(journal)!r} does not exist; run `overunlearn sweep SPEC` first", err=True)
        raise typer.Exit(2)
    check_out(out, ("",))
    given = [name for name, v in (("--privacy-models", privacy_models), ("--privacy-seed", privacy_seed),
                                  ("--privacy-pareto-metric", privacy_pareto_metric), ("--cache", cache),
                                  ("--privacy-ground-truth", privacy_ground_truth)) if v is not None]
    if given and not privacy:
        raise typer.BadParameter(f"{', '.join(given)} need --privacy")
    gt = privacy_ground_truth.strip().lower() if privacy_ground_truth is not None else None
    if gt is not None and gt not in ("extra", "split"):
        raise typer.BadParameter(f"must be 'extra' or 'split', got {privacy_ground_truth!r}",
                                 param_hint="'--privacy-ground-truth'")
    if imports:
        from overunlearn.cli import _load_plugins

        _load_plugins(imports)
    if threads:
        import torch

        torch.set_num_threads(threads)
    chosen: list[int] | None = None
    if select_seeds is not None:
        from overunlearn.cli.options import parse_seeds

        try:
            chosen = parse_seeds(select_seeds)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--select-seeds'") from None
    options = None
    if privacy:
        try:
            options = PrivacyOptions(n_models=privacy_models, seed=privacy_seed, device=device, cache_dir=cache,
                                     pareto_metric=privacy_pareto_metric, imports=tuple(imports or ()),
                                     plots=not no_figures, ground_truth=gt, progress=not quiet)  # type: ignore[arg-type]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    try:
        files = build_report(journal, out, allow_partial=allow_partial, sweeps=sweep or None,
                             figures=not no_figures, sections=[privacy_section(options)] if options else [],
                             select_seeds=chosen,
                             warn=lambda m: typer.echo(f"warning: {m}", err=True))
    except OSError as exc:
        typer.echo(f"error: cannot read the journal or write the report: {exc}", err=True)
        raise typer.Exit(1) from None
    except MemoryError:
        typer.echo(f"error: out of memory while building the report of {journal}", err=True)
        raise typer.Exit(1) from None
    except SeedSplitError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--select-seeds'") from None
    except UnknownSweepError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--sweep'") from None
    except ReportSectionError as exc:
        for f in exc.files:
            typer.echo(str(f))
        for msg in exc.failures:
            typer.echo(f"error: privacy columns not computed for {msg}", err=True)
        typer.echo("the rest of the report was written", err=True)
        raise typer.Exit(1) from None
    for f in files:
        typer.echo(str(f))
