"""The package's imports run one way: no cycles, and no module imports a higher floor.

Floors, lowest first: errors/io -> arrays -> data, models -> dictionary -> learners -> evaluation,
formats, interpret, intervene -> explore -> cli. Every import counts: function-local ones (a lazy import is still
a dependency) and those inside ``if TYPE_CHECKING:`` (an annotation-only cycle is still a cycle a reader
has to untangle). Also checked here: no module under ``learners/`` carries its package in a prefix, and
no code sets another object's private attributes (it calls a public method instead).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vitatlas

PACKAGE_DIR = Path(vitatlas.__file__).parent

FLOORS = {
    "errors": 0, "io": 0, "distributed": 0, "devices": 0, "arrays": 1, "data": 2, "models": 2, "dictionary": 3, "learners": 4,
    "evaluation": 5, "formats": 5, "interpret": 5, "intervene": 5, "explore": 6, "cli": 7, "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = ["vitatlas", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], source: str | None = None) -> set[str]:
    """The package modules ``path`` imports (resolving ``from . import x`` to submodule x when it is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
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
    assert "vitatlas.learners.sae.train" in graph["vitatlas.learners.sae.learner"]


def test_type_checking_and_local_imports_count():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..dictionary import Dictionary\n"
              "def f():\n    from .sae import learner\n")
    modules = {"vitatlas.dictionary", "vitatlas.learners.sae", "vitatlas.learners.sae.learner", "vitatlas.learners.probe"}
    found = imports_of(PACKAGE_DIR / "learners" / "probe.py", modules, source)
    assert found == {"vitatlas.dictionary", "vitatlas.learners.sae.learner"}


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


def test_learner_modules_carry_no_package_prefix():
    learners = PACKAGE_DIR / "learners"
    packages = {p.name for p in learners.iterdir() if (p / "__init__.py").exists()}
    assert {"sae", "dbksvd", "baselines"} <= packages
    stems = {p.name.removesuffix("s") for p in learners.iterdir() if (p / "__init__.py").exists()}
    prefixed = [str(p.relative_to(PACKAGE_DIR)) for p in learners.rglob("*.py")
                if any(p.stem.startswith(stem + "_") for stem in stems)]
    assert not prefixed, f"name these without their package prefix: {prefixed}"


def private_attribute_writes(tree: ast.AST) -> list[str]:
    """``obj._name = ...`` (or ``+=``) where obj is not self/cls: another object's private state."""
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if (isinstance(e, ast.Attribute) and e.attr.startswith("_") and not e.attr.startswith("__")
                        and not (isinstance(e.value, ast.Name) and e.value.id in ("self", "cls"))):
                    found.append(f"line {e.lineno}: {ast.unparse(e)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("_set_") and not (isinstance(node.func.value, ast.Name)
                                                                 and node.func.value.id in ("self", "cls"))):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}()")
    return found


def test_private_attribute_writes_are_found():
    tree = ast.parse("self._a = 1\nobj._b = 2\nx.y._c += 1\nsae._set_module(m)\nself._set_x(1)\nobj._setup()\nobj.__dict__ = {}\n")
    assert private_attribute_writes(tree) == ["line 2: obj._b", "line 3: x.y._c", "line 4: sae._set_module()"]


def test_nothing_sets_another_objects_private_attributes():
    root = PACKAGE_DIR.parents[1]
    offenders = []
    for folder in ("src", "benchmarks", "scripts"):
        for path in sorted((root / folder).rglob("*.py")):
            offenders += [f"{path.relative_to(root)} {w}" for w in private_attribute_writes(ast.parse(path.read_text()))]
    assert not offenders, "call a public method instead of setting private state: " + "; ".join(offenders)
