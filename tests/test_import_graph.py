"""The import graph of qmp_server and blocklayer has no cycles (issue 9 §3).

Every import counts: module level, inside functions, and under ``TYPE_CHECKING``. A
function-local import still ties two modules together; it only hides the cycle from the
interpreter. Run as a script to print the graph's cycles:
``python3 tests/test_import_graph.py``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qmp_server", "blocklayer")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of our packages."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that ``module`` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # ``from . import datapath`` imports the submodule, not the package's
                # other imports; ``from .x import name`` imports module x.
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield submodule
                elif base in known:
                    yield base


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    known = modules(root)
    return {name: {target for target in _imported(name, path, known) if target != name}
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
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


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_blocklayer_knows_nothing_of_qmp_server() -> None:
    # The block layer sits below the QMP side; it must not reach up into it.
    graph = import_graph()
    upward = {name: sorted(t for t in targets if t.startswith("qmp_server"))
              for name, targets in graph.items() if name.startswith("blocklayer")}
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_the_check_sees_a_cycle(tmp_path: Path) -> None:
    # The checker itself: a planted two-module cycle through a function-local import.
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "qmp_server" / "a.py").write_text("from . import b\n")
    (tmp_path / "qmp_server" / "b.py").write_text("def f():\n    from .a import x\n")
    assert cycles(import_graph(tmp_path)) == [["qmp_server.a", "qmp_server.b"]]


if __name__ == "__main__":
    found = cycles(import_graph())
    for component in found:
        print(" <-> ".join(component))
    sys.exit(1 if found else 0)
