"""The package is layered: each folder imports only the layers below it, and no module imports in a circle.

The rule each folder's __init__ docstring states is checked here from the source (ast), imports inside
functions included. `rmt_deploy` itself (the lazy public names, __version__) may be imported by anyone.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmt_deploy"
BELOW = {  # folder -> the folders it may import (besides itself)
    "errors": set(),
    "artifacts": {"errors"},
    "basemodel": {"artifacts", "errors"},
    "runtime": {"artifacts", "errors"},  # + basemodel in the torch backend alone (TORCH_BACKEND)
    "export": {"basemodel", "artifacts", "errors"},
    "training": {"runtime", "basemodel", "artifacts", "errors"},
    "tools": {"runtime", "artifacts", "errors"},
    "bench": {"runtime", "artifacts", "errors"},
    "serving": {"runtime", "export", "artifacts", "errors"},
    "demo": {"training", "export", "runtime", "bench", "basemodel", "artifacts", "errors"},
    "cli": {"demo", "bench", "tools", "serving", "training", "export", "runtime", "basemodel", "artifacts",
            "errors"},
}
TORCH_BACKEND = "runtime/backends/torch.py"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update([node.module] if node.module != "rmt_deploy" else
                         [f"rmt_deploy.{a.name}" for a in node.names])
    return {n.split(".")[1] for n in names if n.startswith("rmt_deploy.")} - {"__version__"}


def test_the_root_holds_only_the_public_face():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "errors.py"]
    assert set(BELOW) == {_layer(p) for p in _modules()}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downward(path):
    layer = _layer(path)
    allowed = BELOW[layer] | {layer}
    if path.relative_to(PACKAGE).as_posix() == TORCH_BACKEND:
        allowed = allowed | {"basemodel"}
    wrong = _imported_layers(path) - allowed
    assert not wrong, f"{path.relative_to(PACKAGE)} ({layer}) imports {sorted(wrong)}: a layer above or beside it"


def _imports(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(module-level imports, imports inside functions) of one module, as dotted names."""
    top, lazy = set(), set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = set()
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = {child.module} | {f"{child.module}.{a.name}" for a in child.names}
            elif isinstance(child, ast.Import):
                names = {a.name for a in child.names}
            (lazy if inner else top).update(names)
            visit(child, inner)

    visit(tree, False)
    return top, lazy


def test_no_module_imports_itself_through_others():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = _imports(ast.parse(path.read_text(encoding="utf-8")))
    # a package handing on its own submodules' names from inside a function (lazily) is not a circle
    edges = {m: {t for t in top | lazy if t in graph and t != m and not (t in lazy - top and t.startswith(m + "."))}
             for m, (top, lazy) in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = [m for m in edges if reaches(m, m, set())]
    assert not cycles, f"modules in an import circle: {cycles}"
