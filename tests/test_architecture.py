"""The shape of the package: no import cycle anywhere in ``trio_portfolio/``.

Rules of this suite: the code is read, never imported - every ``.py`` under
``trio_portfolio/`` is parsed with :mod:`ast` and every ``import`` /
``from ... import`` statement counts, wherever it is (module level, inside a
function, under ``if TYPE_CHECKING:``), because a lazy import inside a
function hides a cycle rather than removing it.  Relative imports are
resolved against the importing module.  ``from package import name`` is an
edge to ``package.name`` when that is a module, else to ``package``.  The
implicit import of a parent package (importing ``a.b`` runs ``a/__init__``)
is not an edge: every package would otherwise be a cycle with its own
submodules.

The walker itself is tested on a throw-away package, so the tree test can
fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "trio_portfolio"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a directory under ``root``) by dotted name."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_names(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool
) -> Iterator[str]:
    """Dotted names an import statement may refer to, most specific first per target."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    for alias in node.names:
        yield f"{source}.{alias.name}"
        yield source


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports anywhere in its source."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            candidates = list(_imported_names(node, name, is_package))
            if isinstance(node, ast.Import):
                # ``import a.b.c`` loads a.b.c: the longest prefix that is ours.
                targets = []
                for dotted in candidates:
                    parts = dotted.split(".")
                    for end in range(len(parts), 0, -1):
                        prefix = ".".join(parts[:end])
                        if prefix in modules:
                            targets.append(prefix)
                            break
            else:
                # Pairs (source.alias, source): the submodule if it exists, else the source.
                targets = []
                for submodule, source in zip(candidates[::2], candidates[1::2], strict=True):
                    if submodule in modules:
                        targets.append(submodule)
                    elif source in modules:
                        targets.append(source)
            graph[name].update(t for t in targets if t != name)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _describe(graph: Mapping[str, set[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return "cycle among " + ", ".join(component) + ": " + "; ".join(edges)


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph(ROOT, PACKAGE)
    assert f"{PACKAGE}.store" in graph, "the walker found no store package: wrong root?"
    assert f"{PACKAGE}.store.base" in graph[f"{PACKAGE}.store"]
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe(graph, c) for c in cycles)


def test_the_walker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    """The pattern the store used to have: a package and its submodule, one import lazy."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text(
        "from pkg.sub.base import Base\n"
        "\n"
        "def open_():\n"
        "    from .impl import Impl\n"
        "    return Impl\n"
    )
    (pkg / "sub" / "base.py").write_text("class Base: ...\n")
    (pkg / "sub" / "impl.py").write_text("from pkg.sub import Base\n\nclass Impl(Base): ...\n")
    (pkg / "leaf.py").write_text("import pkg.sub.base\nfrom . import sub\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.leaf": {"pkg.sub.base", "pkg.sub"},
        "pkg.sub": {"pkg.sub.base", "pkg.sub.impl"},
        "pkg.sub.base": set(),
        "pkg.sub.impl": {"pkg.sub"},
    }
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.impl"]]


def test_relative_imports_resolve_against_the_importing_module(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from . import m\n")
    (pkg / "a" / "m.py").write_text("from ..x import thing\nfrom .. import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.a.m"}
    assert graph["pkg.a.m"] == {"pkg.x", "pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.a.m"]]


ADAPTER_MODULES = frozenset(
    {"trio_portfolio.redis_wire", "trio_portfolio.redis_mux", "trio_portfolio.redis_io"}
)
"""The Trio Redis adapter: the only modules that may use redis-py's internals."""

REDIS_INTERNALS = ("redis.exceptions", "redis._parsers")


def redis_internal_imports(root: Path, package: str) -> dict[str, set[str]]:
    """For each module, which of redis-py's exception or parser modules it imports."""
    found: dict[str, set[str]] = {}
    for module, path in module_files(root, package).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            hits = {n for n in names if n.startswith(REDIS_INTERNALS)}
            if hits:
                found.setdefault(module, set()).update(hits)
    return found


def test_only_the_adapter_imports_redis_py_exceptions_or_parsers() -> None:
    offenders = {
        module: sorted(names)
        for module, names in redis_internal_imports(ROOT, PACKAGE).items()
        if module not in ADAPTER_MODULES and not module.startswith(f"{PACKAGE}.testing")
    }
    assert offenders == {}, f"redis-py internals imported outside the adapter: {offenders}"


def test_the_internal_import_check_sees_an_offender(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "store.py").write_text(
        "def f():\n    from redis.exceptions import ConnectionError\n    return ConnectionError\n"
    )
    assert redis_internal_imports(tmp_path, "pkg") == {
        "pkg.store": {"redis.exceptions", "redis.exceptions.ConnectionError"}
    }
