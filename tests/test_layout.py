"""The package layout stays true: a module imports only from its own layer or a lower one, pure
math imports no I/O, and no module imports itself back through a circle (lazy imports inside
functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jestcurate"

# Lowest first. errors and ui are shared by every layer above math, so they sit just above it.
LAYERS = {
    "jestcurate": 0,  # the package root: __version__ only
    "jestcurate.errors": 0,
    "jestcurate.math": 1,
    "jestcurate.ui": 2,
    "jestcurate.io": 3,
    "jestcurate.model": 4,
    "jestcurate.scale": 5,
    "jestcurate.trainer": 6,
    "jestcurate.loader": 6,  # stable import paths for trainers, re-exporting jestcurate.trainer
    "jestcurate.online": 6,
    "jestcurate.openclip_train": 6,  # `python -m jestcurate.openclip_train`: the launcher
    "jestcurate.pipelines": 7,
    "jestcurate.cli": 8,
    "jestcurate.__main__": 9,
}
# Libraries that do I/O or load models: pure math must not reach for them.
IO_MODULES = {
    "os",
    "io",
    "pathlib",
    "shutil",
    "tarfile",
    "json",
    "pyarrow",
    "PIL",
    "fsspec",
    "webdataset",
    "open_clip",
    "faiss",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module this file imports (at the top or inside a function), as dotted names:
    package modules resolved to the module itself, others to their top-level name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {name if name.startswith("jestcurate") else name.split(".", 1)[0] for name in found}


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


GRAPH = {name: imports(path, set(modules())) for name, path in modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        assert any(name == k or name.startswith(k + ".") for k in LAYERS), name


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_upward_imports(name: str) -> None:
    upward = [
        other
        for other in GRAPH[name]
        if other.startswith("jestcurate") and other != "jestcurate" and layer(other) > layer(name)
    ]
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


def test_pure_math_imports_no_io() -> None:
    for name, found in GRAPH.items():
        if name.startswith("jestcurate.math"):
            package = {m for m in found if m.startswith("jestcurate")}
            assert package <= {"jestcurate.errors"} | {m for m in GRAPH if "math" in m}, name
            assert not found & IO_MODULES, f"{name} imports {found & IO_MODULES}"


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """A circle in the import graph (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_no_import_circles() -> None:
    edges = {n: {m for m in deps if m in GRAPH and m != n} for n, deps in GRAPH.items()}
    circle = find_circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above would fail on a bad tree (so their passing means something)."""
    low = tmp_path / "low.py"
    low.write_text("def f():\n    from jestcurate.pipelines import select\n")
    assert "jestcurate.pipelines.select" in imports(low, {"jestcurate.pipelines.select"})
    assert layer("jestcurate.pipelines.select") > layer("jestcurate.io.store")
    assert layer("jestcurate.math.jest") < layer("jestcurate.io.store")
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_trainer_import_paths_stay() -> None:
    from jestcurate.loader import SelectionBatches
    from jestcurate.online import OnlineSelector, SuperBatches
    from jestcurate.trainer import loader, online

    assert SelectionBatches is loader.SelectionBatches
    assert SuperBatches is online.SuperBatches and OnlineSelector is online.OnlineSelector
