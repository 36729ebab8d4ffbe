"""The import graph of the package's modules, built with ``ast`` (nothing is imported).

``python -m coreselect.devtools.imports`` prints one line per module with the package
modules it imports (at module level or inside functions: a lazy import still couples two
modules), then the cycles (none expected: tests/test_import_graph.py checks it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "coreselect"
ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module ``name`` refers to (``a.b.func`` -> ``a.b``), if any."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: package modules it imports}`` (a package's ``__init__`` is the package name)."""
    files = {module_name(p): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    out: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for n in names:
                if n.split(".")[0] != PACKAGE:
                    continue
                target = _resolve(n, modules)
                # ``from pkg import sub`` names the submodule; ``import pkg.sub`` runs pkg/__init__ too
                if target and target != mod and not mod.startswith(target + "."):
                    deps.add(target)
        out[mod] = deps
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    g = graph()
    for mod in sorted(g):
        short = sorted(d.removeprefix(PACKAGE + ".") for d in g[mod])
        print(f"{mod.removeprefix(PACKAGE + '.') or PACKAGE}: {', '.join(short) or '-'}")
    cyc = cycles(g)
    users = sorted(m for m, d in g.items() if f"{PACKAGE}.api" in d)
    print(
        f"\n{len(g)} modules, {sum(len(d) for d in g.values())} edges, {len(cyc)} cycle(s); "
        f"modules importing {PACKAGE}.api: {', '.join(users) or 'none'}"
    )
    for c in cyc:
        print("cycle: " + " <-> ".join(c))
    return 1 if cyc else 0


if __name__ == "__main__":
    sys.exit(main())
