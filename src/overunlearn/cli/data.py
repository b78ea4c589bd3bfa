"""``overunlearn data status`` and ``overunlearn data prepare fashion-mnist``."""

from __future__ import annotations

from pathlib import Path

import typer

from overunlearn.cli import data_app


@data_app.command("status")
def status_cmd(
    data_root: Path | None = typer.Option(None, "--data-root", help="dataset root (default $OVERUNLEARN_DATA "
                                                                        "or ~/.cache/overunlearn/data)"),
) -> None:
    """List the image datasets, where each was found, and how to provide the missing ones."""
    from overunlearn.data.sources import default_data_root, get_source, list_sources

    root = data_root if data_root is not None else default_data_root()
    typer.echo(f"data root: {root}")
    missing = []
    for name in list_sources():
        src = get_source(name)
        loc = src.find(Path(root))
        state = f"available  {loc}" if loc is not None else "missing"
        if loc is not None and name == "fashion-mnist" and Path(root) not in Path(loc).parents:
            state += "  (Debian files, read directly; `overunlearn data prepare fashion-mnist` lays them out)"
        typer.echo(f"  {name:14s} {src.description}\n  {'':14s} {state}")
        if loc is None:
            missing.append((name, src.how_to(Path(root))))
    for name, how in missing:
        typer.echo(f"\n{name}: {how}")


@data_app.command("prepare")
def prepare_cmd(
    dataset: str = typer.Argument(..., help="the dataset to lay out; only 'fashion-mnist' is supported"),
    data_root: Path | None = typer.Option(None, "--data-root", help="dataset root to fill"),
    source: Path | None = typer.Option(None, "--source", help="folder with the four *-ubyte.gz files "
                                                                 "(default /usr/share/datasets/fashion-mnist)"),
    copy: bool = typer.Option(False, "--copy", help="copy the .gz files instead of symlinking them"),
) -> None:
    """Lay files already on this machine into torchvision's layout (never downloads)."""
    from overunlearn.data.prepare import prepare_fashion_mnist
    from overunlearn.data.sources import canonical_name
    from overunlearn.errors import OverunlearnError

    try:
        name = canonical_name(dataset)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from None
    if name != "fashion-mnist":
        raise typer.BadParameter(f"only fashion-mnist can be prepared from local files; for {name} run "
                                 "`overunlearn data status` to see where its files must go")
    try:
        raw = prepare_fashion_mnist(data_root, source, link=not copy)
    except (OverunlearnError, OSError) as exc:  # a missing or unusable source file; a data root that cannot be made
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Fashion-MNIST laid out in {raw} (torchvision.datasets.FashionMNIST(root={raw.parent.parent}, "
               "download=False) now loads it)")
