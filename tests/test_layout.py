"""The layout by where code runs: no import circle among Porten's modules (function-level imports
count), the node agent independent of the gateway, the planner pure, and no underscore-named
attribute of another project used anywhere (tests and benchmarks included)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("porten", "catalog", "fleet", "playground")
SCANNED = (*PACKAGES, "tests", "bench", "scripts")


def modules() -> dict[str, Path]:
    found = {}
    for top in SCANNED:
        for path in (ROOT / top).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, tree: ast.AST) -> set[str]:
    """Every module `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {}
    for name, path in found.items():
        if not name.startswith(PACKAGES):
            continue
        targets = imported(name, path, ast.parse(path.read_text()))
        graph[name] = {t for t in targets if t in found and t != name and t.startswith(PACKAGES)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_among_porten_modules():
    graph = project_graph()
    # A package's __init__ importing its own modules is how a package exposes them, not a circle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert cycles(graph) == []


def test_the_node_agent_imports_nothing_of_the_gateway_and_the_planner_nothing_of_django():
    graph = project_graph()
    agent = {name: targets for name, targets in graph.items() if name.startswith("fleet.agent")}
    assert agent, "the agent's modules were found"
    assert {(n, t) for n, targets in agent.items() for t in targets if t.startswith("fleet.gateway")} == set()
    for name, path in modules().items():
        if name.startswith("fleet.planner"):
            assert not {t for t in imported(name, path, ast.parse(path.read_text())) if t.startswith("django")}, name


def third_party_underscores() -> list[str]:
    """`from pkg import _x`, `pkg._x` or `pkg.mod._x` where pkg is not Porten's."""
    ours = set(SCANNED) | {"harness", "stub_engine", "byte_pipe"}  # bench/ modules import each other by file name
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                top = node.module.split(".")[0]
                for alias in node.names:
                    if top not in ours and alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {alias.name}")
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    module = aliases[base.id]
                    if module.split(".")[0] not in ours:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}...{node.attr}")
    return found


def test_no_underscore_named_attribute_of_another_project_is_used():
    assert third_party_underscores() == []


def underscore_names_defined_here() -> set[str]:
    defined = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.alias):
                defined.add(node.asname or node.name.split(".")[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
                defined.add(node.value)  # __slots__ entries
    return {name for name in defined if name.startswith("_")}


def test_every_underscore_attribute_read_anywhere_is_one_of_ours():
    """Whatever object it is read from: an underscore name Porten never defines is another project's."""
    ours = underscore_names_defined_here() | {"_meta"}  # Django documents Model._meta as public API
    foreign = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in ours:
                foreign.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert foreign == []
