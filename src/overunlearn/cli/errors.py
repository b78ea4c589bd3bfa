"""One message and an exit code for every foreseeable failure of a computing command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

#: what a command that trains reference models keeps when interrupted
KEPT = "trained models are kept in the cache; run the same command again to continue"


@contextmanager
def friendly_errors(kept: str, memory_hint: str = "lower the number of models, seeds or the batch size") -> Iterator[None]:
    """Run a command's work, turning our errors and the foreseeable system ones into one line on stderr:

    a missing dataset, an unusable (corrupt, truncated) dataset file or a plugin module that cannot be
    imported exits 2; our other errors (a locked journal, an unusable cache file, a failed set-up),
    an unreadable or unwritable file and running out of memory exit 1; Ctrl-C exits 130 after saying
    what is ``kept`` and how to continue.
    """
    import torch

    from overunlearn.errors import DatasetFileError, DatasetNotFoundError, OverunlearnError, PluginError

    try:
        yield
    except (DatasetNotFoundError, DatasetFileError, PluginError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OverunlearnError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (MemoryError, torch.OutOfMemoryError):  # (CUDA's is a RuntimeError, not a MemoryError)
        typer.echo(f"error: out of memory; {memory_hint}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: {kept}", err=True)
        raise typer.Exit(130) from None
