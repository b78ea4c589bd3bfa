"""Methods by name: ``register_method``, ``list_methods``, ``create``, ``get_method``."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from overunlearn.errors import UnknownMethodError
from overunlearn.methods.base import Method, MethodConfig

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` under ``name`` (lower case; ``-`` read as ``_``).

    The class's ``Config`` must be a frozen dataclass deriving from :class:`MethodConfig`. A name taken by
    another class is an error; the same class registered again (a module reloaded, a notebook cell run
    twice: same module and qualified name) replaces it."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_method takes the method's name, got {name!r}")

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a subclass of overunlearn.methods.Method, not {cls!r}")
        _check_config(name, cls)
        key = _key(name)
        old = _REGISTRY.get(key)
        if old is not None and old is not cls and _definition(old) != _definition(cls):
            raise ValueError(f"a method named {key!r} is already registered ({_definition(old)}); register "
                             f"{_definition(cls)} under another name")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _definition(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_config(name: str, cls: type[Method]) -> None:
    config = cls.Config
    where = f"method {name!r}: {cls.__name__}.Config"
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"{where} must be a dataclass deriving from overunlearn.methods.MethodConfig, got {config!r}")
    params = getattr(config, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{where} must be a frozen dataclass (@dataclass(frozen=True)): hyperparameters do not "
                        "change during a run")
    fields = {f.name for f in dataclasses.fields(config)}
    undeclared = [a for klass in config.__mro__ if klass is not object
                  for a, kind in vars(klass).get("__annotations__", {}).items()
                  if a not in fields and "ClassVar" not in str(kind)]
    if undeclared:
        raise TypeError(f"{where} annotates {undeclared} but they are not dataclass fields: decorate the class "
                        "with @dataclass(frozen=True)")


def list_methods(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered method names matching a shell-style ``pattern``, optionally only those for ``task``."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern.lower()))
    if task is not None:
        names = [n for n in names if task in _REGISTRY[n].tasks]
    return names


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name lists the valid ones."""
    key = _key(name)
    if key not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; valid names: {', '.join(list_methods())}")
    return _REGISTRY[key]


def create(name: str, **hyper: Any) -> Method:
    """Instantiate method ``name`` with hyperparameters ``hyper`` (validated by its config)."""
    cls = get_method(name)
    fields = set(cls.Config.__dataclass_fields__)
    unknown = set(hyper) - fields
    if unknown:
        raise ValueError(
            f"method {cls.name!r} has no hyperparameter(s) {sorted(unknown)}; its hyperparameters are {sorted(fields)}"
        )
    return cls(cls.Config(**hyper))
