"""The command line's shared vocabulary: option parsers and checks every command uses the same way.

Every command that computes takes ``--seeds`` (``1``, ``1,2,5`` or ``1-5``), ``--threads``
(torch threads per worker) and one quiet switch (``--quiet``/``-q``); every list option is
comma-separated; an ``--out`` file is checked against the suffixes the command can write.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

SEEDS_HELP = "seeds: 1, 1,2,5 or 1-5 (ranges inclusive)"
THREADS_HELP = "torch threads per worker process (default: torch's choice)"
QUIET_HELP = "no progress output (warnings and errors are still printed)"


#: most values one list option may expand to (a sweep spec's seeds have the same cap)
MAX_VALUES = 100_000


def check_device(value: str | None) -> str | None:
    """The callback of every ``--device`` option: a device overunlearn runs on (``auto``, ``cpu``, ``cuda`` or
    ``cuda:N``), and a GPU present where one is asked for -- checked before anything runs."""
    if value is None:
        return None
    from overunlearn.sweep.spec import valid_device

    if not valid_device(value):
        raise typer.BadParameter(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{value!r} asks for a GPU but CUDA is not available on this machine; use cpu "
                                     "(or auto)")
        index = int(value.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{value!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return value


def parse_int_list(text: str, what: str = "value", option: str | None = None) -> list[int]:
    """``"1"``, ``"1,2,5"`` or ``"1-5"`` (ranges inclusive) -> a list of distinct integers, in order (at most
    :data:`MAX_VALUES` of them)."""
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            dash = part.find("-", 1)  # a range's dash (a leading one is a sign)
            if dash > 0:
                start, stop = int(part[:dash]), int(part[dash + 1:])
                if stop < start:
                    raise typer.BadParameter(f"the range {part!r} ends below its start; write e.g. '{stop}-{start}'",
                                             param_hint=option)
                if stop - start + 1 + len(values) > MAX_VALUES:
                    raise typer.BadParameter(f"{text!r} holds more than {MAX_VALUES} {what}s", param_hint=option)
                values.extend(range(start, stop + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise typer.BadParameter(f"cannot read {what}s from {text!r}; write e.g. '1', '1,2,5' or '1-5'",
                                     param_hint=option) from None
    if not values:
        raise typer.BadParameter(f"no {what}s in {text!r}", param_hint=option)
    return list(dict.fromkeys(values))


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``"1"``, ``"1,2,5"`` or ``"1-5"``."""
    return parse_int_list(text, "seed", "'--seeds'")


def parse_epochs(text: str) -> list[int]:
    """``--epochs``: one or more positive epoch counts, e.g. ``"100"`` or ``"10,100,1000"``."""
    values = parse_int_list(text, "epoch count", "'--epochs'")
    bad = [v for v in values if v <= 0]
    if bad:
        raise typer.BadParameter(f"epoch counts must be positive, got {bad}", param_hint="'--epochs'")
    return values


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--hp``: ``["minnorm_og.lr=1e-4", "gd.lr=0.01"]`` -> ``{"minnorm_og": {"lr": 1e-4}, "gd": {"lr": 0.01}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise typer.BadParameter(f"--hp expects METHOD.KEY=VALUE, got {item!r}", param_hint="'--hp'")
        lhs, value = item.split("=", 1)
        method, key = lhs.split(".", 1)
        val: Any = value
        for conv in (int, float):
            try:
                val = conv(value)
                break
            except ValueError:
                pass
        if isinstance(val, str) and val.lower() in ("true", "false"):
            val = val.lower() == "true"
        out.setdefault(method.strip().lower(), {})[key.strip()] = val
    return out


def check_out(path: Path | None, suffixes: Sequence[str], option: str = "'--out'") -> Path | None:
    """``path`` if its suffix is one of ``suffixes`` (``""`` = a folder); else a clear error. A suffix that is not
    a file type (digits, as in ``results/v1.2``) is part of a folder's name."""
    if path is None:
        return None
    suffix = path.suffix.lower()
    if not any(c.isalpha() for c in suffix):
        suffix = ""
    if suffix not in suffixes:
        kinds = ", ".join(repr(s) if s else "a folder (no suffix)" for s in suffixes)
        raise typer.BadParameter(f"{path}: this command writes {kinds}, not {suffix or 'a folder'!r}",
                                 param_hint=option)
    return path


def echo_log(quiet: bool):
    """A ``log(message)`` function: progress lines to stderr, or nothing with ``--quiet``."""
    if quiet:
        return lambda _msg: None
    return lambda msg: typer.echo(msg, err=True)


CACHE_HELP = ("cache root of trained models (default: $OVERUNLEARN_CACHE, else $XDG_CACHE_HOME/overunlearn, "
              "else ~/.cache/overunlearn)")
JOBS_HELP = "worker processes (1: run in this process)"


def parse_value(text: str) -> Any:
    """A command-line value: an int, a float, ``true``/``false``, ``none``, else the string itself."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


def parse_options(items: Sequence[str] | None, option: str = "'--option'") -> dict[str, Any]:
    """``--option``: ``["recipe=smoke", "n_train=500"]`` -> ``{"recipe": "smoke", "n_train": 500}`` (the
    benchmark's constructor options; values as :func:`parse_value` reads them)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise typer.BadParameter(f"expects KEY=VALUE (a benchmark constructor option), got {item!r}",
                                     param_hint=option)
        out[key] = parse_value(value.strip())
    return out


OPTION_HELP = ("a benchmark constructor option KEY=VALUE, as get_benchmark(name, KEY=VALUE) takes it "
               "(repeatable; e.g. recipe=smoke, n_train=500)")


def choose_methods(text: str | None, available: Sequence[str]) -> list[str]:
    """``--methods``: comma-separated names or shell patterns (``n*``) out of ``available``, in the order
    given; empty, ``all`` or ``*`` -> every one of ``available``."""
    import fnmatch

    if text is None or text.strip().lower() in ("", "all", "*"):
        return list(available)
    chosen: list[str] = []
    for pat in text.split(","):
        pat = pat.strip().lower().replace("-", "_")
        if not pat:
            continue
        found = [m for m in available if fnmatch.fnmatchcase(m, pat)]
        if not found:
            raise typer.BadParameter(f"no method matches {pat!r} (an unknown method for this command); valid: "
                                     f"{', '.join(available)} or 'all'", param_hint="'--methods'")
        chosen += [m for m in found if m not in chosen]
    return chosen
