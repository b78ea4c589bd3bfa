"""Methods by name: ``register_method``, ``list_methods``, ``create``, ``get_method``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from overunlearn.errors import UnknownMethodError
from overunlearn.methods.base import Method

M = TypeVar("M", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator registering a :class:`Method` under ``name`` (lower case)."""

    def deco(cls: M) -> M:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"a method named {key!r} is already registered ({_REGISTRY[key].__name__})")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def list_methods(pattern: str = "*", task: str | None = None) -> list[str]:
    """Registered method names matching a shell-style ``pattern``, optionally only those for ``task``."""
    names = sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern.lower()))
    if task is not None:
        names = [n for n in names if task in _REGISTRY[n].tasks]
    return names


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name lists the valid ones."""
    key = name.lower().replace("-", "_")
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
