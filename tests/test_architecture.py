"""The import graph follows the layers of docs/architecture.md: imports point down, never up.

The graph is read from the source with ``ast`` (module-level and function-level imports alike, so a
deferred import cannot hide an upward dependency).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "overunlearn"

#: top-level parts of the package by layer; a part may import parts of lower layers only
LAYERS: list[set[str]] = [
    {"errors"},
    {"structure", "storage", "plugins"},
    {"problem", "models"},
    {"batching", "data", "initialisation", "linalg", "metrics", "theory"},
    {"methods", "workers"},
    {"training"},
    {"engine"},
    {"ensemble_unlearn"},
    {"benchmarks"},
    {"sweep"},
    {"report"},
    {"privacy"},
    {"cli", "integrations"},
    {"__init__"},
    {"__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}

#: parts that only read results: they must not import anything that trains or unlearns
NEVER_TRAIN = {"report", "metrics"}
TRAINING_MODULES = ("overunlearn.engine", "overunlearn.ensemble_unlearn", "overunlearn.training",
                    "overunlearn.workers", "overunlearn.privacy", "overunlearn.benchmarks", "overunlearn.sweep.run",
                    "overunlearn.sweep.worker", "overunlearn.sweep.executors")


def _part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_edges() -> dict[str, set[tuple[str, str, str]]]:
    """``{part: {(imported part, imported module, "file:line"), ...}}`` over every import in the package."""
    edges: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        source = _part(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                names = [f"{name}.{a.name}" for a in node.names] if name == "overunlearn" else [name]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("overunlearn.") and _part(name) != source:
                    edges[source].add((_part(name), name, f"{path.relative_to(SRC.parent)}:{node.lineno}"))
    return edges


EDGES = import_edges()


def test_every_part_has_a_layer():
    parts = {_part(_module_name(p)) for p in SRC.rglob("*.py")}
    assert parts - set(RANK) == set(), "add the new part to LAYERS here and to docs/architecture.md"


@pytest.mark.parametrize("source", sorted(EDGES))
def test_imports_point_down(source):
    upward = sorted((target, where) for target, _, where in EDGES[source]
                    if target in RANK and source in RANK and RANK[target] >= RANK[source])
    assert not upward, f"{source} imports upward or sideways: {upward}"


@pytest.mark.parametrize("source", sorted(NEVER_TRAIN))
def test_readers_never_train(source):
    bad = sorted((m, w) for _, m, w in EDGES.get(source, set()) if m.startswith(TRAINING_MODULES))
    assert not bad, f"{source} must only read results, but imports {bad}"


def test_no_cycles():
    graph = {s: {t for t, _, _ in ts} for s, ts in EDGES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_fingerprinted_sources_exist():
    """Caches are keyed by a hash of the sources that compute their numbers: every listed path must
    still name files (a renamed module would silently drop out of the hash)."""
    from overunlearn.sweep.journal import CODE_PATHS

    for pattern in CODE_PATHS:
        assert list(SRC.glob(pattern)), f"CODE_PATHS entry {pattern!r} matches no file"


def test_fingerprint_of_a_missing_source_fails_loudly():
    from overunlearn.privacy.runner import unlearning_fingerprint
    from overunlearn.storage import source_fingerprint

    assert len(unlearning_fingerprint()) == 12  # every path the privacy cache hashes exists
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        source_fingerprint(["no_such_module.py"])
