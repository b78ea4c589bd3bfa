"""The ``overunlearn`` command line: ``bench``, ``sweep``, ``report``, ``data``, ``methods``.

Each command group lives in its own module of this package and registers itself on the
Typer apps defined here.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Machine unlearning for overparameterized models.")
bench_app = typer.Typer(no_args_is_help=True, help="Run a benchmark end to end and print its table.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare datasets on disk (never downloads unless asked).")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")


@app.command("methods")
def methods_cmd(pattern: str = typer.Argument("*", help="shell-style filter, e.g. 'n*'")) -> None:
    """List the registered unlearning methods and their hyperparameters."""
    import dataclasses

    from overunlearn.methods import get_method, list_methods

    names = list_methods(pattern)
    if not names:
        raise typer.BadParameter(f"no method matches {pattern!r}; known: {', '.join(list_methods())}",
                                 param_hint="'PATTERN'")
    for name in names:
        cls = get_method(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config))
        typer.echo(f"{name:12s} [{'/'.join(sorted(cls.tasks - {'custom'}))}] {fields}")


def _register() -> None:
    # imported for their side effect of adding commands; each module owns its commands
    from overunlearn.cli import bench_facts, bench_images, bench_poison, data, privacy, report, sweep  # noqa: F401


def main() -> None:
    _register()
    app()
