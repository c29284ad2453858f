"""The package's shape: the import graph of tracker/ and projections/ has no cycle,
no module imports another inside a function (the usual way to hide a cycle), and
the fold (projections/) does no I/O."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tracker", "projections")
IO_MODULES = {"redis", "socket", "asyncio", "subprocess", "os", "threading"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported first-party module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t:
                found.append((t, id(node) in top or _in_type_checking(tree, node)))
    return found


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
               and node in list(ast.walk(n)) for n in tree.body)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    nested = []
    for name, path in mods.items():
        for target, at_top in _imports(name, path, known):
            if target != name:
                graph[name].add(target)
            if not at_top:
                nested.append(f"{name} imports {target} inside a function")
    return graph, nested


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            # a package's __init__ importing its own submodules is how packages work
            if m == n.rpartition(".")[0] and n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    assert _cycle(graph) == []


def test_no_module_imports_another_inside_a_function():
    _, nested = _graph()
    assert nested == []


def test_the_fold_does_no_io():
    for path in (ROOT / "projections").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in IO_MODULES, f"{path.name} imports {n}"
    for lua in (ROOT / "projections").glob("*.lua"):
        code = re.sub(r"--[^\n]*", "", lua.read_text())  # comments may name it
        assert "redis." not in code, f"{lua.name} talks to Redis"


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
