"""``overunlearn report JOURNAL``: tables (markdown, CSV) and frontier figures from a sweep journal."""

from __future__ import annotations

from pathlib import Path

import typer

from overunlearn.cli import app


@app.command("report")
def report_cmd(
    journal: Path = typer.Argument(..., help="a sweep journal (.jsonl)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (default: <journal>_report/)"),
    sweep: list[str] | None = typer.Option(None, "--sweep", help="only these sweep names (repeatable)"),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="also select among settings that lack some seeds"),
    no_figures: bool = typer.Option(False, "--no-figures", help="tables only"),
) -> None:
    """Write Table 1/2-style tables, Pareto-front figures and the winning hyperparameters."""
    from overunlearn.report import build_report

    if not journal.exists():
        typer.echo(f"error: journal {str(journal)!r} does not exist; run `overunlearn sweep SPEC` first", err=True)
        raise typer.Exit(2)
    files = build_report(journal, out, allow_partial=allow_partial, sweeps=sweep or None, figures=not no_figures)
    for f in files:
        typer.echo(str(f))
