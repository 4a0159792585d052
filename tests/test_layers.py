"""The package's layers import only downwards, and no modules import each other in a circle.

gpudiff is layered (``docs/guide/algorithm_map.md``, ``docs/api/index.rst``); a module may
import its own layer and the layers below it, never one above:

====  ======================================================================================
rank  packages
====  ======================================================================================
0     ``gpudiff.errors``: the exception hierarchy; imports nothing of gpudiff
      ``gpudiff.configfield``: config-field metadata and validation (imports only errors)
1     ``gpudiff.backend``: the array backends and the CUDA kernels (the only CuPy importer)
2     ``gpudiff.image``: the data model, FITS input and output, the inputs beside an image
3     ``gpudiff.ops``: array algorithms
4     ``gpudiff.psfmatch``: the PSF-matching engine
5     ``gpudiff.tasks``: LSST's tasks
6     the top: ``gpudiff`` itself (its ``__init__`` re-exports the layers below),
      ``gpudiff.cli``/``gpudiff.__main__``, ``gpudiff.commands``, ``gpudiff.batch`` (Dask runs
      of the commands' file functions) and ``gpudiff.sim`` (the simulator, used by the demo,
      the tests and the benches; nothing of the library depends on it)
====  ======================================================================================

Every ``import`` statement of every module is read with :mod:`ast`, the lazy ones inside
functions included (a lazy import that climbs a layer is still a dependency, only a later
one).  The layer order is checked on all of them; the cycle check on the module-level
imports, which run when a module is first imported and so could leave one module half
initialised when another needs it.  Between the top layer's packages no import
circle is allowed even through lazy imports: ``batch`` runs the file functions of
``gpudiff.commands.subtract``/``match_psf``/``coadd``, so the ``gpudiff batch`` command
lives in the batch package (``gpudiff.batch.command``) and ``gpudiff.commands`` never
imports ``gpudiff.batch``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpudiff"

#: Rank of each top-level part of the package ("" is ``gpudiff/__init__.py`` itself).
LAYERS = {
    "errors": 0,
    "configfield": 0,
    "backend": 1,
    "image": 2,
    "ops": 3,
    "psfmatch": 4,
    "tasks": 5,
    "": 6,
    "__main__": 6,
    "cli": 6,
    "commands": 6,
    "batch": 6,
    "sim": 6,
}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package's ``__init__``) of every module of gpudiff."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The gpudiff modules an import statement of ``module`` names.

    ``from X import y`` names module ``X.y`` when that is a module, else ``X`` (``y`` is an
    attribute of it); relative imports are resolved against ``module``'s package.
    """
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "gpudiff"]
    if node.level:
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "gpudiff":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


@functools.lru_cache(maxsize=None)
def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported gpudiff module, line, lazy) for every import statement of ``module``.

    Lazy: inside a function (or lambda), or under ``if TYPE_CHECKING:``; everything else,
    class bodies and ``try`` blocks included, runs when the module is imported.
    """
    path, is_pkg = MODULES[module]
    found = []

    def walk(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                child_lazy = True
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, is_pkg, child):
                    if target != module:
                        found.append((target, child.lineno, child_lazy))
            walk(child, child_lazy)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _violations(edges) -> list[str]:
    """Imports (importer, imported, where) that climb the layers."""
    bad = []
    for importer, imported, where in edges:
        a, b = LAYERS[_layer(importer)], LAYERS[_layer(imported)]
        if b > a:
            bad.append(f"{where}: {importer} (rank {a}) imports {imported} (rank {b})")
    return bad


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module → modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state:
                cycle = visit(w)
                if cycle:
                    return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            cycle = visit(v)
            if cycle:
                return cycle
    return None


def _all_edges():
    for module in MODULES:
        for target, line, lazy in _imports(module):
            yield module, target, line, lazy


def test_every_module_sits_in_a_layer():
    unplaced = sorted(m for m in MODULES if _layer(m) not in LAYERS)
    assert not unplaced, f"place these in LAYERS (and in the docs' layer table): {unplaced}"


def test_the_import_reader_sees_module_level_and_lazy_imports():
    # Known imports of the tree, so that the checks below cannot pass on an empty graph.
    edges = {(a, b, lazy) for a, b, _, lazy in _all_edges()}
    assert ("gpudiff.ops.warp", "gpudiff.ops.resample", False) in edges
    assert ("gpudiff.backend", "gpudiff.backend.launchers", False) in edges  # from . import x
    assert ("gpudiff.batch.task", "gpudiff.commands.subtract", True) in edges
    assert len(edges) > 300


def test_imports_only_go_down_the_layers():
    edges = [
        (a, b, f"{MODULES[a][0].relative_to(PACKAGE.parent)}:{line}")
        for a, b, line, _ in _all_edges()
    ]
    bad = _violations(edges)
    assert not bad, "imports that climb the layers:\n" + "\n".join(bad)


def test_no_import_cycles_at_module_level():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, lazy in _all_edges():
        if not lazy:
            graph[a].add(b)
    cycle = _find_cycle(graph)
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle)


def test_no_import_circles_between_packages():
    """Package level (``gpudiff.X``), lazy imports included: no two packages of the tree
    import each other, directly or round a longer circle (within a package, lazy imports
    may go both ways)."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in _all_edges():
        pa, pb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        graph.setdefault(pa, set())
        graph.setdefault(pb, set())
        if pa != pb:
            graph[pa].add(pb)
    cycle = _find_cycle(graph)
    assert cycle is None, "package-level import circle: " + " -> ".join(cycle)
    assert "gpudiff.batch" not in graph["gpudiff.commands"]


def test_only_the_backend_imports_cupy():
    bad = []
    for module, (path, _) in MODULES.items():
        if _layer(module) == "backend":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("cupy", "cupyx") for n in names):
                bad.append(f"{module}:{node.lineno}")
    assert not bad, f"CuPy imported outside gpudiff.backend: {bad}"


def test_the_checks_catch_a_climb_and_a_circle():
    # The same functions on planted graphs: a violation and a circle must be reported.
    assert _violations([("gpudiff.image.psf", "gpudiff.tasks.subtract", "x.py:1")])
    assert not _violations([("gpudiff.tasks.subtract", "gpudiff.image.psf", "x.py:1")])
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
