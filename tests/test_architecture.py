"""Imports flow one way: app -> sphinx_model, storage; train -> sphinx_model; sphinx_model -> nothing of ours.

Inside sphinx_model (ARCHITECTURE.md): the model at the package's top imports none of the rooms
beside it; `loading` imports nothing from `released` or `serving`; `serving` nothing from
`released` or `loading`; and nowhere in the project does a chain of imports come back to where
it started. Imports inside functions count: a lazy import is still a dependency.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"sphinx_model", "train", "storage", "app"}
ALLOWED = {"sphinx_model": set(), "train": {"sphinx_model"}, "storage": {"sphinx_model"},
           "app": {"sphinx_model", "storage"}}
ROOMS = ("sphinx_model.loading", "sphinx_model.released", "sphinx_model.serving")
ENTRIES = {"sphinx_model", "sphinx_model.__main__"}   # the package's lazy API and the CLI use every room
LOADERS = {"from_pretrained", "load_model", "resolve_checkpoint", "read_weights"}   # take a name: released:NAME too


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in sorted(OURS) for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(module: str) -> list[tuple[str, set[str]]]:
    """(imported module, names taken from it) for every import statement in `module`, relative
    ones resolved; `from package import submodule` also counts as importing the submodule."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, set()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = {a.name for a in node.names}
            found.append((target, names))
            found += [(f"{target}.{n}", set()) for n in names if f"{target}.{n}" in MODULES]
    return found


GRAPH = {m: {t for t, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}


def inside(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_the_graph_sees_relative_and_lazy_imports():
    assert "sphinx_model.loading.checkpoint" in GRAPH["sphinx_model.released.hub"]       # from ..loading.checkpoint
    assert "sphinx_model.released.convert" in GRAPH["sphinx_model.released.hub"]         # inside a function
    assert "sphinx_model.released" in GRAPH["sphinx_model.__main__"]                     # from . import released


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_packages(path) - ALLOWED[package] - {package}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_storage_uses_only_the_torch_free_schema():
    for path in (ROOT / "storage").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sphinx_model"):
                assert node.module in {"sphinx_model.conversation", "sphinx_model.boxes", "sphinx_model.tiling",
                                       "sphinx_model.pixels", "sphinx_model.feedback_data"}, \
                    f"{path.name} imports {node.module}"


@pytest.mark.parametrize("room, forbidden", [
    ("sphinx_model.loading", ("sphinx_model.released", "sphinx_model.serving")),
    ("sphinx_model.serving", ("sphinx_model.released", "sphinx_model.loading")),
])
def test_rooms_depend_one_way(room, forbidden):
    for module, targets in GRAPH.items():
        if inside(module, room):
            bad = sorted(t for t in targets if any(inside(t, f) for f in forbidden))
            assert not bad, f"{module} imports {bad}"


def test_the_model_imports_none_of_the_rooms():
    model = [m for m in GRAPH if inside(m, "sphinx_model") and m not in ENTRIES
             and not any(inside(m, room) for room in ROOMS)]
    assert "sphinx_model.modeling" in model and "sphinx_model.processor" in model
    for module in model:
        bad = sorted(t for t in GRAPH[module] if any(inside(t, room) for room in ROOMS))
        assert not bad, f"{module} (the model) imports {bad}"


def test_whoever_loads_a_named_checkpoint_registers_released_names():
    """`released:NAME` reaches the loader through a resolver that importing sphinx_model.released
    registers: a module outside those two rooms that hands a name to the loader imports it too."""
    for module in MODULES:
        if not module.startswith(("sphinx_model", "app", "train")) or \
                any(inside(module, room) for room in ("sphinx_model.loading", "sphinx_model.released")):
            continue
        found = imports_of(module)
        loads = {n for t, names in found if inside(t, "sphinx_model.loading") for n in names} & LOADERS
        registers = any(t == "sphinx_model.released" for t, _ in found)
        assert registers or not loads, f"{module} calls {sorted(loads)} without importing sphinx_model.released"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_anywhere():
    assert cycles(GRAPH) == []
