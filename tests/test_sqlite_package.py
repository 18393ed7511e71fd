"""The SQLite engine's package shape ("One house"), read from its imports with ast: no other
engine imported, nothing private passed between modules, no import cycle, small modules, and
a composition root that offers every method of the Backend and HistoryEngine protocols."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import diadb.backends.sqlite as package
from diadb.backends.base import Backend
from diadb.backends.sqlite import SqliteBackend
from diadb.history.manifest import HistoryEngine

ROOT = Path(package.__file__).parent
PREFIX = "diadb.backends.sqlite"
OTHER_ENGINES = ("diadb.backends.postgres", "diadb.backends.cassandra")


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(ROOT.glob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import``/``from ... import`` in ``tree``."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_no_other_engine_and_no_private_names_across_modules() -> None:
    for name, tree in _modules().items():
        for module, names in _imports(tree):
            assert not module.startswith(OTHER_ENGINES), (name, module)
            if module.startswith("diadb"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {module}"


def test_no_import_cycle() -> None:
    graph = {
        name: {m.removeprefix(PREFIX + ".") for m, _ in _imports(tree) if m.startswith(PREFIX + ".")}
        for name, tree in _modules().items()
    }
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, " -> ".join((*path, node))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*path, node))
        done.add(node)

    for node in graph:
        visit(node, ())


def test_modules_are_small() -> None:
    for path in ROOT.glob("*.py"):
        assert len(path.read_text().splitlines()) < 500, path.name


def test_backend_offers_both_protocols() -> None:
    wanted = {
        n
        for proto in (Backend, HistoryEngine)
        for n, v in vars(proto).items()
        if not n.startswith("_") and inspect.isfunction(v)
    }
    missing = sorted(n for n in wanted if not callable(getattr(SqliteBackend, n, None)))
    assert not missing
