"""The layout of docs/ARCHITECTURE.md, kept true: no import cycles, short route handlers, and
measurements in docs/PERFORMANCE.md rather than in code comments. The layering itself (handlers
-> server -> db, independent domains, db without aiohttp) is import-linter's, in `make lint`."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import grimp

import handlers

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "handlers", "db")


def test_no_import_cycles() -> None:
    """Counting imports under TYPE_CHECKING and inside functions: a cycle is a cycle."""
    graph = grimp.build_graph(*PACKAGES)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                chain = graph.find_shortest_chain(importer=imported, imported=module)
                cycles.append(f"{module} -> {' -> '.join(chain or ())}")
    assert cycles == []


def test_route_handlers_are_short() -> None:
    """A handler reads its input, calls one service function and answers."""
    long = {}
    for route in handlers.routes:
        lines = len(inspect.getsource(route.handler).splitlines())
        if lines > 30:
            long[f"{route.method} {route.path}"] = lines
    assert long == {}


_DIARY = re.compile(r"#.*(instructions|callgrind|\d\s*(µs|us|ns)\b)", re.IGNORECASE)


def test_no_measurements_in_code_comments() -> None:
    """Figures go stale in a comment; docs/PERFORMANCE.md keeps them with how they were taken."""
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if _DIARY.search(line)
    ]
    assert found == []
