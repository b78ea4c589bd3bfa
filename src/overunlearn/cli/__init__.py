"""The ``overunlearn`` command line: ``bench``, ``sweep``, ``report``, ``privacy``, ``data``, ``methods``.

Each command group lives in its own module of this package and registers itself on the
Typer apps defined here.

Every command takes ``--plugin MODULE`` (repeatable, anywhere on the line): the module is imported
before the command line is parsed, so the methods and benchmarks it registers can be named
(:mod:`overunlearn.plugins`; installed packages register theirs through the entry-point group
``overunlearn.plugins``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

#: help of the root ``--plugin`` option
PLUGIN_HELP = ("import MODULE first: a plugin registering methods (@register_method) or benchmarks "
               "(@register_benchmark); repeatable, accepted anywhere on the command line and by every command; "
               "worker processes import it too (installed plugins load through the entry-point group "
               "'overunlearn.plugins')")


def _load_plugins(names: Sequence[str]) -> None:
    """Entry points and ``names``; a failure is one line on stderr and exit 2."""
    from overunlearn.errors import PluginError
    from overunlearn.plugins import load_entry_points, load_plugins

    try:
        load_entry_points()
        load_plugins(names)
    except PluginError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _plain_help(command: Any) -> None:
    """Help of ``command`` and its subcommands as written: flags shown without a value type, and square
    brackets kept (the rich help reads ``[engine].device`` as a markup tag and drops it)."""
    _show_flags_as_flags(command)
    try:
        from rich.markup import escape
    except ImportError:  # pragma: no cover - typer then prints plain help
        return

    def walk(cmd: Any) -> None:
        for obj in (cmd, *cmd.params):
            for attr in ("help", "short_help"):
                text = getattr(obj, attr, None)
                if isinstance(text, str) and "[" in text and not getattr(obj, "_overunlearn_escaped_" + attr, False):
                    setattr(obj, attr, escape(text))
                    setattr(obj, "_overunlearn_escaped_" + attr, True)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(command)


def _show_flags_as_flags(command: Any) -> None:
    """Drop the value type of boolean flags from the help of ``command`` and its subcommands.

    Typer 0.2x (which vendors its own click) renders the type of every option in its rich help, flags
    included (``--quiet <bool>``), which reads as if ``--quiet true`` were valid: its
    ``TyperOption.display_type_rich`` returns the metavar when there is one and the type otherwise, with
    no case for flags. An empty metavar makes it show nothing for a flag, as plain click does.
    """
    params = list(command.params)
    try:  # --help itself, which the command creates (and caches) on first use
        help_option = command.get_help_option(command.context_class(command))
        if help_option is not None:
            params.append(help_option)
    except Exception:  # noqa: BLE001 - cosmetic: never let the help's look break the command line
        pass
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", "") is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _show_flags_as_flags(sub)


class _RootGroup(TyperGroup):
    """The root command: takes every ``--plugin X`` / ``--plugin=X`` out of the arguments, wherever it
    stands, and loads those modules before the subcommand's arguments are parsed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from overunlearn.errors import PluginError
        from overunlearn.plugins import split_plugin_args

        try:
            names, rest = split_plugin_args(args)
        except PluginError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        _load_plugins(names)
        return super().parse_args(ctx, rest)


app = typer.Typer(no_args_is_help=True, add_completion=False, cls=_RootGroup,
                  help="Machine unlearning for overparameterized models.")
bench_app = typer.Typer(no_args_is_help=True, help="Run a benchmark end to end and print its table.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare datasets on disk (never downloads unless asked).")
app.add_typer(bench_app, name="bench")
app.add_typer(data_app, name="data")


@app.callback()
def _root(
    plugin: list[str] | None = typer.Option(None, "--plugin", metavar="MODULE", help=PLUGIN_HELP),
) -> None:
    """Machine unlearning for overparameterized models."""
    # the modules were loaded by _RootGroup.parse_args (which takes --plugin out of every position); this
    # option documents it and loads any that reached here another way
    if plugin:
        _load_plugins(plugin)


@app.command("methods")
def methods_cmd(pattern: str = typer.Argument("*", help="shell-style filter, e.g. 'n*'")) -> None:
    """List the registered unlearning methods (plugins' included) and their hyperparameters."""
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
    from overunlearn.cli import (  # noqa: F401
        bench_facts,
        bench_images,
        bench_poison,
        bench_run,
        data,
        privacy,
        report,
        sweep,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The ``overunlearn`` console script: plugins (``--plugin``, entry points) first, then the commands."""
    from overunlearn.errors import PluginError
    from overunlearn.plugins import split_plugin_args

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        names, rest = split_plugin_args(args)
    except PluginError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    try:
        _load_plugins(names)  # before the commands are built: a plugin may add commands of its own
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    _register()
    app(args=rest)
