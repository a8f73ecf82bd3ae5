"""The package's shape: no import cycles (module-level or inside functions), no imports of private
names across modules, no test helpers inside the package."""

from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "zeda_megatron")


def _modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py") and "remote_code" not in root:  # remote_code ships into exports on its own
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(name: str, path: str, modules: dict[str, str]):
    """(imported module, imported names) for every import in the file, at any depth."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            # "from pkg import module" imports a module
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            for s in subs:
                yield s, []
            yield base, [n for n in names if f"{base}.{n}" not in modules]


def _graph():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        deps = set()
        for mod, names in _imports(name, path, modules):
            if mod in modules and mod != name:
                deps.add(mod)
                private += [(name, mod, n) for n in names if n.startswith("_") and not n.startswith("__")]
        graph[name] = deps
    return graph, private


def _cycles(graph):
    # package __init__ re-exports are edges from a package to its own children: not a cycle of concerns
    state, stack, found = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if d.startswith(n + "."):
                continue
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return [c for c in found if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]


def test_no_import_cycles():
    graph, _ = _graph()
    assert "zeda_megatron.train" in graph and graph["zeda_megatron.train"], "the import graph was not read"
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_names_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_no_test_helpers_in_the_package():
    modules = _modules()
    assert not [m for m in modules if m.rpartition(".")[2] in ("testing", "fixtures", "conftest")
                or m.rpartition(".")[2].startswith("test_")]
