"""The rooms of DESIGN.md, checked on the import graph of the package (parsed with `ast`, nothing imported).

Every `import` counts, at module level and inside functions; imports under `if TYPE_CHECKING:` do not (they are
types, not code). A failure lists every offending edge as `importer -> imported (line)`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = "atlaspatch_stream"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# The pure core: what stages may import besides anyio and the standard library.
CORE = {f"{PACKAGE}.{name}" for name in ("items", "protocols", "errors", "config", "geometry", "batching", "buffers", "formats")}
# What backends may not import (they are reached from these rooms through protocols only).
ABOVE_BACKENDS = ("daemon", "outputs", "run", "api", "pipeline", "cli", "assembly", "sync", "distributed")


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target` at `line`."""

    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping the bodies of `if TYPE_CHECKING:` (their `else` still runs)."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for node in child.orelse:
                yield node
                yield from _runtime_nodes(node)
            continue
        yield child
        yield from _runtime_nodes(child)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names of what one import statement imports (submodules named in `from x import y` included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _resolve(module, path.name == "__init__.py", node)
    submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in _modules()]
    return submodules or [base]


@cache
def edges() -> tuple[Edge, ...]:
    """Every runtime import of every module of the package."""
    found = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in _runtime_nodes(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [Edge(module, t, node.lineno) for t in _targets(module, path, node)]
    return tuple(found)


def _own(target: str) -> str | None:
    """The package module `target` lives in (the longest existing prefix), or None for a third-party name."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in _modules():
            return name
    return None


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(room: str, allowed: Callable[[str], bool]) -> list[str]:
    return [str(e) for e in edges() if _room(e.source) == room and not allowed(e.target)]


def _stage_may_import(target: str) -> bool:
    own = _own(target)
    if own is None:
        top = target.split(".")[0]
        return top == "anyio" or top in sys.stdlib_module_names
    return own in CORE or _room(own) == "stages"


def test_stages_import_only_anyio_and_the_core() -> None:
    """stages/ import the standard library, anyio, other stages and the core (items, protocols, errors, ...)."""
    bad = _violations("stages", _stage_may_import)
    assert not bad, "stages import outside anyio and the core:\n" + "\n".join(bad)


def test_backends_import_nothing_above_them() -> None:
    """backends/ reach outputs, the daemon and the run layer only through protocols."""
    bad = _violations("backends", lambda t: _own(t) is None or _room(_own(t) or "") not in ABOVE_BACKENDS)
    assert not bad, "backends import a room above them:\n" + "\n".join(bad)


def test_sources_and_daemon_import_no_backend() -> None:
    """Job sources and the daemon reach backends only through protocols (pure tables live in `formats`)."""
    bad = [s for room in ("sources", "daemon") for s in _violations(room, lambda t: _room(_own(t) or "") != "backends")]
    assert not bad, "sources/daemon import a backend:\n" + "\n".join(bad)


def test_outputs_import_no_backend_and_qc_only_slides_and_contours() -> None:
    """Everything under `<out>` (the overlay and QC images too) is written by outputs/, which imports no backend; qc/
    reaches two backends, lazily: a slide's own thumbnail (`slides`) and the tissue contours of a card (`contours`)."""
    bad = _violations("outputs", lambda t: _room(_own(t) or "") != "backends")
    qc_may = {f"{PACKAGE}.backends.slides", f"{PACKAGE}.backends.contours"}
    bad += _violations("qc", lambda t: _room(_own(t) or "") != "backends" or _own(t) in qc_may)
    assert not bad, "outputs/qc import a backend they may not:\n" + "\n".join(bad)


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}, self-imports and package-of-self imports left out."""
    graph: dict[str, dict[str, int]] = {m: {} for m in _modules()}
    for edge in edges():
        target = _own(edge.target)
        if target is not None and target != edge.source and not edge.source.startswith(target + "."):
            graph[edge.source].setdefault(target, edge.line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """No two package modules import each other, directly or round a loop, not even inside functions."""
    graph = _graph()
    report = []
    for component in _cycles(graph):
        inside = set(component)
        report += [f"{s} -> {t} (line {graph[s][t]})" for s in component for t in graph[s] if t in inside]
        report.append("")
    assert not report, "import cycles (edges inside each cycle):\n" + "\n".join(report)


def test_the_checker_sees_function_level_imports() -> None:
    """The graph holds imports made inside functions (a lazy import is still a dependency)."""
    lazy = [e for e in edges() if e.source == f"{PACKAGE}.assembly" and e.target.endswith("segment_otsu")]
    assert lazy, "the function-level import of segment_otsu in assembly was not seen"


# The seam between the run, the stages and the rooms below: typed without `Any` (DESIGN: "protocols.py, no Any").
SEAM = ("items", "protocols", "pipeline", "run")


def _in_seam(module: str) -> bool:
    return module.removeprefix(f"{PACKAGE}.") in SEAM or _room(module) == "stages"


def _spelled(node: ast.expr) -> str | None:
    """The name a `Name` or `Attribute` node spells (`Any` for `typing.Any`), else None."""
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def test_the_seam_names_no_any() -> None:
    """items, protocols, stages/, pipeline and run spell out their types: no `typing.Any` anywhere in them."""
    bad: list[tuple[str, int]] = []
    for module, path in _modules().items():
        if not _in_seam(module):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.expr) and _spelled(node) == "Any":
                bad.append((module, node.lineno))
    assert not bad, "`Any` in the typed seam:\n" + "\n".join(f"{m} line {n}" for m, n in sorted(set(bad)))
