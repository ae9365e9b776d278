"""Import hygiene of the ``spa`` package: cycles between modules, imports hidden inside functions,
and every module importable on its own.

    python tools/check_imports.py            # static checks only (a second)
    python tools/check_imports.py --alone    # also import each module in a fresh interpreter

Module-level imports (``TYPE_CHECKING`` blocks excepted: annotations only) form a graph; a cycle in
it is printed, and so is every import of a spa module inside a function, the usual way a cycle
is hidden. Exits 1 when a cycle is found or a module fails to import alone.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = module.split(".") if is_package else module.split(".")[:-1]
        parent = parent[: len(parent) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    # "from spa.verify import fidelity" imports the submodule spa.verify.fidelity
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def imports(path: Path, modules: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """Module-level spa imports (outside TYPE_CHECKING), and (line, module) of those inside functions."""
    module, tree = module_name(path), ast.parse(path.read_text())
    top, hidden = set(), []

    def visit(node, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = [t for t in _target(child, module, path.name == "__init__.py") if t in modules]
                if in_function:
                    hidden.extend((child.lineno, t) for t in found)
                elif not type_only:
                    top.update(found)
                continue
            checking = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or function, type_only or checking)

    visit(tree, False, False)
    top.discard(module)
    return top, hidden


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alone", action="store_true", help="import every module in a fresh interpreter")
    args = parser.parse_args()
    paths = sorted((ROOT / "spa").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph, failed = {}, 0
    for path in paths:
        graph[module_name(path)], hidden = imports(path, modules)
        for line, target in hidden:
            print(f"inside a function: {path.relative_to(ROOT)}:{line} imports {target}")
    # a package's __init__ runs before any of its modules: edges into a package are edges to it
    for found in cycles({m: {t for t in targets if t != m.rpartition(".")[0]} for m, targets in graph.items()}):
        print("cycle:", " <-> ".join(found))
        failed = 1
    if args.alone:
        for module in sorted(modules):
            command = [sys.executable, "-c", f"import {module}"]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if result.returncode:
                print(f"{module} does not import alone: {result.stderr.strip().splitlines()[-1]}")
                failed = 1
    print(f"{len(modules)} modules, {sum(len(t) for t in graph.values())} module-level imports checked")
    return failed


if __name__ == "__main__":
    sys.exit(main())
