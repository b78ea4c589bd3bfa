"""Plugins: the user's own modules that register methods and benchmarks.

A plugin is an ordinary Python module that, when imported, registers what it defines with
``@register_method`` (:mod:`overunlearn.methods`) and ``@register_benchmark``
(:mod:`overunlearn.benchmarks`). It is loaded

* on the command line with ``--plugin MODULE`` (repeatable, on every command, anywhere on the line);
* by installed packages through the entry-point group ``overunlearn.plugins`` (each entry point names
  a module: ``[project.entry-points."overunlearn.plugins"] mine = "my_package.unlearning"``);
* in a sweep spec by ``[benchmark].imports``.

Every module loaded here is recorded in the environment variable ``OVERUNLEARN_PLUGINS``
(``os.pathsep``-separated), which worker processes (spawned pools, Ray workers) inherit and load
at start (:func:`load_from_env`); the sweep runner also names them in each task's ``imports``.

This module sits at the bottom of the package: it imports nothing from the rest of it but
:mod:`overunlearn.errors`.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Iterable

from overunlearn.errors import PluginError

#: the environment variable that carries the loaded plugin modules to worker processes
ENV_VAR = "OVERUNLEARN_PLUGINS"
#: the entry-point group of installed plugins
ENTRY_POINT_GROUP = "overunlearn.plugins"

_LOADED: list[str] = []
_ENTRY_POINTS_DONE: dict[str, list[str]] = {}


def active_plugins() -> list[str]:
    """The plugin modules loaded in this process (in load order), or named by ``$OVERUNLEARN_PLUGINS``."""
    return list(dict.fromkeys([*_LOADED, *_env_names()]))


def _env_names() -> list[str]:
    return [n.strip() for n in os.environ.get(ENV_VAR, "").split(os.pathsep) if n.strip()]


def _record(name: str) -> None:
    if name not in _LOADED:
        _LOADED.append(name)
    names = _env_names()
    if name not in names:
        os.environ[ENV_VAR] = os.pathsep.join([*names, name])


def _import(name: str, what: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # like `python -m`, look in the working directory too (a console script does not put it on sys.path),
        # but only when the plugin itself, not something it imports, was not found
        top, cwd = name.split(".")[0], os.getcwd()
        in_cwd = os.path.exists(os.path.join(cwd, top)) or os.path.exists(os.path.join(cwd, top + ".py"))
        if exc.name not in (name, top) or cwd in sys.path or not in_cwd:
            raise PluginError(_message(name, exc, what)) from exc
        sys.path.append(cwd)
        try:
            importlib.import_module(name)
        except Exception as exc2:  # noqa: BLE001 - reported as one message
            raise PluginError(_message(name, exc2, what)) from exc2
    except Exception as exc:  # noqa: BLE001 - a plugin may fail in any way; report it as one message
        raise PluginError(_message(name, exc, what)) from exc
    except SystemExit as exc:  # (sys.exit() at import time would end the command without a word)
        raise PluginError(f"{what} {name!r} called sys.exit({exc.code!r}) while being imported") from None


def _message(name: str, exc: BaseException, what: str) -> str:
    """One line: a module not found asks about the path; an error raised by the module's own code names it
    and where it was raised."""
    if isinstance(exc, ModuleNotFoundError) and exc.name in (name, name.split(".")[0]):
        return f"cannot import {what} {name!r}: {exc}; is it on PYTHONPATH?"
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "importlib" not in f.filename and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if frames and not isinstance(exc, SyntaxError):  # (a SyntaxError's message names its file and line)
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return f"cannot import {what} {name!r}: importing it raised {type(exc).__name__}: {exc}{where}"


def load_plugins(names: Iterable[str], *, what: str = "plugin module", record: bool = True) -> list[str]:
    """Import each module of ``names`` (registering its methods and benchmarks) and, with ``record``, record
    it as active (:func:`active_plugins`, ``$OVERUNLEARN_PLUGINS``); return the names, in order, without
    repeats.

    Raises:
        PluginError: a module cannot be imported (not found, or it raised); the message names it.
    """
    done: list[str] = []
    for raw in names:
        name = str(raw).strip()
        if not name or name in done:
            continue
        _import(name, what)
        if record:
            _record(name)
        done.append(name)
    return done


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Import the module each installed entry point of ``group`` names (once per process); return the
    module names. An entry point ``name = "package.module"`` (or ``"package.module:anything"``) loads
    ``package.module``.

    Raises:
        PluginError: a module cannot be imported; the message names the entry point.
    """
    if group in _ENTRY_POINTS_DONE:
        return list(_ENTRY_POINTS_DONE[group])
    from importlib.metadata import entry_points

    modules: list[str] = []
    for ep in entry_points(group=group):
        module = ep.value.split(":", 1)[0].strip()
        if module and module not in modules:
            load_plugins([module], what=f"plugin module (entry point {ep.name!r} of group {group!r})")
            modules.append(module)
    _ENTRY_POINTS_DONE[group] = modules
    return list(modules)


def load_from_env() -> list[str]:
    """Import the modules ``$OVERUNLEARN_PLUGINS`` names (what a worker process calls at start)."""
    return load_plugins(_env_names())


def split_plugin_args(argv: Iterable[str], option: str = "--plugin") -> tuple[list[str], list[str]]:
    """``argv`` -> (the modules of every ``--plugin X`` / ``--plugin=X``, the other arguments).

    Arguments after a ``--`` are left alone.

    Raises:
        PluginError: a trailing ``--plugin`` without a module.
    """
    args = list(argv)
    names: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a == option:
            if i + 1 >= len(args):
                raise PluginError(f"{option} needs a module name after it (e.g. {option} mypackage.plugin)")
            names.append(args[i + 1])
            i += 2
            continue
        if a.startswith(option + "="):
            names.append(a[len(option) + 1:])
            i += 1
            continue
        rest.append(a)
        i += 1
    return names, rest


__all__ = ["ENV_VAR", "ENTRY_POINT_GROUP", "PluginError", "active_plugins", "load_plugins", "load_entry_points",
           "load_from_env", "split_plugin_args"]
