"""The package's imports run one way: no cycles, and no module imports a higher floor.

Floors, lowest first: errors/io -> arrays -> data, models -> dictionary -> learners -> evaluation,
interpret, intervene -> explore -> cli. Imports inside ``if TYPE_CHECKING:`` are annotations only and
are skipped; function-local imports count (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vitatlas

PACKAGE_DIR = Path(vitatlas.__file__).parent

FLOORS = {
    "errors": 0, "io": 0, "distributed": 0, "devices": 0, "arrays": 1, "data": 2, "models": 2, "dictionary": 3, "learners": 4,
    "evaluation": 5, "interpret": 5, "intervene": 5, "explore": 6, "cli": 7, "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = ["vitatlas", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_skipping_type_checking(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for c in child.orelse for n in [c, *_walk_skipping_type_checking(c)])
            continue
        yield child
        yield from _walk_skipping_type_checking(child)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (resolving ``from . import x`` to submodule x when it is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in _walk_skipping_type_checking(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vitatlas"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vitatlas"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(me)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "vitatlas.arrays" in graph["vitatlas.dictionary"]
    assert "vitatlas.data.store" in graph["vitatlas.data.batches"]
    assert "vitatlas.learners.sae_train" in graph["vitatlas.learners.sae"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_go_down_the_floors():
    upward = []
    for module, targets in import_graph().items():
        mine = floor(module)
        if mine is None:
            continue  # the package root re-exports the public API from every floor
        for target in targets:
            theirs = floor(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that climb a floor: " + ", ".join(upward)


def test_every_subpackage_has_a_floor():
    top = {p.name for p in PACKAGE_DIR.iterdir() if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    top = {t.removesuffix(".py") for t in top} - {"__init__"}
    assert top <= set(FLOORS), f"give these modules a floor in FLOORS: {sorted(top - set(FLOORS))}"
